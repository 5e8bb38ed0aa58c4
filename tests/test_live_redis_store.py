"""RedisStore against a real redis-server, in this process: what is stored, atomicity, and Redis going away.

Each RedisStore has its own connections, as each clipal process does, so two of them
are two processes as far as Redis can tell. The whole-process behaviour (clipal and
gunicorn processes, Redis killed and frozen under load) is in test_live_shared_state.py.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from clipal import redis_store
from clipal.classify import Kind, Verdict
from clipal.config import BreakerSettings, Provider
from clipal.redis_store import READ_MAX_AGE, RedisStore
from clipal.routing import Routing
from conftest import free_port
from redisserver import RedisServer


class Recorder:
    """Stands in for the clipal logger: keeps (level, line) pairs."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def warning(self, message: str, *args: object, **_: object) -> None:
        self.lines.append(("warning", message % args))

    def info(self, message: str, *args: object, **_: object) -> None:
        self.lines.append(("info", message % args))

    def warnings(self) -> list[str]:
        return [line for level, line in self.lines if level == "warning"]


@pytest.fixture
def log(monkeypatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(redis_store, "get_logger", lambda: recorder)
    return recorder


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as running:
        yield running


@pytest.fixture
def stores() -> Iterator[list[RedisStore]]:
    """Stores made by a test, closed at its end."""
    made: list[RedisStore] = []
    yield made
    for store in made:
        store.close()


def settle() -> None:
    """Past the age up to which a store answers a read with its last one: others' changes are read."""
    time.sleep(READ_MAX_AGE + 0.01)


def bump(old: dict | None) -> dict:
    record = old if old is not None else {}
    record["n"] = record.get("n", 0) + 1
    return record


def test_a_record_is_prefixed_json_expiring_as_the_policy_says(server, stores, log):
    store = RedisStore(server.url, "team")
    stores.append(store)
    assert store.update("codex:abc", lambda old: {"current_key": "k1", "cooling": {}}, lambda record: 90.0) \
        == {"current_key": "k1", "cooling": {}}
    redis = server.client()
    assert json.loads(redis.get("team:codex:abc")) == {"current_key": "k1", "cooling": {}}
    assert 89_000 < redis.pttl("team:codex:abc") <= 90_000
    assert store.get_many(["codex:abc", "codex:none"]) == [{"current_key": "k1", "cooling": {}}, None]
    assert store.update("codex:abc", lambda old: None, lambda record: 1.0) is None
    assert redis.exists("team:codex:abc") == 0
    assert store.describe() == {"backend": "redis", "connected": True}
    assert log.warnings() == []


def test_stores_with_one_prefix_share_records_and_another_prefix_sees_none(server, stores, log):
    one, two, other = (RedisStore(server.url, prefix) for prefix in ("clipal", "clipal", "elsewhere"))
    stores.extend([one, two, other])
    one.update("claudecode/cursor", lambda old: {"current": {"main": "B"}}, lambda record: 60.0)
    assert two.get_many(["claudecode/cursor"]) == [{"current": {"main": "B"}}]
    assert other.get_many(["claudecode/cursor"]) == [None]
    # Each store reads its own change back at once.
    two.update("claudecode/cursor", lambda old: {**old, "current": {"main": "C"}}, lambda record: 60.0)
    assert two.get_many(["claudecode/cursor"]) == [{"current": {"main": "C"}}]


def test_a_change_is_read_by_another_process_within_100_ms(server, stores, log):
    one, two = RedisStore(server.url, "clipal"), RedisStore(server.url, "clipal")
    stores.extend([one, two])
    for n in range(5):
        assert two.get_many(["codex:x"]) == [None if n == 0 else {"n": n}]  # two has just read it
        one.update("codex:x", bump, lambda record: 60.0)
        changed = time.monotonic()
        while two.get_many(["codex:x"]) != [{"n": n + 1}]:
            assert time.monotonic() - changed < 0.1, "not seen within 100 ms"
            time.sleep(0.002)


def test_a_busy_process_reads_redis_a_few_times_a_second_not_once_per_request(server, stores, log):
    store = RedisStore(server.url, "clipal")
    stores.append(store)
    store.update("codex:x", bump, lambda record: 60.0)
    calls = lambda: server.client().info("commandstats").get("cmdstat_mget", {}).get("calls", 0)  # noqa: E731
    before, started = calls(), time.monotonic()
    reads = 0
    while time.monotonic() - started < 0.5:
        assert store.get_many(["codex:x", "codex:y"]) == [{"n": 1}, None]
        reads += 1
    assert reads > 1000
    assert calls() - before <= 0.5 / READ_MAX_AGE + 2


def test_updates_are_atomic_across_processes(server, stores, log):
    # A generous bound: this checks the transaction, not how fast this machine's threads are.
    pair = [RedisStore(server.url, "clipal", timeout=2.0), RedisStore(server.url, "clipal", timeout=2.0)]
    stores.extend(pair)

    def work(store: RedisStore) -> None:
        for _ in range(50):
            store.update("codex:counter", bump, lambda record: 60.0)

    threads = [threading.Thread(target=work, args=(pair[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # A read-modify-write that is not atomic loses increments when two processes interleave.
    settle()
    assert pair[0].get_many(["codex:counter"]) == [{"n": 400}], log.lines
    assert log.warnings() == []


def test_one_half_open_probe_between_two_processes(server, stores, log):
    """The breaker's probe permit, as the policy takes it: of many processes asking at once, one gets it."""
    providers = (Provider("A", "http://a.invalid", ("sk-A-0123456789",)),
                 Provider("B", "http://b.invalid", ("sk-B-0123456789",)))
    breaker = BreakerSettings(failure_threshold=1, success_threshold=1, open_timeout=0.2)
    routings = []
    for _ in range(4):
        store = RedisStore(server.url, "clipal", timeout=2.0)
        stores.append(store)
        routings.append(Routing({"codex": providers}, store=store, clock=time.time, reactivate_after=3600,
                                isolate_count_tokens=False, breaker=breaker).client("codex"))
    # One process sees A fail: its breaker opens (threshold 1), for everyone.
    walk = routings[0].walk()
    attempt = next(iter(walk))
    assert attempt.provider.name == "A"
    walk.failed(attempt, Verdict(True, Kind.SERVER_ERROR, False, None, "500 (test)"))
    assert [view.breaker for view in routings[3].views()] == ["open", "closed"]
    time.sleep(0.3)  # open_timeout over: half-open
    # Every process starts a request at A (the cursor moved to B, so point it back) at once.
    routings[0].set_current(None, providers[0], "main")
    first_attempts: list = [None] * 4

    def first(index: int) -> None:
        first_attempts[index] = next(iter(routings[index].walk()))

    threads = [threading.Thread(target=first, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    probes = [a for a in first_attempts if a.probe]
    assert len(probes) == 1 and probes[0].provider.name == "A"
    assert all(a.provider.name == "B" for a in first_attempts if not a.probe), first_attempts


def test_keep_only_forgets_in_memory_but_leaves_other_processes_records_in_redis(server, stores, log):
    store = RedisStore(server.url, "clipal")
    stores.append(store)
    store.update("codex:kept", bump, lambda record: 60.0)
    store.update("codex:gone", bump, lambda record: 60.0)
    store.keep_only(["codex:kept"])
    # Another host may still have provider "gone": its record stays, to expire by its TTL.
    assert server.client().exists("clipal:codex:kept", "clipal:codex:gone") == 2
    assert store.get_many(["codex:gone"]) == [{"n": 1}]


def test_flushall_is_an_empty_state_not_an_outage(server, stores, log):
    store = RedisStore(server.url, "clipal")
    stores.append(store)
    store.update("codex:x", bump, lambda record: 60.0)
    server.client().flushall()
    settle()
    assert store.get_many(["codex:x"]) == [None]
    assert store.update("codex:x", bump, lambda record: 60.0) == {"n": 1}
    assert log.warnings() == [] and store.describe()["connected"]


def test_an_unreachable_redis_costs_one_bounded_wait_per_pause_then_sharing_resumes(tmp_path, stores, log):
    port = free_port()  # nothing listens there yet
    store = RedisStore(f"redis://127.0.0.1:{port}/0", "clipal", retry_after=0.5)
    stores.append(store)
    started = time.monotonic()
    assert store.get_many(["codex:mine"]) == [None]
    assert time.monotonic() - started < 0.2
    assert store.describe() == {"backend": "redis", "connected": False}
    (warning,) = log.warnings()
    assert f"Redis at redis://127.0.0.1:{port}/0 is unreachable" in warning
    assert "serving from this process's memory" in warning

    # Meanwhile the process keeps its own state, and Redis is not asked again during the pause.
    store.update("codex:mine", bump, lambda record: 60.0)
    store.update("codex:theirs", bump, lambda record: 60.0)
    started = time.monotonic()
    for _ in range(200):
        assert store.get_many(["codex:mine"]) == [{"n": 1}]
    assert time.monotonic() - started < 0.05, "Redis was asked during the pause"
    assert len(log.warnings()) == 1

    with RedisServer(tmp_path / "redis", port=port) as server:
        # Another process wrote "theirs" after Redis came back: what is in Redis wins.
        server.client().set("clipal:codex:theirs", json.dumps({"n": 7}), px=60_000)
        time.sleep(0.6)
        assert store.get_many(["codex:mine", "codex:theirs"]) == [{"n": 1}, {"n": 7}]
        warnings = log.warnings()
        assert len(warnings) == 2 and "answers again" in warnings[1] and "1 record(s)" in warnings[1], warnings
        assert json.loads(server.client().get("clipal:codex:mine")) == {"n": 1}
        assert 50_000 < server.client().pttl("clipal:codex:mine") <= 60_000  # what was left of its TTL
        assert store.describe()["connected"]
        store.close()


def test_a_frozen_redis_is_waited_on_within_the_bound_only(server, stores, log):
    store = RedisStore(server.url, "clipal", retry_after=0.5)
    stores.append(store)
    store.update("codex:x", bump, lambda record: 60.0)
    settle()
    server.freeze()
    try:
        started = time.monotonic()
        assert store.get_many(["codex:x"]) == [{"n": 1}]  # from memory, which every update also wrote
        first = time.monotonic() - started
        assert first < 0.2, first
        started = time.monotonic()
        assert store.update("codex:x", bump, lambda record: 60.0) == {"n": 2}
        assert store.get_many(["codex:x"]) == [{"n": 2}]
        assert time.monotonic() - started < 0.01
        assert len(log.warnings()) == 1
        time.sleep(0.6)
        started = time.monotonic()
        store.get_many(["codex:x"])  # the next probe: one more bounded wait, no second warning
        assert time.monotonic() - started < 0.2
        assert len(log.warnings()) == 1
    finally:
        server.thaw()
    time.sleep(0.6)
    # Redis still had codex:x, so the change made while it was frozen stays this process's own.
    assert store.get_many(["codex:x"]) == [{"n": 1}]
    assert len(log.warnings()) == 2 and "answers again" in log.warnings()[1]
    assert store.update("codex:x", bump, lambda record: 60.0) == {"n": 2}


def test_a_value_that_is_not_a_record_reads_as_none(server, stores, log):
    store = RedisStore(server.url, "clipal")
    stores.append(store)
    server.client().set("clipal:codex:odd", b"not json")
    server.client().set("clipal:codex:list", b"[1, 2]")
    assert store.get_many(["codex:odd", "codex:list"]) == [None, None]
    assert store.update("codex:odd", bump, lambda record: 60.0) == {"n": 1}
    assert log.warnings() == []
