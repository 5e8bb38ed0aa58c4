"""release_memory_after_bursts: malloc_trim once after a burst of connections, and no timer between bursts.

Driven from the test's own greenlet with a fake malloc_trim and handler
greenlets that hold their pool slot until told to finish, as a client
connection's handler does. Sampling while nothing is open would wake an idle
clipal several times a second, so the tests count how often the sampler
waits: a loop that ran would wait at least once at its start.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Callable, List, Optional

import gevent
import pytest
from gevent.event import Event

from clipal import server
from clipal.platforms import GlibcMalloc
from clipal.server import BURST_CONNECTIONS, ConnectionPool, release_memory_after_bursts


class CountingEvent(Event):
    """The ``stopping`` event, counting the timed waits of the sampling loop."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: Optional[float] = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


class Burst:
    """A pool, the burst follower on it, and handler greenlets held open at will."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.trims: List[int] = []
        monkeypatch.setattr(server, "BURST_CHECK_INTERVAL", 0.01)
        monkeypatch.setattr(server, "glibc_malloc",
                            lambda: GlibcMalloc(mallopt=lambda *_: 1, malloc_trim=self._trim))
        self.pool = ConnectionPool(1000)
        self.stopping = CountingEvent()
        self._held: List[Event] = []
        release_memory_after_bursts(SimpleNamespace(pool=self.pool), self.stopping)  # type: ignore[arg-type]

    def _trim(self, pad: int) -> int:
        self.trims.append(pad)
        return 1

    def open(self, count: int) -> None:
        for _ in range(count):
            done = Event()
            self._held.append(done)
            self.pool.spawn(done.wait)
        gevent.sleep(0)

    def close(self, count: int) -> None:
        for _ in range(count):
            self._held.pop().set()
        wait_until(lambda: len(self.pool) == len(self._held))

    def close_all(self) -> None:
        self.close(len(self._held))


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        gevent.sleep(0.005)


@pytest.fixture
def burst(monkeypatch: pytest.MonkeyPatch):
    b = Burst(monkeypatch)
    yield b
    b.stopping.set()
    b.close_all()


def test_nothing_is_sampled_until_a_burst_begins(burst):
    burst.open(BURST_CONNECTIONS - 1)
    gevent.sleep(0.05)  # five sampling intervals
    burst.close_all()
    gevent.sleep(0.05)
    assert burst.stopping.waits == 0
    assert burst.trims == []


def test_one_trim_once_the_count_falls_to_a_quarter_of_the_peak(burst):
    burst.open(BURST_CONNECTIONS * 2)
    wait_until(lambda: burst.stopping.waits > 0)  # the burst is being followed
    burst.close(BURST_CONNECTIONS * 2 - BURST_CONNECTIONS // 2 - 1)  # one more than a quarter still open
    gevent.sleep(0.05)
    assert burst.trims == []  # not while the burst goes on
    burst.close(1)  # now a quarter of the peak
    wait_until(lambda: burst.trims == [0])
    burst.close_all()
    gevent.sleep(0.05)
    assert burst.trims == [0]


def test_the_sampling_stops_when_the_burst_is_over_and_starts_again_with_the_next(burst):
    burst.open(BURST_CONNECTIONS)
    wait_until(lambda: burst.stopping.waits > 0)
    burst.close_all()
    wait_until(lambda: burst.trims == [0])
    wait_until(lambda: burst.pool.on_burst is not None)  # the follower is done and gone
    waits = burst.stopping.waits
    gevent.sleep(0.05)  # five intervals, in which a running loop would have waited
    assert burst.stopping.waits == waits
    burst.open(BURST_CONNECTIONS)
    wait_until(lambda: burst.stopping.waits > waits)
    burst.close_all()
    wait_until(lambda: burst.trims == [0, 0])


def test_a_burst_that_stays_large_after_a_trim_is_followed_on(burst):
    burst.open(BURST_CONNECTIONS * 8)
    wait_until(lambda: burst.stopping.waits > 0)
    burst.close(BURST_CONNECTIONS * 6)  # down to a quarter, and still a burst in itself
    wait_until(lambda: burst.trims == [0])
    burst.open(BURST_CONNECTIONS * 2)  # climbs again without crossing the threshold anew
    gevent.sleep(0.05)
    burst.close_all()
    wait_until(lambda: burst.trims == [0, 0])


def test_nothing_is_sampled_after_stopping(burst):
    burst.stopping.set()
    burst.open(BURST_CONNECTIONS)
    gevent.sleep(0.05)
    burst.close_all()
    gevent.sleep(0.05)
    assert burst.trims == []


def test_the_server_counts_its_connections_in_such_a_pool():
    proxy = server.ProxyServer(("127.0.0.1", 0), lambda environ, start_response: [])
    assert isinstance(proxy.pool, ConnectionPool)
    assert proxy.pool.size == server.MAX_CONNECTIONS
