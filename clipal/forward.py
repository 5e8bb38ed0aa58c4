"""One attempt against one provider, up to the commit point, and the stream after it.

:func:`send` sends the request and waits for what clipal calls the commit
point: the response headers *and* the first body bytes (or the first whole
event of an SSE stream, so an error event can still fail over). Any failure
before that raises :class:`AttemptFailed` with a verdict for the failover
state; nothing has reached the client yet. :func:`stream_rest` then relays
the remaining bytes exactly as they arrive.

Bytes are read with urllib3's ``read1(decode_content=False)``: it returns
whatever has arrived (one recv) instead of waiting to fill a buffer, it
removes chunked framing but never content encoding, so a gzip body stays
gzip. Every wait on the upstream is bounded by one ``gevent.Timeout``.
"""

from __future__ import annotations

import select
import socket
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import gevent
import requests
import urllib3.exceptions
from gevent import monkey
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.connection import allowed_gai_family
from urllib3.util.timeout import _DEFAULT_TIMEOUT

from . import headerparse
from .classify import (FAILOVER_STATUSES, Kind, Verdict, classify_response, classify_sse_error,
                       provider_failure)
from .config import format_duration
from .decode import Decoder
from .outbound import UpstreamRequest, end_to_end

#: Largest read handed to the client at once; smaller reads return as soon as bytes arrive.
READ_SIZE = 64 * 1024
#: Error bodies are read up to this size for classification and logs.
ERROR_BODY_LIMIT = 64 * 1024
#: An SSE response is committed after its first event, or after this many bytes without one.
FIRST_EVENT_LIMIT = 64 * 1024
#: Opening a TCP/TLS connection gets at most this long (or the idle timeout, if shorter).
CONNECT_TIMEOUT = 15.0
#: A request body up to this size leaves in the same send() as the request headers.
COALESCE_LIMIT = 64 * 1024


class AttemptFailed(Exception):
    """The provider failed before anything reached the client."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


class UpstreamIdle(Exception):
    """No bytes from the upstream within the idle timeout."""


def _network_failure(reason: str, kind: Kind = Kind.SERVER_ERROR) -> AttemptFailed:
    return AttemptFailed(provider_failure(reason, kind))


# --- the transport: requests' adapter, minus per-request work a proxy does not need ---
#
# A proxy request goes straight to the session's HTTPAdapter (see :func:`send`)
# with a request prepared here, not through ``Session.request``: that layer
# merges session settings, cookies and hooks, re-parses and re-quotes the URL
# and keeps a cookie jar, none of which a pass-through proxy wants, and it cost
# about a third of clipal's CPU per small request. ``HTTPAdapter.send`` itself
# is unchanged (so ``responses`` still mocks it in tests).

_real_poll = monkey.get_original("select", "poll")
_real_getaddrinfo = monkey.get_original("socket", "getaddrinfo")


def _is_connected(connection: HTTPConnection) -> bool:
    """urllib3's check that a pooled connection is still open, with a plain poll(0).

    urllib3 asks ``select.poll`` for readability with a zero timeout before
    reusing a connection; under gevent that poll object is emulated with hub
    watchers, about 25 us per request. A zero-timeout poll never blocks, so
    the original system call is the same answer, cheaply.
    """
    sock = connection.sock
    if sock is None:
        return False
    poller = _real_poll()
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)


def _literal_addresses(host: str, port: int) -> list | None:
    """getaddrinfo's answer for an IP-literal host; None for a name that needs resolving.

    With AI_NUMERICHOST getaddrinfo does no lookup at all, so the original
    function answers in place (~2 us) and cannot block.
    """
    try:
        return _real_getaddrinfo(host.strip("[]"), port, allowed_gai_family(), socket.SOCK_STREAM, 0,
                                 socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return None


def _connect(addresses: list, timeout, source_address, socket_options) -> socket.socket:
    """urllib3's create_connection loop over already-resolved addresses."""
    error: OSError | None = None
    for family, socktype, proto, _name, sockaddr in addresses:
        sock = socket.socket(family, socktype, proto)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            if timeout is not _DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    raise error if error is not None else OSError("getaddrinfo returns an empty list")


