"""Hot reload (SPEC §5): watch the config directory and apply valid changes at once.

The watcher (:mod:`clipal.watch`) only says "something changed"; this module
loads and validates everything, then swaps the runtime's snapshot in one
step. An invalid edit is reported and the running configuration stays.
"""

from __future__ import annotations

import dataclasses

from .app import Runtime, warn_about_permissions
from .clients import CLIENTS
from .config import CONFIG_FILE, Config, ConfigError, load_config
from .logs import get_logger
from .watch import DirectoryWatcher

#: Settings that only take effect when the listening socket is reopened.
_RESTART_ONLY = ("listen_addr", "port")


def describe_changes(old: Config, new: Config) -> list[str]:
    """Human lines for what a reload changed, for the info log."""
    lines = []
    for client in CLIENTS:
        before = [p.name for p in old.providers.get(client.name, ()) if p.enabled]
        after = [p.name for p in new.providers.get(client.name, ()) if p.enabled]
        if old.providers.get(client.name) != new.providers.get(client.name):
            lines.append(f"{client.file}: providers {', '.join(after) or '(none)'}"
                         + (f" (were {', '.join(before) or 'none'})" if before != after else " (settings changed)"))
    for field in ("log_level", "reactivate_after", "upstream_idle_timeout", "max_request_body_bytes",
                  "log_dir", "log_retention_days", "log_stdout", "ignore_count_tokens_failover"):
        if getattr(old.settings, field) != getattr(new.settings, field):
            lines.append(f"{CONFIG_FILE}: {field} = {getattr(new.settings, field)!r}")
    return lines


class Reloader:
    """Loads the config directory on change and applies it to a :class:`Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def reload(self) -> bool:
        """Load, validate and apply. Returns whether a new configuration was applied."""
        log = get_logger()
        old = self.runtime.snapshot.config
        try:
            new = load_config(old.config_dir)
        except ConfigError as error:
            log.warning("config reload rejected, keeping the running configuration: %s", error)
            return False
        # Flags given on the command line keep winning over the files.
        for field in _RESTART_ONLY:
            if field not in self.runtime.overrides and getattr(new.settings, field) != getattr(old.settings, field):
                log.warning("%s: %s changed to %r; restart clipal to apply it", CONFIG_FILE, field,
                            getattr(new.settings, field))
        # listen_addr/port keep their running values in the snapshot: that is what is served,
        # and what the next reload compares with (so a later edit still says "restart", and
        # putting the running values back does not).
        running = {field: getattr(old.settings, field) for field in _RESTART_ONLY}
        new = dataclasses.replace(new, settings=dataclasses.replace(new.settings, **running))
        snapshot = self.runtime.apply(new)
        changes = describe_changes(old, snapshot.config)
        log.info("configuration reloaded%s", (": " + "; ".join(changes)) if changes else " (no changes)")
        warn_about_permissions(snapshot.config)
        return True


def start_watching(runtime: Runtime) -> DirectoryWatcher:
    """Start the watcher greenlet for the runtime's config directory."""
    config_dir = runtime.snapshot.config.config_dir
    names = [CONFIG_FILE] + [client.file for client in CLIENTS]
    watcher = DirectoryWatcher(config_dir, names, Reloader(runtime).reload)
    watcher.start()
    get_logger().debug("watching %s for changes (%s)", config_dir, watcher.mode_in_use or "starting")
    return watcher
