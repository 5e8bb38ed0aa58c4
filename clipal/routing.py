"""Routing: which provider and key a request tries, in what order, and what each outcome changes.

The policy is pure: it reads records from a :class:`~clipal.store.Store`,
decides with a clock it is given, and writes records back. It never does
I/O of its own, so every rule is unit-tested with a fake clock and a memory
store, and the same code runs over a shared Redis store.

The rules:

* Each client has a current provider (per lane: Claude Code's count_tokens
  may keep its own, see ``ignore_count_tokens_failover``). A request walks the
  enabled providers by priority from the current one, wrapping, each at most
  once, skipping those out of service. The provider that answers becomes
  current, so later requests stay on it (and on its prompt cache).
* A provider has one or more keys and a current key (the one that last
  succeeded). Key-scoped outcomes (auth, billing, quota, rate limit) put only
  that key out of service - deactivated for ``reactivate_after``, or cooling
  for the hinted time; a rate limit without a hint only for this request -
  and the next key of the same provider is tried before any other provider.
  A provider whose keys are all out is out itself.
* Provider-scoped outcomes (network, server errors, timeouts, broken or
  incomplete streams) go straight to the next provider, cooling this one for
  the hinted time, if any.
* Each provider has a circuit breaker that only steers: ``failure_threshold``
  consecutive counted failures open it for ``open_timeout``; an open provider
  (or a half-open one whose single probe is in flight) is not skipped but
  tried last, after every other provider in service has failed in this
  request. After ``open_timeout`` it is half-open: one request at a time
  probes it; ``success_threshold`` completed successes close it, a counted
  failure opens it again. Answers returned as they are (a 4xx) are neutral.
  Breakers never make a request fail by themselves, and count_tokens never
  moves a breaker or takes the probe.
* Deactivations (auth, billing, quota) are facts about an account, shared by
  every lane; cooldowns and request cursors are per lane.

Records are keyed by provider identity (client, name, base_url and a hash of
each key), so a reload keeps them for every unchanged provider, and
processes sharing a store share them. Times are wall-clock seconds, the one
clock several processes agree on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

from .classify import Kind, Verdict
from .config import BreakerSettings, Provider, active_providers, format_duration
from .store import Record, Store

#: The main conversation's lane, and the one Claude Code's count_tokens uses when isolated.
MAIN = "main"
COUNT_TOKENS = "count_tokens"

#: clipal's own Retry-After never asks a client to wait longer than this (seconds).
MAX_RETRY_AFTER = 60
#: Records outlive their last outage by this much, so a reactivation is noticed (and logged).
RECORD_GRACE = 24 * 3600.0
#: A half-open probe that never reports back (its process died) frees the permit after this long.
PROBE_LEASE = 600.0

Clock = Callable[[], float]

#: "Not read yet" (None is a valid record: there is none).
_UNREAD: object = object()


# --------------------------------------------------------------------------- records


def _outage(until: float, kind: Kind) -> list:
    return [until, kind.value]


def _live(outage: list | None, now: float) -> tuple[float, Kind] | None:
    """An outage that has not ended yet, as (until, kind)."""
    if outage is None or outage[0] <= now:
        return None
    return outage[0], Kind(outage[1])


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


def _breaker(record: Record | None) -> dict:
    return dict((record or {}).get("breaker") or {"state": CLOSED, "failures": 0, "successes": 0})


def breaker_state(record: Record | None, settings: BreakerSettings, now: float) -> str:
    """closed, open or half_open: an open breaker whose open_timeout has passed reads half_open."""
    breaker = _breaker(record)
    state = breaker["state"]
    if state == OPEN and now >= breaker.get("opened_at", 0.0) + settings.open_timeout:
        return HALF_OPEN
    return state


# --------------------------------------------------------------------------- outcomes of a walk


@dataclass(frozen=True)
class Attempt:
    """One try: this provider with its key number ``key`` (0-based)."""

    provider: Provider
    key: int
    #: tried last because its breaker is open (or its half-open probe is taken)
    deferred: bool = False
    #: this attempt holds the half-open probe permit
    probe: bool = False

    @property
    def key_label(self) -> str:
        """How logs name the key: by position, never by value."""
        total = len(self.provider.api_keys)
        return f"key {self.key + 1} of {total}" if total > 1 else ""


@dataclass(frozen=True)
class Unavailable:
    """The answer when no provider can take a request: 429 or 503, and when to come back."""

    status: int
    retry_after: int  # whole seconds, capped at MAX_RETRY_AFTER
    message: str


@dataclass
class Event:
    """Something the caller should log (kept out of the policy so that it stays pure)."""

    level: str  # "info", "warning", "error"
    message: str


@dataclass
class ProviderView:
    """One provider's state for /status and metrics, as this process sees it now."""

    provider: Provider
    state: str  # available, deactivated, cooling, circuit_open, half_open
    reason: str | None
    retry_in: float | None
    keys_available: int
    breaker: str


