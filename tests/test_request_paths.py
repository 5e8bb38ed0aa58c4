"""The request path rules, in process: dot segments refused, the prefix matched as a decoded segment.

tests/test_live_paths.py checks the same over real sockets (and the ``//``
case, which werkzeug's test client reads as a host name).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import responses

from clipal.app import create_app
from clipal.config import load_config
from clipal.proxy import has_dot_segment, raw_subpath, subpath_after
from conftest import write_config

A = "https://a.example"
PROVIDERS = [{"name": "A", "base_url": A, "api_key": "sk-test-provider-a-0123456789"}]


@pytest.mark.parametrize("path", [
    "/claudecode/..", "/claudecode/.", "/claudecode/../gemini/x", "/claudecode/./x", "/./claudecode",
    "/claudecode/%2e%2e/x", "/claudecode/%2E%2e/x", "/claudecode/%2E/x", "/claudecode/.%2E/x",
    "/claudecode/..%2fgemini", "/claudecode/x%2F..%2Fy",
])
def test_dot_segments_plain_or_encoded(path):
    assert has_dot_segment(path)


@pytest.mark.parametrize("path", [
    "/claudecode/v1/messages", "/gemini/v1beta/models/gemini-2.5-pro:streamGenerateContent",
    "/claudecode/...", "/claudecode/..x/.y", "/claudecode/%2e%2e%2e", "/claudecode/%252e%252e/x", "",
])
def test_dots_that_are_not_a_segment_of_their_own(path):
    assert not has_dot_segment(path)


@pytest.mark.parametrize("path,rest", [
    ("/claudecode", ""), ("/claudecode/", "/"), ("/claudecode/v1/messages", "/v1/messages"),
    ("/%63laudecode/v1/messages", "/v1/messages"), ("/%63LAUDECODE/v1", None),
    ("/claudecode/a%2Fb%20c", "/a%2Fb%20c"), ("//claudecode/v1", None), ("/claudecode%2Fv1/x", None),
    ("/claudecodex/v1", None), ("claudecode/v1", None),
])
def test_the_prefix_is_the_decoded_first_segment_and_the_rest_is_kept_as_sent(path, rest):
    assert subpath_after(path, "/claudecode") == rest


def test_raw_subpath_refuses_a_path_that_was_not_checked():
    assert raw_subpath({"RAW_URI": "/%63odex/v1/responses?x=1"}, "/codex") == "/v1/responses"
    with pytest.raises(ValueError):
        raw_subpath({"RAW_URI": "//codex/v1"}, "/codex")


@pytest.fixture
def app_client(tmp_path: Path):
    write_config(tmp_path, settings={"log_stdout": False}, claudecode=PROVIDERS, codex=PROVIDERS)
    return create_app(config=load_config(tmp_path), watch=False).test_client()


@responses.activate
def test_in_process_a_dot_segment_is_400_in_the_clients_shape_and_nothing_is_forwarded(app_client):
    for path in ("/claudecode/../codex/v1/responses", "/claudecode/%2e%2e/x"):
        r = app_client.post(path, json={})
        assert r.status_code == 400 and r.json["error"]["type"] == "invalid_request_error"
    r = app_client.post("/codex/v1/%2E/responses", json={})
    assert r.status_code == 400 and r.json["error"]["code"] == "invalid_request"  # OpenAI's shape
    r = app_client.get("/health/..")
    assert r.status_code == 400 and r.json["error"]["type"] == "invalid_request"
    assert len(responses.calls) == 0


@responses.activate
def test_in_process_an_encoded_prefix_reaches_the_upstream_without_it(app_client):
    responses.post(f"{A}/v1/messages", json={"ok": True})
    r = app_client.post("/%63laudecode/v1/messages", json={})
    assert r.status_code == 200
    assert [call.request.url for call in responses.calls] == [f"{A}/v1/messages"]


@responses.activate
def test_in_process_an_encoded_slash_in_the_first_segment_is_404(app_client):
    r = app_client.post("/claudecode%2Fv1/messages", json={})
    assert r.status_code == 404 and "/claudecode%2Fv1/messages" in r.json["error"]["message"]
    assert len(responses.calls) == 0
