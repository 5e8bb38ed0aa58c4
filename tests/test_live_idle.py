"""An idle clipal arms no timer: its event loop sleeps until a connection or a config edit wakes it.

clipal runs all day on laptops, so at rest it must cost nothing. Counting its
wakeups over a few seconds would flake on a shared machine (the inotify
watches on the way to a config directory under /tmp see every other test's
files come and go), so instead the test looks at what the loop is blocked in:
``/proc/PID/syscall`` shows the epoll_wait of gevent's loop with its timeout,
which is the time to the nearest timer. With none armed, libev sleeps for
days; the sampling loops this guards against had it at 0.25 s and 0.5 s.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import List, Optional

import pytest
import requests

from clipal import server
from conftest import ClipalProcess, provider

# System call numbers of epoll_wait and epoll_pwait (arguments: fd, events, maxevents, timeout).
EPOLL_SYSCALLS = {"x86_64": {232, 281}, "aarch64": {22}}
#: A wait this long or longer means no timer is due: gevent's own timers are all shorter.
NO_TIMER_MS = 60_000
SAMPLES = 20


def epoll_timeout_ms(pid: int) -> Optional[int]:
    """The timeout of the epoll wait the main thread is blocked in, or None if it is not in one now."""
    fields = Path(f"/proc/{pid}/task/{pid}/syscall").read_text().split()
    if not fields or not fields[0].isdigit() or int(fields[0]) not in EPOLL_SYSCALLS[platform.machine()]:
        return None  # "running", or another call for a moment
    timeout = int(fields[4], 16) & 0xFFFFFFFF  # an int in C: -1 is "no timeout at all"
    return timeout - (1 << 32) if timeout >= 1 << 31 else timeout


def loop_timeouts(proc: ClipalProcess) -> List[int]:
    """The epoll timeouts seen in SAMPLES looks at the idle loop, a tenth of a second apart."""
    seen: List[int] = []
    for _ in range(SAMPLES * 5):
        timeout = epoll_timeout_ms(proc.proc.pid)
        if timeout is not None:
            seen.append(timeout)
            if len(seen) == SAMPLES:
                break
        time.sleep(0.1)
    assert len(seen) >= SAMPLES // 2, f"the loop was seldom seen waiting: {seen}\n{proc.output()}"
    return seen


@pytest.fixture(autouse=True)
def linux_only() -> None:
    if platform.machine() not in EPOLL_SYSCALLS or not Path("/proc/self/syscall").exists():
        pytest.skip("reads Linux's /proc/PID/syscall")


def test_an_idle_clipal_has_no_timer_armed(clipal, upstream_factory):
    up = upstream_factory("A")
    proxy = clipal(codex=[provider("A", up)], env={"CLIPAL_WATCH_MODE": "inotify"})
    # Served once first: nothing a request leaves behind may keep a timer going either.
    answer = requests.post(proxy.url + "/codex/v1/chat/completions",
                           json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert answer.status_code == 200
    answer.close()
    # The closed connection's handler finishes, and the one-off start-up work that waits a
    # moment not to delay the first answer (keeping start-up objects out of collections) is done.
    time.sleep(server.FREEZE_DELAY + 0.5)
    timeouts = loop_timeouts(proxy)
    assert all(t < 0 or t >= NO_TIMER_MS for t in timeouts), f"epoll timeouts (ms): {timeouts}"


def test_in_poll_mode_the_only_timer_is_the_poll(clipal):
    proxy = clipal(codex=[provider("A", "http://127.0.0.1:9")], env={"CLIPAL_WATCH_MODE": "poll"})
    timeouts = loop_timeouts(proxy)
    # The watcher's poll every 0.5 s, and nothing shorter that would come from elsewhere.
    assert all(0 <= t <= 500 for t in timeouts), f"epoll timeouts (ms): {timeouts}"
    assert max(timeouts) > 250, f"something wakes more often than the poll: {timeouts}"