# --------------------------------------------------------------------------- the policy


class Routing:
    """The routing of every client for one configuration, over a store that outlives it."""

    def __init__(self, providers: Mapping[str, Sequence[Provider]], *, store: Store, clock: Clock,
                 reactivate_after: float, isolate_count_tokens: bool, breaker: BreakerSettings,
                 pinned: Mapping[str, str] | None = None) -> None:
        self.store = store
        self.clients = {
            client: ClientRouting(client, tuple(ps), store=store, clock=clock, reactivate_after=reactivate_after,
                                  isolate_count_tokens=isolate_count_tokens, breaker=breaker,
                                  pinned=(pinned or {}).get(client))
            for client, ps in providers.items()
        }

    def client(self, name: str) -> ClientRouting:
        return self.clients[name]

    def revalidate(self, previous: Routing | None) -> None:
        """After a reload: a provider that is new or changed (a fixed key, a new URL) and comes
        before a client's current provider becomes current, so the edit is tried at once.

        Everything else stays as it was: the current provider of a client whose edit did not
        touch anything ahead of it, and every unchanged provider's outages and breaker.
        """
        for client in self.clients.values():
            before = previous.clients.get(client.name) if previous is not None else None
            known = {p.identity for p in before.providers} if before is not None else set()
            fresh = [p for p in client.providers if p.identity not in known]
            if not fresh or before is None:
                continue
            cursor, _ = client.read()
            for lane in ((cursor or {}).get("current") or {}):
                current = client.current(lane, cursor)
                if current is not None and client.providers.index(fresh[0]) < client.providers.index(current):
                    client.set_current(cursor, fresh[0], lane)

    def carry_counters(self, previous: Routing | None) -> None:
        """After a reload: each provider's attempt counters go on from where they were (by name).

        They count this process's attempts since start, not since the last edit.
        """
        for client in self.clients.values():
            before = previous.clients.get(client.name) if previous is not None else None
            for name, counters in (before.counters.items() if before is not None else ()):
                if name in client.counters:
                    client.counters[name] = counters

    def forget_others(self) -> None:
        """Drop the records of providers this configuration no longer has (their state is stale)."""
        prefixes = [f"{c.name}:{p.identity}" for c in self.clients.values() for p in c.providers]
        prefixes += [f"{c.name}" + _CLIENT_SUFFIX for c in self.clients.values()]
        self.store.keep_only(prefixes)


_CLIENT_SUFFIX = "/cursor"


@dataclass
class Counters:
    """Attempts this process sent to a provider, and how many failed (for /status)."""

    requests: int = 0
    failures: int = 0


