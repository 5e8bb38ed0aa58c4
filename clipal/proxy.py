"""The proxy itself: one request, walked over the providers until one answers.

Flow: read the body once → pick providers from the failover state
→ one attempt each (:mod:`clipal.forward`) → on failure record the verdict
and try the next → at the commit point hand the response to the client and
stream the rest, never retrying after that.
"""

from __future__ import annotations

import errno
import json
import time
from typing import Iterator
from urllib.parse import quote

import requests
from flask import Response

from . import forward
from .clientwatch import ClientGone, ClientWatch, client_socket
from .classify import Kind, provider_failure
from .clients import ClientKind
from .config import Provider, format_duration
from .failover import ProviderPool
from .frontdoor import OutOfFileDescriptors
from .logs import get_logger
from .outbound import build_upstream_request, client_credentials
from .redact import add_secret
from .runtime import Snapshot


class StreamAborted(ConnectionResetError):
    """Ends a committed response abnormally after the upstream stalled or broke.

    It is a connection reset on purpose: the WSGI servers clipal runs on
    (gevent's pywsgi, gunicorn) then close the client connection without the
    final chunk and without logging a traceback, so the client sees an
    incomplete response rather than a clean-looking truncated one.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(errno.ECONNRESET, reason)


class PassthroughResponse(Response):
    """A Flask response that adds nothing: no default Content-Type."""

    default_mimetype = None


def error_response(client: ClientKind | None, status: int, message: str, *,
                   retry_after: int | None = None, provider: str | None = None) -> Response:
    """An error clipal produces itself, in the client's own JSON shape."""
    if client is None:
        body = json.dumps({"error": {"message": message, "type": "not_found"}}).encode()
    else:
        body = client.error_body(status, message)
    response = Response(body, status=status, mimetype="application/json")
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    if provider is not None:
        response.headers["X-Clipal-Provider"] = provider
    return response


# --- request details ------------------------------------------------------------


