"""Tests for clipal.logs: line format, levels, daily files, retention, redaction."""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import time
from datetime import date, datetime, timedelta
from pathlib import Path

import pytest

from clipal import logs, redact

ANTHROPIC_KEY = "sk-ant-api03-" + "Zx9" * 30 + "-AbCdEfGh"
OPENROUTER_KEY = "sk-or-v1-" + "0123456789abcdef" * 4
GOOGLE_KEY = "AIzaSyD" + "q7Lm2Xn4Pb6Rt8Vw0Yz1Ac3Ed5Gf7Hj9K"[:32]
# A provider key with no recognisable shape: only exact matching can catch it.
PLAIN_PROVIDER_KEY = "plainkey0123456789ABCDEFopaque"
CLIENT_KEY = "client-credential-7f3a9c2e5b1d4068"


def _ts(*args: int) -> float:
    """A local wall-clock time as a timestamp, as the handler sees record.created."""
    return datetime(*args).timestamp()


def _record(msg: str, created: float, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"msg": msg, "levelno": level, "levelname": logging.getLevelName(level), **extra})
    record.created = created
    return record


@pytest.fixture(autouse=True)
def isolated_logging(monkeypatch):
    """Give each test fresh secrets and warnings; restore the clipal logger after."""
    redactor = redact.Redactor()
    monkeypatch.setattr(redact, "REDACTOR", redactor)
    monkeypatch.setattr(logs, "REDACTOR", redactor)
    monkeypatch.setattr(logs._formatter, "_redactor", redactor)
    monkeypatch.setattr(logs, "_warned_paths", set())
    logger = logging.getLogger(logs.LOGGER_NAME)
    handlers, level = list(logger.handlers), logger.level
    yield
    for handler in logger.handlers:
        if handler not in handlers:
            handler.close()
    logger.handlers = handlers
    logger.setLevel(level)


def _configure(tmp_path: Path, **overrides: object) -> Path:
    log_dir = tmp_path / "logs"
    options = dict(level="debug", log_dir=log_dir, retention_days=7, to_stdout=True, secrets=())
    options.update(overrides)
    logs.configure_logging(**options)  # type: ignore[arg-type]
    return Path(options["log_dir"])  # type: ignore[arg-type]


def _file_text(log_dir: Path) -> str:
    return "".join(p.read_text(encoding="utf-8") for p in sorted(log_dir.glob("clipal-*.log")))


# --- format ---------------------------------------------------------------


def test_exact_line_with_and_without_client_tag():
    formatter = logs.ClipalFormatter(redact.Redactor())
    created = _ts(2024, 1, 1, 12, 0, 0)
    tagged = _record("request completed via openrouter", created, client="claudecode")
    plain = _record("clipal started", created)
    assert formatter.format(tagged) == "[INFO]  2024-01-01 12:00:00 [claudecode] request completed via openrouter"
    assert formatter.format(plain) == "[INFO]  2024-01-01 12:00:00 clipal started"


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.DEBUG, "[DEBUG] "),
        (logging.INFO, "[INFO]  "),
        (logging.WARNING, "[WARN]  "),
        (logging.ERROR, "[ERROR] "),
        (logging.CRITICAL, "[ERROR] "),
    ],
)
def test_level_tags_share_one_width(level, prefix):
    formatter = logs.ClipalFormatter(redact.Redactor())
    line = formatter.format(_record("m", _ts(2024, 5, 6, 7, 8, 9), level))
    assert line == f"{prefix}2024-05-06 07:08:09 m"
    assert len(prefix) == 8


def test_time_cache_follows_the_clock():
    formatter = logs.ClipalFormatter(redact.Redactor())
    first = formatter.format(_record("a", _ts(2024, 1, 1, 12, 0, 0, 100)))
    same_second = formatter.format(_record("b", _ts(2024, 1, 1, 12, 0, 0, 900000)))
    next_second = formatter.format(_record("c", _ts(2024, 1, 1, 12, 0, 1)))
    assert "12:00:00 a" in first and "12:00:00 b" in same_second and "12:00:01 c" in next_second


