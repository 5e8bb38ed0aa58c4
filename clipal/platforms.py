"""What this platform has: the one place clipal looks at the operating system.

clipal runs on Linux, macOS and Windows. Four things differ, and each module
that needs one asks :func:`current` (or the helpers below) instead of testing
``sys.platform`` itself:

* inotify (Linux only): without it the config watcher polls.
* glibc's ``mallopt``/``malloc_trim``: without them the memory tuning is skipped.
* signals: POSIX has SIGTERM, SIGINT and SIGHUP, handled through gevent's loop;
  Windows has SIGINT (Ctrl+C) and SIGBREAK (Ctrl+Break), which gevent cannot
  watch there, so they go through :func:`signal.signal`; no SIGHUP, so reloading
  is by file change only.
* the per-user service manager: systemd --user, launchd or Task Scheduler.

``CLIPAL_TEST_PLATFORM`` (``linux``, ``darwin`` or ``win32``) makes this module,
and only this module, answer for another platform. It exists so that the
macOS and Windows paths run in tests on a Linux machine; patching
``sys.platform`` itself would change what the standard library does too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, NamedTuple, Optional

import gevent

try:
    import inotify_simple
except ImportError:  # not installed (it is a Linux-only dependency), or hidden by a test
    inotify_simple = None  # type: ignore[assignment]

#: Set to a ``sys.platform`` value to have this module answer for that platform (tests).
ENV_PLATFORM = "CLIPAL_TEST_PLATFORM"

#: Service manager names, by platform.
SERVICE_MANAGERS = {"linux": "systemd", "darwin": "launchd", "win32": "schtasks"}

#: How often, on Windows, the loop wakes so that a pending Ctrl+C handler gets to run:
#: Python runs signal handlers only between bytecodes, and the hub may sit in the
#: event loop's C code for as long as nothing happens.
SIGNAL_CHECK_INTERVAL = 0.2


class GlibcMalloc(NamedTuple):
    """glibc's two tuning calls, as ctypes functions."""

    mallopt: Callable[[int, int], int]
    malloc_trim: Callable[[int], int]


@dataclass(frozen=True)
class Platform:
    """What the running platform offers clipal."""

    #: ``linux``, ``darwin``, ``win32`` or another ``sys.platform`` value
    name: str
    #: the inotify_simple module is importable and the kernel is Linux
    inotify: bool
    #: glibc's mallopt and malloc_trim can be called
    glibc_malloc: bool
    #: the signals that stop clipal gracefully
    shutdown_signals: tuple[signal.Signals, ...]
    #: the signal that reloads the configuration, or None (Windows)
    reload_signal: Optional[signal.Signals]
    #: signals are watched by gevent's loop (POSIX); otherwise by signal.signal (Windows)
    gevent_signals: bool
    #: ``systemd``, ``launchd``, ``schtasks``, or None where clipal knows none
    service_manager: Optional[str]
    #: file modes say who may read a file (POSIX), so a key file readable by others can be named
    posix_permissions: bool = True


def platform_name() -> str:
    """``linux`` (for any Linux), ``darwin``, ``win32``, or ``sys.platform``; ``CLIPAL_TEST_PLATFORM`` overrides."""
    name = os.environ.get(ENV_PLATFORM, "").strip() or sys.platform
    return "linux" if name.startswith("linux") else name


def inotify_module() -> Optional[ModuleType]:
    """inotify_simple, where it can work: imported, and on Linux."""
    if inotify_simple is None or platform_name() != "linux":
        return None
    return inotify_simple


def glibc_malloc() -> Optional[GlibcMalloc]:
    """glibc's mallopt and malloc_trim, or None (macOS, Windows, musl)."""
    if platform_name() != "linux":
        return None
    try:
        libc = ctypes.CDLL(None)
        return GlibcMalloc(libc.mallopt, libc.malloc_trim)
    except (OSError, AttributeError):  # no C library to open, or one without them (musl)
        return None


def _signal(name: str) -> Optional[signal.Signals]:
    # getattr on the module, not on signal.Signals: what the module lacks does not exist here.
    value = getattr(signal, name, None)
    return signal.Signals(value) if value is not None else None


def current() -> Platform:
    """The running platform, looked at now (cheap: a few lookups and one dlopen of the program)."""
    name = platform_name()
    windows = name == "win32"
    wanted = ("SIGINT", "SIGBREAK") if windows else ("SIGTERM", "SIGINT")
    shutdown = tuple(sig for sig in (_signal(n) for n in wanted) if sig is not None)
    return Platform(
        name=name,
        inotify=inotify_module() is not None,
        glibc_malloc=glibc_malloc() is not None,
        shutdown_signals=shutdown,
        reload_signal=None if windows else _signal("SIGHUP"),
        gevent_signals=not windows,
        service_manager=SERVICE_MANAGERS.get(name),
        posix_permissions=not windows and os.name == "posix",
    )


def handle_signals(on_shutdown: Callable[[], None], on_reload: Callable[[], None]) -> Platform:
    """Run ``on_shutdown`` (or ``on_reload``) in a new greenlet when its signal arrives; the platform used.

    POSIX: gevent's loop watches the signals, so the callbacks run as soon as one arrives.
    Windows: gevent cannot watch signals there (its signal_handler needs POSIX), so a
    :func:`signal.signal` handler only records the signal - it may interrupt any greenlet,
    even the hub, where spawning is not safe - and a greenlet that wakes every
    :data:`SIGNAL_CHECK_INTERVAL` starts the callback.
    """
    platform = current()
    wanted: list[tuple[signal.Signals, Callable[[], None]]] = [(sig, on_shutdown) for sig in platform.shutdown_signals]
    if platform.reload_signal is not None:
        wanted.append((platform.reload_signal, on_reload))
    if platform.gevent_signals:
        for sig, callback in wanted:
            gevent.signal_handler(sig, gevent.spawn, callback)
        return platform

    pending: list[Callable[[], None]] = []
    for sig, callback in wanted:
        signal.signal(sig, lambda _signum, _frame, callback=callback: pending.append(callback))

    def dispatch() -> None:
        while True:
            gevent.sleep(SIGNAL_CHECK_INTERVAL)
            while pending:
                gevent.spawn(pending.pop(0))

    gevent.spawn(dispatch)
    return platform
