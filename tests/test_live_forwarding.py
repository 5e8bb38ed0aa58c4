"""Transparent forwarding, live (issue 2, acceptance 2-4; SPEC §3, §4.1).

A real ``python -m clipal`` on a loopback port forwards to FakeUpstream
servers. The official SDKs of each protocol drive it, streaming and not, and
raw HTTP checks what SDKs hide: paths and queries, hop-by-hop and
X-Forwarded-* headers, pass-through of status/headers/bytes, incremental
streaming (arrival times), gzip, big non-ASCII bodies, the body limit.

Most tests share one clipal (module scope) whose three clients all point at
one fake upstream, reset before every test, to keep the file fast.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import anthropic
import openai
import pytest
import requests
from google import genai
from google.genai import types as genai_types

from conftest import ClipalProcess, provider, write_config
from fakeupstream import FakeUpstream, RecordedRequest, Reply

#: The key the agents send. It must never reach an upstream.
CLIENT_KEY = "client-KEY-that-must-not-leak-7f3a"
#: Provider keys: an Anthropic API key (always x-api-key), and keys that follow the client's carrier.
CLAUDE_KEY = "sk-ant-api03-claude-provider-KEY-0001"
CODEX_KEY = "sk-codex-provider-KEY-0002"
GEMINI_KEY = "AIza-gemini-provider-KEY-0003"

MESSAGES = [{"role": "user", "content": "hi"}]


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream("U") as up:
        yield up


@pytest.fixture
def up(shared_upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    shared_upstream.reset()
    yield shared_upstream
    assert not shared_upstream.errors, "\n".join(shared_upstream.errors)


def _start(tmp_path_factory, upstream: FakeUpstream, name: str, settings: dict | None = None) -> ClipalProcess:
    config_dir = tmp_path_factory.mktemp(name) / "config"
    write_config(
        config_dir, settings=settings,
        claudecode=[provider("claude-p", upstream, key=CLAUDE_KEY)],
        # a base_url with a path and a trailing slash: joined with exactly one slash
        codex=[provider("codex-p", upstream.url + "/openai/", key=CODEX_KEY)],
        gemini=[provider("gemini-p", upstream, key=GEMINI_KEY)],
    )
    return ClipalProcess(config_dir).wait_healthy()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, shared_upstream) -> Iterator[ClipalProcess]:
    process = _start(tmp_path_factory, shared_upstream, "live")
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def small_proxy(tmp_path_factory, shared_upstream) -> Iterator[ClipalProcess]:
    """A clipal whose max_request_body_bytes is 1000."""
    process = _start(tmp_path_factory, shared_upstream, "small", {"max_request_body_bytes": 1000})
    yield process
    assert process.stop() == 0


@pytest.fixture(autouse=True)
def _no_sdk_environment(monkeypatch):
    for name in ("GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_API_KEY", "GEMINI_API_KEY", "OPENAI_BASE_URL",
                 "ANTHROPIC_BASE_URL", "ANTHROPIC_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)


# --- helpers -------------------------------------------------------------------------------


def only_request(up: FakeUpstream) -> RecordedRequest:
    (request,) = up.wait_for_requests(1)
    time.sleep(0.05)  # nothing else may follow (no retry, no second attempt)
    assert len(up.requests) == 1, [r.path for r in up.requests]
    return request


def assert_no_client_key(request: RecordedRequest) -> None:
    """The client's key appears nowhere: not in headers, path, query or body."""
    assert CLIENT_KEY not in str(request.headers)
    assert CLIENT_KEY not in request.path + "?" + request.query_string
    assert CLIENT_KEY.encode() not in request.body


