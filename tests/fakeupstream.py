"""A fake upstream LLM provider for clipal's live tests.

``FakeUpstream`` is a real HTTP/1.1 server on 127.0.0.1 (free port, background
threads, standard library only).  It answers like the Anthropic, OpenAI and
Gemini APIs closely enough for the official SDKs, records every request, and
fails on demand: error statuses, gzip bodies, slow or stalled streams, dropped
connections.

Start / stop (both take milliseconds; the server starts in the constructor)::

    with FakeUpstream("A") as a, FakeUpstream("B") as b:
        a.url                      # "http://127.0.0.1:PORT"
        a.answer_text              # "hello from A" -- tells tests who answered

    @pytest.fixture
    def upstream():
        with FakeUpstream("A") as up:
            yield up

Default answers (paths are matched by suffix, so a base_url path such as
``/api`` in front is fine; anything else is a 404 JSON):

    POST .../messages                 Anthropic message, SSE when {"stream": true}
    POST .../messages/count_tokens    {"input_tokens": N}
    POST .../chat/completions         chat.completion, chunk SSE + [DONE] when streaming
    POST .../responses                Responses object, Responses SSE when streaming
    POST .../models/M:generateContent         GenerateContentResponse
    POST .../models/M:streamGenerateContent   SSE with ?alt=sse, else a streamed JSON array
    POST .../models/M:countTokens             {"totalTokens": N}

Streams carry one text delta per word of the answer text, so
``Reply.answer("one two three")`` streams three deltas.  Event counts per
stream (useful for ``stall_after`` / ``drop_after``):
Anthropic = 5 + words (message_start, content_block_start, deltas,
content_block_stop, message_delta, message_stop); chat completions = 3 + words
(role chunk, deltas, finish chunk, [DONE]; one more with include_usage);
Responses = 8 + words; Gemini SSE = words (the last one carries finishReason);
Gemini without alt=sse = words + 1 (the closing "]").

Scripting failures: ``up.script(...)`` queues replies; each request takes the
first queued reply (FIFO) whose ``path`` matches (None = any path), else
``up.key_defaults[the API key it carries]``, else ``up.path_defaults[path]``,
else ``up.default`` (initially ``Reply.answer()``)::

    up.script(Reply.anthropic_error(529))                 # then normal answers
    up.script(Reply.anthropic_error(429, retry_after=30, gzip=True))
    up.script(Reply.openai_error(429, code="insufficient_quota"))
    up.script(Reply.gemini_error(429, retry_delay="20s"))
    up.script(Reply.json(200, {"any": "thing"}, headers={"X-A": "1"}))
    up.script(Reply.raw(200, gz_bytes, {"Content-Type": "application/json",
                                        "Content-Encoding": "gzip"}))
    up.script(Reply.anthropic_error(500), path="/v1/messages/count_tokens")
    up.default = Reply.openai_error(503)                  # always 503 from now on

Streams, stalls and drops (all timings in seconds; ``delay`` is the gap between
body chunks, the first chunk goes right after the headers).  ``framing`` is
"chunked" (one chunk per event), "close" (no length, ``Connection: close``, the
body ends when the socket closes) or "length" (Content-Length)::

    Reply.answer(delay=0.4)                               # natural answer, slow
    Reply.answer(delay=0.4, framing="close")
    Reply.sse([("message_start", {...}), {"data": 1}, b"raw bytes", "[DONE]"],
              delay=0.4)                                  # explicit events
    Reply.sse([("error", anthropic_error_body("overloaded_error"))])
    Reply.stall()                                         # never sends headers
    Reply.stall(until=gate)                               # ... until gate.set()
    Reply.answer().stall_after(0)                         # headers, then nothing
    Reply.answer(delay=0.1).stall_after(2)                # headers + 2 events, hold
    Reply.drop()                                          # close, no response
    Reply.drop(reset=True)                                # RST instead of FIN
    Reply.answer().drop_after(2)                          # 2 events, then close
                                                          # (no final chunk)
    Reply.answer().headers_after(0.3)                     # slow headers
    Reply.answer().first_byte_after(0.3)                  # slow first body byte

A hold ends when its ``until`` event is set (then the reply carries on), when
the client goes away, or when the server stops; ``stop()`` never waits for it.

Inspecting what arrived::

    reqs = up.wait_for_requests(2, timeout=5)   # AssertionError on timeout
    r = up.requests[-1]                          # RecordedRequest snapshot
    r.method, r.path, r.query["alt"], r.query_string, r.body, r.json()
                                                 # query: first value per name
    r.headers["x-api-key"]                       # case-insensitive, None if absent
    r.time                                       # time.monotonic() once fully read
    r.connection                                 # TCP connection serial (keep-alive)
    r.client_gone.wait(2)                        # set if the client left mid-reply
    r.finished.wait(2)                           # set when the fake is done with it
    up.open_connections, up.connections_opened, up.errors, up.reset()
"""

