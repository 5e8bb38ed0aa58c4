"""The official SDKs see failover transparently (issue 3 acceptance 4).

Each SDK talks to clipal exactly as an agent does. While the first provider
fails (529 / 401 / 503), the SDK call returns the second provider's answer as
if nothing happened; with every provider down, the SDK raises its ordinary API
error class, carrying clipal's own message.

Every SDK client is built with its own retries switched off (max_retries=0,
google-genai: one attempt): an SDK retry could otherwise mask a failover that
did not happen, or turn clipal's error answer into a later success.
"""

from __future__ import annotations

import anthropic
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from conftest import provider
from fakeupstream import Reply

KEY = "sk-client-key-not-used-upstream"
MODEL_CLAUDE = "claude-test"
MODEL_GPT = "gpt-test"
MODEL_GEMINI = "gemini-test"


def anthropic_client(proxy) -> anthropic.Anthropic:
    # max_retries=0: the SDK must not retry on its own (see the module docstring).
    return anthropic.Anthropic(api_key=KEY, base_url=proxy.url + "/claudecode", max_retries=0, timeout=10)


def openai_client(proxy) -> openai.OpenAI:
    # max_retries=0: the SDK must not retry on its own (see the module docstring).
    return openai.OpenAI(api_key=KEY, base_url=proxy.url + "/codex/v1", max_retries=0, timeout=10)


def genai_client(proxy) -> genai.Client:
    # attempts=1: the SDK must not retry on its own (see the module docstring).
    options = genai_types.HttpOptions(base_url=proxy.url + "/gemini", timeout=10_000,
                                      retry_options=genai_types.HttpRetryOptions(attempts=1))
    return genai.Client(api_key=KEY, http_options=options)


def two_providers(upstream_factory, failure: Reply):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.script(failure)
    return a, b


USER = [{"role": "user", "content": "hi"}]


# --------------------------------------------------------------------------- anthropic


def test_anthropic_messages_create_is_answered_by_the_second_provider(clipal, upstream_factory):
    a, b = two_providers(upstream_factory, Reply.anthropic_error(529))
    proxy = clipal(claudecode=[provider("A", a), provider("B", b)])

    message = anthropic_client(proxy).messages.create(model=MODEL_CLAUDE, max_tokens=16, messages=USER)
    assert message.content[0].text == "hello from B"
    assert len(a.requests) == 1 and len(b.requests) == 1


def test_anthropic_streaming_is_answered_by_the_second_provider(clipal, upstream_factory):
    a, b = two_providers(upstream_factory, Reply.anthropic_error(401))
    proxy = clipal(claudecode=[provider("A", a), provider("B", b)])

    with anthropic_client(proxy).messages.stream(model=MODEL_CLAUDE, max_tokens=16, messages=USER) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == "hello from B"
    assert final.stop_reason == "end_turn"
    assert len(a.requests) == 1


def test_anthropic_count_tokens_is_answered_by_the_second_provider(clipal, upstream_factory):
    a, b = two_providers(upstream_factory, Reply.anthropic_error(503))
    proxy = clipal(claudecode=[provider("A", a), provider("B", b)])

    raw = anthropic_client(proxy).messages.with_raw_response.count_tokens(model=MODEL_CLAUDE, messages=USER)
    assert raw.headers["X-Clipal-Provider"] == "B"
    assert raw.parse().input_tokens > 0
    assert [r.path for r in b.requests] == ["/v1/messages/count_tokens"]


@pytest.mark.parametrize("failure,error_class,status", [
    (lambda: Reply.anthropic_error(503), anthropic.InternalServerError, 503),
    (lambda: Reply.anthropic_error(529, retry_after=30), anthropic.RateLimitError, 429),
], ids=["all-failed", "all-overloaded"])
def test_anthropic_raises_its_api_error_with_clipals_message_when_all_are_down(
        clipal, upstream_factory, failure, error_class, status):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.default = b.default = failure()
    proxy = clipal(claudecode=[provider("A", a), provider("B", b)])

    with pytest.raises(anthropic.APIStatusError) as caught:
        anthropic_client(proxy).messages.create(model=MODEL_CLAUDE, max_tokens=16, messages=USER)
    error = caught.value
    assert isinstance(error, error_class)
    assert error.status_code == status
    assert error.body["error"]["message"].startswith("clipal: ")
    assert "clipal: " in str(error)
    assert error.response.headers["Retry-After"]


# --------------------------------------------------------------------------- openai


def test_openai_responses_create_is_answered_by_the_second_provider(clipal, upstream_factory):
    a, b = two_providers(upstream_factory, Reply.openai_error(401))
    proxy = clipal(codex=[provider("A", a), provider("B", b)])

    response = openai_client(proxy).responses.create(model=MODEL_GPT, input="hi")
    assert response.output_text == "hello from B"
    assert len(a.requests) == 1


def test_openai_chat_stream_is_answered_by_the_second_provider(clipal, upstream_factory):
    a, b = two_providers(upstream_factory, Reply.openai_error(529))
    proxy = clipal(codex=[provider("A", a), provider("B", b)])

    stream = openai_client(proxy).chat.completions.create(model=MODEL_GPT, messages=USER, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hello from B"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(a.requests) == 1


def test_openai_raises_its_api_error_with_clipals_message_when_all_are_down(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.default = Reply.openai_error(503)
    b.default = Reply.openai_error(401)
    proxy = clipal(codex=[provider("A", a), provider("B", b)])

    with pytest.raises(openai.APIStatusError) as caught:
        openai_client(proxy).responses.create(model=MODEL_GPT, input="hi")
    error = caught.value
    assert isinstance(error, openai.InternalServerError)
    assert error.status_code == 503
    assert error.message.startswith("Error code: 503") and "clipal: " in error.message
    assert error.body["message"].startswith("clipal: ")


# --------------------------------------------------------------------------- google-genai


def test_genai_generate_content_is_answered_by_the_second_provider(clipal, upstream_factory):
    a, b = two_providers(upstream_factory, Reply.gemini_error(503))
    proxy = clipal(gemini=[provider("A", a), provider("B", b)])

    client = genai_client(proxy)  # keep a reference: the client closes its HTTP pool when collected
    response = client.models.generate_content(model=MODEL_GEMINI, contents="hi")
    assert response.text == "hello from B"
    assert len(a.requests) == 1


def test_genai_generate_content_stream_is_answered_by_the_second_provider(clipal, upstream_factory):
    a, b = two_providers(upstream_factory, Reply.gemini_error(401))
    proxy = clipal(gemini=[provider("A", a), provider("B", b)])

    client = genai_client(proxy)
    chunks = list(client.models.generate_content_stream(model=MODEL_GEMINI, contents="hi"))
    assert "".join(c.text for c in chunks) == "hello from B"
    assert chunks[-1].candidates[0].finish_reason == genai_types.FinishReason.STOP
    assert b.requests[0].query.get("alt") == "sse"
    assert len(a.requests) == 1


def test_genai_raises_its_api_error_with_clipals_message_when_all_are_down(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.default = Reply.gemini_error(503)
    b.default = Reply.gemini_error(529)
    proxy = clipal(gemini=[provider("A", a), provider("B", b)])

    client = genai_client(proxy)
    with pytest.raises(genai_errors.APIError) as caught:
        client.models.generate_content(model=MODEL_GEMINI, contents="hi")
    error = caught.value
    assert isinstance(error, genai_errors.ServerError)
    assert error.code == 503
    assert error.status == "UNAVAILABLE"
    assert error.message.startswith("clipal: ")
