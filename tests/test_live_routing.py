"""Live routing: several keys per provider, the circuit breaker, manual mode, completion, reloads.

A real clipal in front of fake upstreams that answer per key
(``FakeUpstream.key_defaults``). Each test checks what the agent gets and
which provider and key the upstreams saw, and what the log says.
"""

from __future__ import annotations

import json
import re
import socket
import time

import openai
import pytest
import requests

from conftest import provider, write_yaml
from fakeupstream import Reply, sse_event

MESSAGES = "/claudecode/v1/messages"
PAYLOAD = {"model": "claude-test", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
KEYS = [f"sk-test-key{i}-0123456789abcdef" for i in (1, 2, 3)]


def keyed(name: str, upstream, keys=KEYS, **extra) -> dict:
    entry = provider(name, upstream, **extra)
    del entry["api_key"]
    return {**entry, "api_keys": list(keys)}


def post(proxy, path: str = MESSAGES, **kwargs) -> requests.Response:
    return requests.post(proxy.url + path, json=kwargs.pop("json", PAYLOAD), timeout=15, **kwargs)


def keys_seen(upstream) -> list[str]:
    return [r.api_key for r in upstream.requests]


# --------------------------------------------------------------------------- keys


def test_a_401_on_key_1_is_answered_by_key_2_and_key_1_stays_out_until_reactivate_after(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.key_defaults[KEYS[0]] = Reply.anthropic_error(401)
    proxy = clipal(settings={"reactivate_after": "2s"}, claudecode=[keyed("A", a), provider("B", b)])

    r = post(proxy)
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "A"
    assert keys_seen(a) == [KEYS[0], KEYS[1]] and b.requests == []
    assert "provider A (key 1 of 3) deactivated for 2s" in proxy.wait_for_output("deactivated")
    assert KEYS[0] not in proxy.output()

    for _ in range(3):
        assert post(proxy).headers["X-Clipal-Provider"] == "A"
    assert keys_seen(a)[2:] == [KEYS[1]] * 3  # the key that last succeeded, and never key 1
    time.sleep(2.2)
    a.key_defaults.clear()
    a.key_defaults[KEYS[1]] = Reply.anthropic_error(429, type="rate_limit_error", retry_after=30)
    assert post(proxy).headers["X-Clipal-Provider"] == "A"
    assert keys_seen(a)[-2:] == [KEYS[1], KEYS[2]]
    assert "provider A (key 1 of 3) reactivated" in proxy.output()


def test_a_503_goes_straight_to_the_next_provider_not_the_next_key(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.key_defaults[KEYS[0]] = Reply.anthropic_error(503)
    proxy = clipal(claudecode=[keyed("A", a), provider("B", b)])
    r = post(proxy)
    assert r.headers["X-Clipal-Provider"] == "B"
    assert keys_seen(a) == [KEYS[0]]


def test_all_keys_out_put_the_provider_out(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    for key in KEYS[:2]:
        a.key_defaults[key] = Reply.openai_error(429, code="insufficient_quota")
    proxy = clipal(codex=[keyed("A", a, keys=KEYS[:2]), provider("B", b)])
    r = post(proxy, "/codex/v1/responses", json={"model": "m", "input": "hi"})
    assert r.headers["X-Clipal-Provider"] == "B"
    assert keys_seen(a) == KEYS[:2]
    post(proxy, "/codex/v1/responses", json={"model": "m", "input": "hi"})
    assert len(a.requests) == 2  # A is out as a whole


# --------------------------------------------------------------------------- the circuit breaker


def test_an_open_breaker_skips_the_provider_while_another_is_available_and_uses_it_when_alone(
        clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.default = Reply.anthropic_error(503)
    proxy = clipal(settings={"circuit_breaker": {"failure_threshold": 2, "open_timeout": "30s"}},
                   claudecode=[provider("A", a), provider("B", b)])
    assert post(proxy).headers["X-Clipal-Provider"] == "B"  # A fails (1), B answers and becomes current
    b.script(Reply.anthropic_error(503))
    assert post(proxy).status_code == 503  # B fails once, then A a second time: A's breaker opens
    a_before = len(a.requests)
    assert "circuit opened" in proxy.wait_for_output("circuit opened")
    for _ in range(3):
        assert post(proxy).headers["X-Clipal-Provider"] == "B"
    assert len(a.requests) == a_before  # skipped while B serves

    b.default = Reply.anthropic_error(503)  # now B is down too: A is the last resort, never refused
    a.default = Reply.answer()
    r = post(proxy)
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "A"


def test_stalls_after_the_commit_point_and_incomplete_streams_count_for_the_breaker(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    incomplete = Reply.sse([("message_start", {"type": "message_start"}),
                            ("content_block_delta", {"type": "content_block_delta"})])  # no message_stop
    a.script(incomplete, Reply.answer(delay=0.05).stall_after(2))
    proxy = clipal(settings={"upstream_idle_timeout": "1s",
                             "circuit_breaker": {"failure_threshold": 2, "open_timeout": "30s"}},
                   claudecode=[provider("A", a), provider("B", b)])
    r = post(proxy, json=dict(PAYLOAD, stream=True))
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "A"
    assert r.content == b"".join(incomplete.events)  # the check changes no byte
    out = proxy.wait_for_output("ended without its terminal event")
    assert re.search(r"stream from A ended without its terminal event", out)
    assert "next request starts at B" in out

    requests_made = len(a.requests)
    r = post(proxy, json=dict(PAYLOAD, stream=True))  # the retry goes to B
    assert r.headers["X-Clipal-Provider"] == "B"
    assert len(a.requests) == requests_made


def test_a_stall_after_the_commit_point_counts_and_opens_the_breaker(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.default = Reply.answer(delay=0.05).stall_after(2)
    proxy = clipal(settings={"upstream_idle_timeout": "1s",
                             "circuit_breaker": {"failure_threshold": 2, "open_timeout": "30s"}},
                   claudecode=[provider("A", a), provider("B", b)])
    body = json.dumps(dict(PAYLOAD, stream=True)).encode()
    for round in range(2):
        if round:  # the first stall moved the client on to B: make B fail so that the walk reaches A again
            b.script(Reply.anthropic_error(503))
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(f"POST {MESSAGES} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            while sock.recv(65536):
                pass
    assert "provider A: circuit opened" in proxy.wait_for_output("circuit opened")
    a_seen = len(a.requests)
    assert post(proxy, json=dict(PAYLOAD, stream=True)).headers["X-Clipal-Provider"] == "B"
    assert len(a.requests) == a_seen


def test_chat_streams_ending_on_finish_reason_without_done_are_complete_and_gemini_is_unchecked(
        clipal, upstream_factory):
    a = upstream_factory("A")
    chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}
    last = {"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {}, "finish_reason": "stop"}]}
    a.script(Reply.sse([chunk, last]), path="/v1/chat/completions")
    a.path_defaults["/v1beta/models/m:streamGenerateContent"] = Reply.sse([{"candidates": []}])
    proxy = clipal(codex=[provider("A", a)], gemini=[provider("A", a)])
    r = post(proxy, "/codex/v1/chat/completions", json={"model": "m", "stream": True, "messages": []})
    assert r.status_code == 200
    r = post(proxy, "/gemini/v1beta/models/m:streamGenerateContent?alt=sse", json={})
    assert r.status_code == 200
    proxy.wait_for_output("[gemini] request completed")
    assert "terminal event" not in proxy.output()


def test_an_event_stream_under_the_wrong_content_type_is_still_checked(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    error = sse_event({"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}, "error")
    a.script(Reply.raw(200, error, {"Content-Type": "application/json"}))
    cut = sse_event({"type": "message_start"}, "message_start")
    b.script(Reply.raw(200, cut, {"Content-Type": "text/plain"}))
    proxy = clipal(claudecode=[provider("A", a), provider("B", b)])
    r = post(proxy, json=dict(PAYLOAD, stream=True))
    assert r.headers["X-Clipal-Provider"] == "B"  # A's error first event failed over
    assert r.content == cut
    assert "stream from B ended without its terminal event" in proxy.wait_for_output("terminal event")


# --------------------------------------------------------------------------- manual mode


@pytest.mark.parametrize("reply,status", [
    (lambda: Reply.anthropic_error(401), 401),
    (lambda: Reply.anthropic_error(429, retry_after=30), 429),
    (lambda: Reply.anthropic_error(503), 503),
], ids=["401", "429", "503"])
def test_manual_mode_returns_the_pinned_providers_answers_as_they_are(clipal, upstream_factory, reply, status):
    a, b = upstream_factory("A"), upstream_factory("B")
    b.default = reply()
    proxy = clipal(claudecode=[provider("A", a), provider("B", b)])
    write_yaml(proxy.config_dir / "claude-code.yaml", {"mode": "manual", "pinned_provider": "B",
                                                      "providers": [provider("A", a), provider("B", b)]})
    proxy.wait_for_output("reloaded")
    for _ in range(3):
        r = post(proxy)
        assert r.status_code == status and r.headers["X-Clipal-Provider"] == "B"
    assert a.requests == [] and len(b.requests) == 3
    assert "deactivated" not in proxy.output() and "cooling" not in proxy.output()


def test_manual_mode_answers_502_when_the_pinned_provider_is_unreachable(clipal, upstream_factory):
    a = upstream_factory("A")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
        proxy = clipal(claudecode=[provider("A", a)])
        write_yaml(proxy.config_dir / "claude-code.yaml", {
            "mode": "manual", "pinned_provider": "dead",
            "providers": [provider("A", a), {"name": "dead", "base_url": dead, "api_key": KEYS[0]}]})
        proxy.wait_for_output("reloaded")
        r = post(proxy)
    assert r.status_code == 502 and r.json()["type"] == "error" and "dead" in r.json()["error"]["message"]
    assert a.requests == []


# --------------------------------------------------------------------------- reloads keep state


def test_a_reload_keeps_unchanged_providers_state_and_a_changed_provider_starts_fresh(clipal, upstream_factory):
    a, b, c = upstream_factory("A"), upstream_factory("B"), upstream_factory("C")
    a.default = Reply.anthropic_error(401)
    b.key_defaults[KEYS[0]] = Reply.anthropic_error(401)
    providers = [provider("A", a), keyed("B", b, keys=KEYS[:2]), provider("C", c)]
    proxy = clipal(claudecode=providers)
    assert post(proxy).headers["X-Clipal-Provider"] == "B"  # A deactivated, B's key 1 deactivated
    a_seen, b_seen = len(a.requests), len(b.requests)

    # Another provider added and the log level changed: A and B's key 1 stay out.
    write_yaml(proxy.config_dir / "claude-code.yaml", {"providers": providers + [provider("D", c)]})
    config = proxy.config_dir / "config.yaml"
    write_yaml(config, {"log_dir": str(proxy.config_dir / "logs"), "log_level": "debug"})
    proxy.wait_for_output("log_level")
    time.sleep(0.3)
    assert post(proxy).headers["X-Clipal-Provider"] == "B"
    assert len(a.requests) == a_seen and keys_seen(b)[b_seen:] == [KEYS[1]]

    # A's key changed: it starts fresh (and is first again by priority as the walk wraps to it).
    a.default = Reply.answer()
    fixed = dict(provider("A", a), api_key="sk-test-fixed-key-0123456789")
    write_yaml(proxy.config_dir / "claude-code.yaml", {"providers": [fixed] + providers[1:]})
    proxy.wait_for_output("reloaded", timeout=5)
    time.sleep(0.5)
    b.script(Reply.anthropic_error(503))  # push the walk off B and C so that it wraps to A
    c.script(Reply.anthropic_error(503))
    assert post(proxy).headers["X-Clipal-Provider"] == "A"
    assert a.requests[-1].api_key == "sk-test-fixed-key-0123456789"


# --------------------------------------------------------------------------- URL rules and new rows


@pytest.mark.parametrize("status", [520, 521, 522, 523, 524])
def test_cloudflare_origin_errors_fail_over(clipal, upstream_factory, status):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.raw(status, b"<html>origin down</html>", {"Content-Type": "text/html"}))
    proxy = clipal(codex=[provider("A", a), provider("B", b)])
    assert post(proxy, "/codex/v1/responses", json={"model": "m", "input": "x"}).headers["X-Clipal-Provider"] == "B"


def test_the_two_400s_that_mean_a_bad_key_or_no_credit_deactivate(clipal, upstream_factory):
    a, b, c = upstream_factory("A"), upstream_factory("B"), upstream_factory("C")
    a.default = Reply.gemini_error(400, "API key not valid. Please pass a valid API key.",
                                   rpc_status="INVALID_ARGUMENT",
                                   details=[{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                             "reason": "API_KEY_INVALID"}])
    proxy = clipal(gemini=[provider("A", a), provider("B", b)],
                   claudecode=[provider("C", c), provider("B", b)])
    r = post(proxy, "/gemini/v1beta/models/m:generateContent", json={})
    assert r.headers["X-Clipal-Provider"] == "B"
    c.default = Reply.anthropic_error(400, "Your credit balance is too low to access the Anthropic API.",
                                      type="invalid_request_error")
    assert post(proxy).headers["X-Clipal-Provider"] == "B"
    out = proxy.wait_for_output("provider C deactivated")
    assert "provider A deactivated" in out


def test_retry_after_ms_cools_for_that_long(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(Reply.openai_error(429, headers={"retry-after-ms": "3000"}))
    proxy = clipal(codex=[provider("A", a), provider("B", b)])
    assert post(proxy, "/codex/v1/responses", json={"model": "m", "input": "x"}).headers["X-Clipal-Provider"] == "B"
    assert "cooling down for 3s" in proxy.wait_for_output("cooling down")


@pytest.mark.parametrize("client_suffix", ["/codex", "/codex/v1"])
@pytest.mark.parametrize("provider_suffix", ["", "/v1"])
def test_the_openai_sdk_reaches_v1_responses_whichever_side_has_the_v1(clipal, upstream_factory, client_suffix,
                                                                      provider_suffix):
    a = upstream_factory("A")
    proxy = clipal(codex=[provider("A", a.url + provider_suffix)])
    client = openai.OpenAI(api_key="x", base_url=proxy.url + client_suffix, max_retries=0)
    assert client.responses.create(model="m", input="hi").output_text == "hello from A"
    assert a.requests[-1].path == "/v1/responses"
