"""GET /status and ``clipal status`` against a real clipal.

One request walks a codex configuration through every state a provider can
be in - deactivated (401), cooling (429 with Retry-After), circuit open (a
503 with failure_threshold 1), two of three keys left (the first key's 401),
available, disabled - and /status must say each as the document describes,
with no key, token or query string anywhere in it. ``clipal status`` then
reads the same clipal from its config directory, and says in one line why
it cannot when there is nothing to read: nothing listening, something else
listening, a port that never answers, a client with nothing available.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
import yaml

from conftest import ClipalProcess, free_port, provider, write_config, write_yaml
from fakeupstream import FakeUpstream, Reply

TOKEN = "status-test-token-0123456789"
KEYS = {
    "dead": "sk-status-dead-0123456789abcdef",
    "cool": "sk-status-cool-0123456789abcdef",
    "flaky": "sk-status-flaky-0123456789abcdef",
    "good": "sk-status-good-0123456789abcdef",
    "off": "sk-status-off-0123456789abcdef",
    "pinned": "AIza-status-pinned-0123456789abcdef",
}
MULTI_KEYS = ["sk-status-multi-1-0123456789", "sk-status-multi-2-0123456789", "sk-status-multi-3-0123456789"]
QUERY_SECRET = "qs-status-secret-value-424242"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def clipal_on_its_port(tmp_path: Path) -> Iterator[Callable[..., ClipalProcess]]:
    """A clipal whose port is in config.yaml (``clipal status`` reads it there), stopped at the end."""
    started: list[ClipalProcess] = []

    def start(config_dir: Path | None = None, *, settings: dict | None = None, **clients: list[dict]) -> ClipalProcess:
        port = free_port()
        directory = config_dir or tmp_path / f"config{len(started)}"
        if config_dir is None:
            write_config(directory, settings={"port": port, **(settings or {})}, **clients)
        else:  # a directory the test wrote: only the port is added
            document = yaml.safe_load((directory / "config.yaml").read_text()) or {}
            write_yaml(directory / "config.yaml", {**document, "port": port})
        proc = ClipalProcess(directory, port=port)
        started.append(proc)
        return proc.wait_healthy()

    yield start
    for proc in started:
        proc.stop()


def clipal_status(config_dir: Path, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipal", "status", "--config-dir", str(config_dir), *args],
                          capture_output=True, text=True, timeout=timeout)


def without_key(entry: dict) -> dict:
    return {name: value for name, value in entry.items() if name != "api_key"}


def every_state_config(tmp_path: Path, up: FakeUpstream) -> Path:
    """codex: one provider in each state after one request; gemini: manual mode; claudecode: no file."""
    up.key_defaults.update({
        KEYS["dead"]: Reply.openai_error(401),
        KEYS["cool"]: Reply.openai_error(429, retry_after=30),
        KEYS["flaky"]: Reply.openai_error(503),
        MULTI_KEYS[0]: Reply.openai_error(401),
        KEYS["pinned"]: Reply.gemini_error(503),
    })
    config_dir = tmp_path / "every-state"
    write_config(config_dir, settings={"access_tokens": [TOKEN], "circuit_breaker": {"failure_threshold": 1}},
                 codex=[
                     provider("dead", up, key=KEYS["dead"], priority=1),
                     provider("cool", up, key=KEYS["cool"], priority=2),
                     provider("flaky", up, key=KEYS["flaky"], priority=3),
                     {**without_key(provider("multi", up, priority=4)), "api_keys": MULTI_KEYS},
                     provider("good", up, key=KEYS["good"], priority=5),
                     provider("off", up, key=KEYS["off"], priority=6, enabled=False),
                 ])
    write_yaml(config_dir / "gemini.yaml", {"mode": "manual", "pinned_provider": "pinned",
                                            "providers": [provider("pinned", up, key=KEYS["pinned"])]})
    return config_dir


def by_name(client: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in client["providers"]}


def get_status(proxy: ClipalProcess, **kwargs: Any) -> requests.Response:
    return requests.get(proxy.url + "/status", timeout=5, **kwargs)


def test_status_shows_every_provider_state_and_no_secret(tmp_path, upstream_factory, clipal_on_its_port):
    up = upstream_factory("up")
    proxy = clipal_on_its_port(every_state_config(tmp_path, up))
    auth = {"Authorization": f"Bearer {TOKEN}"}

    # One request walks dead (401), cool (429), flaky (503), multi's first key (401), and multi's second answers.
    answer = requests.post(proxy.url + f"/codex/v1/chat/completions?trace={QUERY_SECRET}", json=CHAT,
                           headers=auth, timeout=10)
    assert answer.status_code == 200 and answer.headers["X-Clipal-Provider"] == "multi"
    assert [r.api_key for r in up.requests] == [KEYS["dead"], KEYS["cool"], KEYS["flaky"], *MULTI_KEYS[:2]]
    # Manual mode returns the pinned provider's 503 as is; the token rides in ?key= this time.
    pinned = requests.post(proxy.url + f"/gemini/v1beta/models/m:generateContent?key={TOKEN}",
                           json={"contents": []}, timeout=10)
    assert pinned.status_code == 503

    response = get_status(proxy, headers=auth)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    document = response.json()
    assert set(document) == {"version", "uptime_s", "config_dir", "listen", "state", "clients"}
    assert document["version"] == __import__("clipal").__version__
    assert 0 <= document["uptime_s"] < 60
    assert document["config_dir"] == str(proxy.config_dir)
    assert document["listen"] == f"127.0.0.1:{proxy.port}"
    assert document["state"] == {"backend": "memory"}
    assert list(document["clients"]) == ["claudecode", "codex", "gemini"]
    assert document["clients"]["claudecode"] == {"file": "claude-code.yaml", "mode": "auto", "current": None,
                                                 "providers": []}

    codex = document["clients"]["codex"]
    assert (codex["file"], codex["mode"], codex["current"]) == ("codex.yaml", "auto", "multi")
    assert [p["name"] for p in codex["providers"]] == ["dead", "cool", "flaky", "multi", "good", "off"]
    providers = by_name(codex)
    for entry in providers.values():
        assert set(entry) == {"name", "priority", "enabled", "state", "reason", "retry_in_s", "keys", "breaker",
                              "requests", "failures"}

    dead = providers["dead"]
    assert (dead["state"], dead["reason"], dead["breaker"]) == ("deactivated", "auth", "closed")
    assert 3590 < dead["retry_in_s"] <= 3600  # reactivate_after: 1h
    assert dead["keys"] == {"total": 1, "available": 0}
    assert (dead["requests"], dead["failures"], dead["priority"], dead["enabled"]) == (1, 1, 1, True)

    cool = providers["cool"]
    assert (cool["state"], cool["reason"], cool["breaker"]) == ("cooling", "rate_limit", "closed")
    assert 20 < cool["retry_in_s"] <= 30
    assert cool["keys"] == {"total": 1, "available": 0}
    assert (cool["requests"], cool["failures"]) == (1, 1)

    flaky = providers["flaky"]
    assert (flaky["state"], flaky["reason"], flaky["breaker"]) == ("circuit_open", "circuit_open", "open")
    assert 50 < flaky["retry_in_s"] <= 60  # open_timeout: 60s
    assert flaky["keys"] == {"total": 1, "available": 1}
    assert (flaky["requests"], flaky["failures"]) == (1, 1)

    multi = providers["multi"]
    assert (multi["state"], multi["reason"], multi["retry_in_s"], multi["breaker"]) == ("available", None, None,
                                                                                        "closed")
    assert multi["keys"] == {"total": 3, "available": 2}
    assert (multi["requests"], multi["failures"]) == (2, 1)

    good = providers["good"]
    assert (good["state"], good["keys"], good["requests"], good["failures"]) == \
        ("available", {"total": 1, "available": 1}, 0, 0)

    off = providers["off"]
    assert (off["enabled"], off["state"], off["reason"], off["retry_in_s"]) == (False, "deactivated", "disabled",
                                                                               None)
    assert off["keys"] == {"total": 1, "available": 0} and (off["requests"], off["failures"]) == (0, 0)

    gemini = document["clients"]["gemini"]
    assert (gemini["mode"], gemini["current"]) == ("manual", "pinned")
    (pinned_view,) = gemini["providers"]
    # A 503 in manual mode is the pinned provider's answer, returned as is: no failure, no breaker.
    assert (pinned_view["state"], pinned_view["breaker"], pinned_view["requests"], pinned_view["failures"]) == \
        ("available", "closed", 1, 0)

    text = response.text
    for secret in [*KEYS.values(), *MULTI_KEYS, TOKEN, QUERY_SECRET, "trace="]:
        assert secret not in text, f"{secret!r} is in /status"


def test_status_and_metrics_take_the_access_rule(tmp_path, upstream_factory, clipal_on_its_port):
    up = upstream_factory("up")
    with_tokens = clipal_on_its_port(settings={"access_tokens": [TOKEN]}, codex=[provider("A", up)])
    for path in ("/status", "/metrics"):
        url = with_tokens.url + path
        assert requests.get(url, timeout=5).status_code == 401
        wrong = {"Authorization": "Bearer wrong-token-0123456789"}
        assert requests.get(url, headers=wrong, timeout=5).status_code == 401
        for carrier in ({"headers": {"Authorization": f"Bearer {TOKEN}"}}, {"headers": {"x-api-key": TOKEN}},
                        {"headers": {"x-goog-api-key": TOKEN}}, {"params": {"key": TOKEN}}):
            assert requests.get(url, timeout=5, **carrier).status_code == 200, (path, carrier)
        refused = requests.get(url, timeout=5)
        assert refused.json()["error"]["message"].startswith("clipal needs one of its access_tokens")
        assert TOKEN not in refused.text

    without = clipal_on_its_port(codex=[provider("A", up)])
    for path in ("/status", "/metrics"):
        url = without.url + path
        assert requests.get(url, timeout=5).status_code == 200  # loopback, loopback Host
        assert requests.get(url, headers={"Host": "rebind.example"}, timeout=5).status_code == 403
        assert requests.get(url, headers={"Origin": "https://evil.example"}, timeout=5).status_code == 403
    assert up.requests == []


def test_an_open_breaker_past_its_timeout_reads_half_open(upstream_factory, clipal_on_its_port):
    up = upstream_factory("up")
    up.default = Reply.openai_error(503)
    b = upstream_factory("B")
    proxy = clipal_on_its_port(settings={"circuit_breaker": {"failure_threshold": 1, "open_timeout": "1s"}},
                               codex=[provider("A", up), provider("B", b, priority=2)])
    assert requests.post(proxy.url + "/codex/v1/chat/completions", json=CHAT, timeout=10).status_code == 200
    assert by_name(get_status(proxy).json()["clients"]["codex"])["A"]["breaker"] == "open"
    time.sleep(1.2)
    a = by_name(get_status(proxy).json()["clients"]["codex"])["A"]
    assert (a["state"], a["breaker"], a["reason"], a["retry_in_s"]) == ("half_open", "half_open",
                                                                        "circuit_half_open", None)


# --------------------------------------------------------------------------- clipal status


def test_clipal_status_prints_the_table_and_json_equals_status(tmp_path, upstream_factory, clipal_on_its_port):
    up = upstream_factory("up")
    proxy = clipal_on_its_port(every_state_config(tmp_path, up))
    requests.post(proxy.url + "/codex/v1/chat/completions", json=CHAT, headers={"x-api-key": TOKEN}, timeout=10)

    result = clipal_status(proxy.config_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"clipal {__import__('clipal').__version__} on 127.0.0.1:{proxy.port}, up ")
    assert "state in memory" in lines[0]
    assert "claudecode (claude-code.yaml): no providers" in lines
    assert "codex (codex.yaml): current multi" in lines
    assert "gemini (gemini.yaml, manual): current pinned" in lines
    rows = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert "deactivated, 1h left: auth" in rows["dead"] and rows["dead"].endswith("keys 0 of 1")
    assert "cooling, " in rows["cool"] and "s left: rate_limit" in rows["cool"]
    assert "circuit open, " in rows["flaky"] and "(degraded: tried last)" in rows["flaky"]
    assert rows["flaky"].endswith("keys 1 of 1")
    assert rows["multi"].split()[1] == "available" and rows["multi"].endswith("keys 2 of 3")
    assert rows["good"].endswith("keys 1 of 1")
    assert rows["off"].split()[1:] == ["disabled"]
    for secret in [*KEYS.values(), *MULTI_KEYS, TOKEN]:
        assert secret not in result.stdout

    as_json = clipal_status(proxy.config_dir, "--json")
    assert as_json.returncode == 0, as_json.stderr
    printed = json.loads(as_json.stdout)
    served = get_status(proxy, headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert abs(printed.pop("uptime_s") - served.pop("uptime_s")) < 5

    def countdowns(document: dict) -> list[float | None]:
        # retry_in_s counts down between the two reads: taken out, compared within a few seconds.
        found = []
        for client in document["clients"].values():
            for entry in client["providers"]:
                found.append(entry.pop("retry_in_s"))
        return found
    for mine, theirs in zip(countdowns(printed), countdowns(served), strict=True):
        assert (mine is None) == (theirs is None) and (mine is None or abs(mine - theirs) < 5)
    assert printed == served


def test_clipal_status_exits_1_when_a_client_has_nothing_available(upstream_factory, clipal_on_its_port):
    up = upstream_factory("up")
    up.default = Reply.openai_error(401)
    b = upstream_factory("B")
    b.default = Reply.openai_error(429, retry_after=30)
    gemini = upstream_factory("G")
    proxy = clipal_on_its_port(codex=[provider("A", up), provider("B", b, priority=2)],
                               gemini=[provider("G", gemini)])
    before = clipal_status(proxy.config_dir)
    assert before.returncode == 0, before.stderr
    assert requests.post(proxy.url + "/codex/v1/chat/completions", json=CHAT, timeout=10).status_code == 429

    result = clipal_status(proxy.config_dir)
    assert result.returncode == 1
    assert "codex (codex.yaml): current " in result.stdout  # the table is still printed
    assert result.stderr.splitlines() == [
        "clipal status: nothing available for codex: every provider is deactivated or cooling"]


def test_clipal_status_exit_0_with_only_an_open_circuit_left(upstream_factory, clipal_on_its_port):
    up = upstream_factory("up")
    up.default = Reply.openai_error(503)
    proxy = clipal_on_its_port(settings={"circuit_breaker": {"failure_threshold": 1}}, codex=[provider("A", up)])
    requests.post(proxy.url + "/codex/v1/chat/completions", json=CHAT, timeout=10)
    result = clipal_status(proxy.config_dir)
    assert result.returncode == 0, result.stderr
    assert "circuit open" in result.stdout and "degraded" in result.stdout


def test_clipal_status_when_clipal_is_not_running(tmp_path):
    port = free_port()
    write_config(tmp_path / "config", settings={"port": port})
    result = clipal_status(tmp_path / "config")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"clipal status: clipal is not running: nothing listens on 127.0.0.1:{port} (connection refused)"]


def test_clipal_status_when_something_else_holds_the_port(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        write_config(tmp_path / "config", settings={"port": port, "listen_addr": "0.0.0.0"})
        result = clipal_status(tmp_path / "config")
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"clipal status: something else is listening on 127.0.0.1:{port}: it answered 404 to /status, "
        "not clipal's status document"]


class _RefusingHandler(http.server.BaseHTTPRequestHandler):
    """Answers as clipal does to a request without its access token."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = json.dumps({"error": {"message": "clipal needs one of its access_tokens as the API key",
                                     "type": "access_denied"}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base signature
        pass