class ClientRouting:
    """One client's providers, over the store."""

    def __init__(self, name: str, providers: tuple[Provider, ...], *, store: Store, clock: Clock,
                 reactivate_after: float, isolate_count_tokens: bool, breaker: BreakerSettings,
                 pinned: str | None = None) -> None:
        self.name = name
        self.providers = active_providers(providers)
        self.all_providers = providers
        self.store = store
        self.clock = clock
        self.reactivate_after = reactivate_after
        self.isolate_count_tokens = isolate_count_tokens
        self.breaker = breaker
        self.pinned = next((p for p in self.providers if p.name == pinned), None) if pinned else None
        self.counters: dict[str, Counters] = {p.name: Counters() for p in providers}
        self._cursor_key = name + _CLIENT_SUFFIX

    # -- the store -----------------------------------------------------------------

    def record_key(self, provider: Provider) -> str:
        return f"{self.name}:{provider.identity}"

    def read(self) -> tuple[Record | None, dict[str, Record | None]]:
        """The cursor record and every provider's record, in one round trip."""
        keys = [self._cursor_key] + [self.record_key(p) for p in self.providers]
        found = self.store.get_many(keys)
        return found[0], {p.name: r for p, r in zip(self.providers, found[1:])}

    def read_one(self, provider: Provider) -> Record | None:
        return self.store.get_many([self.record_key(provider)])[0]

    def change(self, provider: Provider, edit: Callable[[Record], None]) -> Record | None:
        """Edit ``provider``'s record in place, atomically; it lives until its last outage ends, plus a grace."""
        now = self.clock()

        def apply(old: Record | None) -> Record:
            record = old if old is not None else {}
            edit(record)
            return record
        return self.store.update(self.record_key(provider), apply, lambda record: _ttl(record, now))

    def set_current(self, cursor: Record | None, provider: Provider, lane: str) -> None:
        if ((cursor or {}).get("current") or {}).get(lane) == provider.identity:
            return  # the common case: it stays where it is, nothing to write

        def move(old: Record | None) -> Record:
            record = old if old is not None else {}
            record.setdefault("current", {})[lane] = provider.identity
            return record
        self.store.update(self._cursor_key, move, lambda record: RECORD_GRACE)

    # -- lanes -------------------------------------------------------------------

    def lane_for(self, is_count_tokens: bool) -> str:
        return COUNT_TOKENS if is_count_tokens and self.isolate_count_tokens else MAIN

    @property
    def manual(self) -> bool:
        return self.pinned is not None

    # -- what the records mean -------------------------------------------------------

    def current(self, lane: str = MAIN, cursor: Record | None = _UNREAD) -> Provider | None:  # type: ignore[assignment]
        if cursor is _UNREAD:
            cursor, _ = self.read()
        if not self.providers:
            return None
        wanted = ((cursor or {}).get("current") or {}).get(lane)
        return next((p for p in self.providers if p.identity == wanted), self.providers[0])

    def current_key(self, provider: Provider, record: Record | None) -> int:
        current_id = (record or {}).get("current_key")
        return next((i for i in range(len(provider.api_keys)) if provider.key_id(i) == current_id), 0)

    def key_order(self, provider: Provider, record: Record | None, lane: str, now: float,
                  skipped: frozenset[int] = frozenset()) -> list[int]:
        """Keys to try, from the current one, wrapping, without those out of service."""
        total = len(provider.api_keys)
        start = self.current_key(provider, record)
        return [index for index in ((start + step) % total for step in range(total))
                if index not in skipped and self.key_outage(provider, record, index, lane, now) is None]

    def key_outage(self, provider: Provider, record: Record | None, index: int, lane: str,
                   now: float) -> tuple[float, Kind] | None:
        key = ((record or {}).get("keys") or {}).get(provider.key_id(index)) or {}
        found = [o for o in (_live(key.get("deactivated"), now), _live((key.get("cooling") or {}).get(lane), now))
                 if o is not None]
        return max(found) if found else None

    def outage(self, provider: Provider, record: Record | None, lane: str, now: float) -> tuple[float, Kind] | None:
        """What keeps ``provider`` out of service in ``lane`` now (until when, and why), or None."""
        found = []
        cooling = _live(((record or {}).get("cooling") or {}).get(lane), now)
        if cooling is not None:
            found.append(cooling)
        keys = [self.key_outage(provider, record, i, lane, now) for i in range(len(provider.api_keys))]
        if all(k is not None for k in keys):
            found.append(min(keys))  # back when its soonest key is
        return max(found) if found else None

    # -- the walk ----------------------------------------------------------------

    def walk(self, lane: str = MAIN, *, count_tokens: bool = False) -> Walk:
        """A request's way through the providers; count_tokens requests never move a breaker."""
        return Walk(self, lane, count_tokens)

    def move_past(self, provider: Provider, lane: str) -> None:
        """The lane's current provider moves on, so the next request does not start where this one failed."""
        cursor, _ = self.read()
        if self.current(lane, cursor) is not provider or len(self.providers) < 2:
            return
        index = self.providers.index(provider)
        self.set_current(cursor, self.providers[(index + 1) % len(self.providers)], lane)

    # -- views -------------------------------------------------------------------

    def views(self, lane: str = MAIN) -> list[ProviderView]:
        """Every provider's state now, in priority order (for /status and the gauges)."""
        now = self.clock()
        _, records = self.read()
        views = []
        for provider in self.providers:
            record = records[provider.name]
            if self.manual:
                views.append(ProviderView(provider, "available", None, None, len(provider.api_keys), CLOSED))
                continue
            keys = len(self.key_order(provider, record, lane, now))
            outage = self.outage(provider, record, lane, now)
            breaker = breaker_state(record, self.breaker, now) if self.breaker.failure_threshold > 0 else CLOSED
            if outage is not None:
                until, kind = outage
                state = "deactivated" if kind in DEACTIVATING else "cooling"
                views.append(ProviderView(provider, state, kind.value, until - now, keys, breaker))
            elif breaker == OPEN:
                opened_at = _breaker(record).get("opened_at", now)
                views.append(ProviderView(provider, "circuit_open", "circuit_open",
                                          opened_at + self.breaker.open_timeout - now, keys, breaker))
            elif breaker == HALF_OPEN:
                views.append(ProviderView(provider, "half_open", "circuit_half_open", None, keys, breaker))
            else:
                views.append(ProviderView(provider, "available", None, None, keys, breaker))
        return views