from __future__ import annotations

import dataclasses
import gzip as gzip_module
import itertools
import json
import re
import selectors
import socket
import struct
import threading
import time
import traceback
from http import HTTPStatus
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, Union
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "FakeUpstream",
    "RecordedRequest",
    "Reply",
    "SSEEvent",
    "anthropic_error_body",
    "gemini_error_body",
    "openai_error_body",
    "sse_event",
]

Framing = Literal["length", "chunked", "close"]

# An SSE event as tests write it: already framed bytes; a str data payload
# (e.g. "[DONE]"); a JSON-able dict/list; or (event name, data).
SSEEvent = Union[bytes, str, dict, list, tuple]

# Chunk index meaning "before the status line" for stall/drop points.
_BEFORE_HEADERS = -1
# How often a hold with an ``until`` gate looks at the gate.
_GATE_POLL = 0.01


def sse_event(data: Any, event: str | None = None) -> bytes:
    """Frame one server-sent event; non-str data is compact JSON."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    lines = [f"event: {event}"] if event else []
    lines += [f"data: {line}" for line in payload.split("\n")]
    return ("\n".join(lines) + "\n\n").encode()


def _frame_event(event: SSEEvent) -> bytes:
    if isinstance(event, bytes):
        return event
    if isinstance(event, tuple):
        name, data = event
        return sse_event(data, name)
    return sse_event(event)


# --------------------------------------------------------------------------
# Error bodies in each provider's shape (SPEC §3, §4.3).

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 413: "request_too_large",
    429: "rate_limit_error", 529: "overloaded_error",
}
_OPENAI_ERROR_TYPES = {
    400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"), 429: ("requests", "rate_limit_exceeded"),
}
_GEMINI_STATUSES = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return {529: "Overloaded"}.get(status, "Unknown")


def anthropic_error_body(type: str, message: str | None = None) -> dict:
    """``{"type": "error", "error": {"type": ..., "message": ...}}``."""
    return {"type": "error", "error": {"type": type, "message": message or type}}


def openai_error_body(message: str, type: str | None = None, code: str | None = None) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": None, "code": code}}


def gemini_error_body(code: int, message: str | None = None, status: str | None = None,
                      details: Sequence[dict] | None = None) -> dict:
    """``{"error": {"code", "message", "status", "details"?}}`` (google.rpc.Status)."""
    error: dict[str, Any] = {
        "code": code,
        "message": message or _reason(code),
        "status": status or _GEMINI_STATUSES.get(code, "UNKNOWN"),
    }
    if details:
        error["details"] = list(details)
    return {"error": error}


# --------------------------------------------------------------------------
# Scripted replies.

@dataclasses.dataclass(frozen=True)
class Reply:
    """How the fake answers one request.  Build with the classmethods.

    ``body`` and ``events`` both None means "the natural answer for this
    request" (see the module docstring).  ``stall_point``/``drop_point`` count
    body chunks (an SSE event, a JSON body = one chunk); -1 = before headers.
    """

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None
    events: tuple[bytes, ...] | None = None
    text: str | None = None
    framing: Framing | None = None
    gzip: bool = False
    delay: float = 0.0
    headers_delay: float = 0.0
    first_byte_delay: float = 0.0
    stall_point: int | None = None
    drop_point: int | None = None
    reset: bool = False
    until: threading.Event | None = dataclasses.field(default=None, compare=False)

    # -- content --------------------------------------------------------
    @classmethod
    def answer(cls, text: str | None = None, *, status: int = 200,
               headers: Mapping[str, str] | None = None, delay: float = 0.0,
               framing: Framing | None = None, gzip: bool = False) -> Reply:
        """The natural provider answer for the request (JSON or stream).

        ``text`` overrides ``FakeUpstream.answer_text``.  ``gzip`` compresses
        the whole body as one chunk, so a gzipped stream arrives all at once.
        """
        return cls(status=status, headers=_pairs(headers), text=text, delay=delay,
                   framing=framing, gzip=gzip)

    @classmethod
    def json(cls, status: int, body: Any, *, headers: Mapping[str, str] | None = None,
             gzip: bool = False, framing: Framing | None = None) -> Reply:
        """Status + JSON body (``Content-Type: application/json`` unless given)."""
        data = json.dumps(body).encode()
        return cls(status=status, headers=_with_default(headers, "Content-Type", "application/json"),
                   body=data, gzip=gzip, framing=framing)

    @classmethod
    def raw(cls, status: int, body: bytes, headers: Mapping[str, str] | None = None, *,
            framing: Framing = "length") -> Reply:
        """Exactly these bytes and headers (plus the framing header); nothing added."""
        return cls(status=status, headers=_pairs(headers), body=body, framing=framing)

    @classmethod
    def sse(cls, events: Iterable[SSEEvent], *, status: int = 200,
            headers: Mapping[str, str] | None = None, delay: float = 0.0,
            framing: Framing = "chunked") -> Reply:
        """A text/event-stream of these events, one body chunk per event."""
        return cls(status=status,
                   headers=_with_default(headers, "Content-Type", "text/event-stream"),
                   events=tuple(_frame_event(e) for e in events), delay=delay, framing=framing)

    @classmethod
    def anthropic_error(cls, status: int, message: str | None = None, *, type: str | None = None,
                        retry_after: float | str | None = None,
                        headers: Mapping[str, str] | None = None, gzip: bool = False) -> Reply:
        """Anthropic error JSON; the type defaults from the status (529 -> overloaded_error)."""
        error_type = type or _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
        return cls.json(status, anthropic_error_body(error_type, message),
                        headers=_retry_after(headers, retry_after), gzip=gzip)

    @classmethod
    def openai_error(cls, status: int, message: str | None = None, *, type: str | None = None,
                     code: str | None = None, retry_after: float | str | None = None,
                     headers: Mapping[str, str] | None = None, gzip: bool = False) -> Reply:
        """OpenAI error JSON; type/code default from the status (429 -> rate_limit_exceeded)."""
        default_type, default_code = _OPENAI_ERROR_TYPES.get(status, ("server_error", None))
        if code == "insufficient_quota" and type is None:
            default_type = "insufficient_quota"
        body = openai_error_body(message or _reason(status), type or default_type,
                                 code if code is not None else default_code)
        return cls.json(status, body, headers=_retry_after(headers, retry_after), gzip=gzip)

    @classmethod
    def gemini_error(cls, status: int, message: str | None = None, *, rpc_status: str | None = None,
                     retry_delay: str | None = None, details: Sequence[dict] | None = None,
                     retry_after: float | str | None = None,
                     headers: Mapping[str, str] | None = None, gzip: bool = False) -> Reply:
        """Gemini error JSON; ``retry_delay="20s"`` adds a google.rpc.RetryInfo detail."""
        all_details = list(details or [])
        if retry_delay is not None:
            all_details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                "retryDelay": retry_delay})
        body = gemini_error_body(status, message, rpc_status, all_details)
        return cls.json(status, body, headers=_retry_after(headers, retry_after), gzip=gzip)

    @classmethod
    def stall(cls, until: threading.Event | None = None, then: Reply | None = None) -> Reply:
        """Read the request, send nothing; once ``until`` is set, send ``then``."""
        base = then if then is not None else cls.answer()
        return dataclasses.replace(base, stall_point=_BEFORE_HEADERS, until=until)

    @classmethod
    def drop(cls, reset: bool = False) -> Reply:
        """Read the request, then close the connection without a response (RST if reset)."""
        return cls(drop_point=_BEFORE_HEADERS, reset=reset)

    # -- modifiers (return a new Reply) ----------------------------------
    def stall_after(self, chunks: int, until: threading.Event | None = None) -> Reply:
        """Send headers and ``chunks`` body chunks, then hold (until ``until`` is set)."""
        return dataclasses.replace(self, stall_point=chunks, until=until)

    def drop_after(self, chunks: int, reset: bool = False) -> Reply:
        """Send headers and ``chunks`` body chunks, then close without finishing the body."""
        return dataclasses.replace(self, drop_point=chunks, reset=reset)

    def headers_after(self, seconds: float) -> Reply:
        """Wait this long before sending the status line."""
        return dataclasses.replace(self, headers_delay=seconds)

    def first_byte_after(self, seconds: float) -> Reply:
        """Wait this long between the headers and the first body chunk."""
        return dataclasses.replace(self, first_byte_delay=seconds)


def _pairs(headers: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in (headers or {}).items())


def _with_default(headers: Mapping[str, str] | None, name: str, value: str) -> tuple[tuple[str, str], ...]:
    pairs = _pairs(headers)
    if any(k.lower() == name.lower() for k, _ in pairs):
        return pairs
    return ((name, value),) + pairs


def _retry_after(headers: Mapping[str, str] | None, retry_after: float | str | None) -> dict[str, str]:
    merged = dict(headers or {})
    if retry_after is not None:
        merged["Retry-After"] = retry_after if isinstance(retry_after, str) else f"{retry_after:g}"
    return merged


# --------------------------------------------------------------------------
# Recorded requests.

@dataclasses.dataclass
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query_string: str
    query: dict[str, str]
    headers: HTTPMessage
    body: bytes
    time: float
    connection: int
    reply: Reply | None = None
    client_gone: threading.Event = dataclasses.field(default_factory=threading.Event)
    finished: threading.Event = dataclasses.field(default_factory=threading.Event)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def api_key(self) -> str | None:
        """The key the request carried, wherever it was (x-api-key, Bearer, x-goog-api-key, ?key=)."""
        bearer = self.headers.get("Authorization", "")
        if bearer.lower().startswith("bearer "):
            return bearer[7:]
        return self.headers.get("x-api-key") or self.headers.get("x-goog-api-key") or self.query.get("key")


# --------------------------------------------------------------------------
# Natural answers.

@dataclasses.dataclass(frozen=True)
class _Content:
    status: int
    content_type: str
    chunks: list[bytes]


def _words(text: str) -> list[str]:
    pieces = re.findall(r"\s*\S+", text)
    if not pieces:
        return [text]
    pieces[-1] += text[len("".join(pieces)):]
    return pieces


def _compact(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


_GEMINI_PATH = re.compile(r"/models/(?P<model>[^/:]+):(?P<action>generateContent|streamGenerateContent|countTokens)$")


def _natural(req: RecordedRequest, text: str, serial: int) -> _Content:
    try:
        body = json.loads(req.body) if req.body else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    stream = body.get("stream") is True
    model = str(body.get("model") or "fake-model")
    input_tokens = max(1, len(req.body) // 4)
    path = req.path
    if req.method == "POST":
        if path.endswith("/messages/count_tokens"):
            return _json_content({"input_tokens": input_tokens})
        if path.endswith("/messages"):
            return _anthropic(model, text, input_tokens, serial, stream)
        if path.endswith("/chat/completions"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return _chat(model, text, input_tokens, serial, stream, usage)
        if path.endswith("/responses"):
            return _responses(model, text, input_tokens, serial, stream)
        match = _GEMINI_PATH.search(path)
        if match:
            action = match["action"]
            if action == "countTokens":
                return _json_content({"totalTokens": input_tokens})
            return _gemini(match["model"], text, input_tokens, serial,
                           stream=action == "streamGenerateContent",
                           sse=req.query.get("alt") == "sse")
    return _Content(404, "application/json", [_compact(
        {"error": {"type": "not_found_error", "code": 404,
                   "message": f"fakeupstream: no route for {req.method} {path}"}})])


def _json_content(data: Any) -> _Content:
    return _Content(200, "application/json", [_compact(data)])


def _anthropic(model: str, text: str, input_tokens: int, serial: int, stream: bool) -> _Content:
    words = _words(text)
    message = {
        "id": f"msg_fake{serial:06d}", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": len(words)},
    }
    if not stream:
        return _json_content(message)
    start = dict(message, content=[], stop_reason=None,
                 usage={"input_tokens": input_tokens, "output_tokens": 1})
    events = [sse_event({"type": "message_start", "message": start}, "message_start"),
              sse_event({"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}}, "content_block_start")]
    events += [sse_event({"type": "content_block_delta", "index": 0,
                          "delta": {"type": "text_delta", "text": w}}, "content_block_delta")
               for w in words]
    events += [sse_event({"type": "content_block_stop", "index": 0}, "content_block_stop"),
               sse_event({"type": "message_delta",
                          "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                          "usage": {"output_tokens": len(words)}}, "message_delta"),
               sse_event({"type": "message_stop"}, "message_stop")]
    return _Content(200, "text/event-stream", events)


def _chat(model: str, text: str, input_tokens: int, serial: int, stream: bool,
          include_usage: bool) -> _Content:
    words = _words(text)
    usage = {"prompt_tokens": input_tokens, "completion_tokens": len(words),
             "total_tokens": input_tokens + len(words)}
    head = {"id": f"chatcmpl-fake{serial:06d}", "created": int(time.time()), "model": model}
    if not stream:
        return _json_content(dict(head, object="chat.completion", usage=usage, choices=[{
            "index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None, "finish_reason": "stop"}]))

    def chunk(delta: dict, finish: str | None) -> bytes:
        return sse_event(dict(head, object="chat.completion.chunk", choices=[
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]))

    events = [chunk({"role": "assistant", "content": ""}, None)]
    events += [chunk({"content": w}, None) for w in words]
    events.append(chunk({}, "stop"))
    if include_usage:
        events.append(sse_event(dict(head, object="chat.completion.chunk", choices=[], usage=usage)))
    events.append(sse_event("[DONE]"))
    return _Content(200, "text/event-stream", events)


def _responses(model: str, text: str, input_tokens: int, serial: int, stream: bool) -> _Content:
    words = _words(text)
    item_id = f"msg_fake{serial:06d}"
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    item = {"type": "message", "id": item_id, "status": "completed", "role": "assistant",
            "content": [part]}
    done = {
        "id": f"resp_fake{serial:06d}", "object": "response", "created_at": int(time.time()),
        "status": "completed", "model": model, "output": [item], "error": None,
        "incomplete_details": None, "instructions": None, "metadata": {},
        "parallel_tool_calls": True, "temperature": 1.0, "top_p": 1.0, "tool_choice": "auto",
        "tools": [], "text": {"format": {"type": "text"}},
        "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens": len(words), "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": input_tokens + len(words)},
    }
    if not stream:
        return _json_content(done)
    in_progress = dict(done, status="in_progress", output=[], usage=None)
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    raw: list[tuple[str, dict]] = [
        ("response.created", {"response": in_progress}),
        ("response.in_progress", {"response": in_progress}),
        ("response.output_item.added", {"output_index": 0, "item": dict(
            item, status="in_progress", content=[])}),
        ("response.content_part.added", dict(where, part=dict(part, text=""))),
    ]
    raw += [("response.output_text.delta", dict(where, delta=w, logprobs=[])) for w in words]
    raw += [("response.output_text.done", dict(where, text=text, logprobs=[])),
            ("response.content_part.done", dict(where, part=part)),
            ("response.output_item.done", {"output_index": 0, "item": item}),
            ("response.completed", {"response": done})]
    events = [sse_event(dict(data, type=name, sequence_number=n), name)
              for n, (name, data) in enumerate(raw)]
    return _Content(200, "text/event-stream", events)


def _gemini(model: str, text: str, input_tokens: int, serial: int, stream: bool,
            sse: bool) -> _Content:
    words = _words(text)
    usage = {"promptTokenCount": input_tokens, "candidatesTokenCount": len(words),
             "totalTokenCount": input_tokens + len(words)}

    def response(piece: str, last: bool) -> dict:
        candidate: dict[str, Any] = {"content": {"parts": [{"text": piece}], "role": "model"},
                                     "index": 0}
        if last:
            candidate["finishReason"] = "STOP"
        return {"candidates": [candidate], "usageMetadata": usage, "modelVersion": model,
                "responseId": f"fake{serial:06d}"}

    if not stream:
        return _json_content(response(text, True))
    objects = [response(w, i == len(words) - 1) for i, w in enumerate(words)]
    if sse:
        return _Content(200, "text/event-stream", [sse_event(o) for o in objects])
    # Without alt=sse the API streams one JSON array, element by element.
    parts = [(b"[" if i == 0 else b",\r\n") + _compact(o) for i, o in enumerate(objects)]
    parts.append(b"]")
    return _Content(200, "application/json", parts)


# --------------------------------------------------------------------------
# The server.

class _Gone(Exception):
    """The connection is over (client left, server stopping, or a scripted drop)."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Small SSE writes must not wait for delayed ACKs.
    disable_nagle_algorithm = True
    server: FakeUpstream

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass

    def _dispatch(self) -> None:
        up = self.server
        split = urlsplit(self.path)
        body = self._read_body()
        req = RecordedRequest(
            method=self.command, path=split.path, query_string=split.query,
            query={k: v[0] for k, v in parse_qs(split.query, keep_blank_values=True).items()},
            headers=self.headers, body=body, time=time.monotonic(),
            connection=up._connection_id(self.connection))
        reply = up._take_reply(req.path, req.api_key)
        req.reply = reply
        up._record(req)
        try:
            self._perform(req, reply)
        except _Gone:
            self.close_connection = True
        except OSError:
            self.close_connection = True
            if not up._stopping.is_set():
                req.client_gone.set()
        finally:
            req.finished.set()

    # HEAD is left to the base class (501): a body-less reply would not fit the scripts.
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _dispatch

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size_line = self.rfile.readline(65537)
                if not size_line:
                    raise _Gone()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Skip trailers up to the blank line.
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # -- reply ------------------------------------------------------------
    def _perform(self, req: RecordedRequest, reply: Reply) -> None:
        self._pause(req, reply.headers_delay)
        self._maybe_hold_or_drop(req, reply, _BEFORE_HEADERS)
        content = self._content(req, reply)
        chunks = [c for c in content.chunks if c]
        headers = list(reply.headers)
        if content.content_type and not any(k.lower() == "content-type" for k, _ in headers):
            headers.insert(0, ("Content-Type", content.content_type))
        if reply.gzip and chunks:
            chunks = [gzip_module.compress(b"".join(chunks), mtime=0)]
            headers.append(("Content-Encoding", "gzip"))
        framing = reply.framing or ("chunked" if content.content_type == "text/event-stream"
                                    or len(chunks) > 1 else "length")
        if framing == "length":
            headers.append(("Content-Length", str(sum(map(len, chunks)))))
        elif framing == "chunked":
            headers.append(("Transfer-Encoding", "chunked"))
        if framing == "close" or self.close_connection:
            self.close_connection = True
            headers.append(("Connection", "close"))
        head = f"HTTP/1.1 {content.status} {_reason(content.status)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        self.connection.sendall(head.encode("latin-1"))

        for index, chunk in enumerate(chunks):
            self._maybe_hold_or_drop(req, reply, index)
            self._pause(req, reply.first_byte_delay if index == 0 else reply.delay)
            self.connection.sendall(
                f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if framing == "chunked" else chunk)
        for point in (reply.stall_point, reply.drop_point):
            if point is not None and point >= len(chunks):
                self._maybe_hold_or_drop(req, reply, point)
        if framing == "chunked":
            self.connection.sendall(b"0\r\n\r\n")

    def _content(self, req: RecordedRequest, reply: Reply) -> _Content:
        if reply.events is not None:
            return _Content(reply.status, "", list(reply.events))
        if reply.body is not None:
            return _Content(reply.status, "", [reply.body])
        natural = _natural(req, reply.text if reply.text is not None else self.server.answer_text,
                           self.server._next_serial())
        status = reply.status if natural.status == 200 else natural.status
        return dataclasses.replace(natural, status=status)

    def _maybe_hold_or_drop(self, req: RecordedRequest, reply: Reply, point: int) -> None:
        if reply.stall_point == point:
            self._pause(req, None, reply.until)
        if reply.drop_point == point:
            if reply.reset:
                # Linger 0 makes close() send RST instead of FIN.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
            raise _Gone()

    def _pause(self, req: RecordedRequest, seconds: float | None,
               until: threading.Event | None = None) -> None:
        """Wait, watching the socket so a departing client or stop() ends the wait.

        Returns when ``seconds`` elapse or ``until`` is set; raises _Gone if the
        client closed its side or the server is stopping.
        """
        if seconds is not None and seconds <= 0 and until is None:
            return
        deadline = None if seconds is None else time.monotonic() + seconds
        watch = True
        with selectors.DefaultSelector() as selector:
            selector.register(self.connection, selectors.EVENT_READ)
            while True:
                if self.server._stopping.is_set():
                    raise _Gone()
                if until is not None and until.is_set():
                    return
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                step = remaining
                if until is not None:
                    step = _GATE_POLL if remaining is None else min(remaining, _GATE_POLL)
                if not watch:
                    self.server._stopping.wait(step)
                    continue
                if not selector.select(step):
                    continue
                try:
                    peek = self.connection.recv(1, socket.MSG_PEEK)
                except OSError:
                    peek = b""
                if peek:
                    # A pipelined request: the socket stays readable, so stop
                    # watching it and wait on the stop event alone.
                    watch = False
                    continue
                if not self.server._stopping.is_set():
                    req.client_gone.set()
                raise _Gone()


