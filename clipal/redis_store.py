"""Routing state in Redis: every clipal process using the same Redis and prefix shares one failover state.

With ``state_url`` set, :class:`~clipal.runtime.Runtime` keeps its records
here instead of in a :class:`~clipal.store.MemoryStore`. Each record is one
Redis string, ``<state_prefix>:<store key>``, holding the record as JSON and
expiring (``PX``) when the policy's ``ttl`` says.

**Reads go to Redis, at most** :data:`READ_MAX_AGE` **apart.** The policy reads
once at the start of each request (one ``MGET`` of the client's records). A
read within READ_MAX_AGE of the last one for the same records takes that
answer (with this process's own writes since), so a change made by one
process is read by every other within READ_MAX_AGE plus a round trip - well
inside the 100 ms the product promises - while a busy process asks Redis
about twenty times a second per client instead of once per request. Measured
(deploy/README.md), a round trip per request cost a fifth to a third more of
clipal's CPU per request under load on a 2-core machine (Redis spent another
50 us per request); a local mirror refreshed by pub/sub would cost nothing per request but needs
version ordering, a resync after every lost subscription, and keeps state a
flushed Redis no longer has. Updates never use what was read: they are
transactions on Redis itself.

**Updates are optimistic transactions** (``WATCH``+``GET``, then
``MULTI``+``SET``+``EXEC``, tried again when another process wrote the key in
between), so the breaker's transitions and its single half-open probe permit
hold across processes. Within a process one greenlet at a time updates a
given key, so a burst of requests failing over together does not make them
collide with each other.

**Redis is a helper, never a single point of failure.** Redis gets
:data:`CALL_TIMEOUT` to answer a call (connecting included; redis-py's own
retries are off). When it fails or does not answer, this process serves from
its own :class:`MemoryStore` - which every successful update also writes, so
it holds what this process last knew - logs one warning, and leaves Redis
alone for :data:`RETRY_AFTER`: a dead or frozen Redis costs one bounded wait
per second per process, not one per request. The first call after that asks
Redis again; when it answers, one warning says so, and the records this
process wrote while Redis was away are written back where Redis has none for
that key (it restarted empty, or nobody else learned the same thing): what
other processes wrote meanwhile wins. A Redis that lost its data is simply
an empty state.

The bound is on Redis, not on this process: a process so busy that its
greenlet is resumed after the deadline still takes an answer that has
arrived (see :meth:`RedisStore._answers`), so load alone never turns sharing
off. redis-py's sockets are gevent's (clipal patches before anything imports
socket), so waiting on Redis blocks only the greenlet that waits.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from typing import Any, Callable, Iterable, TypeVar

from .config import CONFIG_FILE, ConfigError, public_url
from .logs import get_logger
from .store import MemoryStore, Record

#: How long Redis has to answer a store call (seconds), connecting included.
CALL_TIMEOUT = 0.05
#: The least wait for an answer to a command sent after the deadline (a busy process sends late).
LATE_GRACE = 0.005
#: A read of records read less than this long ago (seconds) takes that answer instead of asking Redis.
READ_MAX_AGE = 0.05
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
    """Other processes wrote a key on every try of a transaction."""


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
        # Only for what redis-py makes of the URL (host or socket, TLS, password, database):
        # connections are this store's own (see _take). A retry inside a call would
        # stretch the bound; a failed call falls back to memory instead.
        pool = redis_module.ConnectionPool.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            health_check_interval=0)
        self._connection_class = pool.connection_class
        self._connection_kwargs = dict(pool.connection_kwargs)
        self._errors: tuple[type[BaseException], ...] = (redis_module.RedisError, OSError)
        self._timeout_error: type[Exception] = redis_module.TimeoutError
        self._memory = MemoryStore(clock)
        self._up = True  # until a call says otherwise
        self._retry_at = 0.0  # monotonic; when Redis is asked again while it is away
        #: key -> wall-clock expiry of what this process wrote to memory while Redis was away
        self._written_away: dict[str, float] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._idle: list[Any] = []  # connections ready for a command
        self._pid = os.getpid()  # the process they belong to
        self._packed: dict[tuple[str, ...], Any] = {}
        #: full key -> (the JSON last read, its record), so an unchanged record is not decoded again
        self._decoded: dict[str, tuple[bytes, Record]] = {}
        #: full key -> (monotonic time it was read or written in Redis, the record or None)
        self._recent: dict[str, tuple[float, Record | None]] = {}

    # -- the Store protocol ------------------------------------------------------------

    def get_many(self, keys: list[str]) -> list[Record | None]:
        names = tuple(self._key_prefix + key for key in keys)
        if self._up:
            oldest = time.monotonic() - READ_MAX_AGE
            recent = [self._recent.get(name) for name in names]
            if all(entry is not None and entry[0] >= oldest for entry in recent):
                return [entry[1] for entry in recent]  # type: ignore[index]
        values = self._shared(lambda deadline: self._mget(names, deadline))
        if isinstance(values, _Away):
            return self._memory.get_many(keys)
        now = time.monotonic()
        records = [self._decode(name, raw) for name, raw in zip(names, values)]
        for name, record in zip(names, records):
            self._recent[name] = (now, record)
        return records

    def update(self, key: str, change: Callable[[Record | None], Record | None],
               ttl: Callable[[Record], float]) -> Record | None:
        try:
            outcome = self._shared(lambda deadline: self._transaction(self._key_prefix + key, change, ttl, deadline))
        except Contended:
            # Redis works; other processes were writing this record all along. Rare (it takes
            # hundreds of writes a second to one record); this process still knows its change.
            get_logger().warning("shared state: the record %s kept changing in Redis while this process tried to "
                                 "change it; this change is kept in this process only", key)
            return self._memory.update(key, change, ttl)
        if isinstance(outcome, _Away):
            return self._memory.update(key, change, lambda record: self._written_while_away(key, ttl(record)))
        new, seconds = outcome
        self._recent[self._key_prefix + key] = (time.monotonic(), new)  # read back at once by this process
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
        for cache in (self._decoded, self._recent):
            for name in [n for n in cache if not n.startswith(names)]:
                del cache[name]

    def describe(self) -> dict[str, Any]:
        return {"backend": "redis", "connected": self._up}

    # -- start and end ------------------------------------------------------------------

    def check(self) -> bool:
        """Ask Redis once (bounded) and log where the state is shared, or (one warning) why not yet."""
        answered = not isinstance(self._shared(lambda deadline: self._run([("PING",)], deadline)), _Away)
        if answered:
            get_logger().info("failover state shared through Redis at %s (state_prefix %r)", public_url(self.url),
                              self.prefix)
        return answered

    def close(self) -> None:
        """Close every idle connection to Redis (the store stays usable: it reconnects when next asked)."""
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.disconnect()

    # -- Redis, bounded, or memory -------------------------------------------------------

    def _shared(self, call: Callable[[float], T]) -> T | _Away:
        """``call(deadline)`` against Redis, or AWAY when Redis is away (now, or for a while)."""
        probing = not self._up
        if probing:
            now = time.monotonic()
            if now < self._retry_at:
                return AWAY
            self._retry_at = now + self.retry_after  # one probe per pause, whichever greenlet comes first
            # Connections from before may lead to a Redis that has died since: start afresh.
            self.close()
        deadline = time.monotonic() + self.timeout
        try:
            written_back = self._write_back(deadline) if probing else 0
            result = call(deadline)
        except self._errors as error:
            self._went_away(str(error) or type(error).__name__)
            return AWAY
        if probing:
            self._up = True
            self._written_away.clear()
            get_logger().warning("shared state: Redis at %s answers again; the failover state is shared again "
                                 "(%d record(s) this process wrote meanwhile written back)", public_url(self.url),
                                 written_back)
        return result

    def _went_away(self, reason: str) -> None:
        self._recent.clear()  # memory answers from now on, until Redis does again
        if self._up:
            self._up = False
            get_logger().warning("shared state: Redis at %s is unreachable (%s); serving from this process's "
                                 "memory, asking Redis again every %gs", public_url(self.url), reason,
                                 self.retry_after)
        self._retry_at = time.monotonic() + self.retry_after

    def _written_while_away(self, key: str, seconds: float) -> float:
        self._written_away[key] = self._clock() + seconds
        return seconds

    def _write_back(self, deadline: float) -> int:
        """Write what this process changed while Redis was away, where Redis has no record for the key."""
        keys = list(self._written_away)
        now = self._clock()
        commands = [("SET", self._key_prefix + key, _encode(record), "PX", _milliseconds(self._written_away[key] - now),
                     "NX")
                    for key, record in zip(keys, self._memory.get_many(keys))
                    if record is not None and self._written_away[key] > now]
        if not commands:
            return 0
        return sum(1 for answer in self._run(commands, deadline) if answer)

    # -- connections and commands -----------------------------------------------------------
    # Not redis-py's pool and client: on the path every request takes, the pool's check of
    # each connection it hands out (a poll) and its metrics cost more than the command,
    # and a client's timeouts cannot tell a silent Redis from a busy process. A connection
    # goes back to the idle list only after every answer to what was sent on it was read,
    # and is closed on any error or interruption, so one taken from the list is always
    # ready for the next command.

    def _take(self) -> Any:
        if self._pid != os.getpid():  # forked (gunicorn --preload): the parent's sockets are not ours
            self._idle, self._pid = [], os.getpid()
        if self._idle:
            return self._idle.pop()
        return self._connection_class(**self._connection_kwargs)

    def _answers(self, connection: Any, packed: Any, count: int, deadline: float) -> list[Any]:
        """Send ``packed`` and read ``count`` answers, Redis having until ``deadline`` to give them.

        A greenlet of a busy process may be resumed after its deadline although the answer
        came in time; what is waiting in the socket then is taken, so the bound is on
        Redis, not on this process. Each wait after the deadline still allows
        :data:`LATE_GRACE` for an answer to a command sent late.
        """
        connection.send_packed_command(packed, check_health=False)
        answers = []
        for _ in range(count):
            wait = max(deadline - time.monotonic(), LATE_GRACE)
            if not (connection.can_read(timeout=wait) or connection.can_read(timeout=0)):
                raise self._timeout_error(f"no answer within {self.timeout * 1000:.0f} ms")
            answers.append(connection.read_response())
        return answers

    def _run(self, commands: list[tuple[Any, ...]], deadline: float) -> list[Any]:
        """``commands`` sent together on one connection: their answers (one round trip)."""
        connection = self._take()
        try:
            answers = self._answers(connection, connection.pack_commands(commands), len(commands), deadline)
        except BaseException:
            connection.disconnect()
            raise
        self._idle.append(connection)
        return answers

    def _mget(self, names: tuple[str, ...], deadline: float) -> list[bytes | None]:
        """``MGET names``; the packed command is kept, as each client reads the same names every time."""
        connection = self._take()
        try:
            packed = self._packed.get(names)
            if packed is None:
                if len(self._packed) >= PACKED_KEPT:
                    self._packed.clear()
                packed = self._packed[names] = connection.pack_command("MGET", *names)
            (values,) = self._answers(connection, packed, 1, deadline)
        except BaseException:
            connection.disconnect()
            raise
        self._idle.append(connection)
        return values

    def _transaction(self, name: str, change: Callable[[Record | None], Record | None],
                     ttl: Callable[[Record], float], deadline: float) -> tuple[Record | None, float]:
        """Replace ``name`` by ``change(old)`` atomically: the new record and its time to live."""
        lock = self._locks.get(name) or self._locks.setdefault(name, threading.Lock())
        with lock:
            connection = self._take()
            try:
                for _ in range(WATCH_ATTEMPTS):
                    _, old = self._answers(connection, connection.pack_commands([("WATCH", name), ("GET", name)]),
                                           2, deadline)
                    new = change(self._loads(old))
                    seconds = ttl(new) if new is not None else 0.0
                    write = ("DEL", name) if new is None else ("SET", name, _encode(new), "PX", _milliseconds(seconds))
                    *_, done = self._answers(connection, connection.pack_commands([("MULTI",), write, ("EXEC",)]),
                                             3, deadline)
                    if done is not None:  # EXEC answers nil when the watched key was written meanwhile
                        self._idle.append(connection)
                        return new, seconds
                    # Read it again, after a random pause so that two processes do not keep
                    # colliding in step. EXEC has ended the WATCH: the connection is clean.
                    deadline += WATCH_PAUSE
                    time.sleep(random.uniform(0, WATCH_PAUSE))
            except BaseException:
                connection.disconnect()
                raise
            self._idle.append(connection)
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
