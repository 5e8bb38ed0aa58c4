"""Live failover (SPEC §4.2-§4.4, §4.6; issue 3 acceptance 2 and 5).

A real clipal process in front of two or three FakeUpstreams; every test
drives it over HTTP the way an agent does and checks what the agent gets
back and which upstreams saw what.
"""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import free_port, provider
from fakeupstream import Reply, anthropic_error_body

TIMEOUT = 10

# One ordinary request per client kind, and how each kind's upstream says "error".
REQUESTS = {
    "claudecode": ("/claudecode/v1/messages",
                   {"model": "claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}),
    "codex": ("/codex/v1/chat/completions", {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}),
    "gemini": ("/gemini/v1beta/models/gemini-test:generateContent", {"contents": [{"parts": [{"text": "hi"}]}]}),
}
ERRORS = {"claudecode": Reply.anthropic_error, "codex": Reply.openai_error, "gemini": Reply.gemini_error}


def call(proxy, client: str, **kwargs) -> requests.Response:
    path, body = REQUESTS[client]
    return requests.post(proxy.url + path, json=body, timeout=TIMEOUT, **kwargs)


def assert_answered_by(response: requests.Response, name: str) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["X-Clipal-Provider"] == name
    assert f"hello from {name}" in response.text


def error_message(client: str, response: requests.Response) -> str:
    """The message of an error in the client's own shape (SPEC §3); fails on any other shape."""
    body = response.json()
    if client == "claudecode":
        assert body["type"] == "error" and isinstance(body["error"]["type"], str)
    elif client == "codex":
        assert isinstance(body["error"]["type"], str) and "code" in body["error"]
    else:
        assert body["error"]["code"] == response.status_code and isinstance(body["error"]["status"], str)
    return body["error"]["message"]


# --------------------------------------------------------------------------- failing over (§4.3)


@pytest.mark.parametrize("status,client", [
    (500, "codex"), (502, "gemini"), (503, "claudecode"), (504, "codex"), (529, "claudecode"), (408, "gemini"),
])
def test_fails_over_to_the_next_provider_on_a_failing_status(clipal, upstream_factory, status, client):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(ERRORS[client](status))
    proxy = clipal(**{client: [provider("A", a), provider("B", b)]})

    assert_answered_by(call(proxy, client), "B")
    assert len(a.requests) == 1 and len(b.requests) == 1
    proxy.wait_for_output("provider A failed")


def test_fails_over_when_the_provider_refuses_the_connection(clipal, upstream_factory):
    b = upstream_factory("B")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proxy = clipal(codex=[provider("A", closed), provider("B", b)])

    assert_answered_by(call(proxy, "codex"), "B")
    assert "connection failed" in proxy.wait_for_output("provider A failed")


def test_after_a_failover_later_requests_go_straight_to_the_new_provider(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.openai_error(503))  # one failure, then A would answer again
    proxy = clipal(codex=[provider("A", a), provider("B", b)])

    for _ in range(4):
        assert_answered_by(call(proxy, "codex"), "B")
    assert len(a.requests) == 1  # never asked again: B stays current (its prompt cache too)
    assert len(b.requests) == 4


def test_a_third_provider_is_reached_when_the_first_two_fail(clipal, upstream_factory):
    a, b, c = upstream_factory("A"), upstream_factory("B"), upstream_factory("C")
    a.script(Reply.anthropic_error(529))
    b.script(Reply.anthropic_error(500))
    proxy = clipal(claudecode=[provider("C", c, priority=2), provider("A", a), provider("B", b)])

    assert_answered_by(call(proxy, "claudecode"), "C")
    assert [len(u.requests) for u in (a, b, c)] == [1, 1, 1]


# --------------------------------------------------------------------------- deactivation


DEACTIVATING = {
    "401": ("claudecode", lambda: Reply.anthropic_error(401)),
    "402": ("claudecode", lambda: Reply.anthropic_error(402)),
    "403": ("gemini", lambda: Reply.gemini_error(403)),
    "quota-429": ("codex", lambda: Reply.openai_error(429, "You exceeded your current quota",
                                                    code="insufficient_quota")),
}


@pytest.mark.parametrize("case", list(DEACTIVATING))
def test_auth_billing_and_quota_errors_deactivate_until_reactivate_after(clipal, upstream_factory, case):
    client, failure = DEACTIVATING[case]
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(failure())
    proxy = clipal(settings={"reactivate_after": "1s"}, **{client: [provider("A", a), provider("B", b)]})

    assert_answered_by(call(proxy, client), "B")
    deactivated_at = time.monotonic()
    assert "provider A deactivated for 1s" in proxy.wait_for_output("deactivated")

    # B fails once: the walk would go on to A, but A is out, so the agent gets clipal's 503.
    b.script(ERRORS[client](503))
    r = call(proxy, client)
    assert time.monotonic() - deactivated_at < 0.9, "too slow to observe the deactivation window"
    assert r.status_code == 503
    assert "X-Clipal-Provider" not in r.headers
    assert len(a.requests) == 1

    # Once reactivate_after has passed, A is used again.
    time.sleep(max(0.0, deactivated_at + 1.1 - time.monotonic()))
    assert_answered_by(call(proxy, client), "A")
    assert len(a.requests) == 2
    proxy.wait_for_output("provider A reactivated")


@pytest.mark.parametrize("client", ["claudecode", "codex", "gemini"])
def test_rate_limit_429_without_hint_does_not_deactivate(clipal, upstream_factory, client):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(ERRORS[client](429))  # a plain rate limit in the client's own shape, no hint
    proxy = clipal(**{client: [provider("A", a), provider("B", b)]})

    assert_answered_by(call(proxy, client), "B")
    # Sticky: the next request stays on B; A is not asked while B works.
    assert_answered_by(call(proxy, client), "B")
    assert len(a.requests) == 1
    # When B fails, the walk reaches A, which was never taken out of service.
    b.script(ERRORS[client](503))
    assert_answered_by(call(proxy, client), "A")
    assert "deactivated" not in proxy.output()


def test_reactivate_after_zero_keeps_failing_over_but_never_deactivates(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.anthropic_error(401))
    proxy = clipal(settings={"reactivate_after": 0}, claudecode=[provider("A", a), provider("B", b)])

    assert_answered_by(call(proxy, "claudecode"), "B")
    b.script(Reply.anthropic_error(503))
    assert_answered_by(call(proxy, "claudecode"), "A")
    assert "deactivated" not in proxy.output()


def test_all_providers_deactivated_answer_503_until_the_first_comes_back(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.default = Reply.openai_error(401)
    b.default = Reply.openai_error(429, code="insufficient_quota")
    proxy = clipal(codex=[provider("A", a), provider("B", b)])  # reactivate_after: 1h (default)

    for attempt in range(2):
        r = call(proxy, "codex")
        assert r.status_code == 503
        assert r.headers["Retry-After"] == "60"  # capped; the message says the real wait
        assert re.search(r"retry in (1h|59m\d+s)$", error_message("codex", r))
    assert len(a.requests) == 1 and len(b.requests) == 1  # the second request contacted nobody


# --------------------------------------------------------------------------- cooldowns


COOLING = {
    "retry-after": ("claudecode", lambda: Reply.anthropic_error(429, retry_after=1), 1.0),
    "x-ratelimit-reset-requests": (
        "codex", lambda: Reply.openai_error(429, headers={"X-RateLimit-Reset-Requests": "1500ms"}), 1.5),
    "retry-after-on-529": ("claudecode", lambda: Reply.anthropic_error(529, retry_after=1), 1.0),
    "gemini-retry-delay": ("gemini", lambda: Reply.gemini_error(429, retry_delay="2s"), 2.0),
}


@pytest.mark.parametrize("case", list(COOLING))
def test_a_hinted_wait_cools_the_provider_down_for_that_long(clipal, upstream_factory, case):
    client, failure, seconds = COOLING[case]
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(failure())
    proxy = clipal(**{client: [provider("A", a), provider("B", b)]})

    started = time.monotonic()
    assert_answered_by(call(proxy, client), "B")
    proxy.wait_for_output("cooling down for")

    # During the cooldown the walk skips A even when B fails.
    b.script(ERRORS[client](503))
    r = call(proxy, client)
    assert time.monotonic() - started < seconds - 0.3, "too slow to observe the cooldown window"
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert len(a.requests) == 1

    # After it, A is tried again (and answers).
    time.sleep(max(0.0, started + seconds + 0.15 - time.monotonic()))
    assert_answered_by(call(proxy, client), "A")


@pytest.mark.parametrize("client", ["claudecode", "codex", "gemini"])
def test_all_providers_cooling_answer_429_with_retry_after_in_the_clients_shape(clipal, upstream_factory,
                                                                                 client):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.default = ERRORS[client](429, retry_after=30)  # rate limited for 30 s
    b.default = ERRORS[client](529, retry_after=20)  # overloaded for 20 s: recovers first
    proxy = clipal(**{client: [provider("A", a), provider("B", b)]})

    r = call(proxy, client)
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) in (20, 21)
    assert "clipal" in error_message(client, r)

    # Nothing is left, so the next request is answered at once without contacting anyone.
    r = call(proxy, client)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) in (20, 21)
    assert len(a.requests) == 1 and len(b.requests) == 1


def test_all_rate_limited_answers_429(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.default = Reply.openai_error(429, retry_after=30)
    b.default = Reply.openai_error(429, headers={"X-RateLimit-Reset-Tokens": "12s"})
    proxy = clipal(codex=[provider("A", a), provider("B", b)])

    r = call(proxy, "codex")
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) in (12, 13)
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert "clipal" in r.json()["error"]["message"]


def test_all_failed_without_hints_answers_503_retry_after_1_and_the_retry_works(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.openai_error(500))
    b.script(Reply.openai_error(502))
    proxy = clipal(codex=[provider("A", a), provider("B", b)])

    r = call(proxy, "codex")
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "1"
    assert r.headers["Content-Type"].startswith("application/json")
    assert "clipal" in error_message("codex", r)
    proxy.wait_for_output("all providers failed")

    # Nothing was benched: the agent's retry is served (by A, where the walk wrapped to).
    assert_answered_by(call(proxy, "codex"), "A")


# --------------------------------------------------------------------------- returned as is


@pytest.mark.parametrize("status", [400, 404, 422])
def test_a_client_error_is_returned_untouched_without_failover(clipal, upstream_factory, status):
    a, b = upstream_factory("A"), upstream_factory("B")
    body = b'{"error": {"message": "messages: field required", "type": "invalid_request_error"}}\n'
    a.script(Reply.raw(status, body, {"Content-Type": "application/json", "X-Request-Id": "req-123"}))
    proxy = clipal(codex=[provider("A", a), provider("B", b)])

    r = call(proxy, "codex")
    assert r.status_code == status
    assert r.content == body
    assert r.headers["X-Request-Id"] == "req-123"
    assert r.headers["X-Clipal-Provider"] == "A"
    assert b.requests == []
    # A stays current: the next request goes to A again.
    assert_answered_by(call(proxy, "codex"), "A")


# --------------------------------------------------------------------------- the body


@pytest.mark.parametrize("framing", ["content-length", "chunked", "gzip"])
def test_a_retried_body_is_byte_identical_on_every_provider(clipal, upstream_factory, framing):
    a, b, c = upstream_factory("A"), upstream_factory("B"), upstream_factory("C")
    a.script(Reply.openai_error(503))
    b.script(Reply.drop())
    # Odd spacing, escapes, raw UTF-8, a large tail: nothing may be re-encoded.
    body = (b'{"model" :"m",\n\t"messages":[{"role":"user","content":"h\\u00e9llo \xc3\xa9\xf0\x9f\x98\x80"}],'
            b' "pad": "' + b"x" * 300_000 + b'", "n": 1.0e0 }')
    headers = {"Content-Type": "application/json; charset=utf-8"}
    data = body
    if framing == "chunked":
        data = iter([body[:1000], body[1000:200_000], body[200_000:]])
    elif framing == "gzip":  # a compressed request body (agents may compress theirs) stays compressed
        body = data = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    proxy = clipal(codex=[provider("A", a), provider("B", b), provider("C", c)])

    r = requests.post(proxy.url + "/codex/v1/chat/completions", data=data, headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "C"
    for upstream in (a, b, c):
        assert upstream.requests[0].body == body
        assert upstream.requests[0].headers["Content-Encoding"] == headers.get("Content-Encoding")


# --------------------------------------------------------------------------- SSE error events


STREAMS = {
    "claudecode": ("/claudecode/v1/messages", dict(REQUESTS["claudecode"][1], stream=True)),
    "codex": ("/codex/v1/chat/completions", dict(REQUESTS["codex"][1], stream=True)),
    "gemini": ("/gemini/v1beta/models/gemini-test:streamGenerateContent?alt=sse", REQUESTS["gemini"][1]),
}
FIRST_EVENT_ERRORS = {
    "claudecode": ("error", anthropic_error_body("overloaded_error", "Overloaded")),
    "codex": {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}},
    "gemini": {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}},
}