def test_logger_lines_reach_stdout_and_file(tmp_path, capsys):
    log_dir = _configure(tmp_path)
    logs.get_logger("codex").info("request completed via %s", "openrouter")
    logs.get_logger().warning("reloaded")
    out = capsys.readouterr().out
    line = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.fullmatch(
        rf"\[INFO\]  {line} \[codex\] request completed via openrouter\n\[WARN\]  {line} reloaded\n", out
    )
    assert _file_text(log_dir) == out


def test_caller_extra_is_kept_next_to_the_client_tag(tmp_path, capsys):
    _configure(tmp_path)
    seen: list[logging.LogRecord] = []
    probe = logging.Handler()
    probe.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger(logs.LOGGER_NAME).addHandler(probe)
    logs.get_logger("gemini").info("x", extra={"provider": "p1"})
    assert seen[0].client == "gemini" and seen[0].provider == "p1"


# --- levels ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "level"),
    [("debug", logging.DEBUG), ("info", logging.INFO), ("warn", logging.WARNING),
     ("WARNING", logging.WARNING), (" error ", logging.ERROR)],
)
def test_parse_level(name, level):
    assert logs.parse_level(name) == level


@pytest.mark.parametrize("name", ["verbose", "", "critical", "trace"])
def test_parse_level_rejects_unknown_names(name):
    with pytest.raises(ValueError):
        logs.parse_level(name)


def test_level_filtering_and_reconfigure_takes_effect_at_once(tmp_path, capsys):
    _configure(tmp_path, level="info")
    log = logs.get_logger("codex")
    log.debug("attempt 1")
    log.info("completed")
    out = capsys.readouterr().out
    assert "attempt 1" not in out and "completed" in out

    _configure(tmp_path, level="debug")
    log.debug("attempt 2")
    assert "attempt 2" in capsys.readouterr().out

    _configure(tmp_path, level="error")
    log.warning("failover")
    log.error("all providers failed")
    out = capsys.readouterr().out
    assert "failover" not in out and "all providers failed" in out


def test_bad_level_changes_nothing(tmp_path, capsys):
    _configure(tmp_path, level="info")
    with pytest.raises(ValueError):
        _configure(tmp_path, level="loud", to_stdout=False)
    logs.get_logger().info("still here")
    assert "still here" in capsys.readouterr().out


def test_reconfigure_never_duplicates_handlers_and_keeps_foreign_ones(tmp_path, capsys):
    logger = logging.getLogger(logs.LOGGER_NAME)
    foreign = logging.NullHandler()
    logger.addHandler(foreign)
    for _ in range(3):
        _configure(tmp_path)
    assert foreign in logger.handlers
    # pytest's own capture handlers are attached too, so count only clipal's.
    owned = [h for h in logger.handlers if getattr(h, "clipal_owned", False)]
    assert sorted(type(h).__name__ for h in owned) == ["DailyFileHandler", "_StdoutHandler"]
    logs.get_logger().info("once")
    assert capsys.readouterr().out.count("once") == 1
    assert _file_text(tmp_path / "logs").count("once") == 1


def test_does_not_propagate_to_root(tmp_path, capsys):
    _configure(tmp_path)
    seen: list[logging.LogRecord] = []
    probe = logging.Handler()
    probe.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(probe)
    try:
        logs.get_logger().info("only ours")
    finally:
        logging.getLogger().removeHandler(probe)
    assert seen == []


# --- outputs --------------------------------------------------------------


def test_to_stdout_false_prints_nothing(tmp_path, capfd):
    log_dir = _configure(tmp_path, to_stdout=False)
    logs.get_logger("gemini").info("quiet please")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert "[gemini] quiet please" in _file_text(log_dir)


def test_file_is_named_after_the_local_date_and_dir_is_created(tmp_path, capsys):
    log_dir = _configure(tmp_path, log_dir=tmp_path / "a" / "b" / "logs")
    logs.get_logger().info("hello")
    expected = log_dir / f"clipal-{date.today():%Y-%m-%d}.log"
    assert expected.is_file()
    assert "hello" in expected.read_text(encoding="utf-8")