def raw_subpath(environ: dict, prefix: str) -> str:
    """The request path after the client prefix, still percent-encoded as the client sent it."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        path = raw.split("?", 1)[0]
        if "://" in path:  # absolute-form request target
            path = "/" + path.split("://", 1)[1].partition("/")[2]
    else:
        path = quote(environ.get("PATH_INFO", ""), safe="/:@!$&'()*+,;=-._~")
    return path[len(prefix):]


class BodyTooLarge(Exception):
    pass


def read_body(environ: dict, limit: int) -> bytes:
    """The whole request body, read once; raises :class:`BodyTooLarge` past ``limit``."""
    stream = environ["wsgi.input"]
    length_header = environ.get("CONTENT_LENGTH")
    if length_header:
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length > limit:
            raise BodyTooLarge()
        if length >= 0:
            body = stream.read(length) if length else b""
            if len(body) < length:  # a slow client: keep reading until all arrived
                parts = [body]
                got = len(body)
                while got < length:
                    more = stream.read(length - got)
                    if not more:
                        raise ClientGone()
                    parts.append(more)
                    got += len(more)
                body = b"".join(parts)
            return body
    if "chunked" not in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return b""
    buffer = bytearray()
    while len(buffer) <= limit:
        more = stream.read(min(65536, limit + 1 - len(buffer)))
        if not more:
            return bytes(buffer)
        buffer += more
    raise BodyTooLarge()


def _request_headers(environ: dict) -> list[tuple[str, str]]:
    headers = []
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers.append((key[5:].replace("_", "-").title(), value))
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            headers.append((key.replace("_", "-").title(), value))
    return headers


def _remember_client_credentials(headers: list[tuple[str, str]], query: str) -> None:
    """Client keys never reach the upstream, and must never reach a log line either."""
    for credential in client_credentials(headers, query):
        add_secret(credential.value)
        if credential.carrier == "query" and credential.raw != credential.value:
            add_secret(credential.raw)  # also as percent-encoded on the wire


# --- the request ------------------------------------------------------------------


def serve(client: ClientKind, environ: dict, snapshot: Snapshot, session: requests.Session) -> Response:
    """Serve one request for ``client`` with the configuration it arrived under."""
    log = get_logger(client.name)
    settings = snapshot.config.settings
    method = environ["REQUEST_METHOD"]
    subpath = raw_subpath(environ, client.prefix)
    query = environ.get("QUERY_STRING", "")

    try:
        body = read_body(environ, settings.max_request_body_bytes)
    except BodyTooLarge:
        log.warning("request body larger than max_request_body_bytes (%d); answered 413", settings.max_request_body_bytes)
        return error_response(client, 413, f"request body exceeds clipal's max_request_body_bytes "
                                            f"({settings.max_request_body_bytes} bytes)")
    except ClientGone:
        log.debug("client went away while sending the request body")
        return Response(status=400)
    log.debug("request received: %s %s (%d bytes)", method, subpath or "/", len(body))

    pool = snapshot.state.pool(client.name)
    if not pool.providers:
        path = snapshot.config.config_dir / client.file
        return error_response(client, 503, f"clipal has no enabled providers for {client.name}: "
                                           f"add one to {path}", retry_after=1)

    headers = _request_headers(environ)
    _remember_client_credentials(headers, query)
    lane = pool.lane_for(client.is_count_tokens(subpath))
    for name in pool.expire():
        log.info("provider %s reactivated", name)

    watch = ClientWatch(client_socket(environ))
    try:
        for provider in pool.candidates(lane):
            request = build_upstream_request(
                method=method, path=subpath, query=query, headers=headers, provider=provider,
                client=client, remote_addr=environ.get("REMOTE_ADDR", ""),
                scheme=environ.get("wsgi.url_scheme", "http"),
            )
            log.debug("attempt via %s: %s %s", provider.name, method, request.url.split("?", 1)[0])
            try:
                with watch.guard():
                    ready = forward.send(session, request, body, settings.upstream_idle_timeout)
            except forward.AttemptFailed as failure:
                _record_failure(log, pool, provider, failure, lane)
                continue
            except OutOfFileDescriptors as error:  # no provider is to blame, and none other would do better
                log.error("clipal ran out of file descriptors connecting upstream (%s); answered 503, no provider blamed", error)
                return error_response(client, 503, "clipal ran out of file descriptors", retry_after=1)
            pool.succeeded(provider, lane)
            relay = _Relay(client, provider, ready, watch, settings.upstream_idle_timeout, pool, lane)
            watch = None  # the relay owns it now
            return relay.response()
    except ClientGone:
        log.info("client disconnected while waiting for the upstream; request abandoned")
        return Response(status=499)
    finally:
        if watch is not None:
            watch.stop()

    unavailable = pool.unavailable(lane)
    log.error("all providers failed; answering %d (retry after %ds)", unavailable.status, unavailable.retry_after)
    return error_response(client, unavailable.status, f"clipal: {unavailable.message}",
                          retry_after=unavailable.retry_after)


def _record_failure(log, pool: ProviderPool, provider: Provider, failure: forward.AttemptFailed, lane: str) -> None:
    verdict = failure.verdict
    outage = pool.failed(provider, verdict, lane)
    if verdict.deactivate and outage is not None:
        log.error("provider %s deactivated for %s: %s", provider.name,
                  format_duration(pool.reactivate_after), verdict.reason)
    elif outage is not None and verdict.cooldown:
        log.warning("provider %s failed: %s; cooling down for %s; trying next", provider.name, verdict.reason,
                    format_duration(verdict.cooldown))
    else:
        log.warning("provider %s failed: %s; trying next", provider.name, verdict.reason)


class _Relay:
    """Streams a committed upstream response to the client and cleans up after it.

    The WSGI server iterates it and then calls :meth:`close` on every path,
    including when the body is never iterated (HEAD, or a client gone before
    the first write), which a bare generator's ``finally`` would miss.
    """

    def __init__(self, client: ClientKind, provider: Provider, ready: forward.Ready,
                 watch: ClientWatch, idle_timeout: float, pool: ProviderPool, lane: str) -> None:
        self.client = client
        self.provider = provider
        self.ready = ready
        self.watch = watch
        self.idle_timeout = idle_timeout
        self.pool = pool
        self.lane = lane

    def _failed(self, reason: str, kind: Kind) -> str:
        """A stall or break after the commit point: the provider failed, as a failed attempt does.

        clipal cannot retry (bytes went out), but the client's next request
        - the agent retrying the turn - must not go back to the provider that
        just broke. Returns the log line's tail naming where that goes.
        """
        self.pool.failed(self.provider, provider_failure(reason, kind), self.lane)
        following = self.pool.current(self.lane)
        if following is None or following.name == self.provider.name:
            return "response to the client ended incomplete"
        return f"response to the client ended incomplete; next request starts at {following.name}"

    def _headers(self) -> list[tuple[str, str]]:
        headers = [(k, v) for k, v in self.ready.headers if k.lower() != "x-clipal-provider"]
        headers.append(("X-Clipal-Provider", self.provider.name))
        return headers

    def response(self) -> Response:
        return PassthroughResponse(self, status=f"{self.ready.status} {self.ready.reason}".strip(),
                                   headers=self._headers(), direct_passthrough=True)

    def __iter__(self) -> Iterator[bytes]:
        log = get_logger(self.client.name)
        ready, started, sent = self.ready, time.monotonic(), 0
        try:
            if ready.first:
                sent += len(ready.first)
                yield ready.first
            rest = forward.stream_rest(ready, self.idle_timeout)
            while True:
                with self.watch.guard():
                    chunk = next(rest, None)
                if chunk is None:
                    break
                sent += len(chunk)
                yield chunk
            log.info("request completed via %s (%d, %d bytes in %.2fs)", self.provider.name, ready.status,
                     sent, time.monotonic() - started)
        except ClientGone:
            log.info("client disconnected during the response from %s after %d bytes", self.provider.name, sent)
        except forward.UpstreamIdle:
            stalled = f"stalled for {format_duration(self.idle_timeout)} after {sent} bytes"
            log.warning("upstream %s %s; %s", self.provider.name, stalled, self._failed(stalled, Kind.TIMEOUT))
            raise StreamAborted("upstream stalled") from None
        except Exception as exc:  # any break in the upstream stream: the client must see it as broken
            broke = f"broke after {sent} bytes ({forward.describe_error(exc)})"
            log.warning("upstream %s %s; %s", self.provider.name, broke, self._failed(broke, Kind.SERVER_ERROR))
            raise StreamAborted("upstream broke") from None
        finally:
            self.close()

    def close(self) -> None:
        """Idempotent: stop watching the client and release the upstream response."""
        self.watch.stop()
        self.ready.close()
