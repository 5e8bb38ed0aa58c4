"""Tests of the fake upstream itself: raw HTTP, the official SDKs, and every failure mode.

The live tests of clipal trust this fake, so it is checked here directly, without clipal.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import anthropic
import openai
import pytest
import requests
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from fakeupstream import FakeUpstream, Reply, anthropic_error_body, sse_event

CLAUDE_BODY = {"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream("A") as server:
        yield server
    assert server.errors == []


# -- raw HTTP helpers ---------------------------------------------------------

class RawResponse:
    """A response read by hand from a socket, so framing and timing are visible."""

    def __init__(self, sock: socket.socket, timeout: float = 2.0) -> None:
        self.sock = sock
        sock.settimeout(timeout)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed before headers: {buffer!r}")
            buffer += data
        head, self.body = buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.header_lines = lines[1:]
        self.headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}

    def read_sized(self) -> bytes:
        """Read a Content-Length framed body."""
        length = int(self.headers["content-length"])
        while len(self.body) < length:
            self.body += self.sock.recv(65536)
        return self.body

    def read_to_eof(self) -> bytes:
        while data := self.sock.recv(65536):
            self.body += data
        return self.body

    def event_times(self, count: int) -> list[float]:
        """Arrival time of each of ``count`` SSE events (an event ends with a blank line)."""
        times: list[float] = []
        seen = self.body.count(b"\n\n")
        times += [time.monotonic()] * seen
        while len(times) < count:
            data = self.sock.recv(65536)
            if not data:
                break
            self.body += data
            now_seen = self.body.count(b"\n\n")
            times += [time.monotonic()] * (now_seen - seen)
            seen = now_seen
        return times


def send_raw(up: FakeUpstream, method: str, path: str, body: bytes = b"",
             headers: dict[str, str] | None = None) -> socket.socket:
    sock = socket.create_connection((up.host, up.port), timeout=2)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {up.host}:{up.port}"]
    all_headers = {"Content-Length": str(len(body)), **(headers or {})}
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """Decode a chunked body; also say whether the terminating chunk was there."""
    out = b""
    while data:
        size_line, data = data.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            return out, True
        out += data[:size]
        data = data[size + 2:]
    return out, False


# -- lifecycle and recording ---------------------------------------------------

def test_start_and_stop_take_milliseconds_and_instances_are_independent() -> None:
    started = time.monotonic()
    servers = [FakeUpstream(name) for name in "ABC"]
    assert len({s.port for s in servers}) == 3
    for server in servers:
        assert requests.post(server.url + "/v1/messages", json=CLAUDE_BODY).json()[
            "content"][0]["text"] == f"hello from {server.name}"
    for server in servers:
        server.stop()
    assert time.monotonic() - started < 0.5
    with pytest.raises(OSError):
        socket.create_connection((servers[0].host, servers[0].port), timeout=0.5)


def test_records_method_path_query_headers_body_and_time(up: FakeUpstream) -> None:
    before = time.monotonic()
    response = requests.post(up.url + "/v1beta/models/gemini-x:streamGenerateContent?alt=sse&key=abc",
                             data=b'{"contents": []}', headers={"X-Goog-Api-Key": "secret"})
    assert response.status_code == 200
    [req] = up.wait_for_requests(1)
    assert (req.method, req.path) == ("POST", "/v1beta/models/gemini-x:streamGenerateContent")
    assert req.query == {"alt": "sse", "key": "abc"}
    assert req.query_string == "alt=sse&key=abc"
    assert req.headers["x-goog-api-key"] == "secret"
    assert req.headers["Authorization"] is None
    assert req.body == b'{"contents": []}' and req.json() == {"contents": []}
    assert before <= req.time <= time.monotonic()
    assert req.finished.wait(1)


def test_wait_for_requests_fails_clearly_on_timeout(up: FakeUpstream) -> None:
    with pytest.raises(AssertionError, match="expected 1 requests, got 0"):
        up.wait_for_requests(1, timeout=0.05)


def test_unknown_path_is_a_json_404(up: FakeUpstream) -> None:
    response = requests.get(up.url + "/v2/nothing")
    assert response.status_code == 404
    assert "no route" in response.json()["error"]["message"]


def test_keep_alive_serves_chunked_and_sized_request_bodies_on_one_connection(up: FakeUpstream) -> None:
    payload = json.dumps(CLAUDE_BODY).encode()
    chunked = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in (payload[:10], payload[10:]))
    sock = socket.create_connection((up.host, up.port), timeout=2)
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + chunked + b"0\r\n\r\n")
    first = RawResponse(sock)
    assert first.status == 200 and json.loads(first.read_sized())["type"] == "message"
    sock.sendall(b"POST /v1/messages/count_tokens HTTP/1.1\r\nHost: x\r\nContent-Length: "
                 + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    second = RawResponse(sock)
    assert second.status == 200 and "input_tokens" in json.loads(second.read_sized())
    sock.close()
    first_req, second_req = up.wait_for_requests(2)
    assert first_req.body == payload == second_req.body
    assert first_req.connection == second_req.connection
    assert up.connections_opened == 1
    up.wait_for_open_connections(0)


def test_serves_sixty_concurrent_connections(up: FakeUpstream) -> None:
    up.default = Reply.answer().headers_after(0.3)

    def call(_: int) -> int:
        return requests.post(up.url + "/v1/chat/completions", json={"model": "m"}, timeout=5).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(60) as pool:
        statuses = list(pool.map(call, range(60)))
    assert statuses == [200] * 60
    # Served one at a time this would take 18 s.
    assert time.monotonic() - started < 3
    assert up.connections_opened == 60


# -- the official SDKs -----------------------------------------------------------

def test_anthropic_sdk_json_stream_and_count_tokens(up: FakeUpstream) -> None:
    up.answer_text = "answer from the fake"
    client = anthropic.Anthropic(base_url=up.url, api_key="k", max_retries=0)
    message = client.messages.create(**CLAUDE_BODY)
    assert message.content[0].text == "answer from the fake"
    assert message.model == "claude-test" and message.stop_reason == "end_turn"
    with client.messages.stream(**CLAUDE_BODY) as stream:
        assert list(stream.text_stream) == ["answer", " from", " the", " fake"]
        assert stream.get_final_message().usage.output_tokens == 4
    assert client.messages.count_tokens(model="claude-test", messages=CLAUDE_BODY["messages"]).input_tokens > 0
    assert [r.path for r in up.requests] == ["/v1/messages", "/v1/messages", "/v1/messages/count_tokens"]


def test_anthropic_sdk_sees_a_scripted_529_as_overloaded(up: FakeUpstream) -> None:
    up.script(Reply.anthropic_error(529, retry_after=7))
    client = anthropic.Anthropic(base_url=up.url, api_key="k", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as caught:
        client.messages.create(**CLAUDE_BODY)
    assert caught.value.status_code == 529
    assert caught.value.body["error"]["type"] == "overloaded_error"
    assert caught.value.response.headers["retry-after"] == "7"
    assert client.messages.create(**CLAUDE_BODY).content[0].text == "hello from A"


def test_openai_sdk_chat_and_responses_json_and_stream(up: FakeUpstream) -> None:
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="k", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    assert client.chat.completions.create(model="gpt-t", messages=messages).choices[0].message.content == "hello from A"
    chunks = list(client.chat.completions.create(model="gpt-t", messages=messages, stream=True,
                                                  stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello from A"
    assert chunks[-1].usage.completion_tokens == 3
    assert client.responses.create(model="gpt-t", input="hi").output_text == "hello from A"
    events = list(client.responses.create(model="gpt-t", input="hi", stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "hello from A"
    with client.responses.stream(model="gpt-t", input="hi") as stream:
        assert stream.get_final_response().output_text == "hello from A"


def test_openai_sdk_sees_quota_error_and_streams_close_delimited_bodies(up: FakeUpstream) -> None:
    up.script(Reply.openai_error(429, "You exceeded your current quota", code="insufficient_quota"),
              Reply.answer(framing="close"))
    client = openai.OpenAI(base_url=up.url + "/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(model="gpt-t", input="hi")
    assert caught.value.code == "insufficient_quota"
    events = list(client.responses.create(model="gpt-t", input="hi", stream=True))
    assert events[-1].response.output_text == "hello from A"


def test_genai_sdk_json_stream_and_errors(up: FakeUpstream) -> None:
    client = genai.Client(api_key="k", http_options=genai_types.HttpOptions(base_url=up.url))
    result = client.models.generate_content(model="gemini-test", contents="hi")
    assert result.text == "hello from A" and result.candidates[0].finish_reason == "STOP"
    pieces = [c.text for c in client.models.generate_content_stream(model="gemini-test", contents="hi")]
    assert pieces == ["hello", " from", " A"]
    stream_request = up.requests[-1]
    assert stream_request.path.endswith("/models/gemini-test:streamGenerateContent")
    assert stream_request.query["alt"] == "sse"
    up.script(Reply.gemini_error(429, "Quota exceeded", retry_delay="20s"))
    with pytest.raises(genai_errors.ClientError) as caught:
        client.models.generate_content(model="gemini-test", contents="hi")
    assert caught.value.code == 429 and caught.value.status == "RESOURCE_EXHAUSTED"
    assert caught.value.details["error"]["details"][0]["retryDelay"] == "20s"


def test_gemini_stream_without_alt_sse_is_a_json_array(up: FakeUpstream) -> None:
    response = requests.post(up.url + "/v1beta/models/g:streamGenerateContent", json={})
    assert "".join(o["candidates"][0]["content"]["parts"][0]["text"] for o in response.json()) == "hello from A"


# -- scripting ---------------------------------------------------------------------

def test_scripted_replies_are_fifo_then_default(up: FakeUpstream) -> None:
    up.script(Reply.json(503, {"n": 1}), Reply.json(500, {"n": 2}, headers={"X-Extra": "yes"}))
    first = requests.post(up.url + "/v1/messages", json=CLAUDE_BODY)
    second = requests.post(up.url + "/v1/messages", json=CLAUDE_BODY)
    third = requests.post(up.url + "/v1/messages", json=CLAUDE_BODY)
    assert (first.status_code, first.json()) == (503, {"n": 1})
    assert (second.status_code, second.headers["X-Extra"]) == (500, "yes")
    assert third.status_code == 200 and up.pending_replies == 0
    up.default = Reply.openai_error(503)
    assert [requests.post(up.url + "/v1/responses").status_code for _ in range(2)] == [503, 503]
    up.reset()
    assert requests.post(up.url + "/v1/responses").status_code == 200
    assert len(up.requests) == 1


def test_path_scripted_replies_only_hit_their_path(up: FakeUpstream) -> None:
    up.script(Reply.anthropic_error(500), path="/v1/messages/count_tokens")
    assert requests.post(up.url + "/v1/messages", json=CLAUDE_BODY).status_code == 200
    assert requests.post(up.url + "/v1/messages/count_tokens", json=CLAUDE_BODY).status_code == 500
    up.path_defaults["/v1/messages"] = Reply.anthropic_error(401)
    assert requests.post(up.url + "/v1/messages", json=CLAUDE_BODY).json()["error"]["type"] == "authentication_error"
    assert requests.post(up.url + "/v1/messages/count_tokens", json=CLAUDE_BODY).status_code == 200


def test_gzip_error_body_is_compressed_on_the_wire(up: FakeUpstream) -> None:
    up.script(Reply.anthropic_error(429, "slow down", gzip=True, retry_after=3))
    response = requests.post(up.url + "/v1/messages", json=CLAUDE_BODY, stream=True)
    raw = response.raw.read(decode_content=False)
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.headers["Retry-After"] == "3"
    assert int(response.headers["Content-Length"]) == len(raw)
    assert raw[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(raw)) == anthropic_error_body("rate_limit_error", "slow down")


def test_raw_reply_is_byte_exact(up: FakeUpstream) -> None:
    body = gzip.compress(b'{"ok": true}', mtime=0)
    up.script(Reply.raw(200, body, {"Content-Type": "application/json", "Content-Encoding": "gzip",
                                    "X-Custom": "v"}))
    reply = RawResponse(send_raw(up, "POST", "/v1/anything"))
    assert reply.header_lines == ["Content-Type: application/json", "Content-Encoding: gzip",
                                  "X-Custom: v", f"Content-Length: {len(body)}"]
    assert reply.read_sized() == body
    reply.sock.close()


# -- streams and timing ---------------------------------------------------------------

@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_events_hit_the_wire_when_due(up: FakeUpstream, framing: str) -> None:
    events = [{"n": 0}, ("named", {"n": 1}), "[DONE]"]
    up.script(Reply.sse(events, delay=0.4, framing=framing))
    sent = time.monotonic()
    reply = RawResponse(send_raw(up, "POST", "/v1/chat/completions"))
    times = reply.event_times(3)
    assert len(times) == 3
    offsets = [t - sent for t in times]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    # Batched writes would show up as gaps near 0; allow a loaded machine some slack.
    assert offsets[0] < 0.2 and all(0.38 <= gap < 0.6 for gap in gaps), offsets
    body = reply.read_to_eof() if framing == "close" else reply.body
    expected = b"".join(sse_event(*((e[1], e[0]) if isinstance(e, tuple) else (e,))) for e in events)
    if framing == "chunked":
        assert reply.headers["transfer-encoding"] == "chunked"
        while not body.endswith(b"0\r\n\r\n"):
            body += reply.sock.recv(65536)
        assert dechunk(body) == (expected, True)
    else:
        assert reply.headers["connection"] == "close"
        assert "content-length" not in reply.headers and "transfer-encoding" not in reply.headers
        assert body == expected
    reply.sock.close()


def test_natural_stream_can_be_paced_and_delayed(up: FakeUpstream) -> None:
    up.script(Reply.answer(delay=0.1).headers_after(0.2).first_byte_after(0.1))
    sent = time.monotonic()
    reply = RawResponse(send_raw(up, "POST", "/v1/messages", json.dumps(dict(CLAUDE_BODY, stream=True)).encode()))
    headers_at = time.monotonic() - sent
    times = [t - sent for t in reply.event_times(8)]
    assert 0.19 <= headers_at < 0.35
    assert len(times) == 8 and 0.29 <= times[0] < 0.5 and 0.99 <= times[-1] < 1.3
    assert b"event: message_stop" in reply.body
    reply.sock.close()


# -- stalls and drops -------------------------------------------------------------------

def test_stall_sends_nothing_and_notices_the_client_leaving(up: FakeUpstream) -> None:
    up.script(Reply.stall())
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(up.url + "/v1/messages", json=CLAUDE_BODY, timeout=0.3)
    [req] = up.requests
    assert req.client_gone.wait(1)
    up.wait_for_open_connections(0)


def test_stall_until_gate_then_answers(up: FakeUpstream) -> None:
    gate = threading.Event()
    up.script(Reply.stall(until=gate))
    threading.Timer(0.2, gate.set).start()
    started = time.monotonic()
    response = requests.post(up.url + "/v1/messages", json=CLAUDE_BODY, timeout=2)
    assert response.json()["content"][0]["text"] == "hello from A"
    assert time.monotonic() - started >= 0.2


def test_stall_after_headers_sends_no_body_byte(up: FakeUpstream) -> None:
    up.script(Reply.answer().stall_after(0))
    reply = RawResponse(send_raw(up, "POST", "/v1/messages", json.dumps(CLAUDE_BODY).encode()), timeout=0.3)
    assert reply.status == 200 and reply.body == b""
    with pytest.raises(TimeoutError):
        reply.sock.recv(1)
    reply.sock.close()


def test_stall_after_two_events_holds_the_rest(up: FakeUpstream) -> None:
    up.script(Reply.answer().stall_after(2))
    body = json.dumps(dict(CLAUDE_BODY, stream=True)).encode()
    reply = RawResponse(send_raw(up, "POST", "/v1/messages", body), timeout=0.3)
    assert len(reply.event_times(2)) == 2
    with pytest.raises(TimeoutError):
        reply.sock.recv(65536)
    assert b"message_start" in reply.body and b"content_block_start" in reply.body
    assert b"content_block_delta" not in reply.body
    reply.sock.close()
    # A client leaving mid-stream is noticed while the fake holds the rest.
    assert up.requests[0].client_gone.wait(1)


def test_stop_releases_held_connections_at_once() -> None:
    up = FakeUpstream("held")
    up.default = Reply.stall()
    outcomes: list[BaseException] = []

    def call() -> None:
        try:
            requests.post(up.url + "/v1/messages", json=CLAUDE_BODY, timeout=5)
        except requests.RequestException as exc:
            outcomes.append(exc)

    clients = [threading.Thread(target=call) for _ in range(3)]
    for client in clients:
        client.start()
    requests_seen = up.wait_for_requests(3)
    started = time.monotonic()
    up.stop()
    assert time.monotonic() - started < 0.2
    for client in clients:
        client.join(2)
    assert len(outcomes) == 3 and up.open_connections == 0
    assert not any(r.client_gone.is_set() for r in requests_seen)


def test_drop_closes_without_a_response(up: FakeUpstream) -> None:
    up.script(Reply.drop())
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(up.url + "/v1/messages", json=CLAUDE_BODY)
    up.script(Reply.drop(reset=True))
    sock = send_raw(up, "POST", "/v1/messages")
    with pytest.raises(ConnectionResetError):
        while sock.recv(65536):
            pass
    sock.close()
    assert len(up.requests) == 2


def test_drop_after_events_ends_without_the_final_chunk(up: FakeUpstream) -> None:
    up.script(Reply.answer().drop_after(2))
    reply = RawResponse(send_raw(up, "POST", "/v1/chat/completions",
                                 json.dumps({"model": "m", "stream": True}).encode()))
    body, complete = dechunk(reply.read_to_eof())
    assert not complete and body.count(b"\n\n") == 2
    reply.sock.close()
    up.script(Reply.answer(delay=0.05).drop_after(1))
    conn = http.client.HTTPConnection(up.host, up.port, timeout=2)
    conn.request("POST", "/v1/messages", json.dumps(dict(CLAUDE_BODY, stream=True)))
    with pytest.raises(http.client.IncompleteRead):
        conn.getresponse().read()
    conn.close()
