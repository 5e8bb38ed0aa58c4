"""Where clipal copies a library's behaviour for speed, the copy must match the library.

clipal.transport reimplements urllib3's connect loop (for IP literals),
urllib3's liveness check and the request send (headers and a small body in
one write), and reads a chunked body with http.client's read1 instead of
urllib3's (same bytes, same errors, the connection reused); clipal.server reimplements pywsgi's response framing (headers and
a small first write in one send). Each test runs the library's own code and
clipal's copy on the same inputs and compares what they produce: socket
state, liveness answers, bytes on the wire. An upgrade of urllib3 or gevent
that changes the original makes these fail before it changes clipal's output.
(http.client's header parsing has its own identity tests in test_headerparse.py.)
"""

from __future__ import annotations

import socket
import threading

import gevent
import gevent.socket
import pytest
from gevent.pywsgi import WSGIHandler, WSGIServer
from urllib3.connection import HTTPConnection
from urllib3.util.connection import create_connection

from clipal import server, transport

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@pytest.fixture
def listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock


def sock_state(sock: socket.socket) -> tuple:
    return (sock.family, sock.type, sock.gettimeout(), sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
            sock.getpeername())


@pytest.mark.parametrize("timeout", [None, 2.5])
@pytest.mark.parametrize("options", [None, NODELAY])
def test_the_connect_loop_leaves_the_socket_as_urllib3s_does(listener, timeout, options):
    host, port = listener.getsockname()
    kwargs = {} if timeout is None else {"timeout": timeout}
    theirs = create_connection((host, port), source_address=None, socket_options=options, **kwargs)
    ours = transport._connect(transport._literal_addresses(host, port),
                              kwargs.get("timeout", transport._DEFAULT_TIMEOUT), None, options)
    try:
        assert sock_state(ours)[:4] == sock_state(theirs)[:4]
        assert ours.getpeername() == theirs.getpeername() == (host, port)
    finally:
        ours.close()
        theirs.close()


def test_the_connect_loop_fails_as_urllib3s_does_on_a_refused_port():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        host, port = closed.getsockname()  # bound, never listening
        with pytest.raises(OSError) as theirs:
            create_connection((host, port))
        with pytest.raises(OSError) as ours:
            transport._connect(transport._literal_addresses(host, port), transport._DEFAULT_TIMEOUT, None, None)
    assert type(ours.value) is type(theirs.value) and ours.value.errno == theirs.value.errno


def test_only_ip_literals_skip_the_resolver():
    assert transport._literal_addresses("127.0.0.1", 80)
    assert transport._literal_addresses("[::1]", 80) is not None or not socket.has_ipv6
    assert transport._literal_addresses("localhost", 80) is None
    assert transport._literal_addresses("api.example.com", 443) is None


def test_the_liveness_check_agrees_with_urllib3s(listener):
    host, port = listener.getsockname()
    ours, theirs = transport._Connection(host, port), HTTPConnection(host, port)
    assert ours.is_connected is theirs.is_connected is False  # never connected
    ours.connect()
    theirs.connect()
    peers = [listener.accept()[0], listener.accept()[0]]
    try:
        assert ours.is_connected is True and HTTPConnection.is_connected.fget(ours) is True
        assert theirs.is_connected is True
        for peer in peers:  # the server closes: both connections must read as dead
            peer.close()
        gevent.sleep(0.05)
        assert ours.is_connected is False and HTTPConnection.is_connected.fget(ours) is False
    finally:
        ours.close()
        theirs.close()


