"""Logs, end to end (SPEC §6 and §2's permission warning; issue 4 acceptance 3 and 4).

A real clipal writes its real log file under ``log_dir``; the tests read that
file and the process's own output (stdout and stderr together).
"""

from __future__ import annotations

import re
import secrets
import time
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests

from conftest import ClipalProcess, free_port, provider, write_config, write_yaml
from fakeupstream import Reply, anthropic_error_body, gemini_error_body, openai_error_body

#: SPEC §6 line format.
LINE = re.compile(r"^\[(DEBUG|INFO|WARN|ERROR)\]\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (\[(claudecode|codex|gemini)\] )?.+$")
#: Anything that starts like a log line.
LOG_LINE_START = re.compile(r"^\[(DEBUG|INFO|WARN|ERROR)\]", re.MULTILINE)
#: The level tags, padded to one width (SPEC §6: "[INFO]  2024-...").
TAGS = {"DEBUG": "[DEBUG] ", "INFO": "[INFO]  ", "WARN": "[WARN]  ", "ERROR": "[ERROR] "}

#: A far-from-UTC zone (POSIX TZ syntax, no tzdata needed): local time and UTC differ by 14 h,
#: so a file name or timestamp in UTC cannot pass for local.
FAR_TZ = "CLP-14"
FAR_OFFSET = timezone(timedelta(hours=14))

