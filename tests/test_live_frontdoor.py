"""The front door, live: what clipal refuses of a client's request, sent byte for byte on a raw socket.

Each request goes to `clipal` itself (gevent's pywsgi) and to clipal under gunicorn with
deploy/gunicorn.conf.py, through gunicorn's own parser (its "gevent" worker) and through its
pywsgi worker. Every client's provider points at one FakeUpstream: a refused request must
reach it in no form, nor anything sent after it on the same connection. Refusals are a
client's errors: never a 500, never a traceback or an ERROR line in the server's output.

The slow-client limits, the connection cap, running out of file descriptors and SIGHUP
are checked on `clipal` alone, with the limits shortened through the environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import threading
import time
from typing import Callable, Iterator

import pytest
import requests

try:
    import resource
except ImportError:  # not Unix
    resource = None  # type: ignore[assignment]

from conftest import ClipalProcess, provider, write_config, write_yaml
from fakeupstream import FakeUpstream

BODY = b'{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}'
#: A request hidden after a body: if it ever runs, it reaches the upstream with the Gemini key.
SMUGGLED = b"GET /gemini/v1beta/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
GEMINI_KEY = "sk-test-gemini-only-0123456789abcdef"
SERVERS = ["clipal", "gunicorn", "gunicorn-pywsgi"]
PYWSGI_WORKER = "gunicorn.workers.ggevent.GeventPyWSGIWorker"


# --------------------------------------------------------------------------- raw HTTP


def split_responses(data: bytes) -> list[tuple[int, bytes]]:
    """The (status, head) of each response in ``data``, in order, interim ones included."""
    found = []
    rest = data
    while rest.startswith(b"HTTP/1."):
        head, _, rest = rest.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        found.append((status, head))
        if status < 200:
            continue
        fields = {name.strip().lower(): value.strip() for name, _, value in
                  (line.partition(b":") for line in head.split(b"\r\n")[1:])}
        if b"content-length" in fields:
            rest = rest[int(fields[b"content-length"]):]
        elif fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            while rest:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                rest = rest[size + 2:]
                if size == 0:
                    break
        else:
            break  # the body runs to the close
    return found


@dataclasses.dataclass
class Exchange:
    """What the server sent on a connection, and whether it closed the connection."""

    data: bytes
    closed: bool

    @property
    def statuses(self) -> list[int]:
        return [status for status, _ in split_responses(self.data)]

    @property
    def status(self) -> int | None:
        """The first final (non-1xx) status, None if the server answered nothing."""
        return next((code for code in self.statuses if code >= 200), None)

    @property
    def head(self) -> bytes:
        """The first final response's status line and headers."""
        return next((head for status, head in split_responses(self.data) if status >= 200), b"")


def read_until_closed(sock: socket.socket, wait: float) -> Exchange:
    """Everything the server sends until it closes the connection, or until ``wait`` seconds pass."""
    data = b""
    deadline = time.monotonic() + wait
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return Exchange(data, closed=True)
        if not chunk:
            return Exchange(data, closed=True)
        data += chunk
    return Exchange(data, closed=False)


