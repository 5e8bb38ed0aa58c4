"""Live chaos soak: three providers flipping among failure modes while agents keep streaming.

Two clipal processes run side by side in front of the same three fake
upstreams - one with the default circuit breaker, one with the breaker off
(``failure_threshold: 0``) - and four agents stream through each for 20 s
while each provider flips, at random, among answering, 503, 529 with a
hint, stalling, dropping mid-stream and refusing connections. No agent may
see a hung answer, or a truncated answer that ends cleanly; and the breaker,
which only steers, must not cost successes: the breaker's success count is
at least 90 % of the other's.
"""

from __future__ import annotations

import json
import random
import threading
import time

import requests

from conftest import provider
from fakeupstream import Reply

SOAK = 20.0
AGENTS = 4
PAYLOAD = {"model": "claude-test", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "hi"}]}

MODES = {
    "ok": lambda: Reply.answer("one two three", delay=0.01),
    "503": lambda: Reply.anthropic_error(503),
    "529": lambda: Reply.anthropic_error(529, retry_after=1),
    "stall-before": lambda: Reply.stall(),
    "stall-after": lambda: Reply.answer("one two three", delay=0.01).stall_after(2),
    "drop-after": lambda: Reply.answer("one two three", delay=0.01).drop_after(3),
    "drop": lambda: Reply.drop(),
}


def agent(url: str, deadline: float, results: dict, lock: threading.Lock) -> None:
    session = requests.Session()
    while time.monotonic() < deadline:
        started = time.monotonic()
        outcome = "error"
        try:
            with session.post(url + "/claudecode/v1/messages", json=PAYLOAD, stream=True, timeout=(3, 8)) as r:
                body = b"".join(r.iter_content(chunk_size=None))
                if r.status_code == 200:
                    # A 200 that ends cleanly must be whole: clipal ends a broken one abnormally.
                    outcome = "ok" if body.rstrip().endswith(b'data: {"type":"message_stop"}') else "clean-truncated"
                else:
                    json.loads(body)  # clipal's own error, in the client's shape
                    outcome = f"status-{r.status_code}"
        except requests.exceptions.ChunkedEncodingError:
            outcome = "broken"  # visibly incomplete: what the agent must see for a broken stream
        except requests.exceptions.ConnectionError:
            outcome = "broken"
        except requests.exceptions.ReadTimeout:
            outcome = "hung"
        if time.monotonic() - started > 6:
            outcome = "hung"
        with lock:
            results[outcome] = results.get(outcome, 0) + 1
        # Paced like an agent (one request, a short think): the counts then measure outcomes,
        # not which of the two clipal processes got more of the machine's CPU.
        time.sleep(0.05)


def test_the_breaker_keeps_every_answer_whole_and_costs_no_successes_under_chaos(clipal, upstream_factory):
    upstreams = [upstream_factory(name) for name in "ABC"]
    settings = {"upstream_idle_timeout": "1s"}
    with_breaker = clipal(settings={**settings, "circuit_breaker": {"failure_threshold": 4, "open_timeout": "2s"}},
                          claudecode=[provider(u.name, u) for u in upstreams])
    without = clipal(settings={**settings, "circuit_breaker": {"failure_threshold": 0}},
                     claudecode=[provider(u.name, u) for u in upstreams])

    stop = threading.Event()
    chaos = random.Random(20261201)

    def flip() -> None:
        while not stop.wait(chaos.uniform(0.3, 1.2)):
            target = chaos.choice(upstreams)
            target.default = MODES[chaos.choice(list(MODES))]()

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    deadline = time.monotonic() + SOAK
    tallies = {"breaker": {}, "no-breaker": {}}
    lock = threading.Lock()
    agents = [threading.Thread(target=agent, args=(proxy.url, deadline, tallies[name], lock), daemon=True)
              for name, proxy in (("breaker", with_breaker), ("no-breaker", without)) for _ in range(AGENTS)]
    for thread in agents:
        thread.start()
    for thread in agents:
        thread.join(SOAK + 20)
    stop.set()
    flipper.join(5)
    for up in upstreams:
        up.default = Reply.answer()

    for name, tally in tallies.items():
        assert tally.get("hung", 0) == 0, f"{name}: {tally}"
        assert tally.get("clean-truncated", 0) == 0, f"{name}: {tally}"
        assert tally.get("ok", 0) > 20, f"{name}: {tally}"
    print("chaos tallies:", tallies)  # shown with -s: the numbers behind the comparison
    ok_breaker, ok_plain = tallies["breaker"]["ok"], tallies["no-breaker"]["ok"]
    # The breaker only steers: it must not cost successes (it may well add some, by trying a
    # provider that keeps stalling last instead of first).
    assert ok_breaker >= 0.9 * ok_plain, tallies
