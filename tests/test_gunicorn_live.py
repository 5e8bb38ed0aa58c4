"""clipal under gunicorn, as deploy/README.md tells people to run it.

    CLIPAL_CONFIG_DIR=... gunicorn -c deploy/gunicorn.conf.py 'clipal.wsgi:app'

with 2 gevent workers in front of FakeUpstreams. Which worker served a request is read from
gunicorn's access log (``%(p)s`` is the worker pid; every request carries an X-Test-Id
header that the log line repeats), so the tests can insist that BOTH workers streamed,
reloaded and switched provider, not just whichever one the kernel happened to favour.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import free_port, provider, terminate, write_config
from fakeupstream import FakeUpstream, Reply

pytest.importorskip("gunicorn")

REPO = Path(__file__).resolve().parent.parent
GUNICORN_CONF = REPO / "deploy" / "gunicorn.conf.py"
# gunicorn's two gevent workers: deploy/gunicorn.conf.py's, whose environ comes from
# gunicorn's own HTTP parser, and the one serving through gevent's pywsgi.
GEVENT_WORKERS = ["gevent", "gunicorn.workers.ggevent.GeventPyWSGIWorker"]


def gunicorn_command() -> list[str]:
    """The venv's gunicorn script (what a user runs), else ``python -m gunicorn``."""
    script = Path(sys.executable).with_name("gunicorn")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gunicorn"]


def supports_setting(name: str) -> bool:
    from gunicorn.config import Config

    return name in Config().settings


