"""The one boundary to requests, urllib3 and http.client: a session tuned for a proxy.

Every reach into those libraries' internals lives here, so an upgrade has one
file to check. Checked against requests 2.34, urllib3 2.8 (``urllib3>=2,<3``
is declared for that reason), http.client of CPython 3.11-3.13 and gevent
26.9; tests/test_library_copies.py compares each copy with the library's own
behaviour.

A proxied request goes straight to the session's HTTPAdapter with a request
prepared here (:func:`prepare`), not through ``Session.request``: that layer
merges session settings, cookies and hooks, re-parses and re-quotes the URL
and keeps a cookie jar, none of which a pass-through proxy wants, and it cost
about a third of clipal's CPU per small request. ``HTTPAdapter.send`` itself
is unchanged (so ``responses`` still mocks it in tests).

Foreign errors are translated here too: :func:`describe_error` turns a
requests/urllib3/socket error into a short line for the log.
"""

from __future__ import annotations

import functools
import http.client
import select
import socket
import sys
from typing import Callable, Sized

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
from .outbound import UpstreamRequest

#: A request body up to this size leaves in the same send() as the request headers.
COALESCE_LIMIT = 64 * 1024


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


def prepare(request: UpstreamRequest, body: Sized) -> requests.PreparedRequest:
    """The request as ``Session.prepare_request`` would build it for clipal's inputs.

    The URL is used as built (a validated base_url plus the client's raw path
    and query), so the client's percent-encoding reaches the upstream as sent;
    urllib3 still encodes anything illegal. Content-Length follows requests'
    rule: the body's length, or 0 for a body-less method other than GET/HEAD.

    ``body`` is bytes, a file reader, or an iterable of pieces with a
    ``len()`` (a body still arriving from the client). For the last, what
    clipal relies on (checked in requests 2.34 and urllib3 2.8):

    - requests' ``HTTPAdapter.send`` passes ``chunked=False`` whenever the
      headers hold Content-Length, and urllib3's ``HTTPConnection.request``
      then frames by that header alone: the pieces go out one ``send()``
      each, unframed (``body_to_chunks`` takes an object with neither
      ``read`` nor the buffer interface as a plain iterable). The upstream
      gets the announced length and the same bytes, as for a body in hand.
    - An exception raised by the iterable (the client gone mid-body) leaves
      ``HTTPConnectionPool.urlopen`` without its clean exit, and its
      ``finally`` closes the connection instead of pooling it half-sent;
      requests passes the exception through as it is, unless it is an
      OSError, which urllib3 may swallow (ECONNRESET) and requests wraps:
      the iterable must raise none (clipal.body turns the client's into
      ClientGone).
    - ``_make_request`` swallows a broken pipe or reset while the body is
      sent (an upstream that answered early and closed) and reads the
      response; the iterable is then left unfinished, and the next attempt
      replays from the start.
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


def body_reader(response: requests.Response) -> Callable[[int], bytes]:
    """``read1(n)`` for the rest of a streamed response's raw body: what has arrived, still encoded.

    urllib3's ``read1(n, decode_content=False)``, except for a chunked body
    read from a real connection: then http.client's own ``read1``, which
    urllib3 would call underneath after a context manager and bookkeeping
    that cost as much as the rest of relaying a small SSE event. Nothing is
    lost by going around it there: http.client raises ``IncompleteRead`` for
    a chunked body cut short (urllib3 adds that check only for Content-Length
    bodies), urllib3 never buffers bytes it did not decode, and an error
    still closes the connection, because the caller closes the response on
    any error (urllib3's ``close`` closes its connection).
    """
    raw = response.raw
    fp = getattr(raw, "_fp", None)
    if getattr(raw, "chunked", False) and isinstance(fp, http.client.HTTPResponse) and fp.chunked \
            and not getattr(raw, "_has_decoded_content", True):
        return fp.read1
    return functools.partial(raw.read1, decode_content=False)


def causes(exc: BaseException) -> list[BaseException]:
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


def refused_head(exc: BaseException) -> str | None:
    """headerparse's reason for refusing the response head, if that is what ``exc`` comes from.

    urllib3 and requests wrap it as a ConnectionError; its message names the
    rule broken, never a header value.
    """
    for error in causes(exc):
        if isinstance(error, headerparse.MalformedHeaderBlock):
            return str(error)
    return None


def describe_error(exc: BaseException) -> str:
    """A short description of a network error for the log: the socket-level cause when there is one.

    e.g. "Connection refused", "cannot resolve host (Name or service not
    known)", "timed out". urllib3's own messages repeat the URL (query
    included) and object reprs; the innermost cause says what happened.
    """
    chain = causes(exc)
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
