#!/usr/bin/env python3
"""What clipal.completion's check costs per streamed chunk (a micro-benchmark, not a test).

The relay feeds :class:`clipal.completion.CompletionCheck` every chunk it
sends, so its ``feed`` is on the hot path of every streamed event. This
times ``feed`` on typical events of each protocol, one event per chunk as
providers flush them, plain and gzip-encoded (each event compressed and
flushed on its own, as a server does); for the encoded streams it also times
the decoder alone, to show which part of the cost is decoding.

    .venv/bin/python bench/completion_cost.py            # a few seconds
    .venv/bin/python bench/completion_cost.py --events 50000 --repeat 9

Each figure is the best of ``--repeat`` runs over ``--events`` chunks, in
microseconds per chunk, including the Python call itself.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from typing import Callable

from clipal.completion import CompletionCheck
from clipal.decode import Decoder


def _event(name: str | None, data: dict) -> bytes:
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _text(i: int) -> str:
    return f" token{i % 97} and some more streamed text"


#: (client, a typical mid-stream event for sequence number i): the events every stream is made of.
STREAMS: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "anthropic text delta": ("claudecode", lambda i: _event("content_block_delta", {
        "type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": _text(i)}})),
    "chat chunk": ("codex", lambda i: _event(None, {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion.chunk", "created": 1741569952,
        "model": "gpt-4.1-2025-04-14", "choices": [{"index": 0, "delta": {"content": _text(i)},
                                                   "logprobs": None, "finish_reason": None}]})),
    "responses text delta": ("codex", lambda i: _event("response.output_text.delta", {
        "type": "response.output_text.delta", "sequence_number": i, "item_id": "msg_67c9fdcecf488190bdd9a0409de3",
        "output_index": 0, "content_index": 0, "delta": _text(i)})),
}


def _gzip_chunks(events: list[bytes]) -> list[bytes]:
    deflater = zlib.compressobj(wbits=31)
    return [deflater.compress(e) + deflater.flush(zlib.Z_SYNC_FLUSH) for e in events]


def _best(run: Callable[[], None], chunks: int, repeat: int) -> float:
    """Microseconds per chunk, the best of ``repeat`` runs."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter_ns()
        run()
        best = min(best, time.perf_counter_ns() - started)
    return best / chunks / 1000


def _feeding(client: str, encoding: str, chunks: list[bytes]) -> Callable[[], None]:
    def run() -> None:
        check = CompletionCheck(client, encoding)
        feed = check.feed
        for chunk in chunks:
            feed(chunk)
        assert check.status == "incomplete"  # no terminal event: every chunk was really looked at
    return run


def _decoding(chunks: list[bytes]) -> Callable[[], None]:
    def run() -> None:
        feed = Decoder("gzip", limit=1 << 40).feed
        for chunk in chunks:
            feed(chunk)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20000, help="chunks per run (default 20000)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure, the best is shown (default 5)")
    args = parser.parse_args()

    print(f"{'stream':<22} {'bytes':>6} {'plain µs':>9} {'gzip µs':>8} {'(decode only)':>14}")
    for name, (client, make) in STREAMS.items():
        events = [make(i) for i in range(args.events)]
        size = sum(map(len, events)) / len(events)
        gzipped = _gzip_chunks(events)
        plain = _best(_feeding(client, "", events), len(events), args.repeat)
        encoded = _best(_feeding(client, "gzip", gzipped), len(events), args.repeat)
        decode = _best(_decoding(gzipped), len(events), args.repeat)
        print(f"{name:<22} {size:>6.0f} {plain:>9.2f} {encoded:>8.2f} {decode:>14.2f}")


if __name__ == "__main__":
    main()
