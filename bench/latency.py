#!/usr/bin/env python3
"""Precise sequential latency: N small POSTs, one at a time, on one keep-alive
connection, with a blocking raw socket (no event loop between the answer and
the clock).  Bounded by count and by --deadline.  Prints one JSON line.

    python bench/latency.py --port N --path /v1/chat/completions [--count 2000] [--warmup 200] [--deadline 20]
"""

from __future__ import annotations

import argparse
import json
import socket
import time

BODY = b'{"model":"bench-model","messages":[{"role":"user","content":"Say hello."}],"stream":false}'


class Conn:
    def __init__(self, host: str, port: int, timeout: float):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by peer")
        self.buf += data

    def response(self) -> tuple[int, dict, int]:
        """Read one response; returns (status, headers, body length)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(":")
            headers[k.strip().lower()] = v.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            total = 0
            while True:
                while b"\r\n" not in self.buf:
                    self._fill()
                line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    while b"\r\n" not in self.buf:
                        self._fill()
                    while not self.buf.startswith(b"\r\n"):  # skip trailers
                        _, self.buf = self.buf.split(b"\r\n", 1)
                        while b"\r\n" not in self.buf:
                            self._fill()
                    self.buf = self.buf[2:]
                    return status, headers, total
                while len(self.buf) < size + 2:
                    self._fill()
                self.buf = self.buf[size + 2:]
                total += size
        n = int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            self._fill()
        self.buf = self.buf[n:]
        return status, headers, n


def pct(s: list[float], p: float):
    if not s:
        return None
    k = min(len(s) - 1, max(0, -(-len(s) * p // 100) - 1))
    return s[int(k)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--deadline", type=float, default=20.0)
    a = ap.parse_args()

    req = (f"POST {a.path} HTTP/1.1\r\nHost: {a.host}:{a.port}\r\nUser-Agent: clipal-bench/1\r\n"
           f"Authorization: Bearer sk-client-bench-token\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY
    end = time.monotonic() + a.deadline
    lat: list[float] = []
    statuses: dict[str, int] = {}
    first_headers: dict = {}
    errors = reconnects = sent = 0
    timed_out = False
    conn = None
    clock = time.perf_counter_ns
    while sent < a.count + a.warmup:
        if time.monotonic() > end:
            timed_out = True
            break
        try:
            if conn is None:
                conn = Conn(a.host, a.port, timeout=max(1.0, min(10.0, end - time.monotonic())))
            sent += 1
            t0 = clock()
            conn.sock.sendall(req)
            status, headers, _ = conn.response()
            dt = clock() - t0
        except (OSError, ValueError, IndexError):
            errors += 1
            reconnects += 1
            if conn is not None:
                conn.sock.close()
            conn = None
            if errors > 100:
                break
            time.sleep(0.01)
            continue
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if not first_headers:
            first_headers = headers
        if not 200 <= status < 300:
            errors += 1
        elif sent > a.warmup:
            lat.append(dt / 1000.0)  # ns -> us
        if headers.get("connection", "").lower() == "close":
            conn.sock.close()
            conn = None
            reconnects += 1
    if conn is not None:
        conn.sock.close()
    lat.sort()
    r = lambda v: None if v is None else round(v, 1)  # noqa: E731
    print(json.dumps({
        "mode": "latency", "client": "latency.py", "requested": a.count, "warmup": a.warmup,
        "completed": len(lat), "errors": errors, "reconnects": reconnects, "timed_out": timed_out,
        "statuses": statuses, "headers": first_headers,
        "p50_us": r(pct(lat, 50)), "p90_us": r(pct(lat, 90)), "p99_us": r(pct(lat, 99)),
        "min_us": r(lat[0] if lat else None), "max_us": r(lat[-1] if lat else None),
        "mean_us": r(sum(lat) / len(lat) if lat else None),
    }))


if __name__ == "__main__":
    main()
