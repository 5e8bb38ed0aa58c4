"""What requests share: the configuration snapshot, the failover state and the upstream session.

A :class:`Runtime` lives as long as the app. Its :class:`Snapshot` - one
configuration and the failover state built from it - is replaced whole on
reload (one reference swap), so a request that read it keeps a consistent
configuration until it finishes, and no request sees half a config.

The failover state's store is chosen once, at start, from ``state_url``: this
process's memory, or Redis shared with every clipal using the same Redis and
``state_prefix`` (:mod:`clipal.redis_store`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Mapping

import requests

from . import transport
from .access import AccessPolicy
from .config import Config, Settings, config_files
from .routing import Routing
from .redis_store import RedisStore
from .store import MemoryStore, Store
from .logs import configure_logging, warn_if_readable_by_others


@dataclass(frozen=True)
class Snapshot:
    """A configuration and what is built from it (routing, access policy), swapped as one."""

    config: Config
    routing: Routing
    access: AccessPolicy = AccessPolicy()


class Runtime:
    """The current :class:`Snapshot`, the routing state's store and the one upstream session.

    The store outlives every snapshot: a reload keeps the state of every
    provider whose identity is unchanged. ``overrides`` are command-line
    settings that win over config.yaml, now and after every reload.
    """

    def __init__(self, config: Config, overrides: Mapping[str, Any] | None = None,
                 store: Store | None = None) -> None:
        self.overrides = dict(overrides or {})
        self.session: requests.Session = transport.new_session()
        self.store: Store = store if store is not None else open_store(self._with_overrides(config).settings)
        self.snapshot = self._build(config)
        if isinstance(self.store, RedisStore):
            # create_app configures logging after the runtime is built; the store's first
            # line (shared, or why not yet) must already reach the configured log.
            apply_logging(self.snapshot.config)
            self.store.check()

    def _with_overrides(self, config: Config) -> Config:
        if not self.overrides:
            return config
        return dataclasses.replace(config, settings=dataclasses.replace(config.settings, **self.overrides))

    def _build(self, config: Config) -> Snapshot:
        config = self._with_overrides(config)
        settings = config.settings
        routing = Routing(config.providers, store=self.store, clock=time.time,
                          reactivate_after=settings.reactivate_after,
                          isolate_count_tokens=settings.ignore_count_tokens_failover,
                          breaker=settings.circuit_breaker, pinned=config.pinned)
        access = AccessPolicy.build(settings.access_tokens, settings.allowed_origins, settings.allowed_hosts)
        return Snapshot(config=config, routing=routing, access=access)

    def apply(self, config: Config) -> Snapshot:
        """Install a new configuration: its routing over the same store, logging settings at once.

        Providers that are gone (or changed, which makes them new) leave their state behind.
        """
        previous = self.snapshot
        snapshot = self._build(config)
        self.snapshot = snapshot
        snapshot.routing.forget_others()
        snapshot.routing.revalidate(previous.routing)
        snapshot.routing.carry_counters(previous.routing)
        apply_logging(snapshot.config)
        return snapshot


def open_store(settings: Settings) -> Store:
    """The store ``state_url`` names: this process's memory when it is empty, else Redis.

    Raises :class:`~clipal.config.ConfigError` when it names Redis and redis-py is not installed.
    """
    if not settings.state_url:
        return MemoryStore(time.time)
    return RedisStore(settings.state_url, settings.state_prefix)


def apply_logging(config: Config) -> None:
    """The logging part of a configuration: level, files, retention, and the keys to redact."""
    settings = config.settings
    configure_logging(level=settings.log_level, log_dir=config.log_dir, retention_days=settings.log_retention_days,
                      to_stdout=settings.log_stdout, secrets=config.secrets())


def warn_about_permissions(config: Config) -> None:
    """Config files hold API keys: say so (once per file) when others may read one."""
    for path in config_files(config.config_dir):
        if path.exists():
            warn_if_readable_by_others(path)