def test_changing_log_dir_switches_files(tmp_path, capsys):
    first = _configure(tmp_path, log_dir=tmp_path / "one")
    logs.get_logger().info("before")
    second = _configure(tmp_path, log_dir=tmp_path / "two")
    logs.get_logger().info("after")
    assert "before" in _file_text(first) and "after" not in _file_text(first)
    assert "after" in _file_text(second) and "before" not in _file_text(second)


def test_day_rollover_switches_files(tmp_path):
    handler = logs.DailyFileHandler(tmp_path, 0, now=lambda: _ts(2024, 1, 1, 23, 0))
    handler.setFormatter(logs.ClipalFormatter(redact.Redactor()))
    try:
        assert handler.path == tmp_path / "clipal-2024-01-01.log"
        handler.handle(_record("late", _ts(2024, 1, 1, 23, 59, 59)))
        handler.handle(_record("just after midnight", _ts(2024, 1, 2, 0, 0, 0)))
        handler.handle(_record("next morning", _ts(2024, 1, 2, 9, 0)))
        assert handler.path == tmp_path / "clipal-2024-01-02.log"
    finally:
        handler.close()
    day1 = (tmp_path / "clipal-2024-01-01.log").read_text(encoding="utf-8")
    day2 = (tmp_path / "clipal-2024-01-02.log").read_text(encoding="utf-8")
    assert day1 == "[INFO]  2024-01-01 23:59:59 late\n"
    assert day2 == ("[INFO]  2024-01-02 00:00:00 just after midnight\n"
                    "[INFO]  2024-01-02 09:00:00 next morning\n")


def test_reload_retries_a_log_dir_that_became_writable(tmp_path, capsys):
    blocker = tmp_path / "logs"
    blocker.write_text("x")  # a file where the directory should be
    _configure(tmp_path, log_dir=blocker)
    blocker.unlink()
    log_dir = _configure(tmp_path, log_dir=blocker)
    logs.get_logger().info("back in the file")
    assert "back in the file" in _file_text(log_dir)


