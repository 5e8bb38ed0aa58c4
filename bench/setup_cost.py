#!/usr/bin/env python3
"""CPU a server spends per stream set-up: 200 SSE streams opened at once, two events each, 1.5 s apart.

With the events that far apart, what the server spends is almost all set-up
(accept, read the request, reach the upstream, answer the head and the first
event) and tear-down. It runs clipal, bench/floor.py's proxy (the stack with
nothing of clipal on it) and floor.py --answer-itself (the serving half of
the stack alone) the same way, in turns, against one bench/upstream.js:

    python bench/setup_cost.py                 # 3 turns of the three servers, 3 x 200 streams each
    python bench/setup_cost.py --turns 1 --streams 100

Prints, per server and turn, CPU per stream (from /proc, user + system) and
the streams' time to first byte (p50, from bench/client.js).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fake_upstream import fake_upstream

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SERVERS = {
    "clipal": ["-m", "clipal"],
    "floor proxy": [str(HERE / "floor.py")],
    "floor answering": [str(HERE / "floor.py"), "--answer-itself"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def streams(node: str, port: int, count: int, events: int, interval_ms: int) -> dict:
    config = {"mode": "sse", "host": "127.0.0.1", "port": port, "path": "/codex/v1/stream", "streams": count,
              "events": events, "interval_ms": interval_ms, "deadline_s": 20}
    out = subprocess.run([node, str(HERE / "client.js"), json.dumps(config)], capture_output=True, text=True,
                         timeout=60)
    return json.loads(out.stdout)


def measure(args, name: str, config_dir: str) -> tuple[float, float, int]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # run as installed: bytecode cached
    server = subprocess.Popen([args.python, *SERVERS[name], "--config-dir", config_dir, "--port", str(port),
                               "--log-level", "error"], env=env, cwd=tempfile.gettempdir())
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"{name} did not answer /health")
                time.sleep(0.05)
        streams(args.node, port, 50, 2, 10)  # warm: imports, pools, code paths
        time.sleep(1.5)  # past clipal's start-up freeze
        before = cpu_seconds(server.pid)
        result = streams(args.node, port, args.streams, 2, 1500)
        spent = cpu_seconds(server.pid) - before
        return spent / args.streams * 1000, result["ttfb_ms"]["p50"], result["completed"]
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--node", default="node")
    args = ap.parse_args()
    with fake_upstream(args.node) as up_port:
        config_dir = tempfile.mkdtemp(prefix="clipal-setup-cost-")
        provider = f"providers:\n  - name: bench\n    base_url: http://127.0.0.1:{up_port}\n    api_key: sk-bench-key\n"
        Path(config_dir, "codex.yaml").write_text(provider)
        Path(config_dir, "config.yaml").write_text("log_stdout: false\n")
        for turn in range(1, args.turns + 1):
            for name in SERVERS:
                per_stream, ttfb, completed = measure(args, name, config_dir)
                print(f"turn {turn}  {name:16s} {per_stream:6.3f} ms CPU per stream   TTFB p50 {ttfb:7.1f} ms   "
                      f"{completed}/{args.streams} complete", flush=True)


if __name__ == "__main__":
    main()