CLAUDE = ("/claudecode/v1/messages", {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
CODEX = ("/codex/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
GEMINI = ("/gemini/v1beta/models/m:generateContent", {"contents": [{"parts": [{"text": "hi"}]}]})


def post(proxy: ClipalProcess, route: tuple[str, dict], **kwargs) -> requests.Response:
    path, body = route
    return requests.post(proxy.url + path, json=body, timeout=10, **kwargs)


def stopped_output(proxy: ClipalProcess) -> str:
    """Everything clipal printed, read after it stopped (its output file is closed then)."""
    assert proxy.proc.poll() is not None
    return proxy.output_path.read_text(errors="replace")


def log_files(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("clipal-*.log"))


def wait_for_file_text(path: Path, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        assert time.monotonic() < deadline, f"{text!r} not in {path} within {timeout}s:\n{content}"
        time.sleep(0.05)


# --- acceptance 3: file name, line format, levels ------------------------------------------


def _traffic_setup(upstream_factory):
    """Providers that make every level speak: success, failover, deactivation, all failed."""
    ok = upstream_factory("OK")
    denied = upstream_factory("D")
    denied.default = Reply.anthropic_error(401)
    flaky = upstream_factory("F")
    flaky.default = Reply.anthropic_error(503, type="api_error")
    broken = upstream_factory("E")
    broken.default = Reply.gemini_error(500)
    return dict(
        codex=[provider("A", ok)],
        claudecode=[provider("D", denied), provider("F", flaky), provider("B", ok)],
        gemini=[provider("E", broken)],
    )


def _drive_traffic(proxy: ClipalProcess) -> None:
    assert post(proxy, CODEX).headers["X-Clipal-Provider"] == "A"  # completion (info)
    # D: 401 -> deactivated (error); F: 503 -> failover (warn); B answers.
    assert post(proxy, CLAUDE).headers["X-Clipal-Provider"] == "B"
    assert post(proxy, GEMINI).status_code == 503  # all providers failed (error)
    time.sleep(0.6)  # reactivate_after is 0.5s
    assert post(proxy, CLAUDE).status_code == 200  # D reactivated (info) first


#: Lines each level must show, as (level, client or None, text); each is also absent below its level.
_EXPECTED_LINES = [
    ("DEBUG", "codex", "request received: POST /v1/chat/completions"),
    ("DEBUG", "claudecode", "attempt via F: POST "),
    ("INFO", None, "codex.yaml: 1 provider(s) loaded: A"),
    ("INFO", None, "listening on http://"),
    ("INFO", "codex", "request completed via A (200"),
    ("INFO", "claudecode", "provider D reactivated"),
    ("WARN", "claudecode", "provider F failed: server error (503)"),
    ("ERROR", "claudecode", "provider D deactivated for "),
    ("ERROR", "gemini", "all providers failed; answering 503"),
]
_ORDER = ["DEBUG", "INFO", "WARN", "ERROR"]


@pytest.mark.parametrize("level", ["debug", "info", "warn", "error"])
def test_log_file_name_line_format_and_level_filtering(clipal, upstream_factory, level):
    proxy = clipal(settings={"log_level": level, "reactivate_after": "500ms"}, env={"TZ": FAR_TZ},
                   **_traffic_setup(upstream_factory))
    started = datetime.now(FAR_OFFSET)
    _drive_traffic(proxy)
    finished = datetime.now(FAR_OFFSET)
    assert proxy.stop() == 0
    log_dir = proxy.config_dir / "logs"

    # One file, named after the local (TZ) date.
    names = [p.name for p in log_files(log_dir)]
    assert names in ([f"clipal-{started:%Y-%m-%d}.log"], [f"clipal-{finished:%Y-%m-%d}.log"])
    lines = (log_dir / names[0]).read_text().splitlines()
    assert lines

    threshold = _ORDER.index(level.upper())
    for line in lines:
        assert LINE.match(line), f"not in SPEC §6 format: {line!r}"
        tag = LINE.match(line).group(1)
        assert line.startswith(TAGS[tag]), f"level tag not padded to 8 columns: {line!r}"
        assert _ORDER.index(tag) >= threshold, f"{tag} line at log_level {level}: {line!r}"
        stamp = datetime.strptime(line[8:27], "%Y-%m-%d %H:%M:%S").replace(tzinfo=FAR_OFFSET)
        assert started - timedelta(seconds=2) <= stamp <= finished + timedelta(seconds=2), line

    for expected_level, client, text in _EXPECTED_LINES:
        tag = f"[{client}] " if client else ""
        found = [line for line in lines if text in line]
        if _ORDER.index(expected_level) >= threshold:
            assert found, f"no {expected_level} line with {text!r} at {level}:\n" + "\n".join(lines)
            assert all(line.startswith(TAGS[expected_level]) and f"{line[28:]}".startswith(tag) for line in found), found
        else:
            assert not found, f"{expected_level} line {text!r} printed at {level}"

    # log_stdout defaults to true: stdout carries the same lines.
    printed = [line for line in stopped_output(proxy).splitlines() if LOG_LINE_START.match(line)]
    assert printed == lines


def test_log_stdout_false_prints_nothing_but_the_file_gets_every_line(clipal, upstream_factory):
    a = upstream_factory("A")
    proxy = clipal(codex=[provider("A", a)], settings={"log_level": "debug", "log_stdout": False})
    assert post(proxy, CODEX).status_code == 200
    assert post(proxy, GEMINI).status_code == 503  # no gemini providers
    log_file = proxy.config_dir / "logs" / f"clipal-{date.today():%Y-%m-%d}.log"
    wait_for_file_text(log_file, "request completed via A")
    assert proxy.stop() == 0

    assert not LOG_LINE_START.search(stopped_output(proxy))
    assert stopped_output(proxy).strip() == ""
    text = log_file.read_text()
    for needle in ("[DEBUG]", "request received", "request completed via A", "listening on", "stopped"):
        assert needle in text


def test_log_stdout_switched_off_by_reload(clipal, upstream_factory):
    a = upstream_factory("A")
    proxy = clipal(codex=[provider("A", a)])
    settings = {"log_dir": str(proxy.config_dir / "logs"), "log_stdout": False}
    write_yaml(proxy.config_dir / "config.yaml", settings)
    log_file = proxy.config_dir / "logs" / f"clipal-{date.today():%Y-%m-%d}.log"
    wait_for_file_text(log_file, "log_stdout = False")
    printed = proxy.output()
    assert post(proxy, CODEX).status_code == 200
    wait_for_file_text(log_file, "request completed via A")
    assert proxy.output() == printed


# --- acceptance 3: retention ------------------------------------------------------------------


def _old_and_recent_files(log_dir: Path) -> tuple[list[str], list[str]]:
    today = date.today()
    old = ["clipal-2020-01-01.log", f"clipal-{today - timedelta(days=8):%Y-%m-%d}.log",
           f"clipal-{today - timedelta(days=30):%Y-%m-%d}.log"]
    kept = [f"clipal-{today - timedelta(days=1):%Y-%m-%d}.log", f"clipal-{today - timedelta(days=6):%Y-%m-%d}.log",
            # not clipal's daily logs: never touched, whatever their age
            "notes.txt", "clipal-2020-01-01.log.gz", "other-2020-01-01.log", "clipal-old.log"]
    log_dir.mkdir(parents=True)
    for name in old + kept:
        (log_dir / name).write_text(f"{name}\n")
    return old, kept


def test_retention_at_start_deletes_old_logs_and_keeps_recent_and_unrelated(clipal, tmp_path):
    config_dir = tmp_path / "config"
    old, kept = _old_and_recent_files(config_dir / "logs")
    write_yaml(config_dir / "config.yaml", {"log_dir": str(config_dir / "logs"), "log_retention_days": 7})
    proxy = clipal(config_dir=config_dir)
    present = {p.name for p in (config_dir / "logs").iterdir()}
    assert not present & set(old)
    assert set(kept) <= present
    assert f"clipal-{date.today():%Y-%m-%d}.log" in present
    assert requests.get(proxy.url + "/health", timeout=2).status_code == 200


def test_retention_zero_keeps_everything_and_a_reload_applies_a_new_retention(clipal, tmp_path):
    config_dir = tmp_path / "config"
    old, kept = _old_and_recent_files(config_dir / "logs")
    settings = {"log_dir": str(config_dir / "logs"), "log_retention_days": 0}
    write_yaml(config_dir / "config.yaml", settings)
    proxy = clipal(config_dir=config_dir)
    present = {p.name for p in (config_dir / "logs").iterdir()}
    assert set(old) | set(kept) <= present

    write_yaml(config_dir / "config.yaml", {**settings, "log_retention_days": 7})
    deadline = time.monotonic() + 3
    while {p.name for p in (config_dir / "logs").iterdir()} & set(old):
        assert time.monotonic() < deadline, "retention change not applied by the reload"
        time.sleep(0.05)
    assert set(kept) <= {p.name for p in (config_dir / "logs").iterdir()}


# --- SPEC §2: config files readable by others ------------------------------------------------


def test_config_file_readable_by_others_is_warned_about_once(clipal, upstream_factory, tmp_path):
    a = upstream_factory("A")
    config_dir = tmp_path / "config"
    write_config(config_dir, codex=[provider("A", a)], claudecode=[provider("A", a)])
    (config_dir / "codex.yaml").chmod(0o644)  # the others (config.yaml, claude-code.yaml) are 0600
    proxy = clipal(config_dir=config_dir)
    log_file = config_dir / "logs" / f"clipal-{date.today():%Y-%m-%d}.log"

    def warnings(text: str) -> list[str]:
        return [line for line in text.splitlines() if "readable by other users" in line]

    found = warnings(proxy.output())
    assert len(found) == 1, found
    assert found[0].startswith("[WARN]") and str(config_dir / "codex.yaml") in found[0]
    assert "0644" in found[0] and "chmod 600" in found[0]

    # Reloads (an edit of the same file, keeping its mode) do not repeat it.
    codex = config_dir / "codex.yaml"
    codex.write_text(codex.read_text() + "\n# edited\n")
    assert codex.stat().st_mode & 0o777 == 0o644
    proxy.wait_for_output("configuration reloaded", timeout=3)
    (config_dir / "claude-code.yaml").write_text((config_dir / "claude-code.yaml").read_text() + "\n")
    deadline = time.monotonic() + 3
    while proxy.output().count("configuration reloaded") < 2:
        assert time.monotonic() < deadline, proxy.output()
        time.sleep(0.05)
    assert len(warnings(proxy.output())) == 1
    assert len(warnings(log_file.read_text())) == 1


# --- acceptance 4: no key, ever -----------------------------------------------------------------


def _key(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(24).replace("-", "x").replace("_", "y")


def test_no_provider_or_client_key_reaches_stdout_or_the_log_file(clipal, upstream_factory):
    keys = {
        # provider keys: some with a recognisable shape, some opaque (only exact matching finds those)
        "claude_401": _key("sk-ant-api03-"), "claude_403": _key("opaque"), "claude_429": _key("sk-"),
        "claude_ok": _key("prov"),
        "codex_401": _key("sk-proj-"), "codex_429": _key("opaque"), "codex_403": _key("plain"),
        "codex_ok": _key("prov"),
        "gemini_dead": _key("opaque"), "gemini_401": _key("opaque"), "gemini_429": _key("g"),
        "gemini_ok": _key("prov"),
        # client keys, as the three agents send them
        "client_claude": _key("sk-ant-oat01-"), "client_claude_bearer": _key("client"),
        "client_codex": _key("client"), "client_gemini_header": _key("client"), "client_gemini_query": _key("client"),
    }
    client_keys = " ".join(v for k, v in keys.items() if k.startswith("client"))

    def up(name: str, reply: Reply):
        upstream = upstream_factory(name)
        upstream.default = reply
        return upstream

    c401 = up("c401", Reply.anthropic_error(401, f"invalid x-api-key: {keys['claude_401']}"))
    c403 = up("c403", Reply.anthropic_error(403, f"key {keys['claude_403']} may not use this model"))
    c429 = up("c429", Reply.json(429, anthropic_error_body(
        "rate_limit_error", f"too many requests for {keys['claude_429']} (client keys seen: {client_keys})")))
    cok = up("cok", Reply.answer())
    x401 = up("x401", Reply.openai_error(401, f"Incorrect API key provided: {keys['codex_401']}.",
                                         code="invalid_api_key"))
    x429 = up("x429", Reply.json(429, openai_error_body(f"You exceeded your current quota for {keys['codex_429']}",
                                                         "insufficient_quota", "insufficient_quota"), gzip=True))
    x403 = up("x403", Reply.openai_error(403, f"key={keys['codex_403']} Authorization: Bearer {keys['codex_403']}"))
    xok = up("xok", Reply.answer())
    g401 = up("g401", Reply.gemini_error(401, f"API key not valid: {keys['gemini_401']}"))
    g429 = up("g429", Reply.json(429, gemini_error_body(429, f"Quota exceeded for key {keys['gemini_429']} "
                                                             f"and {client_keys}")))
    gok = up("gok", Reply.answer())
    dead = f"http://127.0.0.1:{free_port()}/dead"  # nothing listens: connection refused

    proxy = clipal(
        settings={"log_level": "debug", "reactivate_after": "1h"},
        claudecode=[provider("c401", c401, keys["claude_401"]), provider("c403", c403, keys["claude_403"]),
                    provider("c429", c429, keys["claude_429"]), provider("cok", cok, keys["claude_ok"])],
        codex=[provider("x401", x401, keys["codex_401"]), provider("x429", x429, keys["codex_429"]),
               provider("x403", x403, keys["codex_403"]), provider("xok", xok, keys["codex_ok"])],
        gemini=[provider("gdead", dead, keys["gemini_dead"], auth_header="query"),
                provider("g401", g401, keys["gemini_401"], auth_header="query"),
                provider("g429", g429, keys["gemini_429"]), provider("gok", gok, keys["gemini_ok"],
                                                                     auth_header="query")],
    )

    # Each client walks all its failing providers, then succeeds on the last one.
    r = post(proxy, CLAUDE, headers={"x-api-key": keys["client_claude"]})
    assert r.headers["X-Clipal-Provider"] == "cok"
    r = post(proxy, CODEX, headers={"Authorization": f"Bearer {keys['client_codex']}"})
    assert r.headers["X-Clipal-Provider"] == "xok"
    r = post(proxy, GEMINI, headers={"x-goog-api-key": keys["client_gemini_header"]})
    assert r.headers["X-Clipal-Provider"] == "gok"
    assert gok.requests[-1].query["key"] == keys["gemini_ok"]  # the query carrier was used
    # The last providers now fail too, echoing keys, with the other client key forms.
    cok.default = Reply.anthropic_error(500, f"internal error for {keys['claude_ok']} / {client_keys}")
    xok.default = Reply.openai_error(401, f"Incorrect API key provided: {keys['codex_ok']}", code="invalid_api_key")
    gok.default = Reply.gemini_error(403, f"Permission denied for {keys['gemini_ok']}")
    assert post(proxy, CLAUDE, headers={"Authorization": f"Bearer {keys['client_claude_bearer']}"}).status_code == 503
    assert post(proxy, CODEX, headers={"Authorization": f"Bearer {keys['client_codex']}"}).status_code == 503
    path, body = GEMINI
    r = requests.post(f"{proxy.url}{path}?key={keys['client_gemini_query']}", json=body, timeout=10)
    assert r.status_code == 503
    # Streams too: the upstream error arrives as the first SSE event.
    cok.default = Reply.sse([("error", anthropic_error_body("authentication_error", f"bad key {keys['claude_ok']}"))])
    stream = post(proxy, (CLAUDE[0], {**CLAUDE[1], "stream": True}), headers={"x-api-key": keys["client_claude"]})
    assert stream.status_code in (429, 503)
    assert cok.requests[-1].json()["stream"] is True

    out = proxy.output()
    assert "deactivated" in out and "connection failed" in out and "all providers failed" in out
    assert proxy.stop() == 0
    texts = {"clipal output": stopped_output(proxy)}
    texts.update({p.name: p.read_text() for p in log_files(proxy.config_dir / "logs")})
    assert len(texts) == 2

    for where, text in texts.items():
        for name, key in keys.items():
            assert key not in text, f"{name} key in {where}"
            # Nothing longer than the 4-character prefix a mask may show, in any spelling.
            for i in range(len(key) - 7):
                window = key[i:i + 8]
                assert window not in text, f"{name} key fragment {window!r} in {where}"
