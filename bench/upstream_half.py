#!/usr/bin/env python3
"""The upstream half of clipal alone: 200 streams opened at once through clipal.forward.send, no server.

Each greenlet runs one attempt as clipal does (``forward.send``: connect,
send, read the head and the first event) against bench/upstream.js, with no
client connection, Flask or pywsgi in front. What one attempt costs here is
what any clipal request pays for reaching the provider, before serving it:

    python bench/upstream_half.py               # 4 rounds of 200 streams
    python bench/upstream_half.py --rounds 2 --streams 100
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from clipal import forward, transport  # noqa: E402
from fake_upstream import fake_upstream  # noqa: E402
from clipal.outbound import UpstreamRequest  # noqa: E402

BODY = b'{"model":"bench-model","stream":true,"messages":[{"role":"user","content":"Stream please."}]}'


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_round(port: int, count: int) -> tuple[float, float]:
    """CPU per attempt (µs) and the attempts' time to first event (p50, ms), on fresh connections."""
    request = UpstreamRequest("POST", f"http://127.0.0.1:{port}/v1/stream?events=2&interval=1500",
                              [("Host", f"127.0.0.1:{port}"), ("Content-Type", "application/json"),
                               ("Authorization", "Bearer sk-bench-key")])
    session = transport.new_session()
    arrived: list[float] = []
    start = time.perf_counter()

    def attempt():
        ready = forward.send(session, request, BODY, 300.0)
        arrived.append(time.perf_counter() - start)
        return ready

    before = cpu_seconds()
    greenlets = [gevent.spawn(attempt) for _ in range(count)]
    gevent.joinall(greenlets, raise_error=True)
    spent = cpu_seconds() - before
    for greenlet in greenlets:
        greenlet.value.close()
    session.close()
    return spent / count * 1e6, statistics.median(arrived) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--node", default="node")
    args = ap.parse_args()
    with fake_upstream(args.node) as port:
        one_round(port, 20)  # warm
        for n in range(1, args.rounds + 1):
            cpu_us, ttfb_ms = one_round(port, args.streams)
            print(f"round {n}: {cpu_us:5.0f} µs CPU per attempt, first event p50 {ttfb_ms:6.1f} ms "
                  f"({args.streams} at once)", flush=True)


if __name__ == "__main__":
    main()
