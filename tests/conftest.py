"""Shared fixtures: a real clipal process on a loopback port, and fake upstreams.

Live tests start clipal exactly as a user does (``python -m clipal``) against
``FakeUpstream`` servers (tests/fakeupstream.py) and talk to it over HTTP.

    def test_something(clipal, upstream_factory):
        a = upstream_factory("A")
        proxy = clipal(codex=[provider("A", a)])
        r = requests.post(proxy.url + "/codex/v1/chat/completions", json={...})
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
import yaml

from fakeupstream import FakeUpstream

#: Modules whose tests start real processes or servers (clipal, gunicorn, pip, systemd-analyze) or
#: wait on the real filesystem; every test that uses the ``clipal`` or ``upstream_factory`` fixture
#: is live too. ``pytest -m "not live"`` runs the rest: the fast loop, a few seconds.
LIVE_MODULES = frozenset({
    "test_cli", "test_deploy", "test_fakeupstream", "test_gunicorn_live", "test_readme", "test_sdk_failover",
    "test_smoke_live", "test_update", "test_watch",
})
LIVE_FIXTURES = frozenset({"clipal", "upstream_factory"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "live: starts real servers or processes on loopback (slow); "
                                       'deselect with -m "not live"')


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """With ``-m "not live"``, whole live modules are not even imported (their SDK imports cost seconds)."""
    if " ".join(config.getoption("markexpr", "").split()) == "not live":
        stem = collection_path.stem
        if stem in LIVE_MODULES or stem.startswith("test_live_"):
            return True
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__ if getattr(item, "module", None) else ""
        if (module in LIVE_MODULES or module.startswith("test_live_")
                or LIVE_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.live)


#: The client config files by client name (the same table as clipal.clients).
CLIENT_FILES = {"claudecode": "claude-code.yaml", "codex": "codex.yaml", "gemini": "gemini.yaml"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def terminate(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM a server we started, give it ``timeout`` to exit cleanly, then kill it; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def provider(name: str, upstream: FakeUpstream | str, key: str | None = None, **extra: Any) -> dict:
    """A provider entry for a client YAML file."""
    url = upstream if isinstance(upstream, str) else upstream.url
    return {"name": name, "base_url": url, "api_key": key or f"sk-test-{name.lower()}-0123456789abcdef", **extra}


def write_yaml(path: Path, document: Any) -> None:
    """Write a config file the way an editor would, readable only by its owner."""
    text = document if isinstance(document, str) else yaml.safe_dump(document, sort_keys=False)
    path.write_text(text)
    path.chmod(0o600)


def write_config(config_dir: Path, *, settings: dict | None = None, **clients: list[dict]) -> None:
    """Write config.yaml (with quiet, test-friendly defaults) and the given client files."""
    config_dir.mkdir(parents=True, exist_ok=True)
    merged = {"log_dir": str(config_dir / "logs"), **(settings or {})}
    write_yaml(config_dir / "config.yaml", merged)
    for client, providers in clients.items():
        write_yaml(config_dir / CLIENT_FILES[client], {"providers": providers})


class ClipalProcess:
    """One ``python -m clipal`` process; its stdout+stderr go to a file you can read."""

    def __init__(self, config_dir: Path, *, args: tuple[str, ...] = (), env: dict | None = None,
                 port: int | None = None) -> None:
        self.config_dir = config_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_path = config_dir.parent / f"clipal-{self.port}.out"
        command = [sys.executable, "-m", "clipal", "--config-dir", str(config_dir), "--port", str(self.port), *args]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._out = open(self.output_path, "wb")
        self.proc = subprocess.Popen(command, stdout=self._out, stderr=subprocess.STDOUT, env=full_env)

    def wait_healthy(self, timeout: float = 15.0) -> "ClipalProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"clipal exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"clipal did not become healthy in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        """Everything clipal printed so far (its log lines when log_stdout is on)."""
        self._out.flush()
        return self.output_path.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.output()
            if text in out:
                return out
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in clipal output within {timeout}s:\n{self.output()}")

    def stop(self, timeout: float = 10.0) -> int:
        returncode = terminate(self.proc, timeout)
        self._out.close()
        return returncode


@pytest.fixture
def upstream_factory() -> Iterator[Callable[..., FakeUpstream]]:
    """Start fake upstreams by name; all are stopped (and checked for handler errors) at the end."""
    started: list[FakeUpstream] = []

    def start(name: str = "upstream", **kwargs: Any) -> FakeUpstream:
        up = FakeUpstream(name, **kwargs)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()
    for up in started:
        assert not up.errors, f"fake upstream {up.name} had handler errors:\n" + "\n".join(up.errors)


@pytest.fixture
def clipal(tmp_path: Path) -> Iterator[Callable[..., ClipalProcess]]:
    """Start clipal with the given providers per client and settings; stopped at test end.

    ``clipal(codex=[provider("A", a)], settings={"upstream_idle_timeout": "1s"})``
    """
    started: list[ClipalProcess] = []

    def start(*, settings: dict | None = None, args: tuple[str, ...] = (), env: dict | None = None,
              config_dir: Path | None = None, healthy: bool = True, **clients: list[dict]) -> ClipalProcess:
        directory = config_dir or tmp_path / f"config{len(started)}"
        if config_dir is None or clients or settings:
            write_config(directory, settings=settings, **clients)
        proc = ClipalProcess(directory, args=args, env=env)
        started.append(proc)
        return proc.wait_healthy() if healthy else proc

    yield start
    for proc in started:
        proc.stop()
