"""The upstream request clipal builds (SPEC §4.1): URL, headers, credentials.

Pure unit tests of clipal.outbound. The credential rule is checked in full:
every client credential is removed, and the provider's key lands in exactly
one place, chosen by (1) auth_header, (2) an Anthropic API key -> x-api-key,
(3) where the client put its own, (4) the client's default.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import pytest

from clipal.clients import CLAUDE_CODE, CODEX, GEMINI
from clipal.config import Provider
from clipal.outbound import (VERSION_SEGMENTS, build_upstream_request, choose_carrier, client_credentials,
                             end_to_end, hop_by_hop_names, join_url, strip_query_credentials, upstream_path)

CLIENT_KEY = "client-secret-KEY-123"
PROVIDER_KEY = "sk-or-provider-KEY-456"
ANTHROPIC_KEY = "sk-ant-api03-provider-KEY-789"


def make(provider_key: str = PROVIDER_KEY, *, auth_header: str | None = None,
         base_url: str = "https://up.example.com/api") -> Provider:
    return Provider(name="p", base_url=base_url, api_keys=(provider_key,), auth_header=auth_header)


def build(headers=(), *, query: str = "", path: str = "/v1/messages", client=CLAUDE_CODE,
          provider: Provider | None = None, key: str | None = None, remote_addr: str = "127.0.0.1",
          method: str = "POST", scheme: str = "http"):
    provider = provider or make()
    return build_upstream_request(
        method=method, path=path, query=query, headers=list(headers), provider=provider,
        key=provider.api_key if key is None else key, client=client, remote_addr=remote_addr, scheme=scheme,
    )


def header_values(request, name: str) -> list[str]:
    return [v for k, v in request.headers if k.lower() == name.lower()]


def query_of(request) -> str:
    return request.url.split("?", 1)[1] if "?" in request.url else ""


def key_places(request, key: str) -> list[str]:
    """Every place ``key`` appears in the upstream request: header names and 'query'."""
    places = [k.lower() for k, v in request.headers if key in v]
    places += ["query"] * query_of(request).count(key)
    return places


def assert_key_only_at(request, carrier: str, key: str = PROVIDER_KEY, param: str = "key") -> None:
    assert key_places(request, key) == [carrier], request
    assert CLIENT_KEY not in repr(request), request
    if carrier == "authorization":
        assert header_values(request, "authorization") == [f"Bearer {key}"]
    elif carrier == "query":
        assert (param, key) in parse_qsl(query_of(request))
    else:
        assert header_values(request, carrier) == [key]
    # no other credential carrier is left at all
    for other in ("authorization", "x-api-key", "x-goog-api-key"):
        if other != carrier:
            assert header_values(request, other) == [], other
    if carrier != "query":
        names = [k for k, _ in parse_qsl(query_of(request), keep_blank_values=True)]
        assert "key" not in names and "api_key" not in names


# --- URL join ---------------------------------------------------------------------


@pytest.mark.parametrize("base, path, query, expected", [
    ("https://api.example.com", "/v1/messages", "", "https://api.example.com/v1/messages"),
    ("https://api.example.com/", "/v1/messages", "", "https://api.example.com/v1/messages"),
    ("https://api.example.com///", "/v1/messages", "", "https://api.example.com/v1/messages"),
    ("https://openrouter.ai/api", "/v1/messages", "", "https://openrouter.ai/api/v1/messages"),
    ("https://openrouter.ai/api/", "/v1/messages", "", "https://openrouter.ai/api/v1/messages"),
    ("https://h.example.com/api/v1", "/chat/completions", "", "https://h.example.com/api/v1/chat/completions"),
    ("https://h.example.com/api", "v1/x", "", "https://h.example.com/api/v1/x"),
    ("https://h.example.com/api", "", "", "https://h.example.com/api"),
    ("https://h.example.com/api/", "", "", "https://h.example.com/api"),
    ("https://h.example.com/api", "/", "", "https://h.example.com/api/"),
    ("https://h.example.com", "/v1/models/", "", "https://h.example.com/v1/models/"),
    ("https://h.example.com", "/v1beta/models/m:streamGenerateContent", "alt=sse",
     "https://h.example.com/v1beta/models/m:streamGenerateContent?alt=sse"),
    ("http://127.0.0.1:8080/x/", "/a%2Fb/c", "q=1&r=%20", "http://127.0.0.1:8080/x/a%2Fb/c?q=1&r=%20"),
])
def test_join_url(base, path, query, expected):
    assert join_url(base, path, query) == expected


# --- version segments and Codex's bare paths ---------------------------------------------

H = "https://h.example.com"
ANY = (CLAUDE_CODE, CODEX, GEMINI)

#: (base_url, request path, clients, upstream URL): the same for every client listed.
UPSTREAM_URLS = [
    # base_url ends in the version the path starts with: it appears once
    ("https://openrouter.ai/api/v1", "/v1/messages", ANY, "https://openrouter.ai/api/v1/messages"),
    ("https://openrouter.ai/api/v1/", "/v1/messages", ANY, "https://openrouter.ai/api/v1/messages"),
    ("https://openrouter.ai/api/v1//", "/v1/messages", ANY, "https://openrouter.ai/api/v1/messages"),
    (f"{H}/v1beta", "/v1beta/models/m:streamGenerateContent", ANY, f"{H}/v1beta/models/m:streamGenerateContent"),
    (f"{H}/v1alpha/", "/v1alpha/models/m:generateContent", ANY, f"{H}/v1alpha/models/m:generateContent"),
    (f"{H}/v1", "/v1", ANY, f"{H}/v1"),
    (f"{H}/v1", "/v1/", ANY, f"{H}/v1/"),
    (f"{H}/v1", "/v1/messages/", ANY, f"{H}/v1/messages/"),
    # a path starting with the version segment twice sends it once
    (H, "/v1/v1/messages", ANY, f"{H}/v1/messages"),
    (f"{H}/v1", "/v1/v1/messages", ANY, f"{H}/v1/messages"),
    (H, "/v1/v1/v1/messages", ANY, f"{H}/v1/messages"),
    (H, "/v1beta/v1beta/models", ANY, f"{H}/v1beta/models"),
    (H, "/v1/v1", ANY, f"{H}/v1"),
    (H, "/v1/v1/", ANY, f"{H}/v1/"),
    # different versions, other segments and other spellings are left alone
    (f"{H}/v1", "/v1beta/models", ANY, f"{H}/v1/v1beta/models"),
    (f"{H}/v1beta", "/v1/models", (CLAUDE_CODE, GEMINI), f"{H}/v1beta/v1/models"),
    (H, "/v1/v1beta/models", ANY, f"{H}/v1/v1beta/models"),
    (f"{H}/api/v2", "/v2/x", ANY, f"{H}/api/v2/v2/x"),
    (f"{H}/v1", "/v1x/y", ANY, f"{H}/v1/v1x/y"),
    (f"{H}/av1", "/v1/x", ANY, f"{H}/av1/v1/x"),
    (f"{H}/V1", "/v1/x", ANY, f"{H}/V1/v1/x"),
    (f"{H}/v1", "/api/v1/x", ANY, f"{H}/v1/api/v1/x"),
    (f"{H}/v1/api", "/v1/x", ANY, f"{H}/v1/api/v1/x"),
    # the rest of the path keeps the client's percent-encoding
    (f"{H}/v1", "/v1/files/a%2Fb%20c", ANY, f"{H}/v1/files/a%2Fb%20c"),
    (f"{H}/v1", "/%76%31/x", (CLAUDE_CODE, GEMINI), f"{H}/v1/%76%31/x"),
    (H, "", ANY, H),
    (H, "/", ANY, f"{H}/"),
    # Codex: a bare OpenAI path gets /v1 unless base_url ends in something version-like
    ("https://api.openai.com", "/responses", (CODEX,), "https://api.openai.com/v1/responses"),
    ("https://api.openai.com/", "/responses", (CODEX,), "https://api.openai.com/v1/responses"),
    ("https://api.openai.com", "/v1/responses", (CODEX,), "https://api.openai.com/v1/responses"),
    ("https://api.openai.com/v1", "/responses", (CODEX,), "https://api.openai.com/v1/responses"),
    ("https://api.openai.com/v1", "/v1/responses", (CODEX,), "https://api.openai.com/v1/responses"),
    ("https://openrouter.ai/api", "/responses", (CODEX,), "https://openrouter.ai/api/v1/responses"),
    (H, "/responses/resp_1/input_items", (CODEX,), f"{H}/v1/responses/resp_1/input_items"),
    (H, "/responses/compact", (CODEX,), f"{H}/v1/responses/compact"),
    (H, "/responses/resp%2F1", (CODEX,), f"{H}/v1/responses/resp%2F1"),
    (H, "/chat/completions", (CODEX,), f"{H}/v1/chat/completions"),
    (H, "/completions", (CODEX,), f"{H}/v1/completions"),
    (H, "/embeddings", (CODEX,), f"{H}/v1/embeddings"),
    (H, "/models", (CODEX,), f"{H}/v1/models"),
    (H, "/models/gpt-5", (CODEX,), f"{H}/v1/models/gpt-5"),
    (H, "/responses/", (CODEX,), f"{H}/v1/responses/"),
    (H, "/v1/v1/responses", (CODEX,), f"{H}/v1/responses"),
    ("https://open.bigmodel.cn/api/paas/v4", "/chat/completions", (CODEX,),
     "https://open.bigmodel.cn/api/paas/v4/chat/completions"),
    (f"{H}/v2/", "/responses", (CODEX,), f"{H}/v2/responses"),
    (f"{H}/v1beta", "/models", (CODEX,), f"{H}/v1beta/models"),
    (f"{H}/v1beta", "/v1/models", (CODEX,), f"{H}/v1beta/v1/models"),
    (f"{H}/video", "/responses", (CODEX,), f"{H}/video/v1/responses"),  # "v" then a letter is no version
    # ... and only a bare path: a whole segment of one, nothing else
    (H, "/responsesx", (CODEX,), f"{H}/responsesx"),
    (H, "/chat", (CODEX,), f"{H}/chat"),
    (H, "/chat/other", (CODEX,), f"{H}/chat/other"),
    (H, "/files", (CODEX,), f"{H}/files"),
    (H, "/api/responses", (CODEX,), f"{H}/api/responses"),
    # the bare-path rule is Codex's: the other clients' paths are sent as they come
    (H, "/responses", (CLAUDE_CODE, GEMINI), f"{H}/responses"),
    (H, "/models", (CLAUDE_CODE, GEMINI), f"{H}/models"),
]


@pytest.mark.parametrize("base, path, client, expected", [
    pytest.param(base, path, client, expected, id=f"{client.name} {base} + {path or '(empty)'}")
    for base, path, clients, expected in UPSTREAM_URLS for client in clients])
def test_upstream_url(base, path, client, expected):
    request = build(path=path, client=client, provider=make(base_url=base))
    assert request.url == expected
    assert request.url == join_url(base, upstream_path(base, path, client), "")


def test_the_version_segments_are_the_three_named():
    assert VERSION_SEGMENTS == ("v1", "v1beta", "v1alpha")


def test_upstream_url_keeps_the_query_after_the_version_rules():
    request = build(path="/responses", query="stream=true&x=a%2Fb", client=CODEX, provider=make(base_url=H))
    assert request.url == f"{H}/v1/responses?stream=true&x=a%2Fb"
    request = build(path="/v1beta/models/m:streamGenerateContent", query="alt=sse", client=GEMINI,
                    provider=make(base_url=f"{H}/v1beta/"))
    assert request.url == f"{H}/v1beta/models/m:streamGenerateContent?alt=sse"


def test_upstream_url_is_base_url_plus_subpath_plus_query():
    request = build(path="/v1/messages", query="beta=true", provider=make(base_url="https://h.example.com/anthropic/"))
    assert request.url == "https://h.example.com/anthropic/v1/messages?beta=true"
    assert request.method == "POST"


# --- header filtering ------------------------------------------------------------------


def test_hop_by_hop_headers_and_those_named_by_connection_are_not_forwarded():
    headers = [
        ("Host", "127.0.0.1:3333"), ("Connection", "keep-alive, X-Private, Upgrade"), ("Keep-Alive", "timeout=5"),
        ("Proxy-Authorization", "Basic abc"), ("Proxy-Connection", "keep-alive"), ("Proxy-Authenticate", "x"),
        ("TE", "trailers"), ("Trailer", "X-T"), ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"),
        ("X-Private", "hop"), ("Content-Type", "application/json"), ("Anthropic-Version", "2023-06-01"),
        ("User-Agent", "claude-cli/1.0"), ("Accept-Encoding", "gzip"), ("X-Custom", "a"), ("X-Custom", "b"),
    ]
    request = build(headers)
    names = [k.lower() for k, _ in request.headers]
    for gone in ("host", "connection", "keep-alive", "proxy-authorization", "proxy-connection",
                 "proxy-authenticate", "te", "trailer", "transfer-encoding", "upgrade", "x-private"):
        assert gone not in names, gone
    # end-to-end headers are kept, in order, with their case and values, repeats included
    kept = [(k, v) for k, v in request.headers if k.lower() in
            ("content-type", "anthropic-version", "user-agent", "accept-encoding", "x-custom")]
    assert kept == [("Content-Type", "application/json"), ("Anthropic-Version", "2023-06-01"),
                    ("User-Agent", "claude-cli/1.0"), ("Accept-Encoding", "gzip"),
                    ("X-Custom", "a"), ("X-Custom", "b")]


def test_end_to_end_drops_hop_by_hop_response_headers_too():
    headers = [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked"), ("Connection", "close, X-Hop"),
               ("X-Hop", "1"), ("Keep-Alive", "timeout=5"), ("Content-Encoding", "gzip"), ("X-Request-Id", "r1")]
    assert end_to_end(headers) == [("Content-Type", "text/event-stream"), ("Content-Encoding", "gzip"),
                                   ("X-Request-Id", "r1")]
    assert {"x-hop", "connection", "te", "upgrade"} <= hop_by_hop_names(headers)


@pytest.mark.parametrize("coding", ["chunked", "gzip, chunked", "Chunked"])
def test_end_to_end_drops_a_content_length_beside_a_transfer_encoding(coding):
    headers = [("Content-Type", "text/plain"), ("content-length", "5"), ("Transfer-Encoding", coding)]
    assert end_to_end(headers) == [("Content-Type", "text/plain")]
    assert end_to_end([("Content-Type", "text/plain"), ("Content-Length", "5")]) == [
        ("Content-Type", "text/plain"), ("Content-Length", "5")]


def test_host_is_replaced_and_x_forwarded_headers_are_set():
    request = build([("Host", "localhost:3333"), ("Content-Type", "application/json")],
                    remote_addr="10.1.2.3", scheme="http")
    assert header_values(request, "host") == []  # requests sets the upstream's own Host
    assert header_values(request, "x-forwarded-for") == ["10.1.2.3"]
    assert header_values(request, "x-forwarded-proto") == ["http"]
    assert header_values(request, "x-forwarded-host") == ["localhost:3333"]


def test_x_forwarded_for_is_appended_and_client_forwarded_headers_are_not_duplicated():
    request = build([("Host", "h:1"), ("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "https"),
                     ("X-Forwarded-Host", "spoofed")], remote_addr="127.0.0.1", scheme="http")
    assert header_values(request, "x-forwarded-for") == ["203.0.113.9, 127.0.0.1"]
    assert header_values(request, "x-forwarded-proto") == ["http"]
    assert header_values(request, "x-forwarded-host") == ["h:1"]


def test_client_content_length_is_not_copied():
    # The body is sent as read (possibly de-chunked), so the length is computed afresh.
    request = build([("Content-Length", "12"), ("Content-Type", "application/json")])
    assert header_values(request, "content-length") == []


# --- credentials -----------------------------------------------------------------------------


ALL_CLIENT_CREDENTIALS = [("Authorization", f"Bearer {CLIENT_KEY}"), ("x-api-key", CLIENT_KEY),
                          ("x-goog-api-key", CLIENT_KEY)]


@pytest.mark.parametrize("carrier", ["x-api-key", "authorization", "x-goog-api-key", "query"])
@pytest.mark.parametrize("client", [CLAUDE_CODE, CODEX, GEMINI], ids=lambda c: c.name)
def test_auth_header_override_wins_over_everything(carrier, client):
    request = build(ALL_CLIENT_CREDENTIALS, query=f"alt=sse&key={CLIENT_KEY}&api_key={CLIENT_KEY}",
                    client=client, provider=make(ANTHROPIC_KEY, auth_header=carrier))
    assert_key_only_at(request, carrier, ANTHROPIC_KEY)
    assert query_of(request).startswith("alt=sse")


@pytest.mark.parametrize("client", [CLAUDE_CODE, CODEX, GEMINI], ids=lambda c: c.name)
def test_anthropic_api_key_goes_to_x_api_key_even_when_the_client_sent_bearer(client):
    request = build([("Authorization", f"Bearer {CLIENT_KEY}")], client=client, provider=make(ANTHROPIC_KEY))
    assert_key_only_at(request, "x-api-key", ANTHROPIC_KEY)


def test_anthropic_api_key_with_no_client_credential_goes_to_x_api_key_for_codex_too():
    assert_key_only_at(build([], client=CODEX, provider=make(ANTHROPIC_KEY)), "x-api-key", ANTHROPIC_KEY)


def test_an_anthropic_oauth_token_is_not_an_api_key():
    # Only sk-ant-api… keys are rejected as Bearer; other sk-ant tokens follow the client.
    token = "sk-ant-oat01-token-abc"
    request = build([("Authorization", f"Bearer {CLIENT_KEY}")], provider=make(token))
    assert_key_only_at(request, "authorization", token)


@pytest.mark.parametrize("client", [CLAUDE_CODE, CODEX, GEMINI], ids=lambda c: c.name)
@pytest.mark.parametrize("headers, query, carrier, param", [
    ([("Authorization", f"Bearer {CLIENT_KEY}")], "", "authorization", None),
    ([("authorization", f"Bearer {CLIENT_KEY}")], "", "authorization", None),
    ([("X-Api-Key", CLIENT_KEY)], "", "x-api-key", None),
    ([("X-Goog-Api-Key", CLIENT_KEY)], "", "x-goog-api-key", None),
    ([], f"key={CLIENT_KEY}", "query", "key"),
    ([], f"api_key={CLIENT_KEY}", "query", "api_key"),
    # several carriers: the first in the order Authorization, x-api-key, x-goog-api-key, query
    ([("x-goog-api-key", CLIENT_KEY), ("x-api-key", CLIENT_KEY), ("Authorization", f"Bearer {CLIENT_KEY}")],
     f"key={CLIENT_KEY}", "authorization", None),
    ([("x-goog-api-key", CLIENT_KEY), ("x-api-key", CLIENT_KEY)], f"key={CLIENT_KEY}", "x-api-key", None),
    ([("x-goog-api-key", CLIENT_KEY)], f"key={CLIENT_KEY}", "x-goog-api-key", None),
])
def test_provider_key_goes_where_the_client_put_its_own(client, headers, query, carrier, param):
    request = build(headers, query=query, client=client)
    assert_key_only_at(request, carrier, param=param or "key")


@pytest.mark.parametrize("client, carrier", [(CLAUDE_CODE, "x-api-key"), (CODEX, "authorization"),
                                             (GEMINI, "x-goog-api-key")], ids=lambda c: getattr(c, "name", c))
def test_without_any_client_credential_the_client_default_carrier_is_used(client, carrier):
    request = build([("Content-Type", "application/json")], client=client)
    assert_key_only_at(request, carrier)


# --- the key sent is the one the caller chose ------------------------------------------------


OTHER_KEY = "sk-or-second-KEY-000"


@pytest.mark.parametrize("client, carrier", [(CLAUDE_CODE, "x-api-key"), (CODEX, "authorization"),
                                             (GEMINI, "x-goog-api-key")], ids=lambda c: getattr(c, "name", c))
def test_the_key_given_is_sent_not_the_providers_first(client, carrier):
    provider = Provider("p", "https://up.example.com", (PROVIDER_KEY, OTHER_KEY))
    request = build([], client=client, provider=provider, key=OTHER_KEY)
    assert_key_only_at(request, carrier, OTHER_KEY)
    assert PROVIDER_KEY not in repr(request)


def test_the_query_carrier_sends_the_key_given():
    provider = Provider("p", "https://up.example.com", (PROVIDER_KEY, OTHER_KEY), auth_header="query")
    request = build([], client=GEMINI, provider=provider, key=OTHER_KEY)
    assert query_of(request) == f"key={OTHER_KEY}"


def test_the_anthropic_rule_looks_at_the_key_being_sent():
    provider = Provider("p", "https://up.example.com", (PROVIDER_KEY, ANTHROPIC_KEY))
    bearer = [("Authorization", f"Bearer {CLIENT_KEY}")]
    assert_key_only_at(build(bearer, provider=provider, key=PROVIDER_KEY), "authorization", PROVIDER_KEY)
    assert_key_only_at(build(bearer, provider=provider, key=ANTHROPIC_KEY), "x-api-key", ANTHROPIC_KEY)


@pytest.mark.parametrize("auth_header, key, client_carrier, expected", [
    ("query", ANTHROPIC_KEY, "authorization", "query"),
    (None, ANTHROPIC_KEY, "authorization", "x-api-key"),
    (None, PROVIDER_KEY, "authorization", "authorization"),
    (None, PROVIDER_KEY, None, "authorization"),
    (None, "sk-ant-oat01-token", None, "authorization"),
])
def test_choose_carrier(auth_header, key, client_carrier, expected):
    # The provider's own first key is not Anthropic's: only the key passed in decides rule 2.
    provider = Provider("p", "https://up.example.com", (PROVIDER_KEY,), auth_header=auth_header)
    assert choose_carrier(provider, key, CODEX, client_carrier) == expected


def test_query_credentials_are_removed_and_other_params_kept_byte_identical():
    query = f"alt=sse&key={CLIENT_KEY}&x=a%2Fb+c&api_key={CLIENT_KEY}&keys=1&empty=&flag"
    request = build([("x-goog-api-key", CLIENT_KEY)], query=query, client=GEMINI,
                    path="/v1beta/models/m:streamGenerateContent")
    assert request.url == ("https://up.example.com/api/v1beta/models/m:streamGenerateContent"
                           "?alt=sse&x=a%2Fb+c&keys=1&empty=&flag")
    assert_key_only_at(request, "x-goog-api-key")


def test_query_carrier_keeps_the_other_params_and_adds_the_key_once():
    request = build([], query=f"alt=sse&key={CLIENT_KEY}", client=GEMINI)
    assert query_of(request) == f"alt=sse&key={PROVIDER_KEY}"


def test_query_key_is_percent_encoded():
    request = build([], query="key=c", client=GEMINI, provider=make("a+b/c=d&e"))
    assert query_of(request) == "key=a%2Bb%2Fc%3Dd%26e"
    assert parse_qsl(query_of(request)) == [("key", "a+b/c=d&e")]


def test_forced_query_carrier_with_no_query_adds_key_param():
    request = build([("x-api-key", CLIENT_KEY)], client=CLAUDE_CODE, provider=make(auth_header="query"))
    assert request.url.endswith(f"/v1/messages?key={PROVIDER_KEY}")


def test_strip_query_credentials():
    assert strip_query_credentials("") == ("", None)
    assert strip_query_credentials("alt=sse") == ("alt=sse", None)
    assert strip_query_credentials("api_key=1&key=2&alt=sse") == ("alt=sse", "api_key")
    assert strip_query_credentials("KEY=1&a=b") == ("a=b", "key")


def test_credential_headers_are_removed_case_insensitively_and_every_copy():
    headers = [("AUTHORIZATION", f"Bearer {CLIENT_KEY}"), ("authorization", f"Bearer {CLIENT_KEY}"),
               ("X-API-KEY", CLIENT_KEY), ("X-Goog-Api-Key", CLIENT_KEY)]
    request = build(headers, client=CODEX)
    assert_key_only_at(request, "authorization")


def test_client_credentials_are_found_in_every_spelling_the_upstream_request_strips():
    headers = [("AUTHORIZATION", "bearer  tok-one"), ("X-Api-Key", "tok-two"), ("x-goog-api-key", "tok-three"),
               ("Accept", "*/*")]
    query = "alt=sse&api%5Fkey=tok%2Ffour&API_KEY=tok+five&Key=six&keyx=no"
    found = client_credentials(headers, query)
    assert [(c.carrier, c.value) for c in found] == [
        ("authorization", "tok-one"), ("x-api-key", "tok-two"), ("x-goog-api-key", "tok-three"),
        ("query", "tok/four"), ("query", "tok five"), ("query", "six"),
    ]
    assert found[3].raw == "tok%2Ffour"
    # Whatever is found as a credential is exactly what the upstream request drops.
    remaining, _ = strip_query_credentials(query)
    assert remaining == "alt=sse&keyx=no"
