"""Encoded upstream answers over real sockets: gzip, deflate, br and zstd.

Claude Code and Codex send ``Accept-Encoding: br, zstd``, so an upstream may
compress its answers with any of these. What clipal inspects (an error body,
the first SSE event) it reads decoded; what it forwards stays byte for byte
as the upstream sent it, Content-Encoding included.
"""

from __future__ import annotations

import http.client
import json
import threading

import pytest
import requests

from conftest import ClipalProcess, provider
from encoders import CODINGS, encoded, encoded_stream
from fakeupstream import Reply, anthropic_error_body, sse_event

# Short enough that a proxy holding an encoded stream back fails quickly.
TIMEOUT = 5

STREAM = ("/claudecode/v1/messages",
          {"model": "claude-test", "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
CHAT = ("/codex/v1/chat/completions", {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
QUOTA_BODY = (b'{"error":{"message":"You exceeded your current quota","type":"insufficient_quota",'
              b'"code":"insufficient_quota"}}')


def anthropic_events(text: str) -> list[bytes]:
    """A complete Anthropic message stream, one framed SSE event per item."""
    message = {"id": "msg_enc", "type": "message", "role": "assistant", "model": "claude-test", "content": [],
               "stop_reason": None, "usage": {"input_tokens": 1, "output_tokens": 1}}
    events = [sse_event({"type": "message_start", "message": message}, "message_start"),
              sse_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                        "content_block_start")]
    events += [sse_event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}},
                         "content_block_delta") for word in text.split(" ")]
    events += [sse_event({"type": "content_block_stop", "index": 0}, "content_block_stop"),
               sse_event({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                          "usage": {"output_tokens": 3}}, "message_delta"),
               sse_event({"type": "message_stop"}, "message_stop")]
    return events


def raw_post(proxy: ClipalProcess, path: str, payload: dict) -> http.client.HTTPResponse:
    """POST as an agent that asks for br and zstd; http.client never decodes what comes back."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=TIMEOUT)
    connection.request("POST", path, body=json.dumps(payload),
                       headers={"Content-Type": "application/json", "Accept-Encoding": "br, zstd"})
    return connection.getresponse()


def read_at_least(response: http.client.HTTPResponse, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = response.read1(size - len(data))
        assert more, f"the stream ended after {len(data)} of {size} bytes"
        data += more
    return data


@pytest.mark.parametrize("coding", CODINGS)
def test_an_encoded_stream_reaches_the_client_byte_identical_from_its_first_event(clipal, upstream_factory, coding):
    a = upstream_factory("A")
    events = anthropic_events("hello from A")
    chunks = encoded_stream(coding, events)
    rest_may_follow = threading.Event()
    # A sends its first event and holds the rest: clipal must commit on the decoded first event.
    a.script(Reply.sse(chunks, headers={"Content-Encoding": coding}).stall_after(1, until=rest_may_follow))
    proxy = clipal(claudecode=[provider("A", a)])

    response = raw_post(proxy, *STREAM)
    assert response.status == 200
    assert response.getheader("Content-Encoding") == coding
    assert response.getheader("X-Clipal-Provider") == "A"
    first = read_at_least(response, len(chunks[0]))
    rest_may_follow.set()
    body = first + response.read()

    assert body == b"".join(chunks)
    assert a.requests[0].headers["Accept-Encoding"] == "br, zstd"


@pytest.mark.parametrize("coding", CODINGS)
def test_an_encoded_stream_whose_first_event_is_an_error_fails_over(clipal, upstream_factory, coding):
    a, b = upstream_factory("A"), upstream_factory("B")
    error = sse_event(anthropic_error_body("overloaded_error", "Overloaded"), "error")
    # The stream stays open after the error event: only the decoded event can make clipal give up on A.
    a.script(Reply.sse(encoded_stream(coding, [error]), headers={"Content-Encoding": coding}).stall_after(1))
    proxy = clipal(claudecode=[provider("A", a), provider("B", b)])
    path, payload = STREAM

    r = requests.post(proxy.url + path, json=payload, timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["X-Clipal-Provider"] == "B"
    assert "hello" in r.text and "overloaded_error" not in r.text
    assert len(a.requests) == 1
    assert "SSE error event: overloaded" in proxy.wait_for_output("provider A failed")


@pytest.mark.parametrize("coding", ["identity", *CODINGS])
def test_an_encoded_quota_429_deactivates_like_its_plain_twin(clipal, upstream_factory, coding):
    a, b = upstream_factory("A"), upstream_factory("B")
    headers = {"Content-Type": "application/json"}
    body = QUOTA_BODY
    if coding != "identity":
        headers["Content-Encoding"] = coding
        body = encoded(coding, QUOTA_BODY)
    a.script(Reply.raw(429, body, headers))
    proxy = clipal(codex=[provider("A", a), provider("B", b)])
    path, payload = CHAT

    first = requests.post(proxy.url + path, json=payload, timeout=TIMEOUT)
    assert first.status_code == 200 and first.headers["X-Clipal-Provider"] == "B"
    assert "provider A deactivated" in proxy.wait_for_output("deactivated")

    # B fails now: a provider that was only rate limited would be tried again, a deactivated one is not.
    b.script(Reply.openai_error(503))
    second = requests.post(proxy.url + path, json=payload, timeout=TIMEOUT)
    assert second.status_code == 503 and "X-Clipal-Provider" not in second.headers
    assert len(a.requests) == 1 and len(b.requests) == 2


@pytest.mark.parametrize("coding", CODINGS)
def test_an_encoded_stream_that_decodes_past_the_limit_is_passed_on_unread(clipal, upstream_factory, coding):
    a, b = upstream_factory("A"), upstream_factory("B")
    bomb = b"".join(encoded_stream(coding, [bytes(1 << 20)] * 8))  # 8 MiB of zeros, no event end in sight
    a.script(Reply.sse([bomb], headers={"Content-Encoding": coding}).stall_after(1))
    proxy = clipal(claudecode=[provider("A", a), provider("B", b)])

    response = raw_post(proxy, *STREAM)
    assert response.status == 200 and response.getheader("X-Clipal-Provider") == "A"
    assert read_at_least(response, len(bomb)) == bomb
    assert b.requests == []
