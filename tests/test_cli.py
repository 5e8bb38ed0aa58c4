"""The command line (SPEC §1), run as a user runs it: ``python -m clipal`` and ``clipal``.

--version; bad configurations exit 1 with one line naming file, provider and
field; flags override config.yaml; where the config directory comes from; a
missing config directory starts fine and answers 503; SIGTERM/SIGINT exit 0
after letting an in-flight stream finish (bounded); a port in use exits 1.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

import clipal
from conftest import free_port, provider, write_config, write_yaml
from fakeupstream import Reply

CONSOLE_SCRIPT = str(Path(sys.executable).with_name("clipal"))
RUNNERS = {"python -m clipal": [sys.executable, "-m", "clipal"], "clipal": [CONSOLE_SCRIPT]}


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CLIPAL_CONFIG_DIR"}
    env.update(HOME=str(home), PYTHONUNBUFFERED="1")
    return env


def run(args: list[str], *, env: dict[str, str], runner: str = "python -m clipal",
        timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(RUNNERS[runner] + args, env=env, capture_output=True, text=True, timeout=timeout)


class Server:
    """A clipal started with arbitrary arguments and environment; stdout/stderr to a file."""

    def __init__(self, args: list[str], env: dict[str, str], out: Path, runner: str = "python -m clipal") -> None:
        self.out_path = out
        self._out = open(out, "wb")
        self.proc = subprocess.Popen(RUNNERS[runner] + args, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_healthy(self, url: str, timeout: float = 15) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"clipal exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"clipal not healthy at {url}:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@pytest.fixture
def servers(tmp_path) -> Iterator:
    started: list[Server] = []

    def start(args: list[str], env: dict[str, str], runner: str = "python -m clipal") -> Server:
        server = Server(args, env, tmp_path / f"server{len(started)}.out", runner)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


# --- --version ------------------------------------------------------------------------------


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_version(runner, tmp_path):
    result = run(["--version"], env=base_env(tmp_path), runner=runner)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"clipal {clipal.__version__}"
    assert re.fullmatch(r"clipal \d+\.\d+\.\d+", result.stdout.strip())
    assert not (tmp_path / ".clipal").exists()  # --version reads and writes nothing


def test_version_imports_none_of_the_server(tmp_path):
    """--version answers at once: gevent, Flask and requests are never imported for it."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "clipal", "--version"],
                            env=base_env(tmp_path), capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    imported = set(re.findall(r"\|\s*([\w.]+)$", result.stderr, re.M))
    assert "clipal.cli" in imported  # the -X importtime report is there to read
    assert not imported & {"gevent", "flask", "requests", "yaml", "clipal.config"}


