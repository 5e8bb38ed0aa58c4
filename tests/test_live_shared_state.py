"""Several clipal processes sharing one failover state through a real redis-server.

Each process has its own config directory with the same provider entries, as two hosts
with the same provider files would: a provider's state is keyed by its identity, so they
share it. What one process learns (a deactivation, a cooldown, a key's state, a breaker,
the current provider) the other acts on without asking the provider, from 100 ms after
the change on (the promise: the tests wait that long, ``settle()``); a process with
another state_prefix keeps its own. Redis killed, frozen or flushed under load never
fails a request, and sharing resumes when it is back.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests

from conftest import ClipalProcess, free_port, provider, write_config, write_yaml
from fakeupstream import Reply
from redisserver import RedisServer
from test_gunicorn_live import chat as gunicorn_chat
from test_gunicorn_live import gunicorn_clipal  # noqa: F401  (a fixture)
from test_gunicorn_live import hit_both_workers

TIMEOUT = 10
UNREACHABLE = "is unreachable"
BACK = "answers again"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


def settle() -> None:
    """Wait as long as a change may take to reach the other processes."""
    time.sleep(0.1)


def shared(server: RedisServer, prefix: str = "clipal", **settings: object) -> dict:
    return {"state_url": server.url, "state_prefix": prefix, **settings}


def chat(proxy: ClipalProcess, **kwargs: object) -> requests.Response:
    return requests.post(proxy.url + "/codex/v1/chat/completions",
                         json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
                         timeout=TIMEOUT, **kwargs)


def answered_by(response: requests.Response) -> str:
    assert response.status_code == 200, response.text
    return response.headers["X-Clipal-Provider"]


# --------------------------------------------------------------------------- what is shared


def test_a_401_seen_by_one_process_deactivates_the_provider_in_the_other(clipal, upstream_factory, redis_server):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.default = Reply.openai_error(401)  # A's key is bad, whoever asks
    providers = [provider("A", a), provider("B", b, priority=2)]
    one = clipal(settings=shared(redis_server), codex=providers)
    two = clipal(settings=shared(redis_server), codex=providers)

    assert answered_by(chat(one)) == "B"
    assert len(a.requests) == 1
    one.wait_for_output("provider A deactivated")
    settle()
    for _ in range(3):
        assert answered_by(chat(two)) == "B"
    assert len(a.requests) == 1, "the other process asked the deactivated provider"
    # Not only the current provider moved: when B fails, two skips A as deactivated.
    b.script(Reply.openai_error(429))  # a rate limit without a hint: out for this request only
    assert chat(two).status_code == 503
    assert len(a.requests) == 1

    # Another state_prefix is another failover state in the same Redis: it learns for itself.
    three = clipal(settings=shared(redis_server, prefix="other-team"), codex=providers)
    assert answered_by(chat(three)) == "B"
    assert len(a.requests) == 2


def test_after_a_failover_in_one_process_the_other_starts_at_the_new_provider(clipal, upstream_factory,
                                                                              redis_server):
    a, b = upstream_factory("A"), upstream_factory("B")
    providers = [provider("A", a), provider("B", b, priority=2)]
    one = clipal(settings=shared(redis_server), codex=providers)
    two = clipal(settings=shared(redis_server), codex=providers)
    assert answered_by(chat(two)) == "A"

    a.script(Reply.openai_error(500))  # once: A is failed over from, not put out of service
    assert answered_by(chat(one)) == "B"
    settle()
    assert answered_by(chat(two)) == "B"
    assert len(a.requests) == 2
    b.script(Reply.openai_error(429))
    assert answered_by(chat(two)) == "A"  # back on A, which two's walk reached next
    settle()
    assert answered_by(chat(one)) == "A"
    assert (len(a.requests), len(b.requests)) == (4, 3)


def test_key_states_are_shared(clipal, upstream_factory, redis_server):
    up = upstream_factory("K")
    keys = [f"sk-shared-key-{i}-0123456789abcdef" for i in (1, 2, 3)]
    up.key_defaults[keys[0]] = Reply.openai_error(401)
    providers = [{"name": "K", "base_url": up.url, "api_keys": keys}]
    one = clipal(settings=shared(redis_server), codex=providers)
    two = clipal(settings=shared(redis_server), codex=providers)

    assert answered_by(chat(one)) == "K"  # key 1 deactivated, key 2 answers and becomes current
    settle()
    assert answered_by(chat(two)) == "K"  # straight to key 2
    up.key_defaults[keys[1]] = Reply.openai_error(429, retry_after=60)
    assert answered_by(chat(two)) == "K"  # key 2 cools down for 60 s, key 3 answers
    settle()
    assert answered_by(chat(one)) == "K"  # straight to key 3
    assert [r.api_key for r in up.requests] == [keys[0], keys[1], keys[1], keys[1], keys[2], keys[2]]


def test_cooldowns_are_shared(clipal, upstream_factory, redis_server):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.openai_error(503, retry_after=30))  # the provider cools down
    b.script(Reply.openai_error(429, retry_after=30))  # its only key cools down
    providers = [provider("A", a), provider("B", b, priority=2)]
    one = clipal(settings=shared(redis_server), codex=providers)
    two = clipal(settings=shared(redis_server), codex=providers)

    first = chat(one)
    assert first.status_code in (429, 503) and "retry in" in first.text
    settle()
    answer = chat(two)
    assert answer.status_code == first.status_code and 20 <= int(answer.headers["Retry-After"]) <= 31
    assert (len(a.requests), len(b.requests)) == (1, 1), "the other process asked a cooling provider"


def test_an_open_breaker_is_shared(clipal, upstream_factory, redis_server):
    """Failures counted by two processes open A's breaker; then A is tried last by both.

    A 429 without a hint puts a key out for one request only and never moves a breaker,
    which steers each walk to where the breaker's effect shows: from C, A comes next.
    """
    a, b, c = upstream_factory("A"), upstream_factory("B"), upstream_factory("C")
    providers = [provider("A", a), provider("B", b, priority=2), provider("C", c, priority=3)]
    settings = shared(redis_server, circuit_breaker={"failure_threshold": 2, "open_timeout": "60s"})
    one = clipal(settings=settings, codex=providers)
    two = clipal(settings=settings, codex=providers)

    a.script(Reply.openai_error(500))
    b.script(Reply.openai_error(429))
    assert answered_by(chat(one)) == "C"  # A's first failure; C is current
    settle()
    c.script(Reply.openai_error(429))
    a.script(Reply.openai_error(500))
    assert answered_by(chat(two)) == "B"  # from C: C out, A's second failure (one's was the first), B
    assert "after 2 failures in a row" in two.wait_for_output("provider A: circuit opened")
    b.script(Reply.openai_error(429))
    assert answered_by(chat(two)) == "C"  # C current again
    requests_to_a = len(a.requests)
    settle()

    c.script(Reply.openai_error(429))
    # From C the walk comes to A; one counted a single failure of A itself, but the breaker
    # it reads is open, so A is left for last and B answers.
    assert answered_by(chat(one)) == "B"
    assert len(a.requests) == requests_to_a


def test_two_gunicorn_workers_share_one_failover_state(tmp_path, upstream_factory, redis_server, gunicorn_clipal):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.default = Reply.openai_error(401)
    config_dir = tmp_path / "config"
    write_config(config_dir, settings=shared(redis_server), codex=[provider("A", a), provider("B", b, priority=2)])
    server = gunicorn_clipal(config_dir)
    assert gunicorn_chat(server, server.new_id())[0] == "B"  # one worker meets A's 401
    settle()

    served = hit_both_workers(server, lambda s, test_id: gunicorn_chat(s, test_id)[0])
    assert {name for _, name in served.values()} == {"B"}
    # One worker met A's 401; the other never asked A (with its own state it would have, once).
    assert len(a.requests) == 1
    assert server.output().count("failover state shared through Redis") == 2


# --------------------------------------------------------------------------- nothing secret in Redis


def test_every_key_is_prefixed_and_no_key_or_token_is_stored(clipal, upstream_factory, redis_server):
    a, b, k = upstream_factory("A"), upstream_factory("B"), upstream_factory("K")
    keys = [f"sk-multi-key-{i}-0123456789abcdef" for i in (1, 2)]
    token = "team-access-token-0123456789abcdef"
    a.default = Reply.openai_error(401)
    b.script(Reply.openai_error(500), Reply.openai_error(429, retry_after=40))
    k.key_defaults[keys[0]] = Reply.openai_error(429, retry_after=50)
    providers = [provider("A", a), provider("B", b, priority=2),
                 {"name": "K", "base_url": k.url, "api_keys": keys, "priority": 3}]
    settings = shared(redis_server, prefix="team", access_tokens=[token],
                      circuit_breaker={"failure_threshold": 1})
    one = clipal(settings=settings, codex=providers)
    two = clipal(settings=settings, codex=providers)
    auth = {"Authorization": f"Bearer {token}"}
    assert answered_by(chat(one, headers=auth)) == "K"  # A deactivated, B's breaker opened, K's key 1 cooling
    settle()
    assert answered_by(chat(two, headers=auth)) == "K"
    b.default = Reply.openai_error(503, retry_after=30)
    k.default = Reply.openai_error(500)
    chat(one, headers=auth)

    entries = redis_server.all_entries()
    assert entries, "nothing was shared"
    assert all(name.startswith(b"team:") for name in entries), sorted(entries)
    secrets = [p["api_key"].encode() for p in providers[:2]] + [key.encode() for key in keys] + [token.encode()]
    for name, value in entries.items():
        for secret in secrets:
            assert secret not in name and secret not in value, (name, value)
    # What there is: the client's cursor, and one record per provider (named by its identity).
    assert {re.sub(rb":[0-9a-f]{64}$", b":<identity>", name) for name in entries} == \
        {b"team:codex/cursor", b"team:codex:<identity>"}
    assert len(entries) == 4


# --------------------------------------------------------------------------- Redis going away


class Load:
    """``threads`` clients sending requests to the processes in turn until stopped."""

    def __init__(self, processes: list[ClipalProcess], threads: int = 4) -> None:
        self.processes = processes
        self.results: list[tuple[int, float]] = []  # (status, seconds)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        session = requests.Session()
        turn = index
        while not self._stop.is_set():
            proxy = self.processes[turn % len(self.processes)]
            turn += 1
            started = time.monotonic()
            try:
                status = session.post(proxy.url + "/codex/v1/chat/completions",
                                      json={"model": "m", "messages": []}, timeout=TIMEOUT).status_code
            except requests.RequestException as error:
                with self._lock:
                    self.errors.append(repr(error))
                continue
            with self._lock:
                self.results.append((status, time.monotonic() - started))

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_for(self, more: int, timeout: float = 10.0) -> None:
        """Until ``more`` requests beyond those done now have finished."""
        target = self.count() + more
        deadline = time.monotonic() + timeout
        while self.count() < target:
            assert time.monotonic() < deadline, f"the load stalled at {self.count()} requests"
            time.sleep(0.01)

    def stop(self) -> list[tuple[int, float]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(TIMEOUT + 5)
        return self.results


def warnings_in(proxy: ClipalProcess, text: str) -> int:
    return proxy.output().count(text)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def assert_sharing_resumed(one: ClipalProcess, two: ClipalProcess, a, b) -> None:
    """A new 401 met by one process is acted on by the other."""
    asked = len(a.requests)
    a.default = Reply.openai_error(401)
    assert answered_by(chat(one)) == "B"
    settle()
    for _ in range(3):
        assert answered_by(chat(two)) == "B"
    assert len(a.requests) == asked + 1


@pytest.fixture
def pair(clipal, upstream_factory, redis_server):
    a, b = upstream_factory("A"), upstream_factory("B")
    providers = [provider("A", a), provider("B", b, priority=2)]
    one = clipal(settings=shared(redis_server), codex=providers)
    two = clipal(settings=shared(redis_server), codex=providers)
    return one, two, a, b


def report(name: str, results: list[tuple[int, float]]) -> float:
    slowest = max(seconds for _, seconds in results)
    print(f"{name}: {len(results)} requests, slowest {slowest * 1000:.1f} ms")
    return slowest


def test_redis_killed_under_load_fails_no_request_and_sharing_resumes_after_a_restart(pair, redis_server):
    one, two, a, b = pair
    load = Load([one, two])
    load.wait_for(50)
    redis_server.kill()
    load.wait_for(200)
    time.sleep(1.2)  # several pauses: each process asks a dead Redis once a second
    redis_server.start()  # the same port, empty
    wait_until(lambda: all(warnings_in(p, BACK) for p in (one, two)), "both processes sharing again")
    load.wait_for(50)
    results = load.stop()

    assert load.errors == [] and {status for status, _ in results} == {200}
    # Never more than the bound (50 ms) and an ordinary answer because of Redis.
    assert report("redis killed", results) < 1.0
    for proxy in (one, two):
        assert 1 <= warnings_in(proxy, UNREACHABLE) <= 2, proxy.output()
        assert 1 <= warnings_in(proxy, BACK) <= 2, proxy.output()
    assert_sharing_resumed(one, two, a, b)


def test_redis_frozen_under_load_fails_no_request_and_blocks_nothing_else(pair, redis_server):
    one, two, a, b = pair
    load = Load([one, two])
    load.wait_for(50)
    redis_server.freeze()
    try:
        # While the requests' Redis calls wait, the process goes on serving: nothing blocks its hub.
        health = []
        for _ in range(30):
            started = time.monotonic()
            assert requests.get(one.url + "/health", timeout=TIMEOUT).status_code == 200
            health.append(time.monotonic() - started)
            time.sleep(0.05)
        load.wait_for(200)
    finally:
        redis_server.thaw()
    wait_until(lambda: all(warnings_in(p, BACK) for p in (one, two)), "both processes sharing again")
    load.wait_for(50)
    results = load.stop()

    assert load.errors == [] and {status for status, _ in results} == {200}
    assert report("redis frozen", results) < 1.0
    assert max(health) < 0.5, health
    for proxy in (one, two):
        assert 1 <= warnings_in(proxy, UNREACHABLE) <= 2, proxy.output()
    assert_sharing_resumed(one, two, a, b)


def test_redis_flushed_under_load_is_an_empty_state(pair, redis_server):
    one, two, a, b = pair
    load = Load([one, two])
    load.wait_for(50)
    for _ in range(5):
        redis_server.client().flushall()
        load.wait_for(20)
    results = load.stop()
    settle()

    assert load.errors == [] and {status for status, _ in results} == {200}
    assert all(warnings_in(p, UNREACHABLE) == 0 for p in (one, two))
    assert_sharing_resumed(one, two, a, b)


def test_clipal_starts_and_serves_before_redis_does(clipal, upstream_factory, tmp_path):
    a = upstream_factory("A")
    port = free_port()
    proxy = clipal(settings={"state_url": f"redis://127.0.0.1:{port}/0"}, codex=[provider("A", a)])
    for _ in range(5):
        assert answered_by(chat(proxy)) == "A"
    out = proxy.output()
    assert out.count(UNREACHABLE) == 1, out
    with RedisServer(tmp_path / "redis", port=port):
        time.sleep(1.1)
        assert answered_by(chat(proxy)) == "A"
        proxy.wait_for_output(BACK)


# --------------------------------------------------------------------------- configuration


def test_a_changed_state_url_on_reload_says_restart_and_keeps_the_running_store(clipal, upstream_factory,
                                                                                redis_server):
    a, b = upstream_factory("A"), upstream_factory("B")
    proxy = clipal(settings=shared(redis_server), codex=[provider("A", a), provider("B", b, priority=2)])
    elsewhere = "redis://:hunter2-secret@127.0.0.1:6390/3"
    write_config(proxy.config_dir, settings={"state_url": elsewhere})
    out = proxy.wait_for_output("restart clipal to apply it")
    assert "config.yaml: state_url changed to 'redis://:***@127.0.0.1:6390/3'; restart clipal to apply it" in out
    assert "hunter2" not in out
    # Still sharing through the Redis it started with.
    a.default = Reply.openai_error(401)
    assert answered_by(chat(proxy)) == "B"
    assert any(name.startswith(b"clipal:codex:") for name in redis_server.all_entries())


@pytest.mark.parametrize("url,message", [
    ("http://127.0.0.1:6379", "config.yaml: state_url must be a redis://, rediss:// or unix:// URL"),
    ("redis://127.0.0.1:99999/0", "config.yaml: state_url is not a valid URL"),
])
def test_an_invalid_state_url_stops_clipal_with_one_line(clipal, url, message):
    proxy = clipal(settings={"state_url": url}, healthy=False)
    assert proxy.proc.wait(15) == 1
    lines = proxy.output().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipal: " + message), lines


def test_state_url_without_the_redis_package_stops_clipal_with_one_line(clipal, tmp_path):
    hidden = tmp_path / "no-redis"
    (hidden / "redis").mkdir(parents=True)
    # Found before site-packages, so `import redis` fails as it does where it is not installed.
    write_yaml(hidden / "redis" / "__init__.py", "raise ImportError(\"No module named 'redis'\")\n")
    proxy = clipal(settings={"state_url": "redis://127.0.0.1:6379/0"}, env={"PYTHONPATH": str(hidden)},
                   healthy=False)
    assert proxy.proc.wait(15) == 1
    assert proxy.output().strip() == \
        "clipal: config.yaml: state_url needs the redis package: pip install 'clipal[redis]'"