class FakeUpstream:
    """A fake Anthropic / OpenAI / Gemini server on 127.0.0.1; see the module docstring."""

    def __init__(self, name: str = "upstream", *, answer_text: str | None = None) -> None:
        self.name = name
        self.answer_text = answer_text if answer_text is not None else f"hello from {name}"
        self.default: Reply = Reply.answer()
        self.path_defaults: dict[str, Reply] = {}
        #: replies by the API key a request carries (before path_defaults and default)
        self.key_defaults: dict[str, Reply] = {}
        self.errors: list[str] = []  # tracebacks of unexpected handler failures
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._requests: list[RecordedRequest] = []
        self._script: list[tuple[str | None, Reply]] = []
        self._serials = itertools.count(1)
        self._conn_serials = itertools.count(1)
        self._connections: dict[socket.socket, int] = {}
        self._threads: set[threading.Thread] = set()
        self._opened = 0
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.host, self.port = self._listener.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self._acceptor = threading.Thread(target=self._accept_loop,
                                          name=f"fakeupstream-{name}", daemon=True)
        self._acceptor.start()

    # -- scripting ----------------------------------------------------------
    def script(self, *replies: Reply, path: str | None = None) -> FakeUpstream:
        """Queue replies, consumed one per request (FIFO); ``path`` limits them to one path."""
        with self._lock:
            self._script.extend((path, r) for r in replies)
        return self

    @property
    def pending_replies(self) -> int:
        with self._lock:
            return len(self._script)

    def reset(self) -> None:
        """Forget requests and scripted replies; answer normally again."""
        with self._lock:
            self._requests.clear()
            self._script.clear()
            self.default = Reply.answer()
            self.path_defaults.clear()
            self.key_defaults.clear()

    # -- inspection -----------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until at least ``n`` requests arrived; AssertionError after ``timeout``."""
        return self._wait_until(lambda: len(self._requests) >= n, timeout,
                                lambda: f"expected {n} requests, got {len(self._requests)}")

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    @property
    def connections_opened(self) -> int:
        """How many TCP connections were accepted in total."""
        with self._lock:
            return self._opened

    def wait_for_open_connections(self, n: int, timeout: float = 5.0) -> None:
        """Wait until exactly ``n`` connections are open (e.g. 0 after a client gave up)."""
        self._wait_until(lambda: len(self._connections) == n, timeout,
                         lambda: f"expected {n} open connections, have {len(self._connections)}")

    def _wait_until(self, predicate: Callable[[], bool], timeout: float,
                    describe: Callable[[], str]) -> list[RecordedRequest]:
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise AssertionError(f"{self.name}: {describe()} within {timeout}s")
            return list(self._requests)

    # -- lifecycle ------------------------------------------------------------
    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop accepting, end held and idle connections, join every thread."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            # Wake the blocking accept() portably by connecting to ourselves.
            socket.create_connection((self.host, self.port), timeout=1).close()
        except OSError:
            pass
        self._acceptor.join(timeout)
        with self._lock:
            connections = list(self._connections)
            threads = list(self._threads)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _accept_loop(self) -> None:
        with self._listener:
            while not self._stopping.is_set():
                try:
                    conn, addr = self._listener.accept()
                except OSError:
                    if self._stopping.is_set():
                        return
                    continue
                if self._stopping.is_set():
                    conn.close()
                    return
                thread = threading.Thread(target=self._serve_connection, args=(conn, addr),
                                          name=f"fakeupstream-{self.name}-conn", daemon=True)
                with self._changed:
                    self._connections[conn] = next(self._conn_serials)
                    self._threads.add(thread)
                    self._opened += 1
                    self._changed.notify_all()
                thread.start()

    def _serve_connection(self, conn: socket.socket, addr: Any) -> None:
        try:
            _Handler(conn, addr, self)  # type: ignore[arg-type]  # serves until the connection ends
        except (_Gone, OSError):
            pass
        except Exception:  # noqa: BLE001 - surfaced to tests through self.errors
            with self._lock:
                self.errors.append(traceback.format_exc())
        finally:
            with self._changed:
                self._connections.pop(conn, None)
                self._threads.discard(threading.current_thread())
                self._changed.notify_all()
            conn.close()

    # -- used by the handler ------------------------------------------------
    def _connection_id(self, conn: socket.socket) -> int:
        with self._lock:
            return self._connections.get(conn, 0)

    def _take_reply(self, path: str, key: str | None = None) -> Reply:
        with self._lock:
            for index, (wanted, reply) in enumerate(self._script):
                if wanted is None or wanted == path:
                    del self._script[index]
                    return reply
            if key is not None and key in self.key_defaults:
                return self.key_defaults[key]
            return self.path_defaults.get(path, self.default)

    def _record(self, req: RecordedRequest) -> None:
        with self._changed:
            self._requests.append(req)
            self._changed.notify_all()

    def _next_serial(self) -> int:
        with self._lock:
            return next(self._serials)