@pytest.mark.parametrize("client", list(STREAMS))
def test_an_sse_stream_whose_first_event_is_an_error_fails_over(clipal, upstream_factory, client):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.sse([FIRST_EVENT_ERRORS[client]]))
    proxy = clipal(**{client: [provider("A", a), provider("B", b)]})
    path, payload = STREAMS[client]

    r = requests.post(proxy.url + path, json=payload, timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["X-Clipal-Provider"] == "B"
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert "error" not in r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    if client == "claudecode":
        text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
        assert events[-1] == {"type": "message_stop"}
    elif client == "codex":
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        text = "".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in events)
        assert events[-1]["candidates"][0]["finishReason"] == "STOP"
    assert text == "hello from B"
    assert len(a.requests) == 1
    assert "SSE error event" in proxy.wait_for_output("provider A failed")


def test_an_sse_stream_whose_first_event_is_a_request_error_is_returned_as_is(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    error = anthropic_error_body("invalid_request_error", "max_tokens: too large")
    a.script(Reply.sse([("error", error)]))
    proxy = clipal(claudecode=[provider("A", a), provider("B", b)])
    path, payload = STREAMS["claudecode"]

    r = requests.post(proxy.url + path, json=payload, timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "A"
    assert r.text == "event: error\ndata: " + json.dumps(error, separators=(",", ":")) + "\n\n"
    assert b.requests == []


# --------------------------------------------------------------------------- count_tokens (§4.6)


# Claude Code adds ?beta=true; the query must not hide that this is count_tokens.
COUNT = ("/claudecode/v1/messages/count_tokens?beta=true",
         {"model": "claude-test", "messages": [{"role": "user", "content": "hi"}]})


def count_tokens(proxy) -> requests.Response:
    return requests.post(proxy.url + COUNT[0], json=COUNT[1], timeout=TIMEOUT)


def test_isolated_count_tokens_failures_leave_the_conversation_on_its_provider(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.anthropic_error(529), path="/v1/messages/count_tokens")
    proxy = clipal(settings={"ignore_count_tokens_failover": True},
                   claudecode=[provider("A", a), provider("B", b)])

    r = count_tokens(proxy)
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "B"
    assert "input_tokens" in r.json()
    for _ in range(2):
        assert_answered_by(call(proxy, "claudecode"), "A")  # the conversation stays on A
        assert count_tokens(proxy).headers["X-Clipal-Provider"] == "B"  # count_tokens stays on B
    assert [r.path for r in a.requests] == ["/v1/messages/count_tokens", "/v1/messages", "/v1/messages"]


def test_isolated_count_tokens_auth_errors_still_deactivate_for_the_conversation(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.anthropic_error(401), path="/v1/messages/count_tokens")
    proxy = clipal(settings={"ignore_count_tokens_failover": True},
                   claudecode=[provider("A", a), provider("B", b)])

    assert count_tokens(proxy).headers["X-Clipal-Provider"] == "B"
    assert_answered_by(call(proxy, "claudecode"), "B")
    assert len(a.requests) == 1


def test_without_isolation_count_tokens_failures_move_the_conversation_too(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.anthropic_error(529), path="/v1/messages/count_tokens")
    proxy = clipal(settings={"ignore_count_tokens_failover": False},
                   claudecode=[provider("A", a), provider("B", b)])

    assert count_tokens(proxy).headers["X-Clipal-Provider"] == "B"
    assert_answered_by(call(proxy, "claudecode"), "B")
    assert len(a.requests) == 1


# --------------------------------------------------------------------------- many at once (acceptance 5)


def test_fifty_concurrent_streams_all_complete_from_the_second_provider(clipal, upstream_factory):
    text = " ".join(f"word{i}" for i in range(30))
    a, b = upstream_factory("A"), upstream_factory("B", answer_text=text)
    a.default = Reply.openai_error(503).headers_after(0.3)  # slow to fail: the requests pile up on A
    b.default = Reply.answer(delay=0.01)
    proxy = clipal(codex=[provider("A", a), provider("B", b)])
    path, payload = REQUESTS["codex"]
    start = threading.Barrier(50, timeout=10)

    def stream(n: int) -> tuple[int, str, str, bool]:
        start.wait()
        with requests.post(proxy.url + path, json=dict(payload, stream=True, user=f"u{n}"), stream=True,
                           timeout=30) as r:
            pieces, done = [], False
            for line in r.iter_lines():
                if line == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data: "):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    pieces.append(delta.get("content") or "")
            return r.status_code, r.headers.get("X-Clipal-Provider", ""), "".join(pieces), done

    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(pool.map(stream, range(50)))

    assert results == [(200, "B", text, True)] * 50
    assert len(a.requests) >= 10, len(a.requests)  # many of them failed over at the same time
    assert len(b.requests) == 50
    assert sorted(r.json()["user"] for r in b.requests) == sorted(f"u{n}" for n in range(50))