#: Outcomes that deactivate (for reactivate_after) rather than cool down.
DEACTIVATING = frozenset({Kind.AUTH, Kind.BILLING, Kind.QUOTA})


def _ttl(record: Record, now: float) -> float:
    latest = max([now] + [outage[0] for outage in _all_outages(record)])
    return latest - now + RECORD_GRACE


def _all_outages(record: Record | None) -> list[list]:
    found = [o for o in ((record or {}).get("cooling") or {}).values() if o]
    for key in ((record or {}).get("keys") or {}).values():
        if key.get("deactivated"):
            found.append(key["deactivated"])
        found.extend(o for o in (key.get("cooling") or {}).values() if o)
    return found


class Walk:
    """One request's way through a client's providers and keys.

    Iterate it for :class:`Attempt` s and report each one's outcome with
    :meth:`failed` or :meth:`committed`, and a committed one's end with
    :meth:`finished`. The next attempt is chosen when it is asked for, so an
    outage another request recorded meanwhile is respected at once.
    ``events`` collects what the caller should log, in order.
    """

    def __init__(self, routing: ClientRouting, lane: str, count_tokens: bool) -> None:
        self.routing = routing
        self.lane = lane
        self.count_tokens = count_tokens
        self.events: list[Event] = []
        self._skipped_keys: dict[str, set[int]] = {}
        self._deferred: list[Provider] = []
        self._stay: Provider | None = None  # set by a key-scoped failure: try this provider's next key
        self._last_record: Record | None = None  # the record the last attempt was chosen from
        self._cursor, self._records = routing.read()
        self._reactivate()

    def _reactivate(self) -> None:
        """Deactivations that have ended are forgotten, and said so (the records come back on their own)."""
        routing, now = self.routing, self.routing.clock()
        for provider in routing.providers:
            keys = (self._records.get(provider.name) or {}).get("keys") or {}
            ended = [i for i in range(len(provider.api_keys))
                     if (keys.get(provider.key_id(i)) or {}).get("deactivated")
                     and keys[provider.key_id(i)]["deactivated"][0] <= now]
            if not ended:
                continue
            for index in ended:
                label = Attempt(provider, index).key_label
                self.events.append(Event("info", f"provider {provider.name}{f' ({label})' if label else ''} "
                                                 f"reactivated"))

            def clear(record: Record, ended: list[int] = ended, provider: Provider = provider) -> None:
                for index in ended:
                    key = (record.get("keys") or {}).get(provider.key_id(index))
                    if key and key.get("deactivated") and key["deactivated"][0] <= now:
                        key["deactivated"] = None
            self._records[provider.name] = routing.change(provider, clear)

    # -- order ---------------------------------------------------------------------

    def __iter__(self) -> Iterator[Attempt]:
        routing = self.routing
        if not routing.providers:
            return
        if routing.manual:
            # No failover, no outages, no breaker: the pinned provider with its current key.
            provider = routing.pinned
            yield Attempt(provider, routing.current_key(provider, self._records.get(provider.name)))
            return
        count = len(routing.providers)
        start = routing.providers.index(routing.current(self.lane, self._cursor))
        for step in range(count):
            yield from self._attempts_on(routing.providers[(start + step) % count], last_resort=False)
        for provider in list(self._deferred):  # the breaker's last resort, in walk order
            yield from self._attempts_on(provider, last_resort=True)

    def _record(self, provider: Provider) -> Record | None:
        if provider.name in self._records:  # read at the start of the request
            return self._records.pop(provider.name)
        return self.routing.read_one(provider)

    def _attempts_on(self, provider: Provider, *, last_resort: bool) -> Iterator[Attempt]:
        routing = self.routing
        now = routing.clock()
        record = self._record(provider)
        if routing.outage(provider, record, self.lane, now) is not None:
            return
        probe = False
        if not last_resort and routing.breaker.failure_threshold > 0:
            state = breaker_state(record, routing.breaker, now)
            if state == OPEN or (state == HALF_OPEN and (self.count_tokens or not self._take_probe(provider))):
                self._deferred.append(provider)
                return
            probe = state == HALF_OPEN
        skipped = self._skipped_keys.setdefault(provider.name, set())
        while True:
            order = routing.key_order(provider, record, self.lane, routing.clock(), frozenset(skipped))
            if not order:
                return
            self._stay = None
            self._last_record = record
            yield Attempt(provider, order[0], deferred=last_resort, probe=probe)
            probe = False  # the probe is one attempt
            if self._stay is not provider:
                return
            record = routing.read_one(provider)

    def _take_probe(self, provider: Provider) -> bool:
        """Take the half-open probe permit, atomically; False when another request holds it."""
        routing, now = self.routing, self.routing.clock()
        taken: list[bool] = []
        said: list[Event] = []  # a shared store may run ``take`` again: say only the last run's

        def take(record: Record) -> None:
            said.clear()
            breaker = _breaker(record)
            if breaker_state(record, routing.breaker, now) != HALF_OPEN or breaker.get("probe_until", 0.0) > now:
                taken.append(False)
                return
            if breaker["state"] == OPEN:  # open_timeout has passed: it is half-open from now on
                breaker.update(state=HALF_OPEN, successes=0)
                said.append(Event("info", f"provider {provider.name}: circuit half-open, probing it"))
            breaker["probe_until"] = now + PROBE_LEASE
            record["breaker"] = breaker
            taken.append(True)
        routing.change(provider, take)
        self.events.extend(said)
        return taken[-1]

    # -- outcomes ------------------------------------------------------------------

    def failed(self, attempt: Attempt, verdict: Verdict) -> None:
        """An attempt failed before the commit point; the next one is chosen accordingly."""
        routing = self.routing
        counters = routing.counters.setdefault(attempt.provider.name, Counters())
        counters.requests += 1
        counters.failures += 1
        if routing.manual:
            return
        kind = verdict.kind or Kind.SERVER_ERROR
        if kind.key_scoped:
            self._key_failed(attempt, verdict, kind)
        else:
            self._provider_failed(attempt, verdict, kind)

    def _key_failed(self, attempt: Attempt, verdict: Verdict, kind: Kind) -> None:
        routing, provider, now = self.routing, attempt.provider, self.routing.clock()
        key_id, lane = provider.key_id(attempt.key), self.lane
        label = f" ({attempt.key_label})" if attempt.key_label else ""
        self._skipped_keys.setdefault(provider.name, set()).add(attempt.key)
        if verdict.deactivate and routing.reactivate_after > 0:
            outage = _outage(now + routing.reactivate_after, kind)
            record = routing.change(provider, lambda r: r.setdefault("keys", {}).setdefault(key_id, {})
                                    .__setitem__("deactivated", outage))
            event = Event("error", f"provider {provider.name}{label} deactivated for "
                                   f"{format_duration(routing.reactivate_after)}: {verdict.reason}")
        elif verdict.cooldown:
            until = now + verdict.cooldown

            def cool(record: Record) -> None:
                cooling = record.setdefault("keys", {}).setdefault(key_id, {}).setdefault("cooling", {})
                if not cooling.get(lane) or cooling[lane][0] < until:
                    cooling[lane] = _outage(until, kind)
            record = routing.change(provider, cool)
            event = Event("warning", f"provider {provider.name}{label} failed: {verdict.reason}; "
                                     f"cooling down for {format_duration(verdict.cooldown)}")
        else:  # out for this request only
            record = self._last_record
            event = Event("warning", f"provider {provider.name}{label} failed: {verdict.reason}")
        remaining = routing.key_order(provider, record, lane, now, frozenset(self._skipped_keys[provider.name]))
        if remaining:
            self._stay = provider  # the next key of the same provider before any other provider
            event.message += f"; trying key {remaining[0] + 1} of {len(provider.api_keys)}"
        else:
            event.message += "; trying next"
            routing.move_past(provider, lane)
        self.events.append(event)

    def _provider_failed(self, attempt: Attempt, verdict: Verdict, kind: Kind) -> None:
        routing, provider, now, lane = self.routing, attempt.provider, self.routing.clock(), self.lane
        message = f"provider {provider.name} failed: {verdict.reason}"
        if verdict.cooldown:
            until = now + verdict.cooldown

            def cool(record: Record) -> None:
                cooling = record.setdefault("cooling", {})
                if not cooling.get(lane) or cooling[lane][0] < until:
                    cooling[lane] = _outage(until, kind)
            routing.change(provider, cool)
            message += f"; cooling down for {format_duration(verdict.cooldown)}"
        self.events.append(Event("warning", message + "; trying next"))
        if kind.counts_for_breaker:
            self._breaker_failure(attempt, verdict.reason)
        routing.move_past(provider, lane)

    def committed(self, attempt: Attempt) -> None:
        """The attempt's answer goes to the client: its provider and key become current."""
        routing, provider = self.routing, attempt.provider
        routing.counters.setdefault(provider.name, Counters()).requests += 1
        if routing.manual:
            return
        routing.set_current(self._cursor, provider, self.lane)
        if len(provider.api_keys) > 1:
            key_id = provider.key_id(attempt.key)
            if (self._last_record or {}).get("current_key") != key_id:
                routing.change(provider, lambda record: record.__setitem__("current_key", key_id))

    def finished(self, attempt: Attempt, *, success: bool | None, reason: str = "",
                 kind: Kind = Kind.SERVER_ERROR) -> None:
        """What became of a committed answer.

        ``success`` True: it completed (a stream with its terminal event).
        None: neutral - returned as is (a 4xx, say) or the client left;
        releases a half-open probe. False: it stalled, broke or ended
        incomplete after the commit point - a provider failure: it counts
        for the breaker and moves the client's current provider past it.
        """
        routing = self.routing
        if routing.manual:
            return
        if success is False:
            routing.counters.setdefault(attempt.provider.name, Counters()).failures += 1
            if kind.counts_for_breaker:
                self._breaker_failure(attempt, reason)
            routing.move_past(attempt.provider, self.lane)
        elif success:
            self._breaker_success(attempt)
        elif attempt.probe:
            self._release_probe(attempt.provider)

    # -- the breaker -------------------------------------------------------------------

    def _breaker_failure(self, attempt: Attempt, reason: str) -> None:
        routing, settings = self.routing, self.routing.breaker
        if settings.failure_threshold <= 0 or self.count_tokens:
            return  # disabled, or a count_tokens request (never moves a breaker)
        now, provider = routing.clock(), attempt.provider
        said: list[Event] = []  # a shared store may run ``count`` again: say only the last run's

        def count(record: Record) -> None:
            said.clear()
            breaker = _breaker(record)
            if breaker_state(record, settings, now) == CLOSED:
                breaker["failures"] = breaker.get("failures", 0) + 1
                if breaker["failures"] >= settings.failure_threshold:
                    breaker.update(state=OPEN, opened_at=now, successes=0, probe_until=0.0)
                    said.append(Event("warning", f"provider {provider.name}: circuit opened for "
                                                        f"{format_duration(settings.open_timeout)} after "
                                                        f"{breaker['failures']} failures in a row (last: {reason})"))
            else:  # half-open, or open and tried as the last resort: open for another open_timeout
                breaker.update(state=OPEN, opened_at=now, successes=0, probe_until=0.0)
                said.append(Event("warning", f"provider {provider.name}: circuit opened again for "
                                             f"{format_duration(settings.open_timeout)} (last: {reason})"))
            record["breaker"] = breaker
        routing.change(provider, count)
        self.events.extend(said)

    def _breaker_success(self, attempt: Attempt) -> None:
        routing, settings = self.routing, self.routing.breaker
        if settings.failure_threshold <= 0 or self.count_tokens:
            if attempt.probe:
                self._release_probe(attempt.provider)
            return
        now, provider = routing.clock(), attempt.provider
        record = self._last_record
        if breaker_state(record, settings, now) == CLOSED and not _breaker(record).get("failures"):
            return  # the common case: nothing to reset, nothing to write
        said: list[Event] = []  # a shared store may run ``count`` again: say only the last run's

        def count(record: Record) -> None:
            said.clear()
            breaker = _breaker(record)
            if breaker_state(record, settings, now) == CLOSED:
                breaker["failures"] = 0
            else:  # half-open, or open and tried as the last resort: a half-open success
                breaker["successes"] = breaker.get("successes", 0) + 1
                breaker["probe_until"] = 0.0
                if breaker["successes"] >= settings.success_threshold:
                    breaker.update(state=CLOSED, failures=0, successes=0)
                    said.append(Event("info", f"provider {provider.name}: circuit closed"))
                else:
                    breaker["state"] = HALF_OPEN
            record["breaker"] = breaker
        routing.change(provider, count)
        self.events.extend(said)

    def _release_probe(self, provider: Provider) -> None:
        def release(record: Record) -> None:
            breaker = _breaker(record)
            breaker["probe_until"] = 0.0
            record["breaker"] = breaker
        self.routing.change(provider, release)

    # -- nothing left --------------------------------------------------------------------

    def unavailable(self) -> Unavailable:
        """What to answer when no provider is left for this request.

        429 when the provider that recovers first is rate-limited or
        overloaded (come back soon), else 503; 503 with Retry-After 1 when a
        provider failed without going out of service (it may work at once).
        Breakers never cause this answer: open providers are tried last.
        """
        routing = self.routing
        if not routing.providers:
            return Unavailable(503, 1, "no providers configured")
        now = routing.clock()
        _, records = routing.read()
        outages = [routing.outage(p, records[p.name], self.lane, now) for p in routing.providers]
        if any(o is None for o in outages):
            return Unavailable(503, 1, "all providers failed")
        until, kind = min(o for o in outages if o is not None)
        left = max(0.0, until - now)
        # The message keeps the real wait; the header is capped, because an
        # agent gives up on (Claude Code) or sleeps through (Codex) a long
        # Retry-After, while asking clipal again is cheap and a reload may
        # have fixed things meanwhile.
        retry_after = min(int(left) + 1, MAX_RETRY_AFTER)
        told = format_duration(math.ceil(left))
        if kind in (Kind.RATE_LIMIT, Kind.OVERLOADED):
            return Unavailable(429, retry_after, f"all providers are rate-limited or overloaded; retry in {told}")
        return Unavailable(503, retry_after, f"no provider available; retry in {told}")


