"""The proxy itself: one request, walked over the providers until one answers.

Flow: read the body once (a long one while the first attempt sends it)
→ pick providers from the failover state
→ one attempt each (:mod:`clipal.forward`) → on failure record the verdict
and try the next → at the commit point hand the response to the client and
stream the rest, never retrying after that.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from typing import Iterator
from urllib.parse import quote, unquote

import requests
from flask import Response

from . import forward
from .body import Body, BodyTooLarge, NoRoomForBody, start_body
from .clientwatch import ClientGone, ClientWatch, client_socket
from .access import is_loopback_address
from .classify import RETURN, Kind, classify_answer, provider_failure
from .clients import ClientKind
from .completion import CompletionCheck
from .config import format_duration
from .frontdoor import OutOfFileDescriptors
from .logs import get_logger
from .metrics import METER, NO_METER, NullMeter
from .outbound import build_upstream_request, client_credentials
from .redact import add_secret
from .routing import Attempt, Walk
from .runtime import Snapshot
from .transport import describe_error


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


#: The ``type`` of clipal's own error shape, for a request no client's shape applies to.
_OWN_ERROR_TYPES = {400: "invalid_request", 401: "access_denied", 403: "access_denied"}


def error_response(client: ClientKind | None, status: int, message: str, *,
                   retry_after: int | None = None, provider: str | None = None) -> Response:
    """An error clipal produces itself, in the client's own JSON shape."""
    if client is None:  # no client's shape applies (no prefix, /status, /metrics): clipal's own
        body = json.dumps({"error": {"message": message, "type": _OWN_ERROR_TYPES.get(status, "not_found")}}).encode()
    else:
        body = client.error_body(status, message)
    response = Response(body, status=status, mimetype="application/json")
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    if provider is not None:
        response.headers["X-Clipal-Provider"] = provider
    return response


# --- request details ------------------------------------------------------------