def test_patching_reads_entry_points_once_and_restores_the_lookup():
    """gevent's patch announcements are answered from one reading; the real lookup is put back."""
    code = """if True:
        from importlib import metadata
        real = metadata.entry_points
        calls = []
        def counting(**selection):
            calls.append(selection)
            return real(**selection)
        metadata.entry_points = counting
        from clipal.patch import patch_with_gevent
        patch_with_gevent()
        import socket, gevent.socket
        assert socket.socket is gevent.socket.socket, "sockets are not patched"
        assert metadata.entry_points is counting, "the lookup was not restored"
        print(len(calls))
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"  # gevent alone looks them up ~25 times


# --- bad configuration: exit 1, one line ---------------------------------------------------------

GOOD = {"name": "x", "base_url": "https://api.example.com", "api_key": "sk-x-0123456789"}

BAD_CONFIGS = [
    pytest.param("config.yaml", {"port": 3333, "colour": "blue"}, ["config.yaml", "colour"], id="unknown-key"),
    pytest.param("codex.yaml", {"providers": [{**GOOD, "weight": 3}]},
                 ["codex.yaml", 'provider "x"', "weight"], id="unknown-provider-key"),
    pytest.param("codex.yaml", {"providers": [{"name": "x", "base_url": "https://api.example.com"}]},
                 ["codex.yaml", 'provider "x"', "api_key"], id="missing-api-key"),
    pytest.param("config.yaml", {"port": 0}, ["config.yaml", "port"], id="port-0"),
    pytest.param("config.yaml", {"port": 70000}, ["config.yaml", "port", "70000"], id="port-70000"),
    pytest.param("config.yaml", {"port": "abc"}, ["config.yaml", "port"], id="port-abc"),
    pytest.param("config.yaml", {"upstream_idle_timeout": "5 minutes"},
                 ["config.yaml", "upstream_idle_timeout"], id="bad-duration"),
    pytest.param("config.yaml", {"reactivate_after": "-1h"}, ["config.yaml", "reactivate_after"],
                 id="negative-duration"),
    pytest.param("gemini.yaml", {"providers": [GOOD, {**GOOD, "base_url": "https://b.example.com"}]},
                 ["gemini.yaml", 'provider "x"', "duplicate"], id="duplicate-name"),
    pytest.param("claude-code.yaml", {"providers": [{**GOOD, "base_url": "ftp://api.example.com"}]},
                 ["claude-code.yaml", 'provider "x"', "base_url"], id="base-url-not-http"),
    pytest.param("claude-code.yaml", {"providers": [{**GOOD, "base_url": "api.example.com"}]},
                 ["claude-code.yaml", 'provider "x"', "base_url"], id="base-url-no-scheme"),
    pytest.param("codex.yaml", "providers:\n  - name: x\n    base_url: [\n",
                 ["codex.yaml", "YAML"], id="broken-yaml"),
]


def assert_one_error_line(result: subprocess.CompletedProcess, *parts: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("file, document, parts", BAD_CONFIGS)
def test_bad_configuration_exits_1_with_one_line(tmp_path, file, document, parts):
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    write_yaml(config_dir / file, document)
    result = run(["--config-dir", str(config_dir), "--port", str(free_port())], env=base_env(tmp_path))
    assert_one_error_line(result, *parts)


def test_bad_configuration_with_the_console_script(tmp_path):
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    write_yaml(config_dir / "codex.yaml", {"providers": [{"name": "x", "base_url": "https://api.example.com"}]})
    result = run(["--config-dir", str(config_dir)], env=base_env(tmp_path), runner="clipal")
    assert_one_error_line(result)
    assert result.stderr.strip().endswith('codex.yaml: provider "x": api_key is required')


@pytest.mark.parametrize("flags, parts", [
    (["--port", "0"], ["port"]),
    (["--port", "70000"], ["port"]),
    (["--port", "abc"], ["port"]),
    (["--log-level", "loud"], ["log_level"]),
])
def test_bad_flag_values_exit_1_with_one_line(tmp_path, flags, parts):
    result = run(["--config-dir", str(tmp_path / "none"), *flags], env=base_env(tmp_path))
    assert_one_error_line(result, *parts)


# --- flags, config directory ------------------------------------------------------------------------


def test_flags_override_config_yaml(tmp_path, servers, upstream_factory):
    up = upstream_factory("A")
    config_dir = tmp_path / "config"
    file_port, flag_port = free_port(), free_port()
    write_config(config_dir, settings={"port": file_port, "listen_addr": "127.0.0.2", "log_level": "error"},
                 codex=[provider("A", up)])
    server = servers(["--config-dir", str(config_dir), "--port", str(flag_port), "--listen-addr", "127.0.0.1",
                      "--log-level", "debug"], base_env(tmp_path))
    server.wait_healthy(f"http://127.0.0.1:{flag_port}")
    for host, port in (("127.0.0.1", file_port), ("127.0.0.2", file_port), ("127.0.0.2", flag_port)):
        with pytest.raises(OSError):
            socket.create_connection((host, port), timeout=1).close()
    r = requests.post(f"http://127.0.0.1:{flag_port}/codex/v1/chat/completions", json={"model": "m"})
    assert r.status_code == 200
    deadline = time.monotonic() + 5
    while "[DEBUG]" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(r"^\[DEBUG\] .*\[codex\]", server.output(), re.M), server.output()


def test_config_yaml_settings_apply_without_flags(tmp_path, servers):
    config_dir = tmp_path / "config"
    port = free_port()
    write_config(config_dir, settings={"port": port, "log_level": "debug"})
    server = servers(["--config-dir", str(config_dir)], base_env(tmp_path))
    server.wait_healthy(f"http://127.0.0.1:{port}")
    requests.post(f"http://127.0.0.1:{port}/codex/v1/chat/completions", json={})
    deadline = time.monotonic() + 5
    while "[DEBUG]" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "[DEBUG]" in server.output()


def _dir_with_provider(path: Path, name: str, upstream) -> Path:
    write_config(path, codex=[provider(name, upstream)])
    return path


def _provider_answering(port: int) -> str:
    r = requests.post(f"http://127.0.0.1:{port}/codex/v1/chat/completions", json={"model": "m"})
    assert r.status_code == 200, r.text
    return r.headers["X-Clipal-Provider"]


@pytest.mark.parametrize("use_flag, use_env, expected", [
    (True, True, "from-flag"),
    (False, True, "from-env"),
    (False, False, "from-home"),
])
def test_config_dir_comes_from_flag_then_env_then_home(tmp_path, servers, upstream_factory,
                                                        use_flag, use_env, expected):
    up = upstream_factory("A")
    home = tmp_path / "home"
    _dir_with_provider(home / ".clipal", "from-home", up)
    env_dir = _dir_with_provider(tmp_path / "env-dir", "from-env", up)
    flag_dir = _dir_with_provider(tmp_path / "flag-dir", "from-flag", up)
    env = base_env(home)
    if use_env:
        env["CLIPAL_CONFIG_DIR"] = str(env_dir)
    port = free_port()
    args = ["--port", str(port)] + (["--config-dir", str(flag_dir)] if use_flag else [])
    servers(args, env).wait_healthy(f"http://127.0.0.1:{port}")
    assert _provider_answering(port) == expected


def test_missing_config_dir_starts_and_each_client_answers_503_naming_its_file(tmp_path, servers):
    missing = tmp_path / "no-such-dir"
    port = free_port()
    server = servers(["--config-dir", str(missing), "--port", str(port)], base_env(tmp_path), runner="clipal")
    server.wait_healthy(f"http://127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}"

    r = requests.post(url + "/claudecode/v1/messages", json={"model": "m"})
    assert r.status_code == 503
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) >= {"type", "message"}
    assert "claude-code.yaml" in body["error"]["message"] and str(missing) in body["error"]["message"]

    r = requests.post(url + "/codex/v1/responses", json={"model": "m"})
    assert r.status_code == 503
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "code"} and "codex.yaml" in error["message"]

    r = requests.post(url + "/gemini/v1beta/models/m:generateContent", json={})
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == 503 and error["status"] and "gemini.yaml" in error["message"]


# --- signals ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_exits_0_quickly(clipal, signum):
    proxy = clipal()
    start = time.monotonic()
    proxy.proc.send_signal(signum)
    assert proxy.proc.wait(5) == 0, proxy.output()
    assert time.monotonic() - start < 2.5
    assert "Traceback" not in proxy.output()


def test_an_idle_keep_alive_connection_does_not_delay_shutdown(clipal):
    # Agents keep connections open between requests; that alone must not hold clipal for the grace period.
    proxy = clipal()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 200 and not response.will_close
        response.read()
        start = time.monotonic()
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(5) == 0, proxy.output()
        assert time.monotonic() - start < 2.5
    finally:
        conn.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_in_flight_stream_completes_during_shutdown(clipal, upstream_factory, signum):
    up = upstream_factory("A")
    events = [{"n": i} for i in range(5)]
    up.script(Reply.sse(events + ["[DONE]"], delay=0.25))
    proxy = clipal(codex=[provider("A", up)])
    r = requests.post(proxy.url + "/codex/v1/chat/completions", json={"stream": True}, stream=True, timeout=10)
    chunks = r.iter_content(None)
    received = next(chunks)
    assert b'{"n":0}' in received
    proxy.proc.send_signal(signum)
    signalled = time.monotonic()
    # new connections are refused while the stream carries on
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            requests.get(proxy.url + "/health", timeout=0.5)
        except requests.ConnectionError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("clipal still accepted connections after the signal")
    for chunk in chunks:  # raises if the response is cut short
        received += chunk
    for event in events:
        assert f'data: {{"n":{event["n"]}}}'.encode() in received
    assert received.endswith(b"data: [DONE]\n\n")
    assert proxy.proc.wait(5) == 0
    assert time.monotonic() - signalled < 4


def test_shutdown_does_not_wait_forever_for_a_stalled_stream(clipal, upstream_factory):
    up = upstream_factory("A")
    up.script(Reply.sse([{"n": 0}, {"n": 1}]).stall_after(1))
    proxy = clipal(codex=[provider("A", up)])
    r = requests.post(proxy.url + "/codex/v1/chat/completions", json={"stream": True}, stream=True, timeout=20)
    chunks = r.iter_content(None)  # keep it: a dropped generator closes the connection
    assert b'{"n":0}' in next(chunks)
    proxy.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert proxy.proc.wait(10) == 0
    elapsed = time.monotonic() - signalled
    assert 4 < elapsed < 8, elapsed  # the ~5 s grace, then exit anyway
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        list(chunks)  # cut off: the client sees an incomplete response, not a clean end


# --- port in use ---------------------------------------------------------------------------------------


def test_port_in_use_exits_1_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(["--config-dir", str(tmp_path / "none"), "--port", str(port)], env=base_env(tmp_path))
    assert result.returncode == 1, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(port) in lines[0]
    assert "Traceback" not in result.stderr
