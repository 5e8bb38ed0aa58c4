"""The attempt loop in process: the app on Flask's test client, upstreams mocked with `responses`.

Milliseconds per test, no sockets: the 413, failover, commit-point and
all-failed paths through the client Blueprints, and the rule that every
client credential, however it is spelled, is hidden from the log. The live
tests (``-m live``) check the same behaviour over real sockets.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import responses

from clipal import logs, redact
from clipal.app import create_app
from clipal.config import load_config
from conftest import write_config

A = "https://a.example"
B = "https://b.example"
PROVIDERS = [
    {"name": "A", "base_url": A, "api_key": "sk-test-provider-a-0123456789"},
    {"name": "B", "base_url": B, "api_key": "sk-test-provider-b-0123456789"},
]
MESSAGE = {"type": "message", "content": [{"type": "text", "text": "hi"}]}


@pytest.fixture
def make_client(tmp_path: Path, monkeypatch):
    """``make_client(settings=..., codex=[...])`` -> a test client of a fresh app (no watcher)."""
    logger = logging.getLogger(logs.LOGGER_NAME)
    handlers, level = list(logger.handlers), logger.level
    monkeypatch.setattr(redact, "REDACTOR", redact.Redactor())
    monkeypatch.setattr(logs, "REDACTOR", redact.REDACTOR)
    monkeypatch.setattr(logs._formatter, "_redactor", redact.REDACTOR)

    def make(settings: dict | None = None, **clients: list[dict]):
        write_config(tmp_path, settings={"log_stdout": False, **(settings or {})}, **clients)
        return create_app(config=load_config(tmp_path), watch=False).test_client()

    yield make
    for handler in logger.handlers:
        if handler not in handlers:
            handler.close()
    logger.handlers, logger.level = handlers, level


def log_text(tmp_path: Path) -> str:
    return "".join(path.read_text() for path in (tmp_path / "logs").glob("clipal-*.log"))


@responses.activate
def test_over_limit_body_gets_413_in_the_clients_shape_without_contacting_a_provider(make_client):
    client = make_client(settings={"max_request_body_bytes": 100}, claudecode=PROVIDERS)
    r = client.post("/claudecode/v1/messages", data=b"x" * 101)
    assert r.status_code == 413
    assert r.json["type"] == "error" and "max_request_body_bytes" in r.json["error"]["message"]
    assert len(responses.calls) == 0


@responses.activate
def test_a_failing_provider_is_skipped_and_the_next_one_becomes_current(make_client):
    responses.post(f"{A}/v1/messages", status=503, json={"type": "error", "error": {"type": "api_error"}})
    responses.post(f"{B}/v1/messages", json=MESSAGE)
    client = make_client(claudecode=PROVIDERS)

    for _ in range(2):
        r = client.post("/claudecode/v1/messages", json={"model": "m"})
        assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "B"
        assert r.json == MESSAGE
    assert [call.request.url for call in responses.calls] == [f"{A}/v1/messages", f"{B}/v1/messages",
                                                               f"{B}/v1/messages"]
    assert responses.calls[1].request.headers["x-api-key"] == "sk-test-provider-b-0123456789"


@responses.activate
def test_an_error_first_event_fails_over_before_anything_reaches_the_client(make_client):
    error = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"busy"}}\n\n'
    responses.post(f"{A}/v1/messages", body=error, content_type="text/event-stream")
    responses.post(f"{B}/v1/messages", body=b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
                   content_type="text/event-stream")
    client = make_client(claudecode=PROVIDERS)

    r = client.post("/claudecode/v1/messages", json={"model": "m", "stream": True})
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "B"
    assert b"message_stop" in r.data and b"overloaded" not in r.data


@responses.activate
def test_every_provider_failing_without_a_hint_answers_503_retry_after_1(make_client):
    responses.post(f"{A}/v1/chat/completions", status=500)
    responses.post(f"{B}/v1/chat/completions", status=502)
    client = make_client(codex=PROVIDERS)

    r = client.post("/codex/v1/chat/completions", json={"model": "m"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json["error"]["message"].startswith("clipal: ")


@responses.activate
def test_a_client_without_providers_gets_503_naming_the_file(make_client):
    client = make_client(gemini=[])
    r = client.post("/gemini/v1beta/models/m:generateContent", json={})
    assert r.status_code == 503 and "gemini.yaml" in r.json["error"]["message"]


@responses.activate
def test_an_answer_returned_as_is_keeps_status_headers_and_body(make_client):
    responses.post(f"{A}/v1/messages", status=400, json={"type": "error", "error": {"type": "invalid_request_error"}},
                   headers={"Request-Id": "req_9"})
    client = make_client(claudecode=PROVIDERS)
    r = client.post("/claudecode/v1/messages", json={"model": "m"})
    assert r.status_code == 400 and r.headers["Request-Id"] == "req_9" and r.headers["X-Clipal-Provider"] == "A"
    assert len(responses.calls) == 1


def test_a_websocket_upgrade_is_answered_426_by_the_clients_blueprint(make_client):
    client = make_client(codex=PROVIDERS)
    r = client.get("/codex/v1/responses", headers={"Connection": "Upgrade", "Upgrade": "websocket"})
    assert r.status_code == 426 and r.headers["Connection"] == "close"
    assert r.json["error"]["code"] == "upgrade_required"


@pytest.mark.parametrize("query", ["api%5Fkey={secret}", "API_KEY={secret}", "Key={secret}&alt=sse",
                                   "alt=sse&api_key={encoded}"])
@responses.activate
def test_a_client_credential_in_any_spelling_of_the_query_never_reaches_a_log_line(make_client, tmp_path, query):
    secret = "client-secret-value/0123456789"
    encoded = "client-secret-value%2F0123456789"
    responses.post(f"{A}/v1beta/models/m:generateContent", json={"candidates": []})
    client = make_client(settings={"log_level": "debug"}, gemini=PROVIDERS)

    r = client.post("/gemini/v1beta/models/m:generateContent?" + query.format(secret=secret, encoded=encoded),
                    json={})
    assert r.status_code == 200
    upstream_url = responses.calls[0].request.url
    assert secret not in upstream_url and encoded not in upstream_url
    # Whatever echoes the credential into a log line later, raw or encoded, it is hidden.
    logs.get_logger("gemini").error("upstream echoed %s and %s", secret, encoded)
    text = log_text(tmp_path)
    assert "upstream echoed" in text
    assert secret not in text and encoded not in text


def test_the_blueprint_view_is_the_request_path_for_every_client(make_client):
    client = make_client()
    adapter = client.application.url_map.bind("localhost")
    for prefix, name in (("/claudecode", "claudecode"), ("/codex", "codex"), ("/gemini", "gemini")):
        assert adapter.match(prefix + "/v1/x", method="POST")[0] == f"{name}.proxy"
    assert client.application.wsgi_app.__func__ is type(client.application).wsgi_app  # nothing in front of Flask
    assert client.get("/codexfoo/x").status_code == 404
    assert json.loads(client.get("/health").data) == {"status": "healthy"}
