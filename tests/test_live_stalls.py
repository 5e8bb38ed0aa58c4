"""Live stalls, breaks and hang-ups around the commit point (SPEC §4.5; issue 3 acceptance 3).

clipal runs with upstream_idle_timeout: 1s in front of FakeUpstreams that
stall or drop on cue. Before the first body bytes every failure fails over;
after them clipal never retries and must end the client's response so that
it visibly broke. A client that hangs up stops everything at once.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from conftest import provider
from fakeupstream import Reply

IDLE = 1.0
SETTINGS = {"upstream_idle_timeout": "1s"}
MESSAGES = "/claudecode/v1/messages"
PAYLOAD = {"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


def post(proxy, *, stream: bool = False, **kwargs) -> requests.Response:
    return requests.post(proxy.url + MESSAGES, json=dict(PAYLOAD, stream=stream), timeout=10, **kwargs)


def open_request(proxy, *, stream: bool = True) -> socket.socket:
    """Send a request over a raw socket and return the socket, response unread."""
    body = json.dumps(dict(PAYLOAD, stream=stream)).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(f"POST {MESSAGES} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def read_to_end(sock: socket.socket) -> list[tuple[float, bytes]]:
    """Every read until the server closes (FIN or reset), each with its arrival time; a final b""."""
    reads = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        reads.append((time.monotonic(), data))
        if not data:
            return reads


# --------------------------------------------------------------------------- before the commit point


def test_no_headers_within_the_idle_timeout_fails_over(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.stall())
    proxy = clipal(settings=SETTINGS, claudecode=[provider("A", a), provider("B", b)])

    started = time.monotonic()
    r = post(proxy)
    elapsed = time.monotonic() - started
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "B"
    assert "hello from B" in r.text
    assert IDLE - 0.1 < elapsed < IDLE + 1.5
    assert "no response headers within 1s" in proxy.wait_for_output("provider A failed")
    assert a.requests[0].client_gone.wait(2), "clipal left the stalled upstream connection open"


@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_headers_without_a_first_byte_within_the_idle_timeout_fail_over(clipal, upstream_factory, stream):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.answer().stall_after(0))  # status line and headers, then nothing
    proxy = clipal(settings=SETTINGS, claudecode=[provider("A", a), provider("B", b)])

    started = time.monotonic()
    r = post(proxy, stream=stream)
    elapsed = time.monotonic() - started
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "B"
    if stream:
        assert "".join(json.loads(line[6:])["delta"]["text"] for line in r.text.splitlines()
                       if '"text_delta"' in line) == "hello from B"
    else:
        assert r.json()["content"][0]["text"] == "hello from B"
    assert IDLE - 0.1 < elapsed < IDLE + 1.5
    assert "no body bytes within 1s" in proxy.wait_for_output("provider A failed")


def test_slow_but_steady_upstreams_are_not_stalls(clipal, upstream_factory):
    # Each wait is shorter than the idle timeout, although the whole answer takes longer.
    a, b = upstream_factory("A"), upstream_factory("B")
    events = [("message_start", {"type": "message_start"}), ("ping", {"type": "ping"})]
    a.script(Reply.sse(events, delay=0.6).headers_after(0.6).first_byte_after(0.6))
    proxy = clipal(settings=SETTINGS, claudecode=[provider("A", a), provider("B", b)])

    started = time.monotonic()
    r = post(proxy, stream=True)
    assert time.monotonic() - started > 1.6  # longer than the idle timeout in total
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "A"
    assert r.text == 'event: message_start\ndata: {"type":"message_start"}\n\nevent: ping\ndata: {"type":"ping"}\n\n'
    assert b.requests == []


# --------------------------------------------------------------------------- after the commit point


def test_a_stall_after_two_events_ends_the_clients_stream_visibly_incomplete(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.answer(delay=0.05).stall_after(2))  # message_start, content_block_start, then silence
    proxy = clipal(settings=SETTINGS, claudecode=[provider("A", a), provider("B", b)])

    with open_request(proxy) as sock:
        reads = read_to_end(sock)
    raw = b"".join(data for _, data in reads)
    last_data = max(at for at, data in reads if data)
    closed = reads[-1][0]

    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower()
    assert b"event: message_start" in body and b"event: content_block_start" in body
    assert b"content_block_delta" not in body
    assert not body.endswith(b"0\r\n\r\n"), "a stalled stream must not end like a complete one"
    assert IDLE - 0.1 < closed - last_data < IDLE + 1.0
    assert "stalled" in proxy.wait_for_output("response to the client ended incomplete")
    assert b.requests == []  # never a retry after bytes went out
    assert a.requests[0].client_gone.wait(2), "clipal left the stalled upstream connection open"


@pytest.mark.parametrize("framing,reset", [("chunked", False), ("close", True), ("length", False)],
                         ids=["chunked-fin", "close-delimited-rst", "content-length-fin"])
def test_an_upstream_that_breaks_mid_stream_gives_the_client_an_incomplete_response(
        clipal, upstream_factory, framing, reset):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.answer(delay=0.02, framing=framing).drop_after(3, reset=reset))
    proxy = clipal(settings=SETTINGS, claudecode=[provider("A", a), provider("B", b)])

    with open_request(proxy) as sock:
        raw = b"".join(data for _, data in read_to_end(sock))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"X-Clipal-Provider: A" in head
    assert b"event: message_start" in body and b"message_stop" not in body
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    if length is not None:  # the upstream's length is passed on; the body falls short of it
        assert framing == "length" and len(body) < length
    else:  # re-framed as chunked for the client: the final chunk never comes
        assert b"transfer-encoding: chunked" in head.lower() and not body.endswith(b"0\r\n\r\n")
    assert "broke" in proxy.wait_for_output("response to the client ended incomplete")
    assert b.requests == []


def test_a_requests_client_sees_a_broken_stream_as_an_error(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.answer(delay=0.02).drop_after(3))
    proxy = clipal(settings=SETTINGS, claudecode=[provider("A", a), provider("B", b)])

    received = []
    with requests.post(proxy.url + MESSAGES, json=dict(PAYLOAD, stream=True), stream=True, timeout=10) as r:
        assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "A"
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for chunk in r.iter_content(chunk_size=None):
                received.append(chunk)
    assert b"event: message_start" in b"".join(received)


# --------------------------------------------------------------------------- the client hangs up


def test_a_client_that_hangs_up_while_the_first_provider_stalls_stops_the_request(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.stall())
    proxy = clipal(settings=SETTINGS, claudecode=[provider("A", a), provider("B", b)])

    sock = open_request(proxy)
    a.wait_for_requests(1)
    time.sleep(0.3)
    sock.close()
    hung_up = time.monotonic()

    assert a.requests[0].client_gone.wait(2), "clipal kept waiting on the stalled upstream"
    proxy.wait_for_output("request abandoned")
    assert time.monotonic() - hung_up < IDLE - 0.2, "the hang-up was noticed only at the idle timeout"
    # Past the point where an idle-timeout failover would have reached B:
    time.sleep(max(0.0, hung_up + IDLE + 0.3 - time.monotonic()))
    assert b.requests == []
    assert "provider A failed" not in proxy.output()

    # A was not blamed: the next request still starts at A.
    r = post(proxy)
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "A"
    assert b.requests == []


def test_a_client_that_hangs_up_mid_stream_makes_clipal_close_the_upstream(clipal, upstream_factory):
    text = " ".join(f"w{i}" for i in range(40))
    a, b = upstream_factory("A", answer_text=text), upstream_factory("B")
    a.script(Reply.answer(delay=0.25))  # ~12 s for the whole answer
    proxy = clipal(settings={"upstream_idle_timeout": "30s"}, claudecode=[provider("A", a), provider("B", b)])

    sock = open_request(proxy)
    received = b""
    while b"content_block_delta" not in received:
        received += sock.recv(65536)
    sock.close()
    hung_up = time.monotonic()

    assert a.requests[0].client_gone.wait(3), "clipal kept reading the upstream for a client that left"
    assert time.monotonic() - hung_up < 1.5
    proxy.wait_for_output("client disconnected during the response from A")
    assert b.requests == []
