"""bench/upstream.js as a context manager, for the small bench scripts (run.py has its own process registry)."""

from __future__ import annotations

import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent


@contextmanager
def fake_upstream(node: str = "node") -> Iterator[int]:
    """Start bench/upstream.js on a free loopback port, yield the port, stop it on the way out."""
    upstream = subprocess.Popen([node, str(HERE / "upstream.js"), "--port", "0", "--watch-stdin"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        line = upstream.stdout.readline()
        if not line.startswith(b"READY "):
            raise SystemExit(f"bench/upstream.js did not start: {line!r}")
        yield int(line.split()[1])
    finally:
        upstream.stdin.close()  # --watch-stdin: it exits when its stdin closes
        upstream.terminate()
        upstream.wait(10)
