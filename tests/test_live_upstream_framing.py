"""Upstream responses whose framing or header block is odd, through a real clipal process.

The upstream here is :class:`RawUpstream`, a loopback server that answers
each request with bytes the test writes out by hand, because the cases under
test (interim 1xx responses, Content-Length next to chunked framing, bare CRs,
NULs, oversized header blocks) are exactly what a well-behaved HTTP server
library refuses to send.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import BinaryIO, Callable, Iterator, Sequence

import pytest
import requests

from conftest import provider

TIMEOUT = 10
CHAT = "/codex/v1/chat/completions"
CHAT_BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


class RawUpstream:
    """An HTTP/1.1 server on 127.0.0.1 that answers the n-th request with the n-th scripted bytes, verbatim.

    Connections are kept alive (one thread each). Every socket wait is short
    and the server stops by itself after ``lifetime`` seconds, so a test that
    goes wrong cannot leave it running; when the script runs out the
    connection is closed without an answer.
    """

    def __init__(self, replies: Sequence[bytes], lifetime: float = 30.0) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[bytes] = []  # the head of each request, as received
        self._replies = list(replies)
        self._lock = threading.Lock()
        self._deadline = time.monotonic() + lifetime
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._accept_loop, daemon=True)]
        self._threads[0].start()

    def _running(self) -> bool:
        return not self._stopped.is_set() and time.monotonic() < self._deadline

    def _accept_loop(self) -> None:
        while self._running():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            conn.settimeout(0.1)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while self._running():
                head, body_length, buffer = self._read_head(conn, buffer)
                if head is None:
                    return
                while len(buffer) < body_length:
                    data = self._recv(conn)
                    if data == b"" or not self._running():
                        return
                    buffer += data or b""
                buffer = buffer[body_length:]
                with self._lock:
                    self.requests.append(head)
                    reply = self._replies.pop(0) if self._replies else None
                if reply is None:
                    return
                conn.sendall(reply)

    def _read_head(self, conn: socket.socket, buffer: bytes) -> tuple[bytes | None, int, bytes]:
        """The next request head, its body length and what follows it; None when the peer left."""
        while b"\r\n\r\n" not in buffer:
            if not self._running():
                return None, 0, buffer
            data = self._recv(conn)
            if data == b"":
                return None, 0, buffer
            buffer += data or b""
        head, _, rest = buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head, length, rest

    @staticmethod
    def _recv(conn: socket.socket) -> bytes | None:
        """Some bytes, ``b""`` at EOF, None when nothing came within the poll interval."""
        try:
            return conn.recv(65536)
        except socket.timeout:
            return None
        except OSError:
            return b""

    def stop(self) -> None:
        self._stopped.set()
        for thread in self._threads:
            thread.join(5)
        self._listener.close()


@pytest.fixture
def raw_upstream() -> Iterator[Callable[..., RawUpstream]]:
    started: list[RawUpstream] = []

    def start(*replies: bytes) -> RawUpstream:
        upstream = RawUpstream(replies)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


def json_reply(payload: dict, status: str = "200 OK", extra: bytes = b"") -> bytes:
    body = json.dumps(payload).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
            + extra + b"\r\n" + body)


def chat(proxy) -> requests.Response:
    return requests.post(proxy.url + CHAT, json=CHAT_BODY, timeout=TIMEOUT)


# --------------------------------------------------------------------------- interim 1xx responses


EARLY_HINTS = b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest.mark.parametrize("interim", [
    pytest.param(EARLY_HINTS, id="103"),
    pytest.param(CONTINUE + EARLY_HINTS + EARLY_HINTS, id="100-103-103"),
])
def test_interim_responses_are_skipped_for_the_final_one(clipal, raw_upstream, interim):
    a = raw_upstream(interim + json_reply({"answer": "first"}), json_reply({"answer": "second"}))
    proxy = clipal(codex=[provider("A", a.url)])

    first = chat(proxy)
    assert first.status_code == 200, first.text
    assert first.json() == {"answer": "first"}
    assert "Link" not in first.headers  # interim headers are not merged into the final response
    second = chat(proxy)  # nothing of the first exchange is left on the upstream connection
    assert second.json() == {"answer": "second"}
    assert len(a.requests) == 2


# --------------------------------------------------------------------------- Content-Length with chunked


def read_response(reader: BinaryIO) -> tuple[int, list[tuple[str, str]], bytes]:
    """One response off a kept-alive client connection, framed as its own headers say."""
    status = int(reader.readline().split()[1])
    headers: list[tuple[str, str]] = []
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    names = dict(headers)
    if names.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while (size := int(reader.readline().split(b";")[0], 16)) > 0:
            body += reader.read(size)
            reader.readline()
        while reader.readline() not in (b"\r\n", b""):  # trailers
            pass
        return status, headers, body
    assert "content-length" in names, f"a kept-alive response without framing: {headers}"
    return status, headers, reader.read(int(names["content-length"]))


def test_content_length_beside_chunked_is_not_relayed(clipal, raw_upstream):
    # After the 5 bytes Content-Length claims, the body holds a whole response:
    # a client framing by that length would take it as the answer to its next request.
    forged = json.dumps({"forged": True}).encode()
    data = (b"hello" + b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(forged)}\r\n\r\n".encode() + forged)
    smuggling = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n")
    a = raw_upstream(smuggling, json_reply({"answer": "second"}))
    proxy = clipal(codex=[provider("A", a.url)])
    body = json.dumps(CHAT_BODY).encode()
    request = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
        reader = sock.makefile("rb")
        sock.sendall(request)
        status, headers, got = read_response(reader)
        assert status == 200 and got == data
        lengths = [value for name, value in headers if name == "content-length"]
        assert lengths in ([], [str(len(data))])
        sock.sendall(request)  # same connection: the next answer is the upstream's second reply
        status, _, got = read_response(reader)
        assert status == 200 and json.loads(got) == {"answer": "second"}


# --------------------------------------------------------------------------- malformed header blocks


MALFORMED = [
    pytest.param(json_reply({}, extra=b"X-A: a\rSet-Cookie: evil=1\r\n"), id="bare-cr"),
    pytest.param(json_reply({}, extra=b"X-A: a\x00Set-Cookie: evil=1\r\n"), id="nul"),
    pytest.param(json_reply({}, status="200 OK\rSet-Cookie: evil=1"), id="bare-cr-in-status-line"),
    pytest.param(json_reply({}, extra=b"X-Big: " + b"x" * 70_000 + b"\r\n"), id="one-line-over-64KiB"),
    # within http.client's limits of 64 KiB a line and 100 lines, over 64 KiB in all
    pytest.param(json_reply({}, extra=b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"p" * 800) for i in range(90))),
                 id="90-lines-over-64KiB"),
    pytest.param(EARLY_HINTS.replace(b"rel=preload", b"rel=preload\rSet-Cookie: evil=1") + json_reply({}),
                 id="bare-cr-in-103"),
]


@pytest.mark.parametrize("reply", MALFORMED)
def test_malformed_header_block_fails_over_and_never_reaches_the_client(clipal, raw_upstream, upstream_factory,
                                                                        reply):
    a = raw_upstream(reply)
    b = upstream_factory("B")
    proxy = clipal(codex=[provider("A", a.url), provider("B", b)])

    response = chat(proxy)
    assert response.status_code == 200, response.text
    assert response.headers["X-Clipal-Provider"] == "B"
    assert "hello from B" in response.text
    assert "evil" not in response.headers.get("Set-Cookie", "")
    assert not any(name.lower().startswith(("x-a", "x-big", "x-pad")) for name in response.headers)
    assert len(a.requests) == 1 and len(b.requests) == 1
    out = proxy.wait_for_output("provider A failed")
    assert "malformed header block" in out
    assert "evil" not in out and "xxxxxxxx" not in out and "pppppppp" not in out  # no header values in the log


# --------------------------------------------------------------------------- reason phrases


def status_line(proxy) -> bytes:
    body = json.dumps(CHAT_BODY).encode()
    request = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        return sock.makefile("rb").readline()


@pytest.mark.parametrize("reason, relayed", [
    pytest.param("OK\x01\x1b[31mred", "OK", id="control-characters"),
    pytest.param("Fine\x7f", "OK", id="DEL"),
    pytest.param("Bad\x0bRequest", "Bad Request", id="vertical-tab-in-400"),
    pytest.param("", "OK", id="empty-gets-the-standard-one"),
    pytest.param("Everything\tFine", "Everything\tFine", id="tab-is-allowed"),
    pytest.param("Tr\u00e8s bien", "Tr\u00e8s bien", id="obs-text-is-allowed"),
])
def test_a_reason_phrase_with_control_characters_reaches_the_client_as_the_standard_one(
        clipal, raw_upstream, reason, relayed):
    status = 400 if "Bad" in reason else 200
    payload = json.dumps({"answer": "first"}).encode()
    reply = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
             f"\r\n").encode("latin-1") + payload
    a = raw_upstream(reply)
    proxy = clipal(codex=[provider("A", a.url)])

    line = status_line(proxy)
    assert line == f"HTTP/1.1 {status} {relayed}\r\n".encode("latin-1")
    assert len(a.requests) == 1  # relayed, not failed over
