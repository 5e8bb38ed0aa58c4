"""Live: long answers are never cut, and a stream that does break moves the client on.

The idle timeout bounds each wait on the upstream (for headers, for the first
bytes, for every next read), never the whole answer: a provider that keeps
sending, however slowly, is never treated as stalled. A real stall still ends
the client's response abnormally one timeout after the *last* byte. After a
stall or a break past the commit point, the agent's retry of the turn goes to
the next provider, not back to the one that just failed.
"""

from __future__ import annotations

import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import provider
from fakeupstream import Reply
from test_live_stalls import read_to_end

MESSAGES = "/claudecode/v1/messages"
GEMINI_STREAM = "/gemini/v1beta/models/gemini-test:streamGenerateContent"
PAYLOAD = {"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
GEMINI_PAYLOAD = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
#: 15 words: an Anthropic stream of 20 events, a Gemini JSON array of 16 chunks.
LONG_TEXT = " ".join(f"word{i}" for i in range(15))


def raw_exchange(port: int, path: str, payload: dict) -> tuple[bytes, bytes, float]:
    """POST over a raw socket; read until the server closes. Returns (head, body, seconds)."""
    body = json.dumps(payload).encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        data = bytearray()
        while True:
            try:
                more = sock.recv(65536)
            except ConnectionResetError:
                more = b""
            if not more:
                break
            data += more
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    return head, rest, time.monotonic() - started


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """The payload of a chunked body, and whether it ended with the final zero-size chunk."""
    payload, pos = bytearray(), 0
    while True:
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            return bytes(payload), False
        size = int(body[pos:line_end], 16)
        if size == 0:
            return bytes(payload), body[line_end:line_end + 4] == b"\r\n\r\n"
        payload += body[line_end + 2:line_end + 2 + size]
        pos = line_end + 2 + size + 2


def whole_answer_problem(name: str, head: bytes, body: bytes, seconds: float) -> str | None:
    """What is wrong with one case of the steady-stream test, or None when it arrived whole."""
    if not head.startswith(b"HTTP/1.1 200") or b"transfer-encoding: chunked" not in head.lower():
        return f"{name}: unexpected head {head!r}"
    payload, clean = dechunk(body)
    if not clean:
        return f"{name}: the response did not end with its final chunk after {seconds:.1f}s"
    if name.startswith("sse"):
        whole = payload.count(b"event: content_block_delta") == 15 and b"message_stop" in payload
        return None if whole and seconds > 7 else f"{name}: {len(payload)} bytes in {seconds:.1f}s, not whole"
    if name.startswith("gemini"):
        whole = payload.startswith(b"[") and payload.endswith(b"]") and len(json.loads(payload)) == 15
        return None if whole and seconds > 7 else f"{name}: {len(payload)} bytes in {seconds:.1f}s, not whole"
    return None if payload == b'{"ok":true}' and seconds > 9 else f"{name}: got {payload!r} in {seconds:.1f}s"


def test_steady_streams_longer_than_the_idle_timeout_arrive_whole(clipal, upstream_factory):
    """2 s idle timeout; an event every 0.4 s for 8 s, in every framing and stream format."""
    sse_chunked, sse_close = upstream_factory("SSE-chunked"), upstream_factory("SSE-close")
    json_chunked, json_close = upstream_factory("JSON-chunked"), upstream_factory("JSON-close")
    drip = upstream_factory("drip")
    sse_chunked.default = Reply.answer(LONG_TEXT, delay=0.4, framing="chunked")
    sse_close.default = Reply.answer(LONG_TEXT, delay=0.4, framing="close")
    json_chunked.default = Reply.answer(LONG_TEXT, delay=0.5, framing="chunked")
    json_close.default = Reply.answer(LONG_TEXT, delay=0.5, framing="close")
    # One byte a second for 10 s under a 3 s timeout (the longest test case, so it sets the pace).
    dripped = b'{"ok":true}'
    drip.default = Reply.sse([bytes([b]) for b in dripped], delay=1.0, headers={"Content-Type": "application/json"})

    short = clipal(settings={"upstream_idle_timeout": "2s"},
                   claudecode=[provider("SSE-chunked", sse_chunked)],
                   gemini=[provider("JSON-chunked", json_chunked)])
    short_close = clipal(settings={"upstream_idle_timeout": "2s"},
                         claudecode=[provider("SSE-close", sse_close)],
                         gemini=[provider("JSON-close", json_close)])
    dripping = clipal(settings={"upstream_idle_timeout": "3s"}, codex=[provider("drip", drip)])

    cases = {
        "sse-chunked": (short, MESSAGES, dict(PAYLOAD, stream=True)),
        "sse-close": (short_close, MESSAGES, dict(PAYLOAD, stream=True)),
        "gemini-json-chunked": (short, GEMINI_STREAM, GEMINI_PAYLOAD),
        "gemini-json-close": (short_close, GEMINI_STREAM, GEMINI_PAYLOAD),
        "one-byte-a-second": (dripping, "/codex/v1/responses", {"model": "m", "input": "hi"}),
    }
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {name: pool.submit(raw_exchange, proxy.port, path, payload)
                   for name, (proxy, path, payload) in cases.items()}
        results = {name: future.result() for name, future in futures.items()}

    problems = [problem for name, result in results.items() if (problem := whole_answer_problem(name, *result))]
    assert not problems, "\n".join(problems)
    for proxy in (short, short_close, dripping):
        assert "stalled" not in proxy.output()
        assert "ended incomplete" not in proxy.output()


def test_a_real_stall_ends_the_response_one_timeout_after_the_last_byte(clipal, upstream_factory):
    a = upstream_factory("A")
    # Ten events 0.4 s apart (4 s, twice the idle timeout), then silence.
    a.script(Reply.answer(LONG_TEXT, delay=0.4).stall_after(10))
    proxy = clipal(settings={"upstream_idle_timeout": "2s"}, claudecode=[provider("A", a)])

    body = json.dumps(dict(PAYLOAD, stream=True)).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(f"POST {MESSAGES} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        reads = read_to_end(sock)
    first = reads[0][0]
    last_data = max(at for at, data in reads if data)
    closed = reads[-1][0]
    payload, clean = dechunk(b"".join(data for _, data in reads).partition(b"\r\n\r\n")[2])
    assert not clean, "a stalled stream must not end like a complete one"
    assert payload.count(b"\n\n") == 10
    assert last_data - first > 3.0  # the stream ran well past one timeout before it stalled
    assert 1.8 < closed - last_data < 3.0, f"closed {closed - last_data:.2f}s after the last byte"
    assert "stalled for 2s" in proxy.wait_for_output("ended incomplete")


@pytest.mark.parametrize("failure", ["stall", "break"])
def test_after_a_stream_fails_past_the_commit_point_the_next_request_goes_to_the_next_provider(
        clipal, upstream_factory, failure):
    a, b = upstream_factory("A"), upstream_factory("B")
    broken = Reply.answer(delay=0.05)
    a.script(broken.stall_after(2) if failure == "stall" else broken.drop_after(3))
    proxy = clipal(settings={"upstream_idle_timeout": "1s"}, claudecode=[provider("A", a), provider("B", b)])

    head, _, _ = raw_exchange(proxy.port, MESSAGES, dict(PAYLOAD, stream=True))
    assert head.startswith(b"HTTP/1.1 200") and b"X-Clipal-Provider: A" in head
    assert "next request starts at B" in proxy.wait_for_output("ended incomplete")

    r = requests.post(proxy.url + MESSAGES, json=PAYLOAD, timeout=10)  # the agent's retry of the turn
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "B"
    assert len(a.requests) == 1  # not sent back to A
    r = requests.post(proxy.url + MESSAGES, json=PAYLOAD, timeout=10)
    assert r.headers["X-Clipal-Provider"] == "B"  # and B is now current


def test_a_client_that_hangs_up_mid_stream_does_not_move_the_client_off_its_provider(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.answer(LONG_TEXT, delay=0.2))
    proxy = clipal(claudecode=[provider("A", a), provider("B", b)])

    body = json.dumps(dict(PAYLOAD, stream=True)).encode()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(f"POST {MESSAGES} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b"message_start" in sock.recv(65536)
    proxy.wait_for_output("client disconnected")
    r = requests.post(proxy.url + MESSAGES, json=PAYLOAD, timeout=10)
    assert r.headers["X-Clipal-Provider"] == "A"
    assert b.requests == []


UPGRADE = ("Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


@pytest.mark.parametrize("path,error_message", [
    ("/codex/v1/responses", lambda body: body["error"]["message"]),
    ("/claudecode/v1/messages", lambda body: body["error"]["message"]),
    ("/gemini/v1beta/models/m:streamGenerateContent", lambda body: body["error"]["message"]),
], ids=["codex", "claudecode", "gemini"])
def test_a_websocket_upgrade_gets_426_in_the_clients_shape_and_reaches_no_upstream(
        clipal, upstream_factory, path, error_message):
    a = upstream_factory("A")
    proxy = clipal(codex=[provider("A", a)], claudecode=[provider("A", a)], gemini=[provider("A", a)])

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-x\r\n{UPGRADE}\r\n".encode())
        data = bytearray()
        while more := sock.recv(65536):  # Connection: close: the server ends the connection
            data += more
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 426")
    assert re.search(rb"(?im)^connection: close\r?$", head)
    assert "WebSocket" in error_message(json.loads(body))
    assert a.requests == []
    assert "WebSocket upgrade" in proxy.wait_for_output("answered 426")

    r = requests.post(proxy.url + "/codex/v1/responses", json={"model": "m", "input": "hi"}, timeout=10)
    assert r.status_code == 200  # the HTTP fallback is served


def test_all_providers_cooling_for_an_hour_ask_for_a_retry_within_a_minute(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.default = Reply.anthropic_error(429, retry_after=3600)
    b.default = Reply.anthropic_error(529, retry_after=3600)
    proxy = clipal(claudecode=[provider("A", a), provider("B", b)])

    for _ in range(2):
        r = requests.post(proxy.url + MESSAGES, json=PAYLOAD, timeout=10)
        assert r.status_code == 429
        assert r.headers["Retry-After"] == "60"
        assert re.search(r"retry in (1h|59m\d+s)$", r.json()["error"]["message"])
    assert len(a.requests) == 1 and len(b.requests) == 1
