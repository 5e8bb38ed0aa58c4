"""One attempt (clipal.forward.send) against mocked upstream replies (`responses`).

Unit-level: every answer reaches the commit point with status, headers and
what clipal read of it (the bounded error body, or the first SSE event), and
the classifier's verdict on that is what the attempt loop acts on; network
errors raise NetworkFailure; hop-by-hop response headers are dropped and
content encoding is left alone. The live tests cover the real sockets.
"""

from __future__ import annotations

import gzip
import json
import time

import pytest
import requests
import responses

from clipal import forward, transport
from clipal.classify import Kind, classify_answer, classify_response
from clipal.outbound import UpstreamRequest

URL = "https://api.example.com/v1/messages"


def request(method: str = "POST", url: str = URL, headers=None) -> UpstreamRequest:
    return UpstreamRequest(method=method, url=url, headers=list(headers or [("x-api-key", "sk-provider")]))


def attempt(body: bytes = b'{"model":"m"}', method: str = "POST", **kwargs) -> forward.Ready:
    return forward.send(transport.new_session(), request(method, **kwargs), body, 5.0)


def judged(ready: forward.Ready):
    """The verdict the attempt loop reaches on what the attempt saw (the response is closed)."""
    try:
        return classify_answer(ready.status, ready.upstream_headers, ready.first, ready.event, now=time.time())
    finally:
        ready.close()


def whole_body(ready: forward.Ready) -> bytes:
    try:
        return ready.first + b"".join(forward.stream_rest(ready))
    finally:
        ready.close()


@responses.activate
def test_success_returns_ready_with_status_headers_and_first_bytes():
    body = json.dumps({"type": "message", "content": [{"type": "text", "text": "hi"}]}).encode()
    responses.add(responses.POST, URL, body=body, status=200,
                  headers={"Content-Type": "application/json", "Request-Id": "req_1"})
    ready = attempt(b'{"model":"m","messages":[]}', headers=[("x-api-key", "sk-provider"),
                                                            ("anthropic-version", "2023-06-01")])
    assert ready.status == 200
    headers = dict(ready.headers)
    assert headers["Content-Type"] == "application/json"
    assert headers["Request-Id"] == "req_1"
    assert ready.first and body.startswith(ready.first)
    assert whole_body(ready) == body

    sent = responses.calls[0].request
    assert sent.url == URL
    assert sent.body == b'{"model":"m","messages":[]}'
    assert sent.headers["x-api-key"] == "sk-provider"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    # the session adds no headers of its own (no python-requests User-Agent)
    assert "User-Agent" not in sent.headers


@responses.activate
def test_sse_commits_after_the_first_event():
    events = b"event: message_start\ndata: {\"type\":\"message_start\"}\n\nevent: ping\ndata: {}\n\n"
    responses.add(responses.POST, URL, body=events, status=200, headers={"Content-Type": "text/event-stream"})
    ready = attempt()
    assert ready.first.startswith(b"event: message_start")
    assert whole_body(ready) == events


@responses.activate
def test_an_sse_error_as_first_event_fails_over():
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    events = b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"
    responses.add(responses.POST, URL, body=events, status=200, headers={"Content-Type": "text/event-stream"})
    assert judged(attempt()).failover


@pytest.mark.parametrize("status, body, headers", [
    (429, {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}, {"Retry-After": "30"}),
    (401, {"type": "error", "error": {"type": "authentication_error", "message": "bad key"}}, {}),
    (402, {"error": {"message": "pay", "type": "billing_error"}}, {}),
    (429, {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota",
                     "code": "insufficient_quota"}}, {}),
    (503, {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}, {}),
    (529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, {}),
])
@responses.activate
def test_a_failover_status_is_read_for_the_classifiers_verdict(status, body, headers):
    data = json.dumps(body).encode()
    responses.add(responses.POST, URL, body=data, status=status,
                  headers={"Content-Type": "application/json", **headers})
    ready = attempt()
    assert ready.first == data  # the whole (small) error body was read before deciding
    verdict = judged(ready)
    expected = classify_response(status, {"Content-Type": "application/json", **headers}, data, now=time.time())
    assert verdict.failover is True
    assert (verdict.kind, verdict.deactivate) == (expected.kind, expected.deactivate)
    if expected.cooldown:
        assert verdict.cooldown == pytest.approx(expected.cooldown, abs=1)
    else:
        assert verdict.cooldown is None


@responses.activate
def test_a_gzip_429_is_decoded_for_classification_only():
    body = gzip.compress(json.dumps({"error": {"message": "quota", "type": "insufficient_quota",
                                              "code": "insufficient_quota"}}).encode())
    responses.add(responses.POST, URL, body=body, status=429,
                  headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert judged(attempt()).deactivate is True


@pytest.mark.parametrize("status", [400, 404, 413, 422])
@responses.activate
def test_client_errors_are_returned_as_they_are(status):
    body = json.dumps({"error": {"message": "nope", "type": "invalid_request_error"}}).encode()
    responses.add(responses.POST, URL, body=body, status=status, headers={"Content-Type": "application/json"})
    ready = attempt()
    assert ready.status == status
    assert whole_body(ready) == body


@pytest.mark.parametrize("error", [
    requests.exceptions.ConnectionError("connection refused"),
    requests.exceptions.ConnectTimeout("connect timed out"),
    requests.exceptions.ChunkedEncodingError("broken"),
])
@responses.activate
def test_network_errors_raise_network_failure(error):
    responses.add(responses.POST, URL, body=error)
    with pytest.raises(forward.NetworkFailure) as info:
        attempt()
    assert info.value.kind is Kind.SERVER_ERROR and info.value.reason


@responses.activate
def test_hop_by_hop_response_headers_are_dropped():
    responses.add(responses.POST, URL, body=b"{}", status=200, headers={
        "Content-Type": "application/json", "Connection": "keep-alive, X-Hop", "Keep-Alive": "timeout=5",
        "X-Hop": "1", "Upgrade": "h2c", "Trailer": "X-T", "X-End-To-End": "yes"})
    ready = attempt()
    names = {k.lower() for k, _ in ready.headers}
    ready.close()
    assert not names & {"connection", "keep-alive", "x-hop", "upgrade", "trailer", "transfer-encoding"}
    assert {"content-type", "x-end-to-end"} <= names


@responses.activate
def test_gzip_body_is_passed_on_still_compressed():
    plain = json.dumps({"text": "héllo wörld " * 100}).encode()
    compressed = gzip.compress(plain)
    responses.add(responses.POST, URL, body=compressed, status=200,
                  headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    ready = attempt()
    assert dict(ready.headers)["Content-Encoding"] == "gzip"
    assert whole_body(ready) == compressed


@pytest.mark.parametrize("method, status", [("POST", 204), ("HEAD", 200)])
@responses.activate
def test_bodyless_responses_commit_with_no_first_bytes(method, status):
    responses.add(method, URL, body=b"", status=status)
    ready = attempt(b"", method=method)
    assert ready.status == status
    assert ready.first == b""
    ready.close()


def test_network_error_reasons_name_the_socket_level_cause_not_the_url():
    """A failover log line says what happened ("Connection refused"), not urllib3's
    retry message, which repeats the URL and its query (where a provider key may sit)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{closed_port}/v1/responses?key=sk-provider-secret-123456"
        with pytest.raises(forward.NetworkFailure) as failure:
            forward.send(transport.new_session(), request(url=url), b"{}", 5.0)
    assert failure.value.reason == "connection failed: Connection refused"
