"""A long request body is forwarded while the client is still sending it, and replayed whole on a failover.

A body with a Content-Length over clipal.body.STREAM_THRESHOLD is not read
before the first attempt: that attempt reads it from the client as it sends
it upstream, keeping a copy for the next. The upstream here is
:class:`BodyUpstream`, a loopback server that reads each body as it comes,
so a test can see how much of it arrived while the client is paused, and can
break off in the middle of it. The client is a raw socket, so it can pause
mid-body, or leave.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import pytest
import requests

from conftest import provider
from fakeupstream import Reply

PATH = "/claudecode/v1/messages"
BODY_SIZE = 1536 * 1024  # a long Claude Code request
#: The client's first part: a multiple of clipal's 64 KiB reads, so all of it is forwarded at once.
FIRST_PART = 12 * 64 * 1024
ANSWER = json.dumps({"type": "message", "content": [{"type": "text", "text": "ok"}]}).encode()


@dataclass
class Exchange:
    """One request to :class:`BodyUpstream`, as it went."""

    connection: int
    head: bytes = b""
    body: bytearray = field(default_factory=bytearray)
    #: clipal closed the connection before the body's end (EOF or reset seen by the upstream)
    cut: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode("latin-1")
        return None


class BodyUpstream:
    """An HTTP/1.1 upstream on 127.0.0.1 reading each request body as it arrives; connections kept alive.

    The first request of each new connection takes the next behaviour of
    ``script`` (then "answer"): "answer" reads the whole body and answers
    200; "503 early" answers 503 (Connection: close) right after the head
    and closes without reading the body; an int n reads n body bytes and
    closes with a reset.
    """

    def __init__(self, script: list[str | int] | None = None) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.exchanges: list[Exchange] = []
        self.connections = 0
        self._script = list(script or [])
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("the upstream did not see that in time")
            time.sleep(0.01)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            with self._lock:
                behaviour = self._script.pop(0) if self._script else "answer"
                self.connections += 1
                serial = self.connections
            threading.Thread(target=self._serve, args=(conn, behaviour, serial), daemon=True).start()

    def _serve(self, conn: socket.socket, behaviour: str | int, serial: int) -> None:
        conn.settimeout(15)
        buffer = b""
        with conn:
            while not self._stopped.is_set():
                while b"\r\n\r\n" not in buffer:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return  # closed between requests: an ordinary end
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                exchange = Exchange(serial, head)
                with self._lock:
                    self.exchanges.append(exchange)
                try:
                    buffer = self._answer(conn, exchange, behaviour, buffer)
                except OSError:
                    exchange.cut.set()
                    buffer = None
                finally:
                    exchange.done.set()
                if buffer is None:
                    return
                behaviour = "answer"

    @staticmethod
    def _answer(conn: socket.socket, exchange: Exchange, behaviour: str | int, buffer: bytes) -> bytes | None:
        """Read and answer one request; what follows its body, or None once the connection is to close."""
        if behaviour == "503 early":
            answer = b'{"type":"error","error":{"type":"overloaded_error","message":"busy"}}'
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))
            return None
        length = int(exchange.header("Content-Length") or 0)
        stop_at = behaviour if isinstance(behaviour, int) else length
        exchange.body += buffer[:stop_at]
        buffer = buffer[stop_at:]
        while len(exchange.body) < stop_at:
            data = conn.recv(min(65536, stop_at - len(exchange.body)))
            if not data:
                exchange.cut.set()
                return None
            exchange.body += data
        if isinstance(behaviour, int):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return None  # closed with a reset: clipal is still sending
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(ANSWER), ANSWER))
        return buffer


@pytest.fixture
def upstreams():
    started: list[BodyUpstream] = []

    def start(script: list[str | int] | None = None) -> BodyUpstream:
        up = BodyUpstream(script)
        started.append(up)
        return up

    yield start
    for up in started:
        up.stop()


def request_head(length: int, extra: str = "") -> bytes:
    return (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def read_response(sock: socket.socket, timeout: float = 15.0) -> tuple[int, bytes]:
    """The status and the whole of one response read from ``sock`` (framed by Content-Length)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return int(head.split(b" ", 2)[1]), head + b"\r\n\r\n" + body


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def start_clipal(clipal, *ups, settings: dict | None = None, env: dict | None = None):
    names = "ABCD"
    return clipal(claudecode=[provider(names[i], up) for i, up in enumerate(ups)],
                  settings={"log_level": "debug", **(settings or {})}, env=env)


def test_a_long_body_arrives_byte_identical_framed_by_its_length(clipal, upstream_factory):
    up = upstream_factory("A")
    proxy = clipal(claudecode=[provider("A", up)])
    body = os.urandom(BODY_SIZE)
    r = requests.post(proxy.url + PATH, data=body, headers={"Content-Type": "application/json"}, timeout=20)
    assert r.status_code == 200
    received = up.requests[0]
    assert sha(received.body) == sha(body)
    assert received.headers["Content-Length"] == str(BODY_SIZE)
    assert received.headers["Transfer-Encoding"] is None


def test_the_upstream_gets_the_body_while_the_client_is_still_sending_it(clipal, upstreams):
    a = upstreams()
    proxy = start_clipal(clipal, a)
    body = os.urandom(BODY_SIZE)
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(request_head(len(body)) + body[:FIRST_PART])
        # The client pauses here: the head and the whole first part reach the upstream meanwhile.
        a.wait_for(lambda: bool(a.exchanges) and len(a.exchanges[0].body) >= FIRST_PART, timeout=5)
        exchange = a.exchanges[0]
        assert exchange.head.startswith(b"POST /v1/messages HTTP/1.1")
        assert exchange.header("Content-Length") == str(BODY_SIZE)
        assert bytes(exchange.body) == body[:FIRST_PART]  # and nothing past what the client sent
        sock.sendall(body[FIRST_PART:])
        status, _ = read_response(sock)
    assert status == 200
    assert sha(exchange.body) == sha(body)