def test_clipal_status_says_when_clipal_refuses_it(tmp_path):
    """A token missing from (or wrong in) config.yaml: the refusal is clipal's, not a stranger's."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        write_config(tmp_path / "config", settings={"port": port})
        result = clipal_status(tmp_path / "config")
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"clipal status: clipal on 127.0.0.1:{port} refused the request (401): "
                                          "clipal needs one of its access_tokens as the API key"]


def test_clipal_status_gives_up_on_a_silent_port_within_its_timeout(tmp_path):
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:  # listens, never accepts or answers
        port = silent.getsockname()[1]
        write_config(tmp_path / "config", settings={"port": port})
        started = time.monotonic()
        result = clipal_status(tmp_path / "config", "--timeout", "1")
        took = time.monotonic() - started
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"clipal status: no answer from 127.0.0.1:{port} within 1s (timeout)"]
    assert took < 4, took  # 1 s of waiting plus starting Python


def test_clipal_status_imports_no_server(tmp_path):
    """It must answer at once: gevent, Flask, werkzeug and requests stay unimported."""
    write_config(tmp_path / "config", settings={"port": free_port()})
    probe = ("import sys; from clipal.cli import main; code = main(['status', '--config-dir', sys.argv[1]]); "
             "print([m for m in ('gevent', 'flask', 'werkzeug', 'requests', 'prometheus_client') "
             "if m in sys.modules], code)")
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "config")], capture_output=True,
                            text=True, timeout=20)
    assert result.stdout.strip() == "[] 1", result.stdout + result.stderr
