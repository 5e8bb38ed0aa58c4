"""Routing state in Redis: every clipal process using the same Redis and prefix shares one failover state.

With ``state_url`` set, :class:`~clipal.runtime.Runtime` keeps its records
here instead of in a :class:`~clipal.store.MemoryStore`. Each record is one
Redis string, ``<state_prefix>:<store key>``, holding the record as JSON and
expiring (``PX``) when the policy's ``ttl`` says.

**Reads go to Redis at the start of every request.** The policy reads once per
request (one ``MGET``), so a deactivation, cooldown, breaker or failover that
any process writes is what every other process reads next: there is nothing
to keep in step. A local mirror refreshed by pub/sub would save that round
trip, but it needs version ordering, a resync after every lost subscription,
and it would keep state that a flushed Redis no longer has. The read path is
kept lean instead (see :meth:`RedisStore._mget`): measured, it adds about
0.05 ms and a few per cent of a request's CPU (deploy/README.md).

**Updates are optimistic transactions** (``WATCH``/``GET``/``MULTI``/``SET``/
``EXEC``, retried when another process wrote the key in between), so the
breaker's transitions and its single half-open probe permit hold across
processes. Within a process one greenlet at a time updates a given key, so a
burst of requests failing over together does not make them retry against
each other.

**Redis is a helper, never a single point of failure.** Every call is bounded
(:data:`CALL_TIMEOUT`, for the whole call, by a gevent timeout on top of the
socket timeouts; redis-py's own retries are off). When a call fails or times
out, this process serves from its own :class:`MemoryStore` - which every
successful update also writes, so it holds what this process last knew -
logs one warning, and leaves Redis alone for :data:`RETRY_AFTER`: a dead or
frozen Redis costs one bounded wait per second per process, not one per
request. The first call after that asks Redis again; when it answers, one
warning says so, and the records this process wrote while Redis was away are
written back where Redis has none for that key (it restarted empty, or
nobody else learned the same thing): what other processes wrote meanwhile
wins. A Redis that lost its data is simply an empty state.

redis-py's sockets are gevent's (clipal patches before anything imports
socket), so a slow Redis blocks only the greenlet waiting on it.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

import gevent

from .config import CONFIG_FILE, ConfigError, public_url
from .logs import get_logger
from .store import MemoryStore, Record

if TYPE_CHECKING:  # redis is an optional dependency, imported when a store is made
    import redis

#: Longest a store call may wait for Redis (seconds), connecting included.
CALL_TIMEOUT = 0.05
#: After a failed call Redis is left alone this long (seconds); calls meanwhile use memory.
RETRY_AFTER = 1.0
#: Tries of one optimistic transaction when other processes keep writing the same key.
WATCH_ATTEMPTS = 20
#: Longest random pause before another try of a transaction (seconds).
WATCH_PAUSE = 0.001
#: Packed MGET commands kept (one per key list, i.e. per client and configuration).
PACKED_KEPT = 64

T = TypeVar("T")


class _Away:
    """What :meth:`RedisStore._shared` returns instead of a result when Redis cannot be used now."""


AWAY = _Away()


class Contended(Exception):
    """Other processes wrote a key on every try of a transaction, or for as long as the bound allowed."""


def import_redis() -> Any:
    """The redis package, or the one-line configuration error that says how to get it."""
    try:
        import redis
    except ImportError:
        raise ConfigError(CONFIG_FILE, "state_url needs the redis package: pip install 'clipal[redis]'") from None
    return redis


def _encode(record: Record) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode("utf-8")


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisStore:
    """The :class:`~clipal.store.Store` of processes that share their failover state through Redis."""

    def __init__(self, url: str, prefix: str, *, clock: Callable[[], float] = time.time,
                 timeout: float = CALL_TIMEOUT, retry_after: float = RETRY_AFTER) -> None:
        redis_module = import_redis()
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.prefix = prefix
        self.timeout = timeout
        self.retry_after = retry_after
        self._clock = clock
        self._key_prefix = prefix + ":"
        # Retries inside a call would multiply the bound; a failed call falls back to memory instead.
        self._pool = redis_module.ConnectionPool.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            health_check_interval=0)
        self._client: redis.Redis = redis_module.Redis(connection_pool=self._pool)
        self._errors: tuple[type[BaseException], ...] = (redis_module.RedisError, OSError)
        self._watch_error: type[Exception] = redis_module.WatchError
        self._memory = MemoryStore(clock)
        self._up = True  # until a call says otherwise
        self._retry_at = 0.0  # monotonic; when Redis is asked again while it is away
        #: key -> wall-clock expiry of what this process wrote to memory while Redis was away
        self._written_away: dict[str, float] = {}
        self._locks: dict[str, threading.Lock] = {}
        # The read path's own connections (see _mget), and the process they belong to.
        self._idle: list[Any] = []
        self._pid = os.getpid()
        self._packed: dict[tuple[str, ...], Any] = {}
        #: full key -> (the JSON last read, its record), so an unchanged record is not decoded again
        self._decoded: dict[str, tuple[bytes, Record]] = {}

    # -- the Store protocol ------------------------------------------------------------

    def get_many(self, keys: list[str]) -> list[Record | None]:
        names = tuple(self._key_prefix + key for key in keys)
        values = self._shared(lambda: self._mget(names))
        if isinstance(values, _Away):
            return self._memory.get_many(keys)
        return [self._decode(name, raw) for name, raw in zip(names, values)]

    def update(self, key: str, change: Callable[[Record | None], Record | None],
               ttl: Callable[[Record], float]) -> Record | None:
        answered: list[bool] = []
        try:
            outcome = self._shared(lambda: self._transaction(self._key_prefix + key, change, ttl, answered),
                                   answered)
        except Contended:
            # Redis works; other processes were writing this record all along. Rare (it takes
            # hundreds of writes a second to one record); this process still knows its change.
            get_logger().warning("shared state: the record %s kept changing in Redis while this process tried to "
                                 "change it; this change is kept in this process only", key)
            return self._memory.update(key, change, ttl)
        if isinstance(outcome, _Away):
            return self._memory.update(key, change, lambda record: self._written_while_away(key, ttl(record)))
        new, seconds = outcome
        # What this process falls back on if Redis goes away: the last it knew of each record it changed.
        self._memory.update(key, lambda _old: new, lambda _record: seconds)
        return new

    def keep_only(self, prefixes: Iterable[str]) -> None:
        """Forget gone providers in this process's memory; in Redis, their records simply expire.

        Another process, or another host, may still have those providers: deleting their
        records in Redis would erase state that is not this process's to forget.
        """
        keep = tuple(prefixes)
        self._memory.keep_only(keep)
        for key in [k for k in self._written_away if not k.startswith(keep)]:
            del self._written_away[key]
        names = tuple(self._key_prefix + p for p in keep)
        for name in [n for n in self._decoded if not n.startswith(names)]:
            del self._decoded[name]

    def describe(self) -> dict[str, Any]:
        return {"backend": "redis", "connected": self._up}

    # -- start and end ------------------------------------------------------------------

    def check(self) -> bool:
        """Ask Redis once (bounded) and log where the state is shared, or (one warning) why not yet."""
        answered = not isinstance(self._shared(self._client.ping), _Away)
        if answered:
            get_logger().info("failover state shared through Redis at %s (state_prefix %r)", public_url(self.url),
                              self.prefix)
        return answered

    def close(self) -> None:
        """Close every connection to Redis (the store stays usable: it reconnects when next asked)."""
        self._drop_connections()

    # -- Redis, bounded, or memory -------------------------------------------------------

    def _shared(self, call: Callable[[], T], answered: list[bool] | None = None) -> T | _Away:
        """``call()`` against Redis within the bound, or AWAY when Redis is away (now or for a while).

        ``answered`` is filled by a call once Redis has answered it: a call cut by the bound
        after that was held up by other writers (:class:`Contended`), not by Redis.
        """
        probing = not self._up
        if probing:
            now = time.monotonic()
            if now < self._retry_at:
                return AWAY
            self._retry_at = now + self.retry_after  # one probe per pause, whichever greenlet comes first
        timer = gevent.Timeout(self.timeout)
        timer.start()
        try:
            written_back = self._write_back() if probing else 0
            result = call()
        except gevent.Timeout as error:
            if error is not timer:
                raise
            if answered:
                raise Contended() from None
            self._went_away(f"no answer within {self.timeout * 1000:.0f} ms")
            return AWAY
        except self._errors as error:
            self._went_away(str(error) or type(error).__name__)
            return AWAY
        finally:
            timer.close()
        if probing:
            self._up = True
            self._written_away.clear()
            get_logger().warning("shared state: Redis at %s answers again; the failover state is shared again "
                                 "(%d record(s) this process wrote meanwhile written back)", public_url(self.url),
                                 written_back)
        return result

    def _went_away(self, reason: str) -> None:
        if self._up:
            self._up = False
            get_logger().warning("shared state: Redis at %s is unreachable (%s); serving from this process's "
                                 "memory, asking Redis again every %gs", public_url(self.url), reason,
                                 self.retry_after)
        self._retry_at = time.monotonic() + self.retry_after
        # Pooled connections to a Redis that died or restarted would each fail once more.
        self._drop_connections()

    def _drop_connections(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.disconnect()
        self._pool.disconnect(inuse_connections=False)

    def _written_while_away(self, key: str, seconds: float) -> float:
        self._written_away[key] = self._clock() + seconds
        return seconds

    def _write_back(self) -> int:
        """Write what this process changed while Redis was away, where Redis has no record for the key."""
        if not self._written_away:
            return 0
        keys = list(self._written_away)
        now = self._clock()
        written: list[bool] = []
        with self._client.pipeline(transaction=False) as pipe:
            for key, record in zip(keys, self._memory.get_many(keys)):
                left = self._written_away[key] - now
                if record is not None and left > 0:
                    pipe.set(self._key_prefix + key, _encode(record), px=_milliseconds(left), nx=True)
            if len(pipe):
                written = pipe.execute()
        return sum(1 for done in written if done)

    # -- the two commands -------------------------------------------------------------------

    def _mget(self, names: tuple[str, ...]) -> list[bytes | None]:
        """``MGET names`` on a connection of this store's own, without redis-py's pool.

        The pool checks each connection it hands out with a poll and counts it for its
        metrics; on the path every request takes, that costs more than the command. A
        connection here goes back to the idle list only after a whole answer was read,
        and is closed on any error or interruption, so one taken from the list is always
        ready for the next command.
        """
        if self._pid != os.getpid():  # forked (gunicorn --preload): the parent's sockets are not ours
            self._idle, self._pid = [], os.getpid()
        packed = self._packed.get(names)
        connection = self._idle.pop() if self._idle else self._new_connection()
        try:
            if packed is None:
                if len(self._packed) >= PACKED_KEPT:
                    self._packed.clear()
                packed = self._packed[names] = connection.pack_command("MGET", *names)
            connection.send_packed_command(packed, check_health=False)
            values = connection.read_response()
        except BaseException:
            connection.disconnect()
            raise
        self._idle.append(connection)
        return values

    def _new_connection(self) -> Any:
        """A connection made as the pool would (URL, timeouts, TLS, auth), but not counted in it."""
        return self._pool.connection_class(**self._pool.connection_kwargs)

    def _transaction(self, name: str, change: Callable[[Record | None], Record | None],
                     ttl: Callable[[Record], float], answered: list[bool]) -> tuple[Record | None, float]:
        """Replace ``name`` by ``change(old)`` atomically: the new record and its time to live."""
        lock = self._locks.get(name) or self._locks.setdefault(name, threading.Lock())
        with lock, self._client.pipeline(transaction=True) as pipe:
            for _ in range(WATCH_ATTEMPTS):
                try:
                    pipe.watch(name)
                    old = pipe.get(name)
                    answered.append(True)
                    new = change(self._loads(old))
                    seconds = ttl(new) if new is not None else 0.0
                    pipe.multi()
                    if new is None:
                        pipe.delete(name)
                    else:
                        pipe.set(name, _encode(new), px=_milliseconds(seconds))
                    pipe.execute()
                    return new, seconds
                except self._watch_error:
                    # Another process wrote it between GET and EXEC: read it again, after a
                    # random pause so that two processes do not keep colliding in step.
                    time.sleep(random.uniform(0, WATCH_PAUSE))
        raise Contended(name)

    # -- values -------------------------------------------------------------------------------

    def _decode(self, name: str, raw: bytes | None) -> Record | None:
        """The record for ``raw``; the same object as last time when the JSON is unchanged (records are read-only)."""
        if raw is None:
            self._decoded.pop(name, None)
            return None
        seen = self._decoded.get(name)
        if seen is not None and seen[0] == raw:
            return seen[1]
        record = self._loads(raw)
        if record is not None:
            self._decoded[name] = (raw, record)
        return record

    @staticmethod
    def _loads(raw: bytes | None) -> Record | None:
        """A record from Redis; anything that is not a JSON object (another program's value) reads as none."""
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None