def exchange(port: int, data: bytes, *, half_close: bool = False, wait: float = 3.0) -> Exchange:
    """Send ``data`` on a new connection (then end the sending side, with ``half_close``) and read."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed early; what it answered is still to be read
        return read_until_closed(sock, wait)


def post(headers: str, body: bytes, path: str = "/claudecode/v1/messages") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"{headers}\r\n").encode() + body


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


# --------------------------------------------------------------------------- servers


@dataclasses.dataclass
class Front:
    """One running server under test and the shared upstream behind it."""

    kind: str
    port: int
    output: Callable[[], str]
    upstream: FakeUpstream
    mark: int = 0

    def new_output(self) -> str:
        return self.output()[self.mark:]

    def assert_nothing_forwarded(self) -> None:
        time.sleep(0.3)  # a forwarded request would have arrived by now
        assert self.upstream.requests == [], [(r.method, r.path) for r in self.upstream.requests]

    def assert_quiet(self) -> None:
        """The refusal left no traceback and no ERROR line: it was the client's error, not the server's."""
        out = self.new_output()
        assert "Traceback" not in out and "[ERROR]" not in out, out


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream("A") as up:
        yield up


@pytest.fixture(scope="module")
def servers(tmp_path_factory, upstream) -> Iterator[Callable[[str], Front]]:
    """Start each kind of server once for the module, on first use."""
    running: dict[str, tuple[Front, Callable[[], int]]] = {}
    config_dir = tmp_path_factory.mktemp("frontdoor") / "config"
    write_config(config_dir, claudecode=[provider("A", upstream)], codex=[provider("A", upstream)],
                 gemini=[provider("A", upstream, key=GEMINI_KEY)])

    def get(kind: str) -> Front:
        if kind not in running:
            if kind == "clipal":
                proc = ClipalProcess(config_dir).wait_healthy()
                running[kind] = (Front(kind, proc.port, proc.output, upstream), proc.stop)
            else:
                pytest.importorskip("gunicorn")
                from test_gunicorn_live import Gunicorn

                server = Gunicorn(config_dir, tmp_path_factory.mktemp(kind),
                                  PYWSGI_WORKER if kind == "gunicorn-pywsgi" else None).start()
                running[kind] = (Front(kind, server.port, server.output, upstream), server.stop)
        return running[kind][0]

    yield get
    for _, stop in running.values():
        stop()


@pytest.fixture(params=SERVERS)
def front(request, servers, upstream) -> Front:
    server = servers(request.param)
    upstream.reset()
    server.mark = len(server.output())
    return server


# --------------------------------------------------------------------------- framing


def _underscored(number: int) -> str:
    text = str(number)
    return f"{text[0]}_{text[1:]}"


#: Each with a second request hidden after what a loose parser would take for the body.
FRAMING = {
    "content-length-and-transfer-encoding": (
        post(f"Content-Length: {len(chunked(BODY))}\r\nTransfer-Encoding: chunked\r\n", chunked(BODY) + SMUGGLED),
        400),
    "two-different-content-lengths": (
        post(f"Content-Length: {len(BODY)}\r\nContent-Length: {len(BODY) + len(SMUGGLED)}\r\n", BODY + SMUGGLED),
        400),
    "content-length-with-a-plus-sign": (post(f"Content-Length: +{len(BODY)}\r\n", BODY + SMUGGLED), 400),
    "content-length-with-an-underscore": (
        post(f"Content-Length: {_underscored(len(BODY))}\r\n", BODY + SMUGGLED), 400),
    "transfer-encoding-gzip-chunked": (post("Transfer-Encoding: gzip, chunked\r\n", chunked(BODY) + SMUGGLED), 400),
    "two-transfer-encoding-headers": (
        post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", chunked(BODY) + SMUGGLED), 400),
    "bad-chunk-size-then-more-bytes": (
        post("Transfer-Encoding: chunked\r\n", b"zz\r\n" + BODY + b"\r\n0\r\n\r\n" + SMUGGLED), 400),
    "unknown-transfer-coding": (post("Transfer-Encoding: foo\r\n", chunked(BODY) + SMUGGLED), 501),
}


@pytest.mark.parametrize("case", FRAMING)
def test_ambiguous_or_malformed_framing_is_refused_closed_and_never_forwarded(front, case):
    data, status = FRAMING[case]
    result = exchange(front.port, data)
    assert result.status == status, result.data
    assert b"connection: close" in result.head.lower(), result.data
    assert result.closed, "the connection stayed open after the refusal"
    assert result.statuses == [status], "something after the refused request was answered"
    front.assert_nothing_forwarded()
    front.assert_quiet()


def test_a_well_framed_chunked_request_and_the_next_one_on_its_connection_are_served(front):
    # The rules refuse only what is ambiguous: chunked bodies and kept-alive connections still work.
    second = post(f"Content-Length: {len(BODY)}\r\nConnection: close\r\n", BODY)
    result = exchange(front.port, post("Transfer-Encoding: chunked\r\n", chunked(BODY)) + second)
    assert result.statuses == [200, 200], result.data
    received = front.upstream.wait_for_requests(2)
    assert [r.body for r in received] == [BODY, BODY]
    front.assert_quiet()


# --------------------------------------------------------------------------- bodies and heads cut short

BAD_BODIES = {
    "chunk-longer-than-its-size": (post("Transfer-Encoding: chunked\r\n", b"5\r\nhello, world\r\n0\r\n\r\n"),
                                   False),
    "no-last-chunk": (post("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n"), True),
    "cut-inside-a-chunk": (post("Transfer-Encoding: chunked\r\n", b"40\r\nhello"), True),
    "malformed-trailer": (post("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nnot a trailer\r\n\r\n"),
                          False),
    "half-closed-upload": (post("Content-Length: 1000\r\n", BODY), True),
}


@pytest.mark.parametrize("case", BAD_BODIES)
def test_a_malformed_or_unfinished_body_gets_400_or_a_quiet_close_never_a_500(front, case):
    data, half_close = BAD_BODIES[case]
    result = exchange(front.port, data, half_close=half_close)
    assert result.status in (None, 400), result.data
    assert result.closed
    front.assert_nothing_forwarded()
    front.assert_quiet()


CUT_HEADS = {
    "request-line-only": b"POST /codex/v1/chat/completions HTTP/1.1\r\n",
    "request-line-without-its-end": b"GET /codex/v1/models HTTP/1.1",
    "no-blank-line": b"POST /codex/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n",
    "in-the-middle-of-a-header": b"GET /codex/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: appl",
}


@pytest.mark.parametrize("case", CUT_HEADS)
def test_a_request_whose_client_leaves_before_the_end_of_its_headers_is_never_forwarded(front, case):
    result = exchange(front.port, CUT_HEADS[case], half_close=True)
    assert result.status in (None, 400), result.data
    assert result.closed
    front.assert_nothing_forwarded()
    front.assert_quiet()


# --------------------------------------------------------------------------- header hygiene

HYGIENE = {
    "obs-fold": (b"X-Note: first\r\n folded\r\n", 400),
    "bare-cr": (b"X-Note: a\rX-Injected: b\r\n", 400),
    "nul": (b"X-Note: a\x00b\r\n", 400),
    "100-kb-header-block": (b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"p" * 4000) for i in range(25)), 431),
}


@pytest.mark.parametrize("case", HYGIENE)
def test_unclean_or_oversized_headers_are_refused(front, case):
    headers, status = HYGIENE[case]
    data = post(f"Content-Length: {len(BODY)}\r\n", b"")
    data = data[:-2] + headers + b"\r\n" + BODY  # the extra lines go before the blank line
    result = exchange(front.port, data)
    assert result.status == status, result.data[:300]
    assert result.closed
    front.assert_nothing_forwarded()
    front.assert_quiet()


@pytest.mark.parametrize("expect", ["100-continue", "100-Continue"])
def test_expect_100_continue_is_answered_by_clipal_and_not_forwarded(front, expect):
    with socket.create_connection(("127.0.0.1", front.port), timeout=5) as sock:
        sock.sendall(post(f"Content-Length: {len(BODY)}\r\nExpect: {expect}\r\nConnection: close\r\n", b""))
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(65536)  # a timeout here: nobody said to go on
            assert chunk, "closed before 100 Continue"
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        sock.sendall(BODY)
        result = read_until_closed(sock, wait=5)
    assert result.status == 200, interim + result.data
    (forwarded,) = front.upstream.wait_for_requests(1)
    assert forwarded.body == BODY
    assert forwarded.headers["Expect"] is None
    front.assert_quiet()


# --------------------------------------------------------------------------- slow clients (clipal)

#: Short limits, so that a test waits seconds rather than minutes.
SHORT = {"CLIPAL_HEADER_TIMEOUT": "1", "CLIPAL_BODY_TIMEOUT": "1", "CLIPAL_KEEPALIVE_TIMEOUT": "2"}


def dribble(sock: socket.socket, data: bytes, interval: float) -> threading.Thread:
    """Send ``data`` a byte at a time, ``interval`` apart, until done or the server closes."""
    def run() -> None:
        for byte in data:
            try:
                sock.send(bytes([byte]))
            except OSError:
                return
            time.sleep(interval)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_headers_sent_a_byte_at_a_time_are_cut_off_after_the_header_timeout(clipal, upstream_factory):
    up = upstream_factory("A")
    proxy = clipal(env=SHORT, codex=[provider("A", up)])
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        started = time.monotonic()
        # every read gets a byte well within a second; the whole head would take 12 s
        sender = dribble(sock, b"POST /codex/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
                         + b"s" * 40 + b"\r\n\r\n", interval=0.1)
        result = read_until_closed(sock, wait=6)
        took = time.monotonic() - started
        sender.join(5)
    assert result.closed and result.status is None, result.data
    assert 0.8 < took < 3, took
    time.sleep(0.3)
    assert up.requests == []
    assert "did not send its request headers within 1s" in proxy.output()


def test_a_body_that_stops_arriving_is_cut_off_after_the_body_timeout(clipal, upstream_factory):
    up = upstream_factory("A")
    proxy = clipal(env=SHORT, claudecode=[provider("A", up)])
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(post(f"Content-Length: {len(BODY)}\r\n", BODY[:20]))
        started = time.monotonic()
        result = read_until_closed(sock, wait=6)
        took = time.monotonic() - started
    assert result.closed and result.status in (None, 408), result.data
    assert 0.8 < took < 3, took
    time.sleep(0.3)
    assert up.requests == []
    out = proxy.output()
    assert "no request body bytes within 1s" in out and "Traceback" not in out and "[ERROR]" not in out, out


def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(clipal, upstream_factory):
    up = upstream_factory("A")
    proxy = clipal(env=SHORT, codex=[provider("A", up)])
    health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(health)
        assert read_until_closed(sock, wait=0.5).statuses == [200]
        # Idle for longer than the header timeout but less than the keep-alive one: the next
        # request's header deadline starts with its first byte, so it is served.
        time.sleep(1.4)
        sock.sendall(health)
        assert read_until_closed(sock, wait=0.5).statuses == [200]
        idle_from = time.monotonic()
        result = read_until_closed(sock, wait=6)
        took = time.monotonic() - idle_from
    assert result.closed and result.data == b""
    assert 1.3 < took < 4, took


def test_connections_beyond_the_cap_wait_in_the_backlog_until_one_closes(clipal, upstream_factory):
    up = upstream_factory("A")
    proxy = clipal(env={"CLIPAL_MAX_CONNECTIONS": "2"}, codex=[provider("A", up)])
    health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    held = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(2)]
    try:
        for sock in held:  # both accepted and served, then kept alive
            sock.sendall(health)
            assert read_until_closed(sock, wait=0.5).statuses == [200]
        with socket.create_connection(("127.0.0.1", proxy.port)) as third:  # connects: the kernel queues it
            third.sendall(health)
            waiting = read_until_closed(third, wait=1.0)
            assert waiting.data == b"" and not waiting.closed, "a third connection was served"
            held.pop().close()
            served = read_until_closed(third, wait=2.0)
            assert served.statuses == [200], served.data
    finally:
        for sock in held:
            sock.close()


# --------------------------------------------------------------------------- file descriptors (clipal)


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs prlimit (Linux)")
def test_running_out_of_file_descriptors_is_clipals_own_problem_and_passes(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    proxy = clipal(codex=[provider("A", a)], claudecode=[provider("B", b)])
    # `ulimit -n 64` for the running clipal (the fixture starts it with no preexec_fn to set it)
    resource.prlimit(proxy.proc.pid, resource.RLIMIT_NOFILE, (64, 64))
    kept = socket.create_connection(("127.0.0.1", proxy.port))  # accepted while there are fds to spare
    kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert read_until_closed(kept, wait=0.5).statuses == [200]
    held = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(70)]
    try:
        proxy.wait_for_output("clipal ran out of file descriptors (Too many open files; ulimit -n is 64)")
        # A request on a connection clipal holds already: its upstream connection finds no fd either.
        kept.sendall(post(f"Content-Length: {len(BODY)}\r\nConnection: close\r\n", BODY))
        answer = read_until_closed(kept, wait=3)
        assert answer.status == 503, answer.data
        assert b"clipal ran out of file descriptors" in answer.data
    finally:
        for sock in held:
            sock.close()
        kept.close()
    proxy.wait_for_output("file descriptors available again")
    r = requests.post(proxy.url + "/claudecode/v1/messages", data=BODY, timeout=5)
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "B"
    out = proxy.output()
    assert "clipal ran out of file descriptors connecting upstream (Too many open files)" in out, out
    assert "provider B failed" not in out and "deactivated" not in out, out
    assert "Traceback" not in out, out


# --------------------------------------------------------------------------- SIGHUP (clipal)


def _codex_file(name: str, upstream: FakeUpstream, size: int = 0) -> str:
    """codex.yaml naming one provider, padded with a comment to ``size`` bytes."""
    text = json.dumps({"providers": [provider(name, upstream)]}) + "\n"  # JSON is YAML
    return text + "#" * max(size - len(text) - 1, 0) + ("\n" if size else "")


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_reloads_the_configuration_and_clipal_keeps_serving(clipal, upstream_factory, tmp_path):
    a, b = upstream_factory("A"), upstream_factory("B")
    config_dir = tmp_path / "config"
    write_config(config_dir)
    path = config_dir / "codex.yaml"
    write_yaml(path, _codex_file("A", a, size=400))
    # Polling sees a file change by its inode, size and mtime: an edit keeping all three
    # is one only SIGHUP can apply, so the test sees SIGHUP's reload and not the watcher's.
    proxy = clipal(config_dir=config_dir, env={"CLIPAL_WATCH_MODE": "poll"})

    def who_answers() -> str:
        r = requests.post(proxy.url + "/codex/v1/chat/completions", json={"model": "m", "messages": []}, timeout=5)
        assert r.status_code == 200, r.text
        return r.headers["X-Clipal-Provider"]

    assert who_answers() == "A"
    before = path.stat()
    write_yaml(path, _codex_file("B", b, size=400))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_ino, path.stat().st_size) == (before.st_ino, before.st_size)
    time.sleep(1.5)  # several polls
    assert who_answers() == "A", "the watcher applied the edit; the test cannot tell SIGHUP's reload apart"

    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_output("configuration reloaded: codex.yaml: providers B (were A)")
    assert "SIGHUP: reloading configuration" in proxy.output()
    assert who_answers() == "B"
    assert proxy.proc.poll() is None
    assert len(b.requests) == 1 and len(a.requests) == 2

