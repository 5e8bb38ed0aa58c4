"""Codex works with ``base_url = <clipal>/codex`` as well as ``<clipal>/codex/v1``, against a
provider whose base_url is written with or without its ``/v1``: the upstream always gets
``/v1/responses``, never ``/responses`` nor ``/v1/v1/responses``.

The official openai SDK builds the request path from its base_url exactly as Codex does.
"""

from __future__ import annotations

import openai
import pytest

from conftest import provider


@pytest.mark.parametrize("provider_suffix", ["", "/v1", "/v1/"], ids=["provider-root", "provider-v1",
                                                                     "provider-v1-slash"])
def test_every_combination_reaches_v1_responses(clipal, upstream_factory, provider_suffix):
    up = upstream_factory("A")
    proxy = clipal(codex=[provider("A", up.url + provider_suffix)])
    for client_suffix in ("/codex", "/codex/v1", "/codex/"):
        client = openai.OpenAI(base_url=proxy.url + client_suffix, api_key="codex-key", max_retries=0, timeout=10)
        answer = client.responses.create(model="gpt-x", input="hi")
        assert answer.output_text, client_suffix
        events = [event.type for event in client.responses.create(model="gpt-x", input="hi", stream=True)]
        assert events[-1] == "response.completed", client_suffix
    assert [request.path for request in up.requests] == ["/v1/responses"] * 6