class _ConnectionMixin:
    """What clipal's upstream connections do differently from urllib3's (same bytes on the wire).

    - Liveness check with a plain poll(0) (see :func:`_is_connected`).
    - Header blocks parsed without the email package (:mod:`clipal.headerparse`).
    - An IP-literal host is not sent to gevent's resolver: it hands every
      getaddrinfo to a thread pool (~100-150 us of CPU and a thread hand-off
      per new connection, a queue when 200 streams open at once).
    - A small body leaves in the same send() as the headers: urllib3 sends
      them with two calls (two syscalls, two TCP segments). Only on a
      connection already open, so a proxy tunnel's CONNECT never sees it.
    """

    is_connected = property(_is_connected)
    response_class = headerparse.HTTPResponse
    _body_with_headers: bytes | None = None

    def _new_conn(self) -> socket.socket:
        addresses = _literal_addresses(self._dns_host, self.port)
        if addresses is None:
            return super()._new_conn()
        try:  # the exceptions urllib3's _new_conn raises
            sock = _connect(addresses, self.timeout, self.source_address, self.socket_options)
        except socket.timeout as exc:
            raise ConnectTimeoutError(
                self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock

    def request(self, method, url, body=None, headers=None, **kwargs):
        if (type(body) is bytes and 0 < len(body) <= COALESCE_LIMIT and self.sock is not None
                and not kwargs.get("chunked") and headers is not None
                and any(name.lower() == "content-length" for name in headers)):
            self._body_with_headers = body
            try:  # urllib3 frames the request by the Content-Length header; send() adds the body
                return super().request(method, url, None, headers, **kwargs)
            finally:
                self._body_with_headers = None
        return super().request(method, url, body, headers, **kwargs)

    def send(self, data) -> None:
        body = self._body_with_headers
        if body is not None:  # the header block from endheaders(): the body follows it
            self._body_with_headers = None
            data = data + body
        super().send(data)


class _Connection(_ConnectionMixin, HTTPConnection):
    pass


class _TLSConnection(_ConnectionMixin, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class _Adapter(HTTPAdapter):
    """requests' HTTPAdapter with clipal's connection pools and no cookie jar.

    Proxied requests (HTTP(S)_PROXY) keep urllib3's stock proxy managers.
    """

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
        self._pools: dict[str, HTTPConnectionPool] = {}

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        # requests parses the URL and normalises a pool key on every request
        # (~13 us); without a proxy or client certificate the pool only
        # depends on the URL's origin, so it is remembered per origin until
        # the pool manager evicts (and closes) it.
        if proxies or cert is not None or verify is not True:
            return super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        origin = _origin(request.url)
        pool = self._pools.get(origin)
        if pool is None or pool.pool is None:
            pool = super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
            if len(self._pools) >= 64:  # base URLs changed over reloads: forget the old ones
                self._pools.clear()
            self._pools[origin] = pool
        return pool

    def request_url(self, request, proxies):
        # Without a proxy requests sends the path and query; it finds that out
        # by parsing the URL twice more (~3 us).
        if proxies:
            return super().request_url(request, proxies)
        return request.path_url

    def build_response(self, req: requests.PreparedRequest, resp) -> requests.Response:
        # HTTPAdapter.build_response minus extracting cookies: clipal passes
        # Set-Cookie through to the client and never stores or sends cookies.
        response = requests.Response()
        response.status_code = getattr(resp, "status", None)
        response.headers = CaseInsensitiveDict(getattr(resp, "headers", {}))
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response


def new_session() -> requests.Session:
    """A session shared by all greenlets: big connection pools, no default headers.

    ``trust_env`` stays off so requests does not re-read proxy variables and
    netrc on every request; :func:`proxies_for` honours proxy variables once
    per base URL instead. :func:`send` uses only the session's adapters.
    """
    session = requests.Session()
    session.headers.clear()  # send the client's headers, not requests' defaults
    session.trust_env = False
    adapter = _Adapter(pool_connections=32, pool_maxsize=512, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _prepare(request: UpstreamRequest, body: bytes) -> requests.PreparedRequest:
    """The request as ``Session.prepare_request`` would build it for clipal's inputs.

    The URL is used as built (a validated base_url plus the client's raw path
    and query), so the client's percent-encoding reaches the upstream as sent;
    urllib3 still encodes anything illegal. Content-Length follows requests'
    rule: the body's length, or 0 for a body-less method other than GET/HEAD.
    """
    prepared = requests.PreparedRequest()
    prepared.method = request.method
    prepared.url = request.url
    headers = CaseInsensitiveDict(_as_mapping(request.headers))
    if body:
        headers["Content-Length"] = str(len(body))
    elif request.method not in ("GET", "HEAD"):
        headers["Content-Length"] = "0"
    prepared.headers = headers
    prepared.body = body or None
    return prepared


def _origin(url: str) -> str:
    """``scheme://host:port`` of a URL (anything before its path or query)."""
    scheme, _, rest = url.partition("://")
    return scheme.lower() + "://" + rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]


_proxy_cache: dict[str, dict[str, str]] = {}


def proxies_for(url: str) -> dict[str, str]:
    """HTTP(S)_PROXY / NO_PROXY for this URL's origin, looked up once per origin."""
    key = _origin(url)
    if key not in _proxy_cache:
        _proxy_cache[key] = requests.utils.get_environ_proxies(key) or {}
    return _proxy_cache[key]


@dataclass
class Ready:
    """An upstream response at its commit point: safe to start sending to the client."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    first: bytes
    response: requests.Response

    def close(self) -> None:
        self.response.close()


def _bounded(timeout: float) -> gevent.Timeout:
    """One wait on the upstream, bounded by the idle timeout (``0``: no limit).

    Always a new Timeout: one cancelled and started again would resume with
    the time it had left, not the whole timeout.
    """
    return gevent.Timeout(timeout or None, UpstreamIdle)


def _read_some(response: requests.Response, timeout: float) -> bytes:
    """The next bytes of the raw (still encoded) body; ``b""`` at its end."""
    with _bounded(timeout):
        return response.raw.read1(READ_SIZE, decode_content=False) or b""


def _read_up_to(response: requests.Response, limit: int, timeout: float) -> bytes:
    """Read until EOF or ``limit`` bytes."""
    buffer = bytearray()
    while len(buffer) < limit:
        data = _read_some(response, timeout)
        if not data:
            break
        buffer += data
    return bytes(buffer)


def _read_first_event(response: requests.Response, timeout: float) -> tuple[bytes, bytes]:
    """An SSE stream up to the end of its first event: the bytes as received, and decoded.

    The client gets the received bytes unchanged; the event is looked for in
    the decoded ones, so a gzip, br or zstd stream is not held back until
    FIRST_EVENT_LIMIT and its error event still fails over. Reading also
    stops at EOF and where the bytes stop decoding (corrupt, or a bomb);
    what decoded until then is the event.
    """
    received = bytearray()
    plain = bytearray()
    decoder = Decoder(response.headers.get("Content-Encoding", ""))
    while len(received) < FIRST_EVENT_LIMIT:
        data = _read_some(response, timeout)
        if not data:  # EOF: the decoder may still hold the few bytes it was sniffing
            plain += decoder.end() or b""
            break
        received += data
        more = decoder.feed(data)
        if more is None:
            break
        plain += more
        if b"\n\n" in plain or b"\r\n\r\n" in plain or b"\r\r" in plain:
            break
    return bytes(received), bytes(plain)


def _known_empty(method: str, status: int, response: requests.Response) -> bool:
    return (
        method == "HEAD"
        or status in (204, 304)
        or 100 <= status < 200
        or response.headers.get("Content-Length") == "0"
    )


def _is_event_stream(response: requests.Response) -> bool:
    return response.headers.get("Content-Type", "").lower().startswith("text/event-stream")


def send(session: requests.Session, request: UpstreamRequest, body: bytes, idle_timeout: float) -> Ready:
    """Run one attempt up to the commit point. Raises :class:`AttemptFailed`.

    The caller owns the returned response and must close it on every path.
    """
    connect = min(CONNECT_TIMEOUT, idle_timeout) if idle_timeout else CONNECT_TIMEOUT
    try:
        adapter = session.get_adapter(request.url)
        prepared = _prepare(request, body)
        with _bounded(idle_timeout):
            response = adapter.send(prepared, stream=True, timeout=(connect, None),
                                    proxies=proxies_for(request.url))
    except UpstreamIdle:
        raise _network_failure(f"no response headers within {format_duration(idle_timeout)}", Kind.TIMEOUT) from None
    except requests.exceptions.ConnectTimeout:
        raise _network_failure("connect timeout") from None
    except requests.exceptions.ConnectionError as exc:
        from .frontdoor import NO_FILE_DESCRIPTORS, OutOfFileDescriptors
        if any(getattr(error, "errno", None) in NO_FILE_DESCRIPTORS for error in _causes(exc)):
            raise OutOfFileDescriptors(describe_error(exc)) from None  # clipal's shortage, not the provider's
        raise _network_failure(_refused_head(exc) or f"connection failed: {describe_error(exc)}") from None
    except requests.exceptions.RequestException as exc:
        raise _network_failure(f"request failed: {describe_error(exc)}") from None

    try:
        return _to_commit_point(request.method, response, idle_timeout)
    except BaseException:
        response.close()
        raise


def _to_commit_point(method: str, response: requests.Response, idle_timeout: float) -> Ready:
    status = response.status_code
    try:
        if status in FAILOVER_STATUSES:  # the verdict may depend on the body or its retry hint
            error_body = _read_up_to(response, ERROR_BODY_LIMIT, idle_timeout)
            verdict = classify_response(status, response.headers, error_body, now=time.time())
            if verdict.failover:
                raise AttemptFailed(verdict)
            first = error_body  # defensive: a failover status the classifier returned as-is
        elif _known_empty(method, status, response):
            first = b""
        elif 200 <= status < 300 and _is_event_stream(response):
            first, event = _read_first_event(response, idle_timeout)
            verdict = classify_sse_error(event, now=time.time())
            if verdict is not None:
                raise AttemptFailed(verdict)
        else:
            first = _read_some(response, idle_timeout)
    except UpstreamIdle:
        raise _network_failure(f"no body bytes within {format_duration(idle_timeout)} (HTTP {status})", Kind.TIMEOUT) from None
    except (requests.exceptions.RequestException, OSError, urllib3.exceptions.HTTPError) as exc:
        raise _network_failure(f"connection broke before the body (HTTP {status}): {describe_error(exc)}") from None

    headers = end_to_end(list(response.raw.headers.items()))
    return Ready(status=status, reason=response.reason or "", headers=headers, first=first, response=response)


def stream_rest(ready: Ready, idle_timeout: float) -> Iterator[bytes]:
    """The rest of the body, chunk by chunk as it arrives.

    Raises :class:`UpstreamIdle` on a stall and ``OSError``/urllib3 errors
    when the upstream breaks; on a clean end the connection goes back to the
    pool for reuse.
    """
    response = ready.response
    read1 = response.raw.read1
    while True:
        # A fresh timer for every read: the idle timeout bounds each wait,
        # never the whole stream. A gevent Timeout that is cancelled and
        # started again does not restart its clock: libev keeps only what was
        # left of it, so a re-armed timer cut every stream at one timeout
        # after its start, however steadily the upstream was sending.
        with _bounded(idle_timeout):
            data = read1(READ_SIZE, decode_content=False)
        if not data:
            response.raw.release_conn()
            return
        yield data


def _as_mapping(headers: list[tuple[str, str]]) -> dict[str, str]:
    """requests takes a mapping: repeated request headers are joined as HTTP allows."""
    merged: dict[str, str] = {}
    names: dict[str, str] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in names:
            merged[names[lower]] += ", " + value
        else:
            names[lower] = name
            merged[name] = value
    return merged


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what caused it, outermost first.

    requests wraps urllib3's errors in ``args[0]``, urllib3 keeps the cause
    in ``.reason`` or ``__cause__``, and the socket error sits at the bottom.
    """
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        reason = getattr(current, "reason", None)
        first_arg = current.args[0] if current.args else None
        current = next((c for c in (reason, first_arg, current.__cause__, current.__context__)
                        if isinstance(c, BaseException)), None)
    return chain


def _refused_head(exc: BaseException) -> str | None:
    """headerparse's reason for refusing the response head, if that is what ``exc`` comes from.

    urllib3 and requests wrap it as a ConnectionError; its message names the
    rule broken, never a header value.
    """
    for error in _causes(exc):
        if isinstance(error, headerparse.MalformedHeaderBlock):
            return str(error)
    return None


def describe_error(exc: BaseException) -> str:
    """A short description of a network error for the log: the socket-level cause when there is one.

    e.g. "Connection refused", "cannot resolve host (Name or service not
    known)", "timed out". urllib3's own messages repeat the URL (query
    included) and object reprs; the innermost cause says what happened.
    """
    chain = _causes(exc)
    for error in reversed(chain):
        if isinstance(error, urllib3.exceptions.NameResolutionError) or type(error).__name__ == "gaierror":
            detail = getattr(error.__cause__, "strerror", None) or getattr(error, "strerror", None)
            return f"cannot resolve host ({detail})" if detail else "cannot resolve host"
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        if isinstance(error, TimeoutError):
            return "timed out"
    text = str(chain[-1]) or type(chain[-1]).__name__
    if ">: " in text:  # urllib3 messages embed object reprs; keep the human part
        text = text.split(">: ", 1)[1]
    return text.strip("()'\" ")[:200]
