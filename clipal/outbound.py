"""Build the upstream request: target URL, forwarded headers and credentials.

Pure functions over plain data, so the rules are unit-testable without a
server. Header lists are ``(name, value)`` pairs in the client's order, so
nothing about the request changes except what the rules below say.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote_plus

from .clients import ClientKind
from .config import Provider

#: Hop-by-hop headers (RFC 9110 §7.6.1) never cross a proxy, in either direction.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})

#: Where a client may put its own credential, in the order :func:`choose_carrier` checks them.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")
CREDENTIAL_QUERY_PARAMS = ("key", "api_key")

#: Headers clipal sets itself on the upstream request.
_REPLACED = frozenset({"host", "content-length", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
#: Expectations clipal's server has met itself: by the time a request is forwarded its whole
#: body has been read, so an upstream asked to confirm it wants the body would only add a wait.
_ANSWERED = frozenset({"expect"})

Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    url: str
    headers: Headers


def join_url(base_url: str, path: str, query: str) -> str:
    """``base_url`` + ``path`` with exactly one slash between them, plus ``query``.

    A path inside base_url is kept: ``https://openrouter.ai/api`` + ``/v1/messages``
    is ``https://openrouter.ai/api/v1/messages``.
    """
    url = base_url.rstrip("/")
    if path.strip("/") or path.endswith("/"):
        url = url + "/" + path.lstrip("/")
    return f"{url}?{query}" if query else url


def hop_by_hop_names(headers: Headers) -> set[str]:
    """The standard hop-by-hop headers plus those the Connection header names."""
    names = set(HOP_BY_HOP)
    for name, value in headers:
        if name.lower() == "connection":
            names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return names


def end_to_end(headers: Headers) -> Headers:
    """The headers of an upstream response that go on to the client.

    Hop-by-hop headers go, and so does a Content-Length beside a
    Transfer-Encoding: the body was read by the transfer coding and clipal's
    server frames what it relays itself, so that length is not the length
    the client gets. Passed on, it would let a kept-alive client take the
    rest of the body for the next response.
    """
    drop = hop_by_hop_names(headers)
    if any(name.lower() == "transfer-encoding" for name, _ in headers):
        drop.add("content-length")
    return [(name, value) for name, value in headers if name.lower() not in drop]


def _query_param_name(part: str) -> str:
    return unquote_plus(part.split("=", 1)[0]).lower()


def strip_query_credentials(query: str) -> tuple[str, str | None]:
    """Remove ``key``/``api_key`` from a raw query string, keeping everything else byte-identical.

    Returns the remaining query and the name of the first credential
    parameter found (so the provider key can go back to the same place).
    """
    if not query:
        return "", None
    kept: list[str] = []
    found: str | None = None
    for part in query.split("&"):
        name = _query_param_name(part)
        if name in CREDENTIAL_QUERY_PARAMS:
            found = found or name
        else:
            kept.append(part)
    return "&".join(kept), found


@dataclass(frozen=True)
class ClientCredential:
    """One credential the client sent: where (a header name or ``query``) and its value."""

    carrier: str
    value: str  # without a ``Bearer`` prefix; percent-decoded for the query
    raw: str  # as it appeared on the wire


def client_credentials(headers: Headers, query: str) -> list[ClientCredential]:
    """Every client credential of a request, headers first, then the query.

    The one rule for what counts as a client credential: the headers of
    :data:`CREDENTIAL_HEADERS` (any case) and the query parameters of
    :data:`CREDENTIAL_QUERY_PARAMS` (any case, percent-decoded: ``api%5Fkey``
    is ``api_key``). The upstream request drops exactly these, and the
    redactor hides exactly their values.
    """
    found: list[ClientCredential] = []
    for name, value in headers:
        lower = name.lower()
        if lower in CREDENTIAL_HEADERS:
            token = value.strip()
            if token[:7].lower() == "bearer ":
                token = token[7:].strip()
            found.append(ClientCredential(lower, token, value))
    for part in query.split("&") if query else ():
        if _query_param_name(part) in CREDENTIAL_QUERY_PARAMS:
            raw = part.partition("=")[2]
            found.append(ClientCredential("query", unquote_plus(raw), raw))
    return found


def choose_carrier(provider: Provider, client: ClientKind, client_carrier: str | None) -> str:
    """Where the provider's key goes: the one place this is decided.

    1. the provider's ``auth_header`` when set;
    2. ``x-api-key`` for an Anthropic API key, which the official API rejects
       as a Bearer token (Claude Code itself sends its token as Bearer);
    3. wherever the client put its own credential;
    4. the client's default.
    """
    if provider.auth_header:
        return provider.auth_header
    if provider.api_key.startswith("sk-ant-api"):
        return "x-api-key"
    return client_carrier or client.default_carrier


def build_upstream_request(
    *,
    method: str,
    path: str,
    query: str,
    headers: Headers,
    provider: Provider,
    client: ClientKind,
    remote_addr: str,
    scheme: str = "http",
) -> UpstreamRequest:
    """Everything about one attempt except the body, which is sent as received."""
    original_host = ""
    forwarded_for = ""
    client_carrier: str | None = None
    drop = hop_by_hop_names(headers) | _REPLACED | _ANSWERED
    kept: Headers = []
    for name, value in headers:
        lower = name.lower()
        if lower == "host":
            original_host = value
        elif lower == "x-forwarded-for":
            forwarded_for = value
        if lower in CREDENTIAL_HEADERS:
            # The first credential in CREDENTIAL_HEADERS' order decides the carrier.
            if client_carrier is None or CREDENTIAL_HEADERS.index(lower) < CREDENTIAL_HEADERS.index(client_carrier):
                client_carrier = lower
            continue
        if lower not in drop:
            kept.append((name, value))

    query, query_param = strip_query_credentials(query)
    if client_carrier is None and query_param is not None:
        client_carrier = "query"

    carrier = choose_carrier(provider, client, client_carrier)
    key = provider.api_key
    if carrier == "query":
        param = f"{query_param or 'key'}={quote(key, safe='')}"
        query = f"{query}&{param}" if query else param
    elif carrier == "authorization":
        kept.append(("Authorization", f"Bearer {key}"))
    elif carrier == "x-api-key":
        kept.append(("x-api-key", key))
    else:
        kept.append(("x-goog-api-key", key))

    kept.append(("X-Forwarded-For", f"{forwarded_for}, {remote_addr}" if forwarded_for else remote_addr))
    kept.append(("X-Forwarded-Proto", scheme))
    if original_host:
        kept.append(("X-Forwarded-Host", original_host))

    return UpstreamRequest(method=method, url=join_url(provider.base_url, path, query), headers=kept)
