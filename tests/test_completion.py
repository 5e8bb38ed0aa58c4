"""clipal.completion: whether an SSE stream reached its protocol's terminal event."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest

from clipal.completion import LINE_LIMIT, CompletionCheck, looks_like_sse
from encoders import CODINGS, encoded, encoded_stream


def event(name: str | None, data: object) -> bytes:
    """One SSE event: an optional ``event:`` line, one ``data:`` line (JSON unless bytes), a blank line."""
    payload = data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode()
    head = f"event: {name}\n".encode() if name else b""
    return head + b"data: " + payload + b"\n\n"


# --------------------------------------------------------------------------- the three protocols

ANTHROPIC_BODY = [
    event("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-sonnet-4-5",
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 12, "output_tokens": 1}}}),
    event("content_block_start", {"type": "content_block_start", "index": 0,
                                   "content_block": {"type": "text", "text": ""}}),
    event("ping", {"type": "ping"}),
    event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                   "delta": {"type": "text_delta", "text": "Hello"}}),
    event("content_block_stop", {"type": "content_block_stop", "index": 0}),
    event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                            "usage": {"output_tokens": 5}}),
]
ANTHROPIC_STOP = event("message_stop", {"type": "message_stop"})
ANTHROPIC_ERROR = event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


def chat_chunk(delta: dict, finish_reason: object = None) -> bytes:
    return event(None, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})


CHAT_BODY = [chat_chunk({"role": "assistant", "content": ""}), chat_chunk({"content": "Hello"}),
             chat_chunk({"content": " world"})]
CHAT_USAGE = event(None, {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
                          "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}})
CHAT_DONE = b"data: [DONE]\n\n"


def responses_event(kind: str, sequence: int, **fields: object) -> dict:
    return {"type": kind, "sequence_number": sequence, **fields}


RESPONSE = {"id": "resp_1", "object": "response", "status": "in_progress", "error": None, "output": []}
RESPONSES_BODY_EVENTS = [
    responses_event("response.created", 0, response=RESPONSE),
    responses_event("response.in_progress", 1, response=RESPONSE),
    responses_event("response.output_item.added", 2, output_index=0,
                    item={"id": "msg_1", "type": "message", "status": "in_progress", "content": [], "role": "assistant"}),
    responses_event("response.output_text.delta", 3, item_id="msg_1", output_index=0, content_index=0, delta="Hello"),
    responses_event("response.output_text.done", 4, item_id="msg_1", output_index=0, content_index=0, text="Hello"),
]
RESPONSES_TERMINAL_EVENTS = {
    "completed": responses_event("response.completed", 5, response={**RESPONSE, "status": "completed"}),
    "failed": responses_event("response.failed", 5, response={
        **RESPONSE, "status": "failed", "error": {"code": "server_error", "message": "boom"}}),
    "incomplete": responses_event("response.incomplete", 5, response={
        **RESPONSE, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}),
    "error": {"type": "error", "sequence_number": 5, "code": "server_error", "message": "boom", "param": None},
}


def responses(events: list[dict], *, named: bool = True) -> list[bytes]:
    """Responses events as sent: with ``event:`` lines (OpenAI) or data alone (some providers)."""
    return [event(e["type"] if named else None, e) for e in events]


COMPLETE = {
    "anthropic message_stop": ("claudecode", ANTHROPIC_BODY + [ANTHROPIC_STOP]),
    "anthropic error event": ("claudecode", ANTHROPIC_BODY[:4] + [ANTHROPIC_ERROR]),
    "anthropic error as first event": ("claudecode", [ANTHROPIC_ERROR]),
    "chat [DONE]": ("codex", CHAT_BODY + [chat_chunk({}, "stop"), CHAT_USAGE, CHAT_DONE]),
    "chat [DONE] alone": ("codex", CHAT_BODY + [CHAT_DONE]),
    "chat finish_reason stop, no [DONE]": ("codex", CHAT_BODY + [chat_chunk({}, "stop")]),
    "chat finish_reason tool_calls": ("codex", CHAT_BODY + [chat_chunk({}, "tool_calls")]),
    "chat finish_reason length with content": ("codex", CHAT_BODY + [chat_chunk({"content": "!"}, "length")]),
    **{f"responses {name}": ("codex", responses(RESPONSES_BODY_EVENTS + [terminal]))
       for name, terminal in RESPONSES_TERMINAL_EVENTS.items()},
    **{f"responses {name}, data only": ("codex", responses(RESPONSES_BODY_EVENTS + [terminal], named=False))
       for name, terminal in RESPONSES_TERMINAL_EVENTS.items()},
}

INCOMPLETE = {
    "anthropic without message_stop": ("claudecode", ANTHROPIC_BODY),
    "anthropic cut inside the message_stop line": ("claudecode", ANTHROPIC_BODY + [b"event: message_st"]),
    "anthropic message_stop line never ended": ("claudecode", ANTHROPIC_BODY + [b"event: message_stop"]),
    "anthropic text that names the terminal events": ("claudecode", ANTHROPIC_BODY[:3] + [
        event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {
            "type": "text_delta", "text": 'message_stop\nevent: message_stop\n{"type":"message_stop"} error'}}),
        event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                      "delta": {"type": "text_delta", "text": "message_stop"}})]),
    "anthropic comment naming message_stop": ("claudecode", ANTHROPIC_BODY + [
        b': message_stop {"type":"message_stop"}\nid: {"type":"message_stop"}\n\n']),
    "chat finish_reason null only": ("codex", CHAT_BODY),
    "chat finish_reason empty string": ("codex", CHAT_BODY + [chat_chunk({}, "")]),
    "chat cut inside [DONE]": ("codex", CHAT_BODY + [chat_chunk({}, None), b"data: [DO"]),
    "chat cut inside the finish_reason chunk, after its value": ("codex", CHAT_BODY + [chat_chunk({}, "stop")[:-4]]),
    "chat error chunk (not a Chat terminal event)": ("codex", CHAT_BODY + [
        event(None, {"error": {"message": "upstream failed", "type": "server_error"}})]),
    "chat content that names the terminal markers": ("codex", CHAT_BODY + [
        chat_chunk({"content": 'data: [DONE]\n"finish_reason":"stop" [DONE]'}),
        chat_chunk({"content": "[DONE]"})]),
    "responses without its terminal event": ("codex", responses(RESPONSES_BODY_EVENTS)),
    "responses without its terminal event, data only": ("codex", responses(RESPONSES_BODY_EVENTS, named=False)),
    "responses text naming the terminal events": ("codex", responses(RESPONSES_BODY_EVENTS + [
        responses_event("response.output_text.delta", 5, item_id="msg_1", delta="response.completed"),
        responses_event("response.output_text.delta", 6, item_id="msg_1", delta='"type":"error" event: error\n'),
    ], named=False)),
    "claudecode does not take Chat's [DONE]": ("claudecode", CHAT_BODY + [chat_chunk({}, "stop"), CHAT_DONE]),
}

ALL = {**{name: (*case, "complete") for name, case in COMPLETE.items()},
       **{name: (*case, "incomplete") for name, case in INCOMPLETE.items()}}


def status_of(client: str, chunks: list[bytes], content_encoding: str = "") -> str:
    check = CompletionCheck(client, content_encoding)
    for chunk in chunks:
        check.feed(chunk)
    return check.status


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


@pytest.mark.parametrize("name", ALL)
def test_status_event_by_event(name):
    client, chunks, expected = ALL[name]
    check = CompletionCheck(client)
    for chunk in chunks:
        check.feed(chunk)
    assert check.status == expected
    assert check.complete is (expected == "complete")


@pytest.mark.parametrize("name", ALL)
def test_fed_one_byte_at_a_time_the_status_is_the_same(name):
    client, chunks, expected = ALL[name]
    assert status_of(client, one_byte_at_a_time(b"".join(chunks))) == expected


@pytest.mark.parametrize("name", ["anthropic message_stop", "chat finish_reason stop, no [DONE]",
                                  "responses completed", "anthropic without message_stop"])
def test_every_split_in_two_gives_the_same_status(name):
    client, chunks, expected = ALL[name]
    data = b"".join(chunks)
    assert {status_of(client, [data[:i], data[i:]]) for i in range(len(data) + 1)} == {expected}


@pytest.mark.parametrize("ending", [b"\r\n", b"\r"])
@pytest.mark.parametrize("name", ALL)
def test_crlf_and_cr_line_endings_give_the_same_status(name, ending):
    client, chunks, expected = ALL[name]
    data = b"".join(chunks).replace(b"\n", ending)
    assert status_of(client, [data]) == expected
    assert status_of(client, one_byte_at_a_time(data)) == expected


def test_a_terminal_event_that_is_not_the_last_still_completes_and_later_bytes_are_ignored():
    check = CompletionCheck("claudecode")
    for chunk in ANTHROPIC_BODY + [ANTHROPIC_STOP, event("ping", {"type": "ping"}), b"\xff" * 100_000]:
        check.feed(chunk)
    assert check.status == "complete"


def test_an_utf8_byte_order_mark_before_the_first_line_is_skipped():
    assert status_of("claudecode", [b"\xef\xbb\xbf" + ANTHROPIC_ERROR]) == "complete"
    assert status_of("codex", one_byte_at_a_time(b"\xef\xbb\xbfdata: [DONE]\n\n")) == "complete"


def test_a_terminal_event_inside_multi_line_data_is_found():
    pretty = json.dumps(RESPONSES_TERMINAL_EVENTS["completed"], indent=2).encode()
    multi_line = b"".join(b"data: " + line + b"\n" for line in pretty.splitlines()) + b"\n"
    assert status_of("codex", responses(RESPONSES_BODY_EVENTS, named=False) + [multi_line]) == "complete"
    finish = json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, indent=2).encode()
    chat = b"".join(b"data: " + line + b"\n" for line in finish.splitlines()) + b"\n"
    assert status_of("codex", CHAT_BODY + [chat]) == "complete"
    not_set = chat.replace(b'"stop"', b"null")
    assert status_of("codex", CHAT_BODY + [not_set]) == "incomplete"


def test_a_second_choice_that_finishes_completes_a_chat_stream():
    chunk = event(None, {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None},
                                     {"index": 1, "delta": {}, "finish_reason": "stop"}]})
    assert status_of("codex", CHAT_BODY + [chunk]) == "complete"


def test_an_overlong_line_is_judged_by_its_head_in_bounded_memory():
    # A data-only response.completed repeats the whole answer; its "type" comes first.
    huge_text = "x" * (4 * LINE_LIMIT)
    completed = {**RESPONSES_TERMINAL_EVENTS["completed"], "response": {**RESPONSE, "output_text": huge_text}}
    data = b"".join(responses(RESPONSES_BODY_EVENTS, named=False) + [event(None, completed)])
    assert status_of("codex", [data[i:i + 1500] for i in range(0, len(data), 1500)]) == "complete"

    check = CompletionCheck("claudecode")
    line = b"data: " + b"y" * (1 << 20)
    tracemalloc.start()
    try:
        for _ in range(8):
            for i in range(0, len(line), 16 * 1024):
                check.feed(line[i:i + 16 * 1024])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * LINE_LIMIT
    check.feed(b"\n\n" + ANTHROPIC_STOP)  # the stream goes on after the overlong line
    assert check.status == "complete"


def test_gemini_is_never_checked():
    check = CompletionCheck("gemini")
    assert (check.status, check.complete) == ("unchecked", True)
    check.feed(b'data: {"candidates":[{"content":{"parts":[{"text":"Hi"}]}}]}\n\n')
    assert (check.status, check.complete) == ("unchecked", True)


def test_an_unknown_client_is_refused():
    with pytest.raises(ValueError):
        CompletionCheck("cursor")


# --------------------------------------------------------------------------- encoded streams


@pytest.mark.parametrize("coding", CODINGS)
@pytest.mark.parametrize("name", ALL)
def test_an_encoded_stream_gives_the_same_status(name, coding):
    client, chunks, expected = ALL[name]
    assert status_of(client, encoded_stream(coding, chunks), coding) == expected


@pytest.mark.parametrize("coding", CODINGS)
def test_an_encoded_stream_fed_one_byte_at_a_time_gives_the_same_status(coding):
    for name in ("anthropic message_stop", "anthropic without message_stop", "chat finish_reason stop, no [DONE]"):
        client, chunks, expected = ALL[name]
        data = b"".join(encoded_stream(coding, chunks))
        assert status_of(client, one_byte_at_a_time(data), coding) == expected, name


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_an_encoded_stream_without_content_encoding_is_recognised_by_its_magic_bytes(coding):
    assert status_of("claudecode", encoded_stream(coding, ANTHROPIC_BODY + [ANTHROPIC_STOP])) == "complete"
    assert status_of("claudecode", encoded_stream(coding, ANTHROPIC_BODY)) == "incomplete"


def test_stacked_codings_are_undone_in_turn():
    data = encoded("br", encoded("gzip", b"".join(CHAT_BODY + [CHAT_DONE])))
    assert status_of("codex", [data], "gzip, br") == "complete"


@pytest.mark.parametrize("coding", CODINGS)
def test_a_bomb_is_unchecked_quickly_and_in_bounded_memory(coding):
    zeros = b"\0" * (1 << 20)
    bomb = encoded_stream(coding, ANTHROPIC_BODY + [zeros] * 64)
    assert sum(map(len, bomb)) < 256 * 1024
    check = CompletionCheck("claudecode", coding, limit=4 << 20)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        for chunk in bomb:
            check.feed(chunk)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert check.status == "unchecked"
    assert not check.complete
    assert elapsed < 2.0
    assert peak < 3 * (4 << 20)


def test_a_terminal_event_before_the_decode_limit_stays_complete():
    chunks = encoded_stream("gzip", ANTHROPIC_BODY + [ANTHROPIC_STOP, b"\0" * (1 << 20)])
    assert status_of("claudecode", chunks, "gzip") == "complete"
    check = CompletionCheck("claudecode", "gzip", limit=1 << 20)
    for chunk in encoded_stream("gzip", [b"\0" * (1 << 20)] + ANTHROPIC_BODY + [ANTHROPIC_STOP]):
        check.feed(chunk)
    assert check.status == "unchecked"  # the stop came after the limit: inspection had been given up


def test_a_corrupt_encoded_stream_is_unchecked():
    chunks = encoded_stream("gzip", ANTHROPIC_BODY)
    assert status_of("claudecode", chunks[:2] + [b"not gzip at all\n\n", ANTHROPIC_STOP], "gzip") == "unchecked"
    assert status_of("claudecode", [b"".join(ANTHROPIC_BODY + [ANTHROPIC_STOP])], "br") == "unchecked"


def test_a_plain_stream_longer_than_the_decode_limit_is_still_checked():
    # Unencoded streams skip the decoder, whose byte count would end a long stream's inspection.
    check = CompletionCheck("claudecode", "identity", limit=1024)
    for chunk in ANTHROPIC_BODY * 50 + [ANTHROPIC_STOP]:
        check.feed(chunk)
    assert check.status == "complete"


# --------------------------------------------------------------------------- looks_like_sse


@pytest.mark.parametrize("content_type,first,expected", [
    ("text/event-stream", b"", True),
    ("Text/Event-Stream; charset=utf-8", b'{"not":"sse"}', True),
    ("application/json", b'data: {"choices":[]}\n\n', True),
    ("", b"event: message_start\ndata: {}\n\n", True),
    ("application/json", b"data:[DONE]", True),
    ("application/json", b"\xef\xbb\xbfdata: {}", True),
    ("application/json", b"\r\n\n\revent: ping", True),
    ("application/json", b": OPENROUTER PROCESSING\n\nid: 1\nretry: 500\ndata: {}\n", True),
    ("application/json", b": OPENROUTER PROCESSING\r\n\r\ndata: {}", True),
    ("application/json", b'[{"candidates":[]}]', False),
    ("application/json", b'{"error":{"message":"data: no"}}', False),
    ("application/json", b"", False),
    ("", b"", False),
    ("text/plain", b"hello\ndata: x\n", False),
    ("application/json", b"dat", False),
    ("application/json", b" data: x", False),
    ("application/json", b": still only a comment", False),
    ("application/json", b"id: 7\n", False),
])
def test_looks_like_sse(content_type, first, expected):
    assert looks_like_sse(content_type, first) is expected
