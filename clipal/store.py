"""Where the routing state lives: a small key-value interface, and its in-memory implementation.

The routing policy (:mod:`clipal.routing`) reads and writes plain records
through a :class:`Store`. Keys name what a record is about - a client, or
one provider of a client, by the provider's identity - so state outlives a
reload for every provider whose identity is unchanged, and two processes
that share a store share the state. Values are JSON-compatible mappings.

:class:`MemoryStore` keeps them in this process. Under gevent each call is
atomic with respect to other greenlets: nothing in it yields.
:class:`clipal.redis_store.RedisStore` keeps them in Redis, shared by every
process that uses the same Redis and prefix, and falls back on a
MemoryStore of its own while Redis does not answer.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Protocol

Record = dict[str, Any]


class Store(Protocol):
    """What the routing policy needs from wherever its records live."""

    def get_many(self, keys: list[str]) -> list[Record | None]:
        """The records under ``keys`` (None where there is none), in one round trip.

        The records are the caller's to read, not to change: a store may hand out the
        same objects again (MemoryStore its own, RedisStore those of an unchanged value).
        """
        ...

    def update(self, key: str, change: Callable[[Record | None], Record | None],
               ttl: Callable[[Record], float]) -> Record | None:
        """Atomically replace the record under ``key`` by ``change(old)`` (None deletes it).

        ``old`` is the caller's own copy, free to be edited into the new record. A shared
        store may call ``change`` more than once (again when another process wrote the
        key meanwhile); only the last result is stored. The new record expires
        ``ttl(new)`` seconds after this write. Returns what was stored.
        """
        ...

    def keep_only(self, prefixes: Iterable[str]) -> None:
        """Forget every record whose key starts with none of ``prefixes`` (providers gone on reload).

        This process's own records only: a shared store leaves the others in place (another
        process or host may still have those providers), and they expire by their ttl.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """Where the records live, for /status: ``{"backend": "memory"}``, or
        ``{"backend": "redis", "connected": bool}`` (False while Redis does not answer)."""
        ...


class MemoryStore:
    """Records in a dict of this process; expired ones are dropped when read."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._records: dict[str, tuple[float, Record]] = {}

    def get_many(self, keys: list[str]) -> list[Record | None]:
        now = self._clock()
        found: list[Record | None] = []
        for key in keys:
            entry = self._records.get(key)
            if entry is not None and entry[0] <= now:
                del self._records[key]
                entry = None
            found.append(entry[1] if entry is not None else None)
        return found

    def update(self, key: str, change: Callable[[Record | None], Record | None],
               ttl: Callable[[Record], float]) -> Record | None:
        (old,) = self.get_many([key])
        # The policy builds new records from old ones; a copy keeps a caller's view unchanged.
        new = change(copy.deepcopy(old) if old is not None else None)
        if new is None:
            self._records.pop(key, None)
        else:
            self._records[key] = (self._clock() + ttl(new), new)
        return new

    def keep_only(self, prefixes: Iterable[str]) -> None:
        keep = tuple(prefixes)
        for key in [k for k in self._records if not k.startswith(keep)]:
            del self._records[key]

    def describe(self) -> dict[str, Any]:
        return {"backend": "memory"}  # always there: nothing to be connected to

    def __len__(self) -> int:
        return len(self._records)
