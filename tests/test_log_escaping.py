"""Control characters in log lines are escaped by the formatter: one record, one line, no terminal escapes.

Upstream text (a status line, an error message) can reach a log line; raw,
a CR or a newline would forge a line of its own and an ESC sequence would
drive the terminal that shows the log. The newline between a message and its
traceback is the formatter's own and stays.
"""

from __future__ import annotations

import logging

import pytest

from clipal import logs, redact


def record(msg: str, *args: object, exc_info=None) -> logging.LogRecord:
    return logging.makeLogRecord({"msg": msg, "args": args, "levelno": logging.WARNING,
                                  "levelname": "WARNING", "exc_info": exc_info, "client": "codex"})


def formatter() -> logs.ClipalFormatter:
    return logs.ClipalFormatter(redact.Redactor())


@pytest.mark.parametrize("raw,escaped", [
    ("bad\x1b[31m\x07reason", "bad\\x1b[31m\\x07reason"),
    ("a\rb", "a\\rb"),
    ("a\nb", "a\\nb"),
    ("a\tb", "a\\tb"),
    ("nul\x00 del\x7f c1\x85 csi\x9b", "nul\\x00 del\\x7f c1\\x85 csi\\x9b"),
    ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
    ("a backslash \\x1b stays as written", "a backslash \\x1b stays as written"),
])
def test_control_characters_in_a_message_are_escaped(raw, escaped):
    line = formatter().format(record("provider A failed: %s; trying next", raw))
    assert line.endswith(f"[codex] provider A failed: {escaped}; trying next")
    assert "\n" not in line and "\r" not in line and "\x1b" not in line


def test_ordinary_text_is_left_alone():
    text = "完成 via openrouter (200, 1234 bytes in 0.52s) — ok ✓ naïve"
    assert formatter().format(record(text)).endswith(text)


def test_the_traceback_keeps_its_lines_and_loses_its_control_characters():
    try:
        raise RuntimeError("upstream said \x1b]0;owned\x07 and\r\nforged line")
    except RuntimeError as error:
        line = formatter().format(record("attempt failed", exc_info=(type(error), error, error.__traceback__)))
    first, *rest = line.split("\n")
    assert first.endswith("[codex] attempt failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "RuntimeError: upstream said \\x1b]0;owned\\x07 and\\r\\nforged line"
    assert "\x1b" not in line and "\r" not in line and "\x07" not in line


def test_escaping_comes_after_redaction():
    secret = "sk-ant-" + "k" * 30
    line = formatter().format(record("echoed Bearer\t%s back\x1b", secret))
    assert secret[8:] not in line
    assert line.endswith("echoed Bearer\\tsk-a...[redacted] back\\x1b")


def test_messages_along_the_chain_and_in_groups_are_escaped_too():
    try:
        try:
            raise ValueError("cause\nforged")
        except ValueError as cause:
            raise ExceptionGroup("group\rmessage", [OSError("member\nforged")]) from cause
    except ExceptionGroup as error:
        line = formatter().format(record("attempt failed", exc_info=(type(error), error, error.__traceback__)))
    assert "ValueError: cause\\nforged" in line
    assert "group\\rmessage" in line and "OSError: member\\nforged" in line
    assert not any(text.startswith("forged") for text in line.split("\n"))