def failures(proxy) -> dict[str, int]:
    """Each claudecode provider's failure count, from /status."""
    document = requests.get(proxy.url + "/status", headers={"Host": "127.0.0.1"}, timeout=5).json()
    return {p["name"]: p["failures"] for p in document["clients"]["claudecode"]["providers"]}


@pytest.mark.parametrize("first", ["503 early", 300_000, "503 after"])
def test_a_failover_replays_the_whole_body_even_before_the_client_has_sent_it_all(clipal, upstreams,
                                                                                 upstream_factory, first):
    # A answers 503 at once without reading the body / reads 300 KB of it and resets / reads it
    # all and answers 503 (a FakeUpstream). In the first two the client is still sending when A
    # fails: B gets what arrived so far at once, then the rest as the client sends it.
    if first == "503 after":
        a = upstream_factory("A")
        a.default = Reply.anthropic_error(503)
    else:
        a = upstreams([first])
    b = upstreams()
    proxy = start_clipal(clipal, a, b)
    body = os.urandom(BODY_SIZE)
    more = FIRST_PART + 64 * 1024
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        if first == "503 after":
            sock.sendall(request_head(len(body)) + body)
        else:
            sock.sendall(request_head(len(body)) + body[:FIRST_PART])
            a.wait_for(lambda: bool(a.exchanges) and a.exchanges[0].done.is_set())
            # clipal notices A's end when it next sends to it, with the client's next bytes
            sock.sendall(body[FIRST_PART:more])
            b.wait_for(lambda: bool(b.exchanges) and len(b.exchanges[0].body) >= more)
            assert bytes(b.exchanges[0].body) == body[:more]  # the kept copy, before the client sent the rest
            sock.sendall(body[more:])
        status, response = read_response(sock)
    assert status == 200 and b"X-Clipal-Provider: B" in response
    assert [sha(e.body) for e in b.exchanges] == [sha(body)]
    assert b.exchanges[0].header("Content-Length") == str(BODY_SIZE)
    if first == "503 after":
        assert sha(a.requests[0].body) == sha(body)
    elif first == 300_000:
        assert 300_000 <= len(a.exchanges[0].body) < len(body)
    assert failures(proxy) == {"A": 1, "B": 0}  # A's own failure, and nothing else
    proxy.wait_for_output("provider A failed")


def test_a_client_gone_mid_body_blames_no_provider_and_closes_the_upstream_connection(clipal, upstreams):
    a, b = upstreams(), upstreams()
    proxy = start_clipal(clipal, a, b)
    body = os.urandom(BODY_SIZE)
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(request_head(len(body)) + body[:FIRST_PART])
        a.wait_for(lambda: bool(a.exchanges) and len(a.exchanges[0].body) >= FIRST_PART)
    assert a.exchanges[0].cut.wait(5)  # clipal closed the half-sent upstream connection
    proxy.wait_for_output("request body cut short by the client")
    assert b.exchanges == []  # nothing retried
    assert failures(proxy) == {"A": 0, "B": 0}
    r = requests.post(proxy.url + PATH, data=b"{}", headers={"Host": "127.0.0.1"}, timeout=10)
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "A"
    assert [e.connection for e in a.exchanges] == [1, 2]  # the half-sent connection was not pooled
    assert "failed" not in proxy.output()


def test_a_slow_client_is_not_the_providers_idle_time_and_a_stalled_one_is_refused(clipal, upstreams):
    # upstream_idle_timeout 1s: the client's 2.5s pause mid-body must not count against A.
    # The server's body read timeout (shortened to 4s here) is what bounds the client.
    a, b = upstreams(), upstreams()
    proxy = start_clipal(clipal, a, b, settings={"upstream_idle_timeout": "1s", "circuit_breaker": {"failure_threshold": 0}},
                         env={"CLIPAL_BODY_TIMEOUT": "4"})
    body = os.urandom(BODY_SIZE)
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(request_head(len(body)) + body[:FIRST_PART])
        time.sleep(2.5)
        sock.sendall(body[FIRST_PART:])
        status, response = read_response(sock)
    assert status == 200 and b"X-Clipal-Provider: A" in response
    assert sha(a.exchanges[0].body) == sha(body) and b.exchanges == []
    assert failures(proxy) == {"A": 0, "B": 0}

    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:  # stalls for good mid-body
        sock.sendall(request_head(len(body)) + body[:FIRST_PART])
        status, response = read_response(sock, timeout=10)
    assert status == 408
    assert a.exchanges[-1].cut.wait(5)
    assert b.exchanges == []
    assert failures(proxy) == {"A": 0, "B": 0}
    assert "no request body bytes within 4s" in proxy.output()


def test_an_announced_body_over_the_limit_gets_413_without_contacting_the_upstream(clipal, upstreams):
    a = upstreams()
    proxy = start_clipal(clipal, a, settings={"max_request_body_bytes": BODY_SIZE - 1})
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(request_head(BODY_SIZE) + b"x" * 1000)
        status, _ = read_response(sock)
    assert status == 413
    time.sleep(0.2)
    assert a.exchanges == []


def test_expect_100_continue_is_answered_and_the_body_forwarded(clipal, upstreams):
    a = upstreams()
    proxy = start_clipal(clipal, a)
    body = os.urandom(BODY_SIZE)
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(request_head(len(body), "Expect: 100-continue\r\n"))
        sock.settimeout(5)
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        sock.sendall(body)
        status, _ = read_response(sock)
    assert status == 200
    assert sha(a.exchanges[0].body) == sha(body)
    assert a.exchanges[0].header("Expect") is None