def _wire_bytes_of_a_request(connection_class, body: bytes | None, headers: dict, chunked: bool = False) -> bytes:
    """What ``connection_class`` sends for one request on an already-open connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        host, port = listener.getsockname()
        connection = connection_class(host, port)
        connection.connect()
        peer, _ = listener.accept()
        with peer:
            connection.request("POST", "/v1/x?y=1", body=body, headers=headers, chunked=chunked)
            connection.sock.shutdown(socket.SHUT_WR)
            data = b""
            while more := peer.recv(65536):
                data += more
        connection.close()
    return data


@pytest.mark.parametrize("size", [0, 1, 1000, transport.COALESCE_LIMIT, transport.COALESCE_LIMIT + 1, 200_000])
@pytest.mark.parametrize("chunked", [False, True])
def test_a_request_leaves_byte_identical_to_urllib3s(size, chunked):
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256) if size else None
    headers = {"Host": "example", "Content-Type": "application/json"}
    if not chunked:
        headers["Content-Length"] = str(size)
    ours = _wire_bytes_of_a_request(transport._Connection, body, headers, chunked)
    theirs = _wire_bytes_of_a_request(HTTPConnection, body, headers, chunked)
    assert ours == theirs


# --------------------------------------------------------------------------- pywsgi response framing


def _app_for(status: str, headers: list[tuple[str, str]], chunks: list[bytes]):
    def app(environ, start_response):
        start_response(status, headers)
        return iter(chunks)
    return app


def _served_bytes(handler_class, app, request: bytes) -> bytes:
    wsgi = WSGIServer(("127.0.0.1", 0), app, handler_class=handler_class, log=None)
    wsgi.start()
    try:
        client = gevent.socket.create_connection(wsgi.address)
        client.sendall(request)
        data = b""
        with gevent.Timeout(5):
            while more := client.recv(65536):
                data += more
        client.close()
    finally:
        wsgi.stop()
    # Date differs between the two runs by the clock; everything else must be identical.
    return b"\r\n".join(line for line in data.split(b"\r\n") if not line.startswith(b"Date: "))


RESPONSES = {
    "small-json-length": ("200 OK", [("Content-Type", "application/json"), ("Content-Length", "11")],
                          [b'{"ok":true}']),
    "sse-chunked": ("200 OK", [("Content-Type", "text/event-stream")],
                    [b"event: a\ndata: 1\n\n", b"", b"event: b\ndata: 2\n\n"]),
    "large-first-write": ("200 OK", [("Content-Type", "application/octet-stream")],
                          [b"z" * (server.COALESCE_LIMIT + 10), b"tail"]),
    "exactly-the-limit": ("200 OK", [], [b"y" * server.COALESCE_LIMIT]),
    "empty-body": ("204 No Content", [], []),
    "error": ("503 Service Unavailable", [("Retry-After", "1")], [b'{"error":{}}']),
}


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
@pytest.mark.parametrize("name", list(RESPONSES))
def test_responses_are_framed_byte_identical_to_pywsgis(name, version):
    app = _app_for(*RESPONSES[name])
    request = f"GET /x {version}\r\nHost: h\r\nConnection: close\r\n\r\n".encode()
    ours = _served_bytes(server.ProxyHandler, app, request)
    theirs = _served_bytes(WSGIHandler, app, request)
    assert ours == theirs


def test_a_large_response_is_framed_identically_when_the_socket_buffer_fills():
    # A body larger than the socket buffer makes the plain send() short; the rest must follow.
    app = _app_for("200 OK", [], [b"a" * 1000, b"b" * 4_000_000])
    request = b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    assert _served_bytes(server.ProxyHandler, app, request) == _served_bytes(WSGIHandler, app, request)



# --------------------------------------------------------------------------- reading a chunked body


def _canned_upstream(listener, answers: list[bytes]) -> threading.Thread:
    """Answers each request on one connection with the next canned response (a thread: requests blocks)."""
    def serve():
        listener.settimeout(5)
        peer, _ = listener.accept()
        with peer:
            peer.settimeout(5)
            for answer in answers:
                request = b""
                while b"\r\n\r\n" not in request:
                    more = peer.recv(65536)
                    if not more:
                        return
                    request += more
                peer.sendall(answer)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
#: name -> (body, whether it is whole; a body cut short ends with the connection)
CHUNKED_BODIES = {
    "whole": (b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n", True),
    "with-trailer": (b"4\r\nabcd\r\n0\r\nX-Trailer: 1\r\n\r\n", True),
    "cut-mid-chunk": (b"9\r\ndata: 1\n\n\r\n20\r\nonly part", False),
    "cut-in-size-line": (b"9\r\ndata: 1\n\n\r\n2", False),
}


def _read_rest(listener, name: str, use_body_reader: bool) -> tuple[bytes, str | None, bool]:
    """What the rest of a streamed chunked answer reads as: bytes, the error described, connection reused."""
    host, port = listener.getsockname()
    body, whole = CHUNKED_BODIES[name]
    answers = [CHUNKED_HEAD + body] + ([b"HTTP/1.1 204 No Content\r\n\r\n"] if whole else [])
    upstream = _canned_upstream(listener, answers)
    session = transport.new_session()
    url = f"http://{host}:{port}/v1/stream"
    response = session.get(url, stream=True, timeout=5)
    sock = response.raw._connection.sock
    read1 = transport.body_reader(response) if use_body_reader else \
        (lambda n: response.raw.read1(n, decode_content=False))
    received, error = b"", None
    try:
        while data := read1(64 * 1024):
            received += data
        response.raw.release_conn()
    except Exception as exc:  # noqa: BLE001 - the error itself is what is compared
        error = transport.describe_error(exc)
        response.close()
    reused = False
    if error is None:
        again = session.get(url, stream=True, timeout=5)
        reused = again.status_code == 204 and again.raw._connection.sock is sock
        again.close()
    session.close()
    upstream.join(5)
    return received, error, reused


@pytest.mark.parametrize("name", list(CHUNKED_BODIES))
def test_a_chunked_body_reads_as_through_urllib3(listener, name):
    ours = _read_rest(listener, name, use_body_reader=True)
    theirs = _read_rest(listener, name, use_body_reader=False)
    assert ours == theirs
    whole = CHUNKED_BODIES[name][1]
    assert (ours[1] is None) == whole and ours[2] == whole  # a whole body's connection is reused


def test_the_shortcut_is_taken_only_for_a_chunked_body(listener):
    host, port = listener.getsockname()
    upstream = _canned_upstream(listener, [CHUNKED_HEAD + CHUNKED_BODIES["whole"][0],
                                           b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    session = transport.new_session()
    chunked = session.get(f"http://{host}:{port}/", stream=True, timeout=5)
    assert transport.body_reader(chunked) == chunked.raw._fp.read1  # http.client's own
    chunked.content
    sized = session.get(f"http://{host}:{port}/", stream=True, timeout=5)
    assert transport.body_reader(sized)(10) == b"ok"
    assert not isinstance(transport.body_reader(sized), type(sized.raw._fp.read1))
    session.close()
    upstream.join(5)
