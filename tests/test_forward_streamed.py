"""forward.send with a body still arriving: the requests/urllib3 behaviour clipal.transport.prepare relies on.

On a loopback socket, with the installed requests and urllib3: an iterable
body with a ``len()`` leaves framed by Content-Length, byte-identical to the
same body sent as bytes; an exception raised while the body is read from the
client comes out of forward.send as it is (never a NetworkFailure), and the
half-sent connection is closed, not pooled.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from clipal import forward, transport
from clipal.body import STREAM_THRESHOLD, start_body
from clipal.clientwatch import ClientGone
from clipal.outbound import UpstreamRequest
from test_body import Trickle

LENGTH = STREAM_THRESHOLD + 150_000
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Recorder:
    """A one-connection-at-a-time upstream that records each connection's bytes until the request's end or EOF."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1/messages"
        self.connections: list[bytearray] = []
        self.closed: list[threading.Event] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            data, closed = bytearray(), threading.Event()
            self.connections.append(data)
            self.closed.append(closed)
            pending = b""  # of the request being read
            with conn:
                conn.settimeout(10)
                while True:
                    more = conn.recv(65536)
                    if not more:
                        closed.set()
                        break
                    data += more
                    pending += more
                    head, _, body = pending.partition(b"\r\n\r\n")
                    if len(body) >= LENGTH:  # every request here has a body of LENGTH
                        pending = body[LENGTH:]
                        conn.sendall(ANSWER)  # then kept open: only clipal's close ends it

    def closed_by_the_client(self, index: int, timeout: float = 5.0) -> bool:
        """Whether connection ``index`` was accepted and then closed from the other end, within ``timeout``."""
        deadline = time.monotonic() + timeout
        while len(self.closed) <= index and time.monotonic() < deadline:
            time.sleep(0.005)  # accepted in the recorder's thread, maybe not yet
        return len(self.closed) > index and self.closed[index].wait(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def upstream():
    recorder = Recorder()
    yield recorder
    recorder.close()


def request(url: str) -> UpstreamRequest:
    return UpstreamRequest(method="POST", url=url, headers=[("Host", "upstream"), ("Content-Type", "application/json")])


def test_a_body_still_arriving_leaves_byte_identical_to_the_same_body_in_hand(upstream):
    data = os.urandom(LENGTH)
    session = transport.new_session()
    for body in (data, start_body({"wsgi.input": Trickle(data, piece=30_000), "CONTENT_LENGTH": str(LENGTH)},
                                  1 << 22).payload()):
        ready = forward.send(session, request(upstream.url), body, 5.0)
        assert ready.status == 200
        ready.response.raw.read()
        ready.response.raw.release_conn()
    session.close()
    assert len(upstream.connections) == 1  # the same kept-alive connection, both times
    wire = bytes(upstream.connections[0])
    first, second = wire[:len(wire) // 2], wire[len(wire) // 2:]
    assert first == second
    assert b"\r\nContent-Length: %d\r\n" % LENGTH in first and b"Transfer-Encoding" not in first
    assert first.endswith(b"\r\n\r\n" + data)


def test_a_client_gone_mid_body_comes_out_as_it_is_and_the_connection_is_closed(upstream):
    session = transport.new_session()
    body = start_body({"wsgi.input": Trickle(os.urandom(100_000)), "CONTENT_LENGTH": str(LENGTH)}, 1 << 22)
    with pytest.raises(ClientGone):
        forward.send(session, request(upstream.url), body.payload(), 5.0)
    assert upstream.closed_by_the_client(0)  # closed by clipal, not left in the pool half-sent
    assert len(upstream.connections[0]) < LENGTH
    ready = forward.send(session, request(upstream.url), os.urandom(LENGTH), 5.0)
    assert ready.status == 200 and len(upstream.connections) == 2  # the next request opens a new one
    ready.close()
    session.close()
