"""Hot reload: watch the config directory and apply valid changes at once.

The watcher (:mod:`clipal.watch`) only says "something changed"; this module
loads and validates everything, then swaps the runtime's snapshot in one
step. An invalid edit is reported and the running configuration stays.

Loading runs in a thread of gevent's pool, never on the event loop: reading
a file is not cooperative, and PyYAML parses at about 2 s per MiB, so on the
loop a large file would hold every request for as long. In a thread the
loop keeps serving: the interpreter hands it the GIL at its switch interval.
Measured with a 1000 KiB client file (about 10,000 providers) loaded and
applied under a steady request loop: the longest wait between two requests
was about 40 ms, against 2.5 s when everything ran on the loop.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import gevent

from . import redact
from .runtime import Runtime, warn_about_permissions
from .clients import CLIENTS
from .config import CONFIG_FILE, SETTINGS, Config, ConfigError, load_config, public_url
from .logs import get_logger
from .watch import DirectoryWatcher

#: Settings that only take effect at start: the listening socket's, and the state store's.
_RESTART_ONLY = tuple(setting.name for setting in SETTINGS if setting.restart)

#: How often a reload refused because a file was not readable is tried again.
UNREADABLE_RETRY = 1.0


class _CollectorPause:
    """The cyclic garbage collector off while config files load, back on after the last load ends.

    A parse allocates hundreds of thousands of objects, and each full
    collection they trigger holds the GIL throughout, ~100-150 ms with a
    1 MiB file, the largest read; the event loop waits for all of it. The
    collector is off for the duration of the load only (seconds at worst);
    reference counting still frees everything acyclic. Entered and left
    from greenlets, so the count needs no lock.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._resume = False

    def __enter__(self) -> None:
        if self._depth == 0:
            self._resume = gc.isenabled()
            gc.disable()
        self._depth += 1

    def __exit__(self, *_exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._resume:
            gc.enable()


_collector_pause = _CollectorPause()


def _load_and_prepare(config_dir: Path) -> Config | Exception:
    """Runs in the pool's thread. An error is returned, not raised: gevent would print
    the traceback of an exception leaving the thread, for every rejected edit."""
    try:
        config = load_config(config_dir)
        # The log redaction's match of the provider keys is compiled here too: with thousands
        # of keys that takes a good part of a second, which applying would spend on the loop.
        redact.REDACTOR.prepare_known(config.secrets())
    except Exception as error:
        return error
    return config


def load_off_the_loop(config_dir: Path) -> Config:
    """:func:`load_config` in a thread of gevent's pool, while the event loop goes on serving."""
    with _collector_pause:
        outcome = gevent.get_hub().threadpool.apply(_load_and_prepare, (config_dir,))
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def describe_changes(old: Config, new: Config) -> list[str]:
    """Human lines for what a reload changed, for the info log."""
    lines = []
    for client in CLIENTS:
        before = [p.name for p in old.providers.get(client.name, ()) if p.enabled]
        after = [p.name for p in new.providers.get(client.name, ()) if p.enabled]
        if old.providers.get(client.name) != new.providers.get(client.name):
            lines.append(f"{client.file}: providers {', '.join(after) or '(none)'}"
                         + (f" (were {', '.join(before) or 'none'})" if before != after else " (settings changed)"))
    # A restart-only setting is never a change a reload made: Reloader.reload warns about it instead.
    for field in (setting.name for setting in SETTINGS if not setting.restart):
        if getattr(old.settings, field) != getattr(new.settings, field):
            lines.append(f"{CONFIG_FILE}: {field} = {getattr(new.settings, field)!r}")
    return lines


class Reloader:
    """Loads the config directory on change and applies it to a :class:`Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._unreadable: str | None = None  # the refusal being retried, if any
        self._retry: gevent.Greenlet | None = None

    def reload(self) -> bool:
        """Load, validate and apply. Returns whether a new configuration was applied."""
        log = get_logger()
        old = self.runtime.snapshot.config
        try:
            new = load_off_the_loop(old.config_dir)
        except ConfigError as error:
            retrying, self._unreadable = self._unreadable, None
            if str(error) != retrying:  # a retry does not repeat the same warning every second
                log.warning("config reload rejected, keeping the running configuration: %s", error)
            if isinstance(error.__context__, PermissionError):
                # Fixing permissions (chmod) is not an edit the watcher reports, by design:
                # look again until the file can be read or another reload supersedes this.
                self._unreadable = str(error)
                if self._retry is None or self._retry.dead:
                    self._retry = gevent.spawn_later(UNREADABLE_RETRY, self._retry_unreadable)
            return False
        self._unreadable = None
        # Flags given on the command line keep winning over the files.
        for field in _RESTART_ONLY:
            if field not in self.runtime.overrides and getattr(new.settings, field) != getattr(old.settings, field):
                value = getattr(new.settings, field)
                # A Redis URL may carry a password, which no log line may show.
                log.warning("%s: %s changed to %r; restart clipal to apply it", CONFIG_FILE, field,
                            public_url(value) if field == "state_url" else value)
        # The restart-only settings keep their running values in the snapshot: that is what is served,
        # and what the next reload compares with (so a later edit still says "restart", and
        # putting the running values back does not).
        running = {field: getattr(old.settings, field) for field in _RESTART_ONLY}
        new = dataclasses.replace(new, settings=dataclasses.replace(new.settings, **running))
        snapshot = self.runtime.apply(new)
        changes = describe_changes(old, snapshot.config)
        log.info("configuration reloaded%s", (": " + "; ".join(changes)) if changes else " (no changes)")
        warn_about_permissions(snapshot.config)
        return True

    def _retry_unreadable(self) -> None:
        self._retry = None  # so that a refusal in this reload schedules the next retry
        if self._unreadable is not None:
            try:
                self.reload()
            except Exception:  # as in the watcher: never let a reload error end the retries silently
                get_logger().warning("config reload failed", exc_info=True)


def start_watching(runtime: Runtime) -> DirectoryWatcher:
    """Start the watcher greenlet for the runtime's config directory."""
    config_dir = runtime.snapshot.config.config_dir
    names = [CONFIG_FILE] + [client.file for client in CLIENTS]
    watcher = DirectoryWatcher(config_dir, names, Reloader(runtime).reload)
    watcher.start()
    get_logger().debug("watching %s for changes (%s)", config_dir, watcher.mode_in_use or "starting")
    return watcher
