"""Logging for clipal: one line format, a file per day, retention, and key redaction.

Every line looks like::

    [INFO]  2024-01-01 12:00:00 [claudecode] request completed via openrouter

Lines go to stdout and/or ``<log_dir>/clipal-YYYY-MM-DD.log``. The file switches at
local midnight while running, and files older than the retention period are pruned
at start and at each day change.

No API key may ever reach a log line, whoever wrote the message: the formatter
redacts the final text (message, traceback and all) with :mod:`clipal.redact`.
It also escapes control characters, so that text from an upstream can neither
start a line of its own nor send escape sequences to a terminal.

Nothing here touches sockets, so importing it before gevent's monkey-patching is
harmless.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from .config import LOG_LEVEL_NAMES, LOG_LEVELS
from . import platforms
from .redact import REDACTOR, Redactor

__all__ = [
    "LOGGER_NAME",
    "ClipalFormatter",
    "DailyFileHandler",
    "configure_logging",
    "get_logger",
    "log_file_name",
    "parse_level",
    "prune_old_logs",
    "warn_if_readable_by_others",
]

LOGGER_NAME = "clipal"

def parse_level(name: str) -> int:
    """Map a config level name (debug/info/warn/warning/error) to a logging level."""
    try:
        return LOG_LEVELS[name.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown log level {name!r}; expected one of {', '.join(LOG_LEVEL_NAMES)}"
        ) from None


# ---------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------

_LEVEL_TAGS: tuple[tuple[int, str], ...] = (
    (logging.ERROR, "[ERROR] "),  # CRITICAL too: the spec has four levels
    (logging.WARNING, "[WARN]  "),
    (logging.INFO, "[INFO]  "),
    (logging.NOTSET, "[DEBUG] "),
)


def _level_tag(levelno: int) -> str:
    for threshold, tag in _LEVEL_TAGS:
        if levelno >= threshold:
            return tag
    return "[DEBUG] "


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: upstream text
# (a status line, an error message) holding one could forge a log line of its own or
# drive the terminal showing the log (ESC sequences, BEL).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# The same but the newline, for tracebacks: their line breaks are the formatter's own.
_CONTROLS_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with control characters written as Python-style escapes (``\\x1b``, ``\\r``)."""
    pattern = _CONTROLS_BUT_NEWLINE if keep_newlines else _CONTROLS
    return pattern.sub(_escape, text) if pattern.search(text) else text