def assert_key_on(request: RecordedRequest, carrier: str, key: str) -> None:
    """``key`` is on ``carrier`` and nowhere else; no other credential is present."""
    assert_no_client_key(request)
    headers = request.headers
    expected = {
        "authorization": [f"Bearer {key}"] if carrier == "authorization" else None,
        "x-api-key": [key] if carrier == "x-api-key" else None,
        "x-goog-api-key": [key] if carrier == "x-goog-api-key" else None,
    }
    for name, values in expected.items():
        assert headers.get_all(name) == values, (name, headers.get_all(name))
    if carrier == "query":
        assert request.query.get("key") == key
    else:
        assert "key" not in request.query and "api_key" not in request.query
    everything = str(headers) + request.query_string
    assert everything.count(key) == 1


def anthropic_client(proxy: ClipalProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url + "/claudecode", api_key=CLIENT_KEY, max_retries=0, timeout=10)


def openai_client(proxy: ClipalProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url + "/codex/v1", api_key=CLIENT_KEY, max_retries=0, timeout=10)


def gemini_client(proxy: ClipalProcess) -> genai.Client:
    return genai.Client(api_key=CLIENT_KEY, http_options=genai_types.HttpOptions(
        base_url=proxy.url + "/gemini", timeout=10_000))


# --- acceptance 2: the official SDKs ---------------------------------------------------------


def test_anthropic_sdk_message(proxy, up):
    message = anthropic_client(proxy).messages.create(model="claude-x", max_tokens=16, messages=MESSAGES)
    assert message.content[0].text == "hello from U"
    request = only_request(up)
    assert request.path == "/v1/messages"
    assert request.json()["messages"] == MESSAGES
    # the SDK sent its key as Bearer; an Anthropic API key must go to x-api-key
    assert_key_on(request, "x-api-key", CLAUDE_KEY)
    assert request.headers["anthropic-version"]


