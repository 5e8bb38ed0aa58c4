"""Failover state: which provider a client uses now, and which are out of service.

This is the only mutable state clipal shares between requests. It is pure
bookkeeping with an injectable clock; the proxy asks it for an order in
which to try providers and reports each outcome back.

Concurrency: every method runs without yielding to the gevent hub (no I/O,
no sleeps), so under gevent each call is atomic with respect to other
greenlets and no lock is needed. A hot reload builds a new
:class:`FailoverState` and swaps the reference, so a request keeps the state
it started with and never sees half a configuration.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from .classify import Kind, Verdict
from .config import Provider, active_providers, format_duration

#: The main conversation's lane, and the separate one Claude Code's count_tokens uses when
#: ignore_count_tokens_failover is on (its failures then move only its own cursor).
MAIN = "main"
COUNT_TOKENS = "count_tokens"

Clock = Callable[[], float]

#: clipal's own Retry-After never asks a client to wait longer than this (seconds).
MAX_RETRY_AFTER = 60


@dataclass(frozen=True)
class Outage:
    """Why and until when a provider is out of service."""

    until: float
    kind: Kind


@dataclass(frozen=True)
class Unavailable:
    """The answer when no provider can take a request: 429 or 503, and when to come back."""

    status: int  # 429 or 503
    retry_after: int  # whole seconds
    message: str


class ProviderPool:
    """One client's providers, current cursors, deactivations and cooldowns."""

    def __init__(self, providers: tuple[Provider, ...], *, reactivate_after: float,
                 isolate_count_tokens: bool, clock: Clock = time.monotonic) -> None:
        self.providers = active_providers(providers)
        self.reactivate_after = reactivate_after
        self.isolate_count_tokens = isolate_count_tokens
        self._clock = clock
        self._index = {p.name: i for i, p in enumerate(self.providers)}
        self._cursor: dict[str, int] = {MAIN: 0, COUNT_TOKENS: 0}
        # Deactivation (auth, billing, quota) is a fact about the provider's
        # account, so it is shared by every lane.
        self._deactivated: dict[str, Outage] = {}
        # Cooldowns are kept per lane: when count_tokens is isolated, its
        # rate limits must not push the main conversation off its provider.
        self._cooling: dict[tuple[str, str], Outage] = {}

    # -- lanes ---------------------------------------------------------------

    def lane_for(self, is_count_tokens: bool) -> str:
        return COUNT_TOKENS if is_count_tokens and self.isolate_count_tokens else MAIN

    def current(self, lane: str = MAIN) -> Provider | None:
        return self.providers[self._cursor[lane]] if self.providers else None

    # -- availability --------------------------------------------------------

    def expire(self) -> list[str]:
        """Forget outages whose time has passed; return names of reactivated providers."""
        now = self._clock()
        reactivated = [name for name, o in self._deactivated.items() if o.until <= now]
        for name in reactivated:
            del self._deactivated[name]
        for key in [k for k, o in self._cooling.items() if o.until <= now]:
            del self._cooling[key]
        return reactivated

    def outage(self, provider: Provider, lane: str = MAIN) -> Outage | None:
        """The outage keeping ``provider`` out of service in ``lane`` now, if any."""
        now = self._clock()
        found = [o for o in (self._deactivated.get(provider.name), self._cooling.get((lane, provider.name)))
                 if o is not None and o.until > now]
        return max(found, key=lambda o: o.until) if found else None

    def is_available(self, provider: Provider, lane: str = MAIN) -> bool:
        return self.outage(provider, lane) is None

    def candidates(self, lane: str = MAIN) -> Iterator[Provider]:
        """Providers in the order a request tries them: from the current one, wrapping, each once.

        Availability is checked lazily, just before each provider is yielded,
        so an outage recorded by a concurrent request is respected at once.
        """
        count = len(self.providers)
        start = self._cursor[lane]
        for step in range(count):
            provider = self.providers[(start + step) % count]
            if self.is_available(provider, lane):
                yield provider

    # -- outcomes ------------------------------------------------------------

    def succeeded(self, provider: Provider, lane: str = MAIN) -> None:
        """The provider answered: it becomes current, so later requests stick to it."""
        index = self._index.get(provider.name)
        if index is not None:
            self._cursor[lane] = index

    def failed(self, provider: Provider, verdict: Verdict, lane: str = MAIN) -> Outage | None:
        """Record a failed attempt; return the outage it started, if any.

        The lane's cursor moves past the provider, so the next request does
        not start on a provider that just failed.
        """
        index = self._index.get(provider.name)
        if index is None:  # not in this configuration (reloaded meanwhile)
            return None
        if self._cursor[lane] == index:
            self._cursor[lane] = (index + 1) % len(self.providers)
        now = self._clock()
        if verdict.deactivate and self.reactivate_after > 0:
            outage = Outage(now + self.reactivate_after, verdict.kind or Kind.AUTH)
            self._deactivated[provider.name] = outage
            return outage
        if verdict.cooldown:
            outage = Outage(now + verdict.cooldown, verdict.kind or Kind.RATE_LIMIT)
            key = (lane, provider.name)
            previous = self._cooling.get(key)
            if previous is None or previous.until < outage.until:
                self._cooling[key] = outage
            return self._cooling[key]
        return None

    def unavailable(self, lane: str = MAIN) -> Unavailable:
        """What to answer when no provider is left for a request.

        429 when the provider that recovers first is rate-limited or
        overloaded (come back soon), else 503; 503 with Retry-After 1 when a
        provider failed without a hint (it may work at once).
        """
        if not self.providers:
            return Unavailable(503, 1, "no providers configured")
        now = self._clock()
        outages = [self.outage(p, lane) for p in self.providers]
        if any(o is None for o in outages):
            # Something failed without an outage: it may work on a retry.
            return Unavailable(503, 1, "all providers failed")
        soonest = min((o for o in outages if o is not None), key=lambda o: o.until)
        left = max(0.0, soonest.until - now)
        wait = int(left) + 1
        # The message keeps the real wait; the header is capped, because an
        # agent gives up on (Claude Code) or sleeps through (Codex) a long
        # Retry-After, while asking clipal again is cheap and a reload may
        # have fixed things meanwhile.
        retry_after = min(wait, MAX_RETRY_AFTER)
        if soonest.kind in (Kind.RATE_LIMIT, Kind.OVERLOADED):
            return Unavailable(429, retry_after,
                               f"all providers are rate-limited or overloaded; retry in {format_duration(math.ceil(left))}")
        return Unavailable(503, retry_after, f"no provider available; retry in {format_duration(math.ceil(left))}")


class FailoverState:
    """Every client's :class:`ProviderPool`, built from one configuration."""

    def __init__(self, providers: Mapping[str, tuple[Provider, ...]], *, reactivate_after: float,
                 isolate_count_tokens: bool, clock: Clock = time.monotonic) -> None:
        self.pools = {
            client: ProviderPool(ps, reactivate_after=reactivate_after,
                                 isolate_count_tokens=isolate_count_tokens, clock=clock)
            for client, ps in providers.items()
        }

    def pool(self, client: str) -> ProviderPool:
        return self.pools[client]