def request_path(environ: dict) -> str:
    """The path of the request target, still percent-encoded as the client sent it."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        path = raw.split("?", 1)[0]
        if "://" in path:  # absolute-form request target
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        return path
    return quote(environ.get("PATH_INFO", ""), safe="/:@!$&'()*+,;=-._~")


def subpath_after(path: str, prefix: str) -> str | None:
    """What follows ``prefix`` in ``path`` when the path's first segment, decoded, is the prefix.

    Segments are split at the slashes the client wrote, so an encoded slash
    (``%2F``) never ends one, and an empty first segment (``//claudecode``)
    is not the prefix: werkzeug routes both as ``/claudecode/...`` (it drops
    leading slashes and decodes ``%2F``), but the rest forwarded must be the
    rest of what the client sent. Returns None when the prefix is not the
    first segment; the rest keeps the client's percent-encoding.
    """
    name = prefix.strip("/")
    first, slash, rest = path[1:].partition("/")
    if not path.startswith("/") or (first != name and unquote(first) != name):
        return None
    return slash + rest


def has_dot_segment(path: str) -> bool:
    """Whether a segment of the decoded path is ``.`` or ``..``.

    Decoded as a whole, so ``%2e%2e`` counts and so does ``..%2F``: an
    upstream that decodes an encoded slash before resolving the path would
    climb out of base_url on it, with the provider's key.
    """
    if "." not in path and "%" not in path:
        return False
    return any(segment in (".", "..") for segment in unquote(path).split("/"))


def no_route_message(path: str) -> str:
    return f"clipal: no route for {path}; use /claudecode, /codex or /gemini"


def refuse_path(environ: dict, client: ClientKind | None) -> Response | None:
    """clipal's answer to a request path it must not serve, or None to go on.

    ``client`` is the client werkzeug routed the request to, if any. A dot
    segment gets 400 - resolved by the upstream, it would reach a provider
    path outside base_url with the owner's key - in that client's error shape
    when the path names it. A path whose own first segment is no client
    prefix gets the 404 of an unknown path. Nothing is read or forwarded.
    """
    path = request_path(environ)
    named = client if client is not None and subpath_after(path, client.prefix) is not None else None
    if has_dot_segment(path):
        get_logger(named.name if named else None).warning(
            "request path %s has a '.' or '..' segment; answered 400", path)
        return error_response(named, 400, "clipal: the request path has a '.' or '..' segment "
                                          "(also percent-encoded); clipal does not forward such paths")
    if client is not None and named is None:
        return error_response(None, 404, no_route_message(path))
    return None


def raw_subpath(environ: dict, prefix: str) -> str:
    """The request path after the client prefix, still percent-encoded as the client sent it.

    Only for a request :func:`refuse_path` let through; raises ValueError
    when the path's first segment is not ``prefix``.
    """
    subpath = subpath_after(request_path(environ), prefix)
    if subpath is None:
        raise ValueError(f"the request path does not start with the segment {prefix}")
    return subpath


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
    limit = snapshot.config.settings.max_request_body_bytes
    try:
        # A long body with a Content-Length is only started here: the first attempt reads it
        # from the client as it sends it upstream (clipal.body.start_body).
        body = start_body(environ, limit)
    except BodyTooLarge:
        log.warning("request body larger than max_request_body_bytes (%d); answered 413", limit)
        return error_response(client, 413, f"request body exceeds clipal's max_request_body_bytes ({limit} bytes)")
    except ClientGone:
        return _body_cut_short(log)
    except NoRoomForBody as error:
        return _no_room_for_body(client, log, error)
    return _attempts(client, environ, snapshot, session, body)


def _body_cut_short(log: logging.LoggerAdapter) -> Response:
    log.debug("client went away while sending the request body")
    return Response(status=400)


def _no_room_for_body(client: ClientKind, log: logging.LoggerAdapter, error: NoRoomForBody) -> Response:
    log.error("no temporary file for a request body over the in-memory budget (%s); answered 503", error)
    return error_response(client, 503, "clipal: no room to hold the request body; try again", retry_after=1)


def _attempts(client: ClientKind, environ: dict, snapshot: Snapshot, session: requests.Session,
              body: Body) -> Response:
    """The providers (and keys) in turn with ``body``, until one answers or all failed.

    Every attempt replays the whole body, so it is held until the request
    gives up, and then closed on every path; once a response is committed
    the relay owns it and closes it when the response ends (the upstream
    response keeps a reference to what was sent until then).

    A body still arriving is read from the client by the attempt sending it,
    and what arrived is replayed by the next. A client that leaves (or is
    refused for stalling) while sending it ends the request there: the
    attempt's connection is closed, no provider is blamed, nothing is retried.
    """
    log = get_logger(client.name)
    settings = snapshot.config.settings
    method = environ["REQUEST_METHOD"]
    held: Body | None = body
    watch: ClientWatch | None = None
    try:
        subpath = raw_subpath(environ, client.prefix)
        query = environ.get("QUERY_STRING", "")
        log.debug("request received: %s %s (%d bytes%s)", method, subpath or "/", body.length,
                  ", held in a temporary file" if body.in_file else "")

        routing = snapshot.routing.client(client.name)
        if not routing.providers:
            # The whole path helps the owner at this machine; a caller elsewhere learns only the file name.
            local = is_loopback_address(environ.get("REMOTE_ADDR", ""))
            path = snapshot.config.config_dir / client.file if local else client.file
            return error_response(client, 503, f"clipal has no enabled providers for {client.name}: "
                                               f"add one to {path}", retry_after=1)

        headers = _request_headers(environ)
        _remember_client_credentials(headers, query)
        count_tokens = client.is_count_tokens(subpath)
        walk = routing.walk(routing.lane_for(count_tokens), count_tokens=count_tokens)
        _log_events(log, walk)

        # Until the body has all arrived the client socket is readable with it: the watch starts then.
        watch = ClientWatch(client_socket(environ), start=False)
        body.when_arrived(watch.start)
        meter: NullMeter = environ.get(METER, NO_METER)
        for attempt in walk:
            provider = attempt.provider
            request = build_upstream_request(
                method=method, path=subpath, query=query, headers=headers, provider=provider,
                key=provider.api_keys[attempt.key], client=client, remote_addr=environ.get("REMOTE_ADDR", ""),
                scheme=environ.get("wsgi.url_scheme", "http"),
            )
            if log.isEnabledFor(logging.DEBUG):  # its arguments cost more than the check
                log.debug("attempt via %s%s: %s %s", provider.name,
                          f" ({attempt.key_label})" if attempt.key_label else "", method, request.url.split("?", 1)[0])
            meter.sending()
            try:
                with watch.guard():
                    # bytes, or a fresh reader from the file's start: each attempt sends it all
                    ready = forward.send(session, request, body.payload(), settings.upstream_idle_timeout)
            except forward.NetworkFailure as failure:
                verdict = provider_failure(failure.reason, failure.kind)
                walk.failed(attempt, verdict)  # counted in manual mode too: the request was sent
                meter.failed(provider.name, verdict, tried_next=not routing.manual)
                if routing.manual:  # no failover: clipal answers for the unreachable pinned provider
                    log.warning("pinned provider %s failed: %s; answering 502 (manual mode)", provider.name,
                                failure.reason)
                    return error_response(client, 502, f"clipal: pinned provider {provider.name} failed: "
                                                        f"{failure.reason}", provider=provider.name)
                _log_events(log, walk)
                continue
            except OutOfFileDescriptors as error:  # no provider is to blame, and none other would do better
                log.error("clipal ran out of file descriptors connecting upstream (%s); answered 503, "
                          "no provider blamed", error)
                return error_response(client, 503, "clipal ran out of file descriptors", retry_after=1)
            # Manual mode returns every upstream answer as it is.
            verdict = RETURN if routing.manual else classify_answer(
                ready.status, ready.upstream_headers, ready.first, ready.event, now=time.time())
            if verdict.failover:
                ready.close()
                walk.failed(attempt, verdict)
                meter.failed(provider.name, verdict)
                _log_events(log, walk)
                continue
            walk.committed(attempt)
            meter.committed(provider.name)
            relay = _Relay(client, attempt, ready, watch, settings.upstream_idle_timeout, walk, body)
            relay.token_name = environ.get(TOKEN_NAME)
            relay.meter = meter
            watch = held = None  # the relay owns them now
            return relay.response()
    except ClientGone:
        if not body.complete:  # raised by reading the body, within an attempt sending it
            return _body_cut_short(log)
        log.info("client disconnected while waiting for the upstream; request abandoned")
        return Response(status=499)
    except NoRoomForBody as error:  # the temporary file of a body still arriving filled the disk
        return _no_room_for_body(client, log, error)
    finally:
        if watch is not None:
            watch.stop()
        if held is not None:
            held.close()

    unavailable = walk.unavailable()
    log.error("all providers failed; answering %d (retry after %ds)", unavailable.status, unavailable.retry_after)
    return error_response(client, unavailable.status, f"clipal: {unavailable.message}",
                          retry_after=unavailable.retry_after)



def _log_events(log: logging.LoggerAdapter, walk: Walk) -> None:
    """Write what the routing policy reported (failovers, deactivations, breaker changes), in order."""
    for event in walk.events:
        log.log(_LEVELS[event.level], "%s", event.message)
    walk.events.clear()


_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


#: The environ key under which the access check leaves the name of the token a request carried.
TOKEN_NAME = "clipal.token_name"


class _Relay:
    """Streams a committed upstream response to the client and reports how it ended.

    The WSGI server iterates it and then calls :meth:`close` on every path,
    including when the body is never iterated (HEAD, or a client gone before
    the first write), which a bare generator's ``finally`` would miss.

    How the answer ended goes back to the routing walk: a 2xx that completed
    (an SSE stream with its protocol's terminal event) is a success for the
    circuit breaker; any other answer returned as is is neutral; a stall, a
    break or a stream that ended without its terminal event is a provider
    failure, so the agent's retry goes to the next provider.
    """

    #: measures the request (clipal.metrics); the app sets it, or nothing is counted
    meter: NullMeter = NO_METER

    def __init__(self, client: ClientKind, attempt: Attempt, ready: forward.Ready,
                 watch: ClientWatch, idle_timeout: float, walk: Walk, body: Body) -> None:
        self.client = client
        self.attempt = attempt
        self.provider = attempt.provider
        self.ready = ready
        self.watch = watch
        self.idle_timeout = idle_timeout
        self.walk = walk
        self.body = body
        #: the access token's name, for the completion line (None without access tokens)
        self.token_name: str | None = None
        self.check: CompletionCheck | None = None
        if 200 <= ready.status < 300 and ready.event is not None:  # an SSE stream (by header or by its bytes)
            self.check = CompletionCheck(client.name, ready.upstream_headers.get("Content-Encoding", ""))
        self._reported = False

    def _finished(self, success: bool | None, reason: str = "", kind: Kind = Kind.SERVER_ERROR) -> str:
        """Report the end to the walk; for a failure, the log line's tail naming where the next request goes."""
        if self._reported:
            return ""
        self._reported = True
        self.meter.finished(self.provider.name, self.ready.status, success)
        walk = self.walk
        walk.finished(self.attempt, success=success, reason=reason, kind=kind)
        _log_events(get_logger(self.client.name), walk)
        if success is not False:
            return ""
        following = walk.routing.current(walk.lane)
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
        ready, started, sent, check = self.ready, time.monotonic(), 0, self.check
        self.meter.streaming()
        try:
            if ready.first:
                sent += len(ready.first)
                if check is not None:
                    check.feed(ready.first)
                yield ready.first
            rest = forward.stream_rest(ready)
            while True:
                with self.watch.guard():
                    chunk = next(rest, None)
                if chunk is None:
                    break
                sent += len(chunk)
                if check is not None:
                    check.feed(chunk)
                yield chunk
            for_token = f" for {self.token_name}" if self.token_name else ""
            if check is not None and check.status == "incomplete":
                incomplete = f"ended without its terminal event after {sent} bytes"
                log.warning("stream from %s%s %s; %s", self.provider.name, for_token, incomplete,
                            self._finished(False, incomplete, Kind.INCOMPLETE))
                return
            log.info("request completed via %s%s (%d, %d bytes in %.2fs)", self.provider.name, for_token,
                     ready.status, sent, time.monotonic() - started)
            self._finished(True if 200 <= ready.status < 300 else None)
        except ClientGone:
            log.info("client disconnected during the response from %s after %d bytes", self.provider.name, sent)
            self._finished(None)
        except forward.UpstreamIdle:
            stalled = f"stalled for {format_duration(self.idle_timeout)} after {sent} bytes"
            log.warning("upstream %s %s; %s", self.provider.name, stalled,
                        self._finished(False, stalled, Kind.TIMEOUT))
            raise StreamAborted("upstream stalled") from None
        except Exception as exc:  # any break in the upstream stream: the client must see it as broken
            broke = f"broke after {sent} bytes ({describe_error(exc)})"
            log.warning("upstream %s %s; %s", self.provider.name, broke,
                        self._finished(False, broke, Kind.SERVER_ERROR))
            raise StreamAborted("upstream broke") from None
        finally:
            self.close()

    def close(self) -> None:
        """Idempotent: stop watching the client, release the upstream response and the request body."""
        self.watch.stop()
        self.ready.close()
        self.body.close()
        if not self._reported:  # never iterated (HEAD, or the client left before the first write)
            self._finished(True if 200 <= self.ready.status < 300 and self.check is None else None)