def test_anthropic_sdk_stream_helper(proxy, up):
    with anthropic_client(proxy).messages.stream(model="claude-x", max_tokens=16, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "hello from U"
    assert final.stop_reason == "end_turn"
    request = only_request(up)
    assert request.json()["stream"] is True
    assert_key_on(request, "x-api-key", CLAUDE_KEY)


def test_anthropic_sdk_raw_stream(proxy, up):
    events = list(anthropic_client(proxy).messages.create(model="claude-x", max_tokens=16, messages=MESSAGES,
                                                          stream=True))
    assert events[0].type == "message_start" and events[-1].type == "message_stop"
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == "hello from U"
    assert_key_on(only_request(up), "x-api-key", CLAUDE_KEY)


def test_anthropic_sdk_count_tokens(proxy, up):
    count = anthropic_client(proxy).messages.count_tokens(model="claude-x", messages=MESSAGES)
    assert count.input_tokens > 0
    request = only_request(up)
    assert request.path == "/v1/messages/count_tokens"
    assert_key_on(request, "x-api-key", CLAUDE_KEY)


def test_openai_sdk_chat_completion(proxy, up):
    completion = openai_client(proxy).chat.completions.create(model="gpt-x", messages=MESSAGES)
    assert completion.choices[0].message.content == "hello from U"
    request = only_request(up)
    assert request.path == "/openai/v1/chat/completions"  # base_url's path kept, one slash
    assert_key_on(request, "authorization", CODEX_KEY)


def test_openai_sdk_chat_completion_stream(proxy, up):
    stream = openai_client(proxy).chat.completions.create(model="gpt-x", messages=MESSAGES, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "hello from U"
    assert_key_on(only_request(up), "authorization", CODEX_KEY)


def test_openai_sdk_responses(proxy, up):
    response = openai_client(proxy).responses.create(model="gpt-x", input="hi")
    assert response.output_text == "hello from U"
    request = only_request(up)
    assert request.path == "/openai/v1/responses"
    assert_key_on(request, "authorization", CODEX_KEY)


def test_openai_sdk_responses_stream(proxy, up):
    events = list(openai_client(proxy).responses.create(model="gpt-x", input="hi", stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "hello from U"
    assert events[-1].type == "response.completed"
    assert_key_on(only_request(up), "authorization", CODEX_KEY)


def test_gemini_sdk_generate_content(proxy, up):
    client = gemini_client(proxy)  # keep a reference: the SDK closes its HTTP client when collected
    response = client.models.generate_content(model="gemini-x", contents="hi")
    assert response.text == "hello from U"
    request = only_request(up)
    assert request.path.endswith("/models/gemini-x:generateContent")
    assert_key_on(request, "x-goog-api-key", GEMINI_KEY)


def test_gemini_sdk_generate_content_stream(proxy, up):
    client = gemini_client(proxy)
    chunks = list(client.models.generate_content_stream(model="gemini-x", contents="hi"))
    assert "".join(c.text for c in chunks) == "hello from U"
    assert len(chunks) == 3  # one per word: it was streamed, not buffered into one answer
    request = only_request(up)
    assert request.path.endswith("/models/gemini-x:streamGenerateContent")
    assert request.query == {"alt": "sse"}
    assert_key_on(request, "x-goog-api-key", GEMINI_KEY)


def test_anthropic_sdk_with_a_non_anthropic_key_uses_the_clients_own_carrier(clipal, upstream_factory):
    # Claude Code sends Bearer; an OpenRouter-style key follows it to Authorization.
    a = upstream_factory("A")
    proxy = clipal(claudecode=[provider("router", a, key="sk-or-v1-router-KEY")])
    message = anthropic_client(proxy).messages.create(model="claude-x", max_tokens=16, messages=MESSAGES)
    assert message.content[0].text == "hello from A"
    assert_key_on(only_request(a), "authorization", "sk-or-v1-router-KEY")


def test_sdk_sees_clipals_own_error_for_a_client_without_providers(clipal, tmp_path):
    proxy = clipal(config_dir=tmp_path / "empty", healthy=True)
    with pytest.raises(openai.APIStatusError) as info:
        openai_client(proxy).chat.completions.create(model="gpt-x", messages=MESSAGES)
    assert info.value.status_code == 503
    assert "codex.yaml" in info.value.message


# --- raw HTTP: paths, queries, headers ------------------------------------------------------


def test_gemini_path_and_query_are_forwarded_and_the_query_key_replaced(proxy, up):
    r = requests.post(proxy.url + f"/gemini/v1beta/models/m:streamGenerateContent?alt=sse&key={CLIENT_KEY}",
                      json={"contents": [{"parts": [{"text": "hi"}]}]})
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers["X-Clipal-Provider"] == "gemini-p"
    assert r.text.count("data: ") == 3
    request = only_request(up)
    assert request.path == "/v1beta/models/m:streamGenerateContent"
    assert request.query_string.startswith("alt=sse&")
    assert_key_on(request, "query", GEMINI_KEY)


def test_percent_encoding_and_extra_slashes_in_the_path_are_kept(proxy, up):
    up.default = Reply.json(200, {"ok": True})
    r = requests.get(proxy.url + "/codex/v1/files/a%2Fb%20c/content?x=1%2B1&y=")
    assert r.status_code == 200
    request = only_request(up)
    assert request.path == "/openai/v1/files/a%2Fb%20c/content"
    assert request.query_string == "x=1%2B1&y="


def test_request_headers_hop_by_hop_dropped_end_to_end_kept_x_forwarded_set(proxy, up):
    body = json.dumps({"model": "m", "messages": MESSAGES}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.putrequest("POST", "/codex/v1/chat/completions", skip_accept_encoding=True)
        for name, value in [("Connection", "keep-alive, X-Private"), ("Keep-Alive", "timeout=5"),
                            ("X-Private", "hop"), ("TE", "trailers"), ("Proxy-Authorization", "Basic c2VjcmV0"),
                            ("Proxy-Connection", "keep-alive"), ("X-End-To-End", "kept"),
                            ("User-Agent", "codex-cli/9.9"), ("Accept-Encoding", "gzip"),
                            ("X-Forwarded-For", "203.0.113.7"), ("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))), ("Authorization", f"Bearer {CLIENT_KEY}")]:
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("X-Clipal-Provider") == "codex-p"
        response.read()
    finally:
        conn.close()
    request = only_request(up)
    headers = request.headers
    for gone in ("Keep-Alive", "X-Private", "TE", "Proxy-Authorization", "Proxy-Connection"):
        assert headers[gone] is None, gone
    assert "x-private" not in (headers["Connection"] or "").lower()
    assert headers["X-End-To-End"] == "kept"
    assert headers["User-Agent"] == "codex-cli/9.9"
    assert headers["Accept-Encoding"] == "gzip"
    assert headers["Host"] == f"127.0.0.1:{up.port}"
    assert headers["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Forwarded-Host"] == f"127.0.0.1:{proxy.port}"
    assert request.body == body
    assert_key_on(request, "authorization", CODEX_KEY)


def test_hop_by_hop_response_headers_are_not_passed_back(proxy, up):
    up.script(Reply.raw(200, b'{"ok":true}', {"Content-Type": "application/json", "Connection": "X-Up-Hop",
                                              "X-Up-Hop": "1", "Keep-Alive": "timeout=99", "X-Kept": "yes"}))
    r = requests.post(proxy.url + "/codex/v1/chat/completions", json={})
    assert r.status_code == 200 and r.content == b'{"ok":true}'
    assert "X-Up-Hop" not in r.headers
    assert r.headers.get("Keep-Alive") != "timeout=99"
    assert r.headers["X-Kept"] == "yes"


@pytest.mark.parametrize("path", ["/codexfoo", "/codexfoo/v1/chat/completions", "/claude/v1/messages",
                                  "/v1/messages", "/", "/geminix/v1beta/models/m:generateContent", "/healthz"])
def test_other_paths_are_404_and_never_reach_an_upstream(proxy, up, path):
    r = requests.post(proxy.url + path, json={})
    assert r.status_code == 404
    assert "X-Clipal-Provider" not in r.headers
    r.json()  # clipal's own error is JSON
    time.sleep(0.05)
    assert up.requests == []


def test_health(proxy, up):
    r = requests.get(proxy.url + "/health")
    assert r.status_code == 200
    assert r.json() == {"status": "healthy"}
    assert r.headers["Content-Type"].startswith("application/json")
    assert up.requests == []


@pytest.mark.parametrize("prefix, name", [("/claudecode/v1/messages", "claude-p"),
                                          ("/codex/v1/chat/completions", "codex-p"),
                                          ("/gemini/v1beta/models/m:generateContent", "gemini-p")])
def test_every_proxied_response_names_its_provider(proxy, up, prefix, name):
    body = {"model": "m", "messages": MESSAGES, "contents": [{"parts": [{"text": "hi"}]}]}
    plain = requests.post(proxy.url + prefix, json=body)
    streamed = requests.post(proxy.url + prefix + ("?alt=sse" if "gemini" in prefix else ""),
                             json={**body, "stream": True}, stream=True)
    streamed_text = streamed.raw.read()
    up.script(Reply.json(404, {"error": "no such model"}))
    failed = requests.post(proxy.url + prefix, json=body)
    assert (plain.status_code, streamed.status_code, failed.status_code) == (200, 200, 404)
    assert b"data: " in streamed_text or "gemini" in prefix
    for r in (plain, streamed, failed):
        assert r.headers["X-Clipal-Provider"] == name


@pytest.mark.parametrize("status", [400, 404, 422])
def test_upstream_client_errors_pass_through_unchanged(proxy, up, status):
    body = b'{"error":{"message":"model \xc3\xa9 not found","type":"invalid_request_error","code":"x"}}'
    up.script(Reply.raw(status, body, {"Content-Type": "application/json; charset=utf-8", "X-Request-Id": "req-77",
                                       "Cache-Control": "no-store"}))
    r = requests.post(proxy.url + "/codex/v1/chat/completions", json={"model": "m"}, stream=True)
    raw = r.raw.read(decode_content=False)
    assert r.status_code == status
    assert raw == body
    assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    assert r.headers["X-Request-Id"] == "req-77"
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["Content-Length"] == str(len(body))
    assert r.headers["X-Clipal-Provider"] == "codex-p"
    assert len(up.requests) == 1  # returned as is: no failover, no retry


def test_a_response_with_content_length_keeps_it(proxy, up):
    body = json.dumps({"text": "ok " * 1000}).encode()
    up.script(Reply.raw(200, body, {"Content-Type": "application/json"}, framing="length"))
    r = requests.post(proxy.url + "/codex/v1/chat/completions", json={})
    assert r.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in r.headers
    assert r.content == body


def test_a_204_has_no_body_and_the_connection_stays_usable(proxy, up):
    up.script(Reply.raw(204, b"", {"X-Empty": "yes"}, framing="close"))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("DELETE", "/codex/v1/files/f1")
        first = conn.getresponse()
        assert first.status == 204
        assert first.read() == b""
        assert first.getheader("X-Empty") == "yes"
        assert first.getheader("X-Clipal-Provider") == "codex-p"
        # a stray body or chunk terminator after the 204 would corrupt the next response
        conn.request("POST", "/codex/v1/chat/completions", body=b"{}", headers={"Content-Type": "application/json"})
        second = conn.getresponse()
        assert second.status == 200
        assert b"hello from U" in second.read()
    finally:
        conn.close()
    assert [r.method for r in up.requests] == ["DELETE", "POST"]


class _HeadUpstream(BaseHTTPRequestHandler):
    """An upstream that answers HEAD (FakeUpstream does not): headers announcing a body, no body."""

    protocol_version = "HTTP/1.1"
    body = b'{"id":"file-1","bytes":1234}'

    def _headers(self) -> None:
        self.server.seen.append((self.command, self.path))  # type: ignore[attr-defined]
        self.close_connection = True  # one request per connection: the thread ends with it
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("X-Head", "yes")
        self.send_header("Connection", "close")
        self.end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._headers()

    def do_GET(self) -> None:  # noqa: N802
        self._headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def head_upstream() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HeadUpstream)
    server.daemon_threads = True
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_head_passes_headers_and_no_body(clipal, head_upstream):
    url = "http://127.0.0.1:%d" % head_upstream.server_address[1]
    proxy = clipal(codex=[provider("H", url)])
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("HEAD", "/codex/v1/files/file-1")
        head = conn.getresponse()
        assert head.status == 200
        assert head.read() == b""
        assert head.getheader("Content-Length") == str(len(_HeadUpstream.body))
        assert head.getheader("X-Head") == "yes"
        assert head.getheader("X-Clipal-Provider") == "H"
        conn.request("GET", "/codex/v1/files/file-1")  # same connection: nothing stray after the HEAD
        get = conn.getresponse()
        assert get.status == 200
        assert get.read() == _HeadUpstream.body
    finally:
        conn.close()
    assert head_upstream.seen == [("HEAD", "/v1/files/file-1"), ("GET", "/v1/files/file-1")]


# --- acceptance 3: streaming is incremental ------------------------------------------------------


def timed_response(port: int, path: str, body: bytes) -> tuple[float, list[tuple[float, bytes]]]:
    """Send one request on a raw socket; return the send time and every recv with its time."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    arrivals: list[tuple[float, bytes]] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.monotonic()
        sock.sendall(head + body)
        while True:
            data = sock.recv(65536)
            if not data:
                break
            arrivals.append((time.monotonic(), data))
    return start, arrivals


def arrival_of(marker: bytes, start: float, arrivals: list[tuple[float, bytes]]) -> float:
    received = b""
    for moment, data in arrivals:
        received += data
        if marker in received:
            return moment - start
    raise AssertionError(f"{marker!r} never arrived: {received!r}")


PACED = [
    pytest.param("/codex/v1/chat/completions", Reply.sse([{"n": 0}, {"n": 1}, {"n": 2}], delay=0.4),
                 [b'{"n":0}', b'{"n":1}', b'{"n":2}'], id="sse-chunked"),
    pytest.param("/codex/v1/chat/completions", Reply.sse([{"n": 0}, {"n": 1}, {"n": 2}], delay=0.4, framing="close"),
                 [b'{"n":0}', b'{"n":1}', b'{"n":2}'], id="sse-close-delimited"),
    pytest.param("/gemini/v1beta/models/m:streamGenerateContent", Reply.answer("alpha beta gamma", delay=0.4),
                 [b'"alpha"', b'" beta"', b'" gamma"'], id="json-array-chunked"),
    pytest.param("/gemini/v1beta/models/m:streamGenerateContent",
                 Reply.answer("alpha beta gamma", delay=0.4, framing="close"),
                 [b'"alpha"', b'" beta"', b'" gamma"'], id="json-array-close-delimited"),
]


@pytest.mark.parametrize("path, reply, markers", PACED)
def test_stream_events_arrive_as_the_upstream_sends_them(proxy, up, path, reply, markers):
    up.script(reply)
    start, arrivals = timed_response(proxy.port, path, b'{"model":"m","stream":true}')
    head = b"".join(data for _, data in arrivals).split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"X-Clipal-Provider:" in head
    times = [arrival_of(marker, start, arrivals) for marker in markers]
    assert times[0] < 0.3, times  # the first event is not held back
    for earlier, later in zip(times, times[1:]):
        assert 0.25 < later - earlier < 0.7, times
    request = only_request(up)
    assert request.time - start < 0.3


# --- acceptance 4: bytes exactly, body limit --------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_gzip_response_arrives_byte_identical_with_its_encoding(proxy, up, framing):
    plain = json.dumps({"id": "x", "text": "héllo wörld 你好 " * 500}, ensure_ascii=False).encode()
    compressed = gzip.compress(plain, mtime=0)
    up.script(Reply.raw(200, compressed, {"Content-Type": "application/json", "Content-Encoding": "gzip"},
                        framing=framing))
    r = requests.post(proxy.url + "/codex/v1/chat/completions", json={}, stream=True,
                      headers={"Accept-Encoding": "gzip"})
    raw = r.raw.read(decode_content=False)
    assert r.status_code == 200
    assert raw == compressed
    assert r.headers["Content-Encoding"] == "gzip"
    if framing == "length":
        assert r.headers["Content-Length"] == str(len(compressed))
    else:
        assert "Content-Length" not in r.headers
    assert gzip.decompress(raw) == plain
    assert only_request(up).headers["Accept-Encoding"] == "gzip"


def big_utf8_body(size: int) -> bytes:
    text = "héllo wörld — 你好，世界 🌍🚀 ünïcödé ✓ "
    reps = size // len(text.encode()) + 1
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text * reps}]},
                      ensure_ascii=False).encode("utf-8")
    assert len(body) >= size and body != body.decode("utf-8").encode("ascii", "ignore")
    return body


def test_a_1mb_non_ascii_body_arrives_upstream_byte_identical(proxy, up):
    body = big_utf8_body(1024 * 1024)
    r = requests.post(proxy.url + "/claudecode/v1/messages", data=body,
                      headers={"Content-Type": "application/json; charset=utf-8", "x-api-key": CLIENT_KEY})
    assert r.status_code == 200
    request = only_request(up)
    assert request.body == body
    assert request.headers["Content-Length"] == str(len(body))
    assert request.headers["Content-Type"] == "application/json; charset=utf-8"


@pytest.mark.parametrize("prefix, check_shape", [
    ("/claudecode/v1/messages",
     lambda j: j["type"] == "error" and j["error"]["type"] == "request_too_large" and j["error"]["message"]),
    ("/codex/v1/chat/completions",
     lambda j: set(j["error"]) >= {"message", "type", "code"} and j["error"]["message"]),
    ("/gemini/v1beta/models/m:generateContent",
     lambda j: j["error"]["code"] == 413 and j["error"]["message"] and j["error"]["status"]),
])
def test_an_over_limit_body_gets_413_in_the_clients_shape_and_the_upstream_sees_nothing(
        small_proxy, up, prefix, check_shape):
    r = requests.post(small_proxy.url + prefix, data=b"x" * 1001, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.headers["Content-Type"].startswith("application/json")
    assert check_shape(r.json()), r.text
    time.sleep(0.1)
    assert up.requests == []


def test_a_body_exactly_at_the_limit_is_forwarded(small_proxy, up):
    body = b'{"model":"m","pad":"' + b"p" * (1000 - 22) + b'"}'
    assert len(body) == 1000
    r = requests.post(small_proxy.url + "/codex/v1/chat/completions", data=body,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    assert only_request(up).body == body


def test_a_chunked_request_body_is_forwarded_intact(proxy, up):
    pieces = ['{"model":"m","messages":[{"role":"user","content":"', "chunked ✓ 你好 " * 50, '"}]}']
    encoded = [p.encode() for p in pieces]
    r = requests.post(proxy.url + "/codex/v1/chat/completions", data=iter(encoded),
                      headers={"Content-Type": "application/json"})
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert r.status_code == 200
    request = only_request(up)
    assert request.body == b"".join(encoded)


def test_an_over_limit_chunked_body_gets_413_and_the_upstream_sees_nothing(small_proxy, up):
    pieces = [b"y" * 400] * 3
    r = requests.post(small_proxy.url + "/codex/v1/chat/completions", data=iter(pieces),
                      headers={"Content-Type": "application/json"})
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert r.status_code == 413
    assert r.json()["error"]["message"]
    time.sleep(0.1)
    assert up.requests == []


def test_a_chunked_body_under_the_small_limit_is_forwarded(small_proxy, up):
    pieces = [b'{"a":"', b"z" * 900, b'"}']
    r = requests.post(small_proxy.url + "/codex/v1/chat/completions", data=iter(pieces),
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 200
    assert only_request(up).body == b"".join(pieces)


def test_repeated_headers_a_redirect_and_its_location_pass_through(proxy, up):
    up.script(Reply(status=302, headers=(("Location", "https://elsewhere.example.com/v1/x"), ("Set-Cookie", "a=1"),
                                         ("Set-Cookie", "b=2"), ("X-Multi", "one"), ("X-Multi", "two")),
                    body=b"moved", framing="length"))
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("GET", "/codex/v1/models")
        response = conn.getresponse()
        assert response.status == 302  # not followed: the client decides
        assert response.read() == b"moved"
        assert response.getheader("Location") == "https://elsewhere.example.com/v1/x"
        assert response.msg.get_all("Set-Cookie") == ["a=1", "b=2"]
        assert response.msg.get_all("X-Multi") == ["one", "two"]
    finally:
        conn.close()
    assert len(up.requests) == 1


@pytest.mark.parametrize("framing", ["length", "chunked", "close"])
def test_a_large_response_arrives_complete_and_byte_identical(proxy, up, framing):
    body = bytes(range(256)) * (4 * 4096)  # 4 MiB, every byte value
    up.script(Reply.raw(200, body, {"Content-Type": "application/octet-stream"}, framing=framing))
    r = requests.get(proxy.url + "/codex/v1/files/big/content", stream=True)
    assert r.status_code == 200
    assert r.raw.read(decode_content=False) == body


def test_expect_100_continue_body_is_forwarded(proxy, up):
    body = json.dumps({"model": "m", "pad": "x" * 5000}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.putrequest("POST", "/codex/v1/chat/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        conn.sock.settimeout(5)
        interim = conn.sock.recv(100)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        conn.send(body)
        response = conn.getresponse()
        assert response.status == 200
        response.read()
    finally:
        conn.close()
    assert only_request(up).body == body