class ClipalFormatter(logging.Formatter):
    """``[LEVEL] YYYY-MM-DD HH:MM:SS [client] message``, redacted, and escaped so it stays one line.

    Control characters are escaped in the message; a traceback or stack that
    follows keeps its line breaks. Escaping comes after redaction, so the
    patterns see the text as written (``Bearer<TAB>key``).
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redactor = redactor
        # (whole second, its text): most lines share their second with the previous one.
        self._clock: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        cached_second, text = self._clock
        if second != cached_second:
            text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._clock = (second, text)
        return text

    def formatException(self, ei) -> str:  # type: ignore[override]  # logging's own signature
        """The traceback as logging writes it, with each exception's message escaped whole.

        The traceback's line breaks are the formatter's; those inside an
        exception's message (which may quote an upstream) are not.
        """
        exc_type, value, tb = ei
        if exc_type is None or value is None:
            return super().formatException(ei)
        report = traceback.TracebackException(exc_type, value, tb, compact=True)
        pending, seen = [report], set()
        while pending:  # the chain (cause, context) and the members of exception groups
            exc = pending.pop()
            if id(exc) in seen:
                continue
            seen.add(id(exc))
            # TracebackException keeps each message in _str (Python 3.11 to 3.13). Were it
            # ever gone, a message would keep its line breaks; its other controls are still
            # escaped by format().
            if isinstance(getattr(exc, "_str", None), str):
                exc._str = escape_controls(exc._str)
            members = getattr(exc, "exceptions", None) or ()
            pending.extend(e for e in (exc.__cause__, exc.__context__, *members) if e is not None)
        return "".join(report.format()).removesuffix("\n")

    def format(self, record: logging.LogRecord) -> str:
        client = getattr(record, "client", None)
        client_tag = f"[{client}] " if client else ""
        line = f"{_level_tag(record.levelno)}{self.formatTime(record)} {client_tag}{record.getMessage()}"
        text = escape_controls(self._redactor.redact(line))
        if record.exc_info and not record.exc_text:
            # Cached on the record for any other handler, so cache it masked.
            record.exc_text = self._redactor.redact(self.formatException(record.exc_info))
        if record.exc_text:
            # Redacted again: another handler's formatter may have cached it first, unmasked.
            exc_text = self._redactor.redact(record.exc_text)
            text = f"{text}\n{escape_controls(exc_text, keep_newlines=True)}"
        if record.stack_info:
            stack = self._redactor.redact(self.formatStack(record.stack_info))
            text = f"{text}\n{escape_controls(stack, keep_newlines=True)}"
        return text


# ---------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------


def _report(message: str) -> None:
    """Last-resort notice on stderr; stderr itself may be gone, which is fine."""
    try:
        sys.stderr.write(f"clipal: {message}\n")
        sys.stderr.flush()
    except Exception:
        pass


class _QuietHandler(logging.Handler):
    """A handler whose failures are reported once and then ignored.

    Logging must never take the proxy down: stdout may be a closed pipe under nohup
    or systemd, and the log disk may fill up.
    """

    # Marks handlers installed by configure_logging, so reconfiguring replaces them
    # and leaves handlers that others (tests) attached alone.
    clipal_owned = True
    _error_reported = False

    def describe(self) -> str:
        return type(self).__name__

    def handleError(self, record: logging.LogRecord) -> None:
        if self._error_reported:
            return
        self._error_reported = True
        error = sys.exc_info()[1]
        _report(
            f"writing log lines to {self.describe()} failed ({REDACTOR.redact(repr(error))}); "
            "further errors there are not reported"
        )


class _StdoutHandler(_QuietHandler):
    """Writes to whatever ``sys.stdout`` is at the time, so a rebound stdout is honoured."""

    def describe(self) -> str:
        return "stdout"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream: TextIO | None = sys.stdout
            if stream is None:  # pythonw, or stdout closed at the fd level
                return
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def log_file_name(day: date) -> str:
    return f"clipal-{day:%Y-%m-%d}.log"


_LOG_FILE = re.compile(r"clipal-(\d{4})-(\d{2})-(\d{2})\.log")


def prune_old_logs(log_dir: Path, retention_days: int, today: date) -> list[Path]:
    """Delete ``clipal-YYYY-MM-DD.log`` files dated more than ``retention_days`` before today.

    With 7, today's file and those of the 7 previous days are kept. ``0`` keeps
    everything. Other files, and names that are not valid dates, are never touched.
    Returns the paths removed; a file that cannot be removed is skipped.
    """
    if retention_days <= 0:
        return []
    oldest_kept = today - timedelta(days=retention_days)
    try:
        entries = list(os.scandir(log_dir))
    except OSError:
        return []
    removed: list[Path] = []
    for entry in entries:
        match = _LOG_FILE.fullmatch(entry.name)
        if match is None:
            continue
        try:
            day = date(*map(int, match.groups()))
            if day >= oldest_kept or not entry.is_file(follow_symlinks=False):
                continue
            os.unlink(entry.path)
        except (ValueError, OSError):
            continue
        removed.append(Path(entry.path))
    return removed


def _local_midnight(day: date) -> float:
    return datetime(day.year, day.month, day.day).timestamp()


# A record stamped slightly before the current day's start (threads racing across
# midnight) goes to the current file rather than reopening yesterday's.
_BACKWARD_SLACK = 5.0


class DailyFileHandler(_QuietHandler):
    """Appends to ``<log_dir>/clipal-<local date>.log``, switching files at local midnight.

    The file is chosen by the record's own timestamp, so a line's date and its
    file's date agree. Each emit compares that timestamp with the cached bounds of
    the current day: no stat and no date arithmetic per line. Each switch also
    prunes old files, which makes retention daily without a timer of its own.
    If the directory cannot be created or the file opened, that is said once on
    stderr and file logging pauses until the next day, when it is tried again.
    """

    def __init__(
        self,
        log_dir: Path,
        retention_days: int,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.log_dir = Path(log_dir)
        self.retention_days = retention_days
        self._stream: TextIO | None = None
        self._path: Path | None = None
        self._day = date.min
        self._day_start = 0.0
        self._day_end = 0.0
        self._open_failure_reported = False
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._switch_to(now())

    @property
    def path(self) -> Path | None:
        """The file currently written, or None while the log dir is unusable."""
        return self._path

    def describe(self) -> str:
        return str(self._path or self.log_dir)

    def writes_to_its_path(self) -> bool:
        """Whether the open file is still the one at ``path`` (not deleted or replaced).

        Checked on reload only, not per line: a user who deleted the log directory (or
        the whole config directory with it) and recreated it gets a fresh file on the next
        reload instead of lines vanishing into an unlinked file until midnight.
        """
        stream, path = self._stream, self._path
        if stream is None or path is None:
            return False
        try:
            open_file, named = os.fstat(stream.fileno()), os.stat(path)
        except (OSError, ValueError):
            return False
        return (open_file.st_dev, open_file.st_ino) == (named.st_dev, named.st_ino)

    def set_retention(self, retention_days: int) -> None:
        """Change retention (on reload) and apply it now, not at the next midnight."""
        with self.lock:  # type: ignore[union-attr]
            changed = retention_days != self.retention_days
            self.retention_days = retention_days
            if changed:
                prune_old_logs(self.log_dir, retention_days, self._day)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            created = record.created
            if created >= self._day_end or created < self._day_start - _BACKWARD_SLACK:
                self._switch_to(created)
            if self._stream is None:
                return
            self._stream.write(self.format(record) + "\n")
            self._stream.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._close_stream()
        super().close()

    def _switch_to(self, timestamp: float) -> None:
        day = date.fromtimestamp(timestamp)
        self._day = day
        self._day_start = _local_midnight(day)
        self._day_end = _local_midnight(day + timedelta(days=1))
        self._close_stream()
        self._open(day)
        prune_old_logs(self.log_dir, self.retention_days, day)

    def _open(self, day: date) -> None:
        path = self.log_dir / log_file_name(day)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._stream = open(path, "a", encoding="utf-8")
        except OSError as error:
            if not self._open_failure_reported:
                self._open_failure_reported = True
                _report(f"cannot write log file {path} ({error}); file logging is paused")
            return
        self._path = path
        self._open_failure_reported = False

    def _close_stream(self) -> None:
        stream, self._stream, self._path = self._stream, None, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


# ---------------------------------------------------------------------------
# Module-level setup: the one logger, redactor and formatter of the process
# ---------------------------------------------------------------------------

_formatter = ClipalFormatter(REDACTOR)
_logger = logging.getLogger(LOGGER_NAME)
# Libraries (werkzeug, gevent) may install root handlers; clipal's lines must not
# be printed twice, nor pass through formatters that do not redact.
_logger.propagate = False
_configure_lock = threading.Lock()
_warned_paths: set[str] = set()
_warned_lock = threading.Lock()


class _ClientAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Adds the ``client`` tag while keeping any ``extra`` the caller passes."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def get_logger(client: str | None = None) -> logging.LoggerAdapter:  # type: ignore[type-arg]
    """The clipal logger; lines carry ``[client]`` when a client name is given."""
    adapter = _adapters.get(client)
    if adapter is None:  # one per client name, made once: every request asks for its client's
        adapter = _adapters[client] = _ClientAdapter(_logger, {"client": client} if client else {})
    return adapter


_adapters: dict[str | None, logging.LoggerAdapter] = {}  # type: ignore[type-arg]


def _owned_handlers() -> list[logging.Handler]:
    return [h for h in _logger.handlers if getattr(h, "clipal_owned", False)]


def _install(handlers: list[logging.Handler], level: int) -> None:
    for handler in handlers:
        handler.setFormatter(_formatter)
    others = [h for h in _logger.handlers if not getattr(h, "clipal_owned", False)]
    # One reference swap: a concurrent emit iterates either the old list or the new.
    _logger.handlers = others + handlers
    _logger.setLevel(level)


def configure_logging(
    *,
    level: str,
    log_dir: Path,
    retention_days: int,
    to_stdout: bool,
    secrets: Iterable[str] = (),
) -> None:
    """Apply the logging part of a config; called at start and on every reload.

    Invalid input raises ValueError before anything changes. The secrets are set
    first, so no line written under the new config can leak a new key. The file
    handler is kept when ``log_dir`` is unchanged (same open file) and replaced
    otherwise; no handler is ever installed twice.
    """
    numeric_level = parse_level(level)
    if retention_days < 0:
        raise ValueError(f"log retention must be 0 (keep all) or more days, not {retention_days}")
    log_dir = Path(os.path.abspath(Path(log_dir).expanduser()))
    with _configure_lock:
        REDACTOR.set_known(secrets)
        current = _owned_handlers()
        # Keep the open file when the directory is unchanged; a handler whose file
        # could not be opened, or was deleted since, is replaced, so a reload retries
        # a fixed directory and recreates a deleted log file.
        file_handler = next(
            (
                h
                for h in current
                if isinstance(h, DailyFileHandler) and h.log_dir == log_dir and h.writes_to_its_path()
            ),
            None,
        )
        if file_handler is None:
            file_handler = DailyFileHandler(log_dir, retention_days)
        else:
            file_handler.set_retention(retention_days)
        stdout_handler: logging.Handler | None = None
        if to_stdout:
            stdout_handler = next((h for h in current if isinstance(h, _StdoutHandler)), None)
            stdout_handler = stdout_handler or _StdoutHandler()
        new = [h for h in (stdout_handler, file_handler) if h is not None]
        _install(new, numeric_level)
        for handler in current:
            if handler not in new:
                handler.close()


def warn_if_readable_by_others(path: Path) -> None:
    """Warn once per path when a file holding keys is group- or world-readable."""
    if not platforms.current().posix_permissions:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not mode & 0o044:
        return
    key = os.path.abspath(path)
    with _warned_lock:
        if key in _warned_paths:
            return
        _warned_paths.add(key)
    get_logger().warning(
        "%s is readable by other users (mode %04o) and may hold API keys; run: chmod 600 %s",
        path,
        mode & 0o7777,
        path,
    )


# Until the config is read, log INFO and up to stdout with the same format and
# redaction, rather than Python's unformatted stderr fallback.
with _configure_lock:
    _install([_StdoutHandler()], logging.INFO)
