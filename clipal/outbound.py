"""Build the upstream request: target URL, forwarded headers and credentials.

Pure functions over plain data, so the rules are unit-testable without a
server. Header lists are ``(name, value)`` pairs in the client's order, so
nothing about the request changes except what the rules below say.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus, urlsplit

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
#: Expectations clipal's server meets itself: it answers 100 Continue when clipal starts reading
#: the body, before or while forwarding it, so an upstream asked to confirm would only add a wait.
_ANSWERED = frozenset({"expect"})

Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    url: str
    headers: Headers


#: The API version segments that never appear twice in a row in an upstream path.
VERSION_SEGMENTS = ("v1", "v1beta", "v1alpha")
#: A base_url whose last segment looks like this already names an API version (/v1, /v4, /v1beta).
_VERSION_LIKE = re.compile(r"v\d")


def _segments(path: str) -> list[str]:
    """``/v1/messages`` -> ``["v1", "messages"]``; a trailing slash leaves a last empty segment."""
    return path[1:].split("/") if path.startswith("/") else path.split("/")


def upstream_path(base_url: str, path: str, client: ClientKind) -> str:
    """The part of the request path that goes after ``base_url``.

    Users copy a provider's base URL with or without its version (``https://api.openai.com``
    or ``https://api.openai.com/v1``), and agents' SDKs differ in whether the version is
    in their own base URL; every combination must reach the same upstream path:

    * a version segment is never doubled: ``/v1/v1/x`` is ``/v1/x``, and when base_url ends
      in the version the path starts with, the path drops it;
    * for a client with bare paths (Codex: its base URL may be ``…/codex`` rather than
      ``…/codex/v1``), a bare path gets ``/v1`` in front unless base_url's last segment
      already looks like a version (``/v1``, ``/v4``, ``/v1beta``: providers that put their
      API under another version keep it).

    Segments are compared as sent, so the path keeps the client's percent-encoding.
    """
    if not path.strip("/"):
        return path
    parts = _segments(path)
    while len(parts) > 1 and parts[0] in VERSION_SEGMENTS and parts[1] == parts[0]:
        del parts[0]
    base = urlsplit(base_url).path.rstrip("/")
    base_last = base.rsplit("/", 1)[-1]
    if base_last in VERSION_SEGMENTS and parts[0] == base_last:
        del parts[0]
    elif not _VERSION_LIKE.match(base_last) and any(
            parts[:len(bare)] == bare for bare in map(_segments, client.bare_paths)):
        parts.insert(0, "v1")
    return "/" + "/".join(parts) if parts else ""


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


def choose_carrier(provider: Provider, key: str, client: ClientKind, client_carrier: str | None) -> str:
    """Where ``key``, one of the provider's keys, goes: the one place this is decided.

    1. the provider's ``auth_header`` when set;
    2. ``x-api-key`` for an Anthropic API key, which the official API rejects
       as a Bearer token (Claude Code itself sends its token as Bearer);
    3. wherever the client put its own credential;
    4. the client's default.

    Rule 2 looks at the key being sent: a provider's keys need not all be of one kind.
    """
    if provider.auth_header:
        return provider.auth_header
    if key.startswith("sk-ant-api"):
        return "x-api-key"
    return client_carrier or client.default_carrier


def build_upstream_request(
    *,
    method: str,
    path: str,
    query: str,
    headers: Headers,
    provider: Provider,
    key: str,
    client: ClientKind,
    remote_addr: str,
    scheme: str = "http",
) -> UpstreamRequest:
    """Everything about one attempt except the body, which is sent as received.

    ``key`` is the one of the provider's keys this attempt sends.
    """
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

    carrier = choose_carrier(provider, key, client, client_carrier)
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

    url = join_url(provider.base_url, upstream_path(provider.base_url, path, client), query)
    return UpstreamRequest(method=method, url=url, headers=kept)