class Gunicorn:
    """``gunicorn -c deploy/gunicorn.conf.py clipal.wsgi:app`` with 2 workers on a free port."""

    def __init__(self, config_dir: Path, workdir: Path, worker_class: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output_path = workdir / f"gunicorn-{self.port}.out"
        self.access_log = workdir / f"gunicorn-{self.port}.access.log"
        command = [
            *gunicorn_command(), "-c", str(GUNICORN_CONF),
            # Only for the test: which worker (pid) served which request (X-Test-Id).
            "--access-logfile", str(self.access_log),
            "--access-logformat", "pid=%(p)s id=%({x-test-id}i)s status=%(s)s",
        ]
        if worker_class is not None:
            command += ["--worker-class", worker_class]  # the command line overrides the config file
        if supports_setting("control_socket_disable"):
            command.append("--no-control-socket")  # else gunicorn >= 25.1 binds ~/.gunicorn/gunicorn.ctl
        command.append("clipal.wsgi:app")
        env = {**os.environ, "CLIPAL_CONFIG_DIR": str(config_dir), "CLIPAL_BIND": f"127.0.0.1:{self.port}",
               "CLIPAL_WORKERS": "2", "PYTHONUNBUFFERED": "1"}
        self._out = open(self.output_path, "wb")
        self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT)
        self._next_id = 0

    def output(self) -> str:
        self._out.flush()
        return self.output_path.read_text(errors="replace")

    def wait_for(self, predicate, what: str, timeout: float) -> float:
        """Poll ``predicate(output)`` until true; returns the seconds it took."""
        start = time.monotonic()
        while not predicate(self.output()):
            assert self.proc.poll() is None, f"gunicorn exited with {self.proc.returncode}:\n{self.output()}"
            assert time.monotonic() - start < timeout, f"{what} not seen within {timeout}s:\n{self.output()}"
            time.sleep(0.05)
        return time.monotonic() - start

    def worker_pids(self) -> set[int]:
        return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", self.output())}

    def start(self) -> "Gunicorn":
        self.wait_for(lambda out: len(re.findall(r"codex\.yaml: \d+ provider\(s\) loaded", out)) == 2,
                      "both workers loading the config", timeout=20)
        assert len(self.worker_pids()) == 2
        deadline = time.monotonic() + 10
        while True:
            try:
                if requests.get(self.url + "/health", headers={"Connection": "close"}, timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    def new_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def served_by(self, test_ids: list[str], timeout: float = 5.0) -> dict[str, int]:
        """Worker pid per X-Test-Id, from the access log (written as each response ends)."""
        deadline = time.monotonic() + timeout
        while True:
            found = {}
            if self.access_log.exists():
                for match in re.finditer(r"pid=<?(\d+)>? id=(\S+)", self.access_log.read_text()):
                    found[match.group(2)] = int(match.group(1))
            if all(test_id in found for test_id in test_ids):
                return {test_id: found[test_id] for test_id in test_ids}
            assert time.monotonic() < deadline, f"missing access log lines for {set(test_ids) - set(found)}"
            time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int:
        returncode = terminate(self.proc, timeout)
        self._out.close()
        return returncode


@pytest.fixture
def gunicorn_clipal(tmp_path):
    started: list[Gunicorn] = []

    def start(config_dir: Path, worker_class: str | None = None) -> Gunicorn:
        server = Gunicorn(config_dir, tmp_path, worker_class)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


# --------------------------------------------------------------------------- requests


def chat(server: Gunicorn, test_id: str) -> tuple[str, Any]:
    """A non-streaming Chat Completions call on a fresh connection: (provider, JSON)."""
    response = requests.post(server.url + "/codex/v1/chat/completions",
                             json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
                             headers={"X-Test-Id": test_id, "Connection": "close", "Authorization": "Bearer client"},
                             timeout=10)
    assert response.status_code == 200, response.text
    return response.headers["X-Clipal-Provider"], response.json()


def stream(server: Gunicorn, test_id: str) -> tuple[str, list[tuple[float, bytes]]]:
    """A streaming Responses API call on a fresh connection: (provider, [(arrival, chunk)])."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        body = json.dumps({"model": "gpt-test", "input": "hi", "stream": True})
        connection.request("POST", "/codex/v1/responses", body=body,
                           headers={"Content-Type": "application/json", "X-Test-Id": test_id,
                                    "Connection": "close"})
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        chunks = []
        while chunk := response.read1(65536):
            chunks.append((time.monotonic(), chunk))
        return response.getheader("X-Clipal-Provider"), chunks
    finally:
        connection.close()


def sse_text(chunks: list[tuple[float, bytes]]) -> str:
    return b"".join(chunk for _, chunk in chunks).decode()


def paced_responses_stream(words: list[str], delay: float) -> Reply:
    """A short Responses API stream: one delta event per word, ``delay`` apart, then completed."""
    events = [("response.output_text.delta", {"type": "response.output_text.delta", "delta": word})
              for word in words]
    events.append(("response.completed", {"type": "response.completed", "response": {"status": "completed"}}))
    return Reply.sse(events, delay=delay)


def hit_both_workers(server: Gunicorn, call, batch: int = 12, limit: int = 120) -> dict[str, tuple[int, str]]:
    """Send requests on fresh connections until each worker has served some: {id: (pid, provider)}."""
    workers = server.worker_pids()
    results: dict[str, tuple[int, str]] = {}
    while {pid for pid, _ in results.values()} != workers:
        assert len(results) < limit, f"{limit} requests all went to the same worker: {results}"
        providers = {}
        for _ in range(batch):
            test_id = server.new_id()
            providers[test_id] = call(server, test_id)
        for test_id, pid in server.served_by(list(providers)).items():
            results[test_id] = (pid, providers[test_id])
    return results


# --------------------------------------------------------------------------- tests


def test_two_gevent_workers_proxy_and_both_reload(tmp_path, upstream_factory, gunicorn_clipal):
    a = upstream_factory("A")
    b = upstream_factory("B")
    config_dir = tmp_path / "config"
    write_config(config_dir, codex=[provider("A", a)])
    server = gunicorn_clipal(config_dir)
    workers = server.worker_pids()

    # Non-streaming and streaming requests, on fresh connections, until both workers served each kind.
    def chat_provider(server, test_id):
        name, answer = chat(server, test_id)
        assert answer["choices"][0]["message"]["content"] == "hello from A"
        return name

    def stream_provider(server, test_id):
        name, chunks = stream(server, test_id)
        text = sse_text(chunks)
        assert "event: response.completed" in text and "output_text.delta" in text
        return name

    for call in (chat_provider, stream_provider):
        served = hit_both_workers(server, call)
        assert {name for _, name in served.values()} == {"A"}
    assert b.requests == []
    # The provider's key, on the carrier the Codex client kind uses; the client's own is gone.
    assert a.requests[0].headers["Authorization"] == "Bearer sk-test-a-0123456789abcdef"
    assert all("client" not in (r.headers["Authorization"] or "") for r in a.requests)

    # A stream is relayed as it arrives under gunicorn too, not buffered: 0.4 s apart in, ~0.4 s apart out.
    a.script(paced_responses_stream(["one", " two", " three"], delay=0.4), path="/v1/responses")
    name, chunks = stream(server, server.new_id())
    assert name == "A"
    deltas = [t for t, chunk in chunks if b"output_text.delta" in chunk]
    assert len(deltas) == 3, sse_text(chunks)
    gaps = [later - earlier for earlier, later in zip(deltas, deltas[1:])]
    assert all(0.25 < gap < 0.7 for gap in gaps), gaps

    # Switch A -> B in the file: each worker's own watcher reloads it.
    requests_to_a = len(a.requests)
    edited = time.monotonic()
    write_config(config_dir, codex=[provider("B", b)])
    took = server.wait_for(lambda out: out.count("configuration reloaded: codex.yaml: providers B (were A)") == 2,
                           "a reload in each of the two workers", timeout=3.0)
    assert took < 3.0

    # From now on every request, whichever worker takes it, goes to B.
    for call in (chat, stream):
        served = hit_both_workers(server, lambda s, i: call(s, i)[0])
        assert {name for _, name in served.values()} == {"B"}, served
        assert {pid for pid, _ in served.values()} == workers
    assert len(a.requests) == requests_to_a, "A was asked after the reload"
    assert time.monotonic() - edited < 30

    # SIGTERM: an in-flight stream still finishes, then gunicorn exits 0.
    b.script(paced_responses_stream(["slow", " answer", " to", " finish"], delay=0.3), path="/v1/responses")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("POST", "/codex/v1/responses", body=json.dumps({"model": "m", "input": "x", "stream": True}),
                       headers={"Content-Type": "application/json", "Connection": "close"})
    response = connection.getresponse()
    first = response.read1(65536)
    assert first and response.getheader("X-Clipal-Provider") == "B"
    stopped = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rest = response.read()  # raises IncompleteRead if the stream was cut
    connection.close()
    assert b"event: response.completed" in first + rest
    assert server.proc.wait(timeout=15) == 0
    # No idle client connection was left open, so the workers did not have to be killed
    # at graceful_timeout (5 s) and both said goodbye.
    assert time.monotonic() - stopped < 5.0
    out = server.output()
    assert all(f"Worker exiting (pid: {pid})" in out for pid in workers), out
    assert "Traceback" not in out, out


@pytest.mark.parametrize("worker_class", GEVENT_WORKERS)
def test_hang_up_and_broken_stream_under_gunicorn(tmp_path, upstream_factory, gunicorn_clipal, worker_class):
    """clipal's client-socket watch and abnormal stream end work with both of gunicorn's
    gevent workers (which hand the socket over as environ['gunicorn.socket'] and
    environ['gunicorn.sock'] respectively)."""
    a = upstream_factory("A")
    b = upstream_factory("B")
    config_dir = tmp_path / "config"
    write_config(config_dir, codex=[provider("A", a), provider("B", b, priority=2)])
    server = gunicorn_clipal(config_dir, worker_class)

    # The agent gives up while A has not even sent headers: clipal abandons at once,
    # closes its upstream request and does not spend B's quota on nobody.
    a.script(Reply.stall(), path="/v1/chat/completions")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server.url + "/codex/v1/chat/completions", json={"model": "m", "messages": []},
                      headers={"Connection": "close"}, timeout=0.5)
    stalled = a.wait_for_requests(1, timeout=5)[0]
    assert stalled.client_gone.wait(2), "clipal kept waiting on A after the client left"
    time.sleep(0.3)
    assert b.requests == []
    # ... and A is not blamed: the next request still goes to A.
    assert chat(server, server.new_id())[0] == "A"

    # A stream that breaks after the commit point reaches the client as broken, not as a
    # clean (truncated) end: no final chunk, so the client's HTTP library raises.
    a.script(Reply.answer("one two three four", delay=0.05).drop_after(3), path="/v1/responses")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("POST", "/codex/v1/responses", body=json.dumps({"model": "m", "input": "x", "stream": True}),
                       headers={"Content-Type": "application/json", "Connection": "close"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Transfer-Encoding") == "chunked"
    received = b""
    with pytest.raises(http.client.IncompleteRead):
        while chunk := response.read1(65536):
            received += chunk
    connection.close()
    assert b"event: response.created" in received and b"response.completed" not in received
    assert b.requests == [], "no retry after the commit point"
    server.wait_for(lambda out: "response to the client ended incomplete" in out, "the broken-stream warning", 5)


def test_each_worker_tunes_memory_as_clipal_does(tmp_path, upstream_factory, gunicorn_clipal):
    """The malloc threshold and the frozen startup objects of `clipal`'s serve() happen in
    every gunicorn worker too; both functions say so at debug level."""
    a = upstream_factory("A")
    config_dir = tmp_path / "config"
    write_config(config_dir, settings={"log_level": "debug"}, codex=[provider("A", a)])
    server = gunicorn_clipal(config_dir)
    pattern = r"memory: (\d+) startup objects kept out of garbage collection"
    # start() saw both workers load the config; the tuning comes just after that.
    server.wait_for(lambda out: len(re.findall(pattern, out)) == 2, "both workers freezing their startup objects", 10)
    out = server.output()
    assert all(int(n) > 1000 for n in re.findall(pattern, out)), out
    if platform.libc_ver()[0] == "glibc":
        assert out.count("memory: allocations of 1048576 bytes and up are returned to the OS when freed") == 2, out
    # Tuned after the app was built: each worker's lines follow its config loading.
    assert out.index("provider(s) loaded") < out.index("startup objects kept out")
