"""Request paths over real sockets: dot segments refused, the client prefix matched as a decoded segment.

A dot segment (``.``/``..``, also percent-encoded) would let a client reach a
provider path outside its base_url with the owner's key, so such a request is
answered 400 and nothing is forwarded. The prefix is found by decoding the
path, and the rest goes upstream exactly as the client spelled it.

The requests are sent with http.client: requests (urllib3) would remove the
dot segments itself before they left the test.
"""

from __future__ import annotations

import http.client
import json

import pytest

from conftest import provider

MESSAGE = json.dumps({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})


def post(proxy, target: str) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        connection.request("POST", target, body=MESSAGE, headers={"Content-Type": "application/json",
                                                                   "x-api-key": "client-dummy-key"})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


@pytest.fixture
def setup(clipal, upstream_factory):
    up = upstream_factory("A")
    proxy = clipal(claudecode=[provider("A", up)], codex=[provider("A", up)], gemini=[provider("A", up)])
    return proxy, up


@pytest.mark.parametrize("target", [
    "/claudecode/../gemini/x",
    "/claudecode/v1/./messages",
    "/claudecode/%2e%2e/x",
    "/claudecode/%2E%2E/gemini/x",
    "/claudecode/v1/%2E/messages",
    "/claudecode/.%2e/x",
    "/claudecode/v1/messages/..",
    "/claudecode/..%2Fgemini/x",  # an upstream that decodes %2F before resolving would climb out
])
def test_dot_segments_are_refused_in_the_clients_shape_and_nothing_is_forwarded(setup, target):
    proxy, up = setup
    status, body = post(proxy, target)
    assert status == 400, body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"  # Anthropic's shape
    assert "segment" in body["error"]["message"]
    assert up.requests == []
    out = proxy.wait_for_output("answered 400")
    assert "[claudecode]" in out


@pytest.mark.parametrize("target,path", [
    ("/claudecode/v1/messages?next=/../x", "/v1/messages"),  # the query is not the path
    ("/claudecode/v1/..messages/.x/...", "/v1/..messages/.x/..."),  # dots inside a segment are no dot segment
])
def test_dots_that_are_not_dot_segments_are_forwarded(setup, target, path):
    proxy, up = setup
    status, _ = post(proxy, target)
    assert status != 400  # the fake upstream answers 404 for a path it does not know
    assert up.requests[-1].path == path


def test_a_dot_segment_before_any_prefix_is_refused_as_plain_json(setup):
    proxy, up = setup
    status, body = post(proxy, "/./claudecode/v1/messages")
    assert status == 400
    assert body["error"]["type"] == "invalid_request" and "segment" in body["error"]["message"]
    assert up.requests == []


@pytest.mark.parametrize("target,client", [
    ("/%63laudecode/v1/messages", "claudecode"),
    ("/%63%6C%61%75%64%65%63%6F%64%65/v1/messages", "claudecode"),
    ("/c%6Fdex/v1/messages", "codex"),
])
def test_an_encoded_prefix_is_served_and_the_upstream_path_is_the_rest(setup, target, client):
    proxy, up = setup
    status, _ = post(proxy, target)
    assert status == 200
    assert up.requests[-1].path == "/v1/messages"


def test_the_rest_of_the_path_keeps_the_clients_percent_encoding(setup):
    proxy, up = setup
    status, _ = post(proxy, "/%63laudecode/v1/a%2Fb%20c/messages")
    assert status == 200
    assert up.requests[-1].path == "/v1/a%2Fb%20c/messages"


@pytest.mark.parametrize("target", [
    # The first segment of "//claudecode/..." is empty, and that of
    # "/claudecode%2Fv1/..." is "claudecode/v1": neither names a client.
    # werkzeug would route both as /claudecode/... (it drops leading slashes
    # and decodes %2F); clipal does not merge or split segments, so that what
    # is served is what the path says, and answers its 404 naming the prefixes.
    "//claudecode/v1/messages",
    "///claudecode/v1/messages",
    "/%2Fclaudecode/v1/messages",
    "/claudecode%2Fv1/messages",
])
def test_a_first_segment_that_is_not_a_client_prefix_is_404(setup, target):
    proxy, up = setup
    status, body = post(proxy, target)
    assert status == 404
    assert body["error"]["type"] == "not_found" and "/claudecode" in body["error"]["message"]
    assert up.requests == []
