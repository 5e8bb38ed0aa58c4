"""A real redis-server on a free loopback port, for the shared-state tests.

    with RedisServer(tmp_path) as server:
        server.url                 # "redis://127.0.0.1:PORT/0"
        server.client().ping()
        server.kill()              # SIGKILL by PID: gone, its data with it
        server.start()             # again, on the same port, empty
        server.freeze(); server.thaw()   # SIGSTOP / SIGCONT: connections stay open, no answers
        server.stop()

Nothing is saved to disk (no RDB, no AOF), so a restarted server is empty, as a Redis
that lost its data is. Every process is ended by its own PID. When redis-server is not
installed the tests that need it are skipped, except under CI (which installs it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        if os.environ.get("CI"):
            raise AssertionError("redis-server is not installed; .ci/run installs it")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return found


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> "RedisServer":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return self
            except Exception:
                pass
            assert self.proc.poll() is None, f"redis-server exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.pid, signal.SIGCONT)  # a frozen server cannot act on SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def all_entries(self) -> dict[bytes, bytes]:
        """Every key of every database (SCAN), with its value as stored."""
        found: dict[bytes, bytes] = {}
        client = self.client()
        databases = int(client.config_get("databases")["databases"])
        for db in range(databases):
            import redis

            one = redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=2)
            for key in one.scan_iter(count=1000):
                kind = one.type(key)
                assert kind == b"string", f"{key!r} is a {kind!r}, not a string"
                found[key] = one.get(key) or b""
        return found

    def __enter__(self) -> "RedisServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