def test_unwritable_log_dir_reports_once_and_stdout_continues(tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    _configure(tmp_path, log_dir=blocker / "logs")
    logs.get_logger().info("first")
    logs.get_logger().info("second")
    captured = capsys.readouterr()
    assert "first" in captured.out and "second" in captured.out
    assert captured.err.count("cannot write log file") == 1
    assert str(blocker / "logs") in captured.err


class _BrokenPipe(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_closed_stdout_never_raises_and_is_reported_once(tmp_path, capsys, monkeypatch):
    log_dir = _configure(tmp_path)
    monkeypatch.setattr(sys, "stdout", _BrokenPipe())
    for i in range(3):
        logs.get_logger().info("line %d", i)
    err = capsys.readouterr().err
    assert err.count("stdout failed") == 1
    assert _file_text(log_dir).count("line ") == 3  # the file keeps working


# --- retention ------------------------------------------------------------


def _touch_logs(log_dir: Path, days: list[date]) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    for day in days:
        (log_dir / f"clipal-{day:%Y-%m-%d}.log").write_text("old\n")


def test_prune_deletes_only_old_clipal_logs(tmp_path):
    today = date(2024, 3, 10)
    _touch_logs(tmp_path, [today - timedelta(days=n) for n in (0, 1, 7, 8, 30)])
    unrelated = ["notes.txt", "clipal-latest.log", "clipal-2024-02-30.log", "clipal-2020-01-01.log.gz",
                 "other-2020-01-01.log"]
    for name in unrelated:
        (tmp_path / name).write_text("keep")
    (tmp_path / "clipal-2019-01-01.log").mkdir()  # a directory with a log's name is not ours

    removed = logs.prune_old_logs(tmp_path, 7, today)

    assert sorted(p.name for p in removed) == ["clipal-2024-02-09.log", "clipal-2024-03-02.log"]
    remaining = {p.name for p in tmp_path.iterdir()}
    assert {"clipal-2024-03-10.log", "clipal-2024-03-09.log", "clipal-2024-03-03.log"} <= remaining
    assert set(unrelated) <= remaining and "clipal-2019-01-01.log" in remaining


def test_prune_zero_keeps_everything(tmp_path):
    _touch_logs(tmp_path, [date(2000, 1, 1), date(2024, 1, 1)])
    assert logs.prune_old_logs(tmp_path, 0, date(2024, 6, 1)) == []
    assert len(list(tmp_path.iterdir())) == 2


def test_prune_of_missing_dir_is_harmless(tmp_path):
    assert logs.prune_old_logs(tmp_path / "missing", 3, date.today()) == []


def test_prune_runs_at_start_and_on_rollover(tmp_path):
    _touch_logs(tmp_path, [date(2024, 1, 1), date(2024, 1, 2), date(2024, 1, 3)])
    handler = logs.DailyFileHandler(tmp_path, 1, now=lambda: _ts(2024, 1, 3, 12))
    handler.setFormatter(logs.ClipalFormatter(redact.Redactor()))
    try:
        names = {p.name for p in tmp_path.iterdir()}
        assert names == {"clipal-2024-01-02.log", "clipal-2024-01-03.log"}
        handler.handle(_record("tomorrow", _ts(2024, 1, 4, 0, 0, 1)))
        names = {p.name for p in tmp_path.iterdir()}
        assert names == {"clipal-2024-01-03.log", "clipal-2024-01-04.log"}
    finally:
        handler.close()


def test_configure_prunes_and_a_reload_applies_new_retention(tmp_path, capsys):
    log_dir = tmp_path / "logs"
    today = date.today()
    _touch_logs(log_dir, [today - timedelta(days=n) for n in (2, 5, 40)])
    _configure(tmp_path, retention_days=10)
    assert not (log_dir / f"clipal-{today - timedelta(days=40):%Y-%m-%d}.log").exists()
    assert (log_dir / f"clipal-{today - timedelta(days=5):%Y-%m-%d}.log").exists()
    _configure(tmp_path, retention_days=3)
    assert not (log_dir / f"clipal-{today - timedelta(days=5):%Y-%m-%d}.log").exists()
    assert (log_dir / f"clipal-{today - timedelta(days=2):%Y-%m-%d}.log").exists()


# --- redaction ------------------------------------------------------------


def _assert_hidden(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text
        # Nothing beyond a 4-character prefix may survive.
        assert secret[:12] not in text


def test_provider_secrets_are_redacted_everywhere(tmp_path, capsys):
    log_dir = _configure(tmp_path, secrets=[PLAIN_PROVIDER_KEY, ANTHROPIC_KEY])
    log = logs.get_logger("claudecode")
    log.debug("using key %s", PLAIN_PROVIDER_KEY)
    log.error("upstream said: invalid key %s", ANTHROPIC_KEY)
    out = capsys.readouterr().out
    _assert_hidden(PLAIN_PROVIDER_KEY, out, _file_text(log_dir))
    _assert_hidden(ANTHROPIC_KEY, out, _file_text(log_dir))
    assert "[redacted]" in out


def test_set_secrets_replaces_the_known_keys(tmp_path, capsys):
    _configure(tmp_path, secrets=[PLAIN_PROVIDER_KEY])
    replacement = "anotherplainsecretvalue42"
    redact.set_secrets([replacement])
    logs.get_logger().info("%s %s", PLAIN_PROVIDER_KEY, replacement)
    out = capsys.readouterr().out
    assert replacement not in out
    assert PLAIN_PROVIDER_KEY in out  # forgotten: only the current config's keys are known


def test_client_secrets_added_at_runtime(tmp_path, capsys):
    log_dir = _configure(tmp_path)
    redact.add_secret(CLIENT_KEY)
    logs.get_logger("codex").warning("client sent %s", CLIENT_KEY)
    out = capsys.readouterr().out
    _assert_hidden(CLIENT_KEY, out, _file_text(log_dir))


def test_reload_keeps_runtime_client_secrets(tmp_path, capsys):
    _configure(tmp_path)
    redact.add_secret(CLIENT_KEY)
    _configure(tmp_path, secrets=[PLAIN_PROVIDER_KEY])
    logs.get_logger().info(CLIENT_KEY)
    assert CLIENT_KEY not in capsys.readouterr().out


def test_key_echoed_in_json_error_body(tmp_path, capsys):
    log_dir = _configure(tmp_path, secrets=[PLAIN_PROVIDER_KEY])
    body = (
        '{"error": {"message": "Incorrect API key provided: ' + PLAIN_PROVIDER_KEY + '", '
        '"api_key": "' + OPENROUTER_KEY + '", "type": "invalid_request_error"}}'
    )
    logs.get_logger("codex").warning("failover: status 401, body %s", body)
    out = capsys.readouterr().out
    for secret in (PLAIN_PROVIDER_KEY, OPENROUTER_KEY):
        _assert_hidden(secret, out, _file_text(log_dir))
    assert '"type": "invalid_request_error"' in out


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("Authorization: Bearer abc123tokenvalue987", "abc123tokenvalue987"),
        ("headers={'authorization': 'Bearer tiny'}", "tiny"),
        ("GET https://generativelanguage.googleapis.com/v1beta/models?key=" + GOOGLE_KEY + "&alt=sse", GOOGLE_KEY),
        ("url ...?alt=sse&key=short1", "short1"),
        ("x-api-key: " + ANTHROPIC_KEY, ANTHROPIC_KEY),
        ("{'x-goog-api-key': 'opaque-google-value-123'}", "opaque-google-value-123"),
        ("bare anthropic key " + ANTHROPIC_KEY + " in text", ANTHROPIC_KEY),
        ("openai sk-proj-" + "Ab1" * 20 + " seen", "sk-proj-" + "Ab1" * 20),
        ("google " + GOOGLE_KEY, GOOGLE_KEY),
        ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
         "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
        ("oauth ya29.a0AfB_byC" + "x" * 40, "ya29.a0AfB_byC" + "x" * 40),
        ("api_key=hunter22", "hunter22"),
        ("https://example.test/cb?code=1&access_token=opaqueAccessValue", "opaqueAccessValue"),
        ('{"client_secret": "GOCSPX-someclientsecret"}', "GOCSPX-someclientsecret"),
        ("REFRESH_TOKEN=1//0gRefreshValue", "1//0gRefreshValue"),
    ],
)
def test_key_shaped_strings_are_redacted_without_being_known(text, secret):
    redacted = redact.redact(text)
    assert secret not in redacted
    assert "[redacted]" in redacted


@pytest.mark.parametrize(
    "text",
    [
        "request completed via openrouter",
        "task-manager skill loaded; risk-assessment-for-the-long-running-job ok",
        "failover from anthropic to openrouter: status 429 (rate limited), cooling down 30s",
        "provider deepseek deactivated: status 401, invalid x-api-key",
        "monkey=banana and key: value and keyboard",
        "POST /claudecode/v1/messages?beta=true 200",
        "all providers failed for gemini",
    ],
)
def test_normal_text_is_not_mangled(text):
    redact.set_secrets([PLAIN_PROVIDER_KEY])
    redact.add_secret(CLIENT_KEY)
    assert redact.redact(text) == text


def test_short_secrets_are_not_matched_in_plain_text():
    redact.set_secrets(["abc", "openai"])
    assert redact.redact("openai says abc") == "openai says abc"
    assert redact.redact("Bearer openai") == "Bearer [redacted]"


def test_mask_reveals_at_most_four_characters():
    redact.set_secrets([PLAIN_PROVIDER_KEY])
    assert redact.redact(f"k={PLAIN_PROVIDER_KEY}.") == "k=plai...[redacted]."
    assert redact.redact(ANTHROPIC_KEY) == "sk-a...[redacted]"
    assert redact.redact("Bearer abcdefgh12") == "Bearer [redacted]"


def test_redact_is_idempotent():
    redact.set_secrets([ANTHROPIC_KEY])
    once = redact.redact(f"Authorization: Bearer {ANTHROPIC_KEY}; x-api-key: {ANTHROPIC_KEY}")
    assert redact.redact(once) == once
    assert once == "Authorization: Bearer sk-a...[redacted]; x-api-key: sk-a...[redacted]"


def test_secret_echoed_url_encoded_or_json_escaped():
    secret = 'odd/secret+with="quote'
    redact.set_secrets([secret])
    assert redact.redact("path=odd%2Fsecret%2Bwith%3D%22quote;") == "path=odd%...[redacted];"
    assert redact.redact('{"k": "odd/secret+with=\\"quote"}') == '{"k": "odd/...[redacted]"}'
    assert redact.redact(secret) == "odd/...[redacted]"


def test_longest_secret_is_masked_whole():
    short, long = "prefixsecret", "prefixsecret-and-more-of-it"
    redact.set_secrets([short, long])
    assert redact.redact(long) == "pref...[redacted]"


def test_exception_tracebacks_are_redacted(tmp_path, capsys):
    log_dir = _configure(tmp_path, secrets=[PLAIN_PROVIDER_KEY])
    redact.add_secret(CLIENT_KEY)
    try:
        raise RuntimeError(f"upstream echoed {PLAIN_PROVIDER_KEY} and {CLIENT_KEY} and {ANTHROPIC_KEY}")
    except RuntimeError:
        logs.get_logger("claudecode").exception("attempt failed")
    out = capsys.readouterr().out
    assert "Traceback (most recent call last)" in out and "RuntimeError: upstream echoed" in out
    for secret in (PLAIN_PROVIDER_KEY, CLIENT_KEY, ANTHROPIC_KEY):
        _assert_hidden(secret, out, _file_text(log_dir))


def test_runtime_secrets_are_bounded():
    redactor = redact.Redactor(runtime_limit=2)
    for secret in ("first-secret-1", "second-secret-2", "third-secret-3"):
        redactor.add(secret)
    assert redactor.redact("first-secret-1") == "first-secret-1"
    assert redactor.redact("second-secret-2 third-secret-3") == "[redacted] [redacted]"
    redactor.add("second-secret-2")  # touching a key makes it the newest
    redactor.add("fourth-secret-4")
    assert redactor.redact("second-secret-2") == "[redacted]"
    assert redactor.redact("third-secret-3") == "third-secret-3"


def test_redaction_is_fast_enough_for_every_line():
    redactor = redact.Redactor()
    redactor.set_known(f"provider-key-{i:04d}-abcdefghijkl" for i in range(300))
    redactor.add("client-key-0000-abcdefghijkl")
    line = "[INFO]  2024-01-01 12:00:00 [claudecode] request completed via openrouter in 1234 ms"
    start = time.perf_counter()
    for _ in range(2000):
        redactor.redact(line)
    per_line = (time.perf_counter() - start) / 2000
    assert per_line < 50e-6  # generous: about 1 us in practice


# --- file permissions -----------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_warns_once_for_a_file_readable_by_others(tmp_path, capsys, mode):
    _configure(tmp_path)
    config = tmp_path / "claudecode.yaml"
    config.write_text("providers: []\n")
    config.chmod(mode)
    logs.warn_if_readable_by_others(config)
    logs.warn_if_readable_by_others(config)
    out = capsys.readouterr().out
    assert out.count("[WARN]  ") == 1
    assert str(config) in out and "chmod 600" in out


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o600, 0o700, 0o400])
def test_no_warning_for_a_private_file(tmp_path, capsys, mode):
    _configure(tmp_path)
    config = tmp_path / "codex.yaml"
    config.write_text("providers: []\n")
    config.chmod(mode)
    logs.warn_if_readable_by_others(config)
    logs.warn_if_readable_by_others(tmp_path / "missing.yaml")
    assert capsys.readouterr().out == ""
