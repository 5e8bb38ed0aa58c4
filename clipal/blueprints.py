"""One Flask Blueprint per client: the request path of every proxied request.

``/claudecode/*``, ``/codex/*`` and ``/gemini/*`` are each a Blueprint that
owns its client: its proxy view serves the client's requests
(:func:`clipal.proxy.serve`), its ``before_request`` hooks turn away what
must never be forwarded before anything of the request is read, and its
error handler answers in the client's own error shape, so the agent's SDK
surfaces clipal's errors as ordinary API errors.
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import HTTPException

from . import access, proxy
from .clients import ClientKind
from .logs import get_logger
from .outbound import CREDENTIAL_HEADERS, client_credentials
from .runtime import Runtime

#: Every HTTP method is forwarded; Flask must not answer OPTIONS or HEAD itself.
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
#: Where the app keeps its :class:`Runtime` (``app.extensions[RUNTIME]``).
RUNTIME = "clipal"
#: The environ keys of the headers that can carry a client credential (an access token).
_CREDENTIAL_ENVIRON = tuple((name, "HTTP_" + name.upper().replace("-", "_")) for name in CREDENTIAL_HEADERS)


class RefusalLog:
    """Says that a peer was refused at most once a minute, so a scanner cannot flood the log."""

    INTERVAL = 60.0
    LIMIT = 4096  # peers remembered; past that the table starts over

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def should_log(self, peer: str, now: float) -> bool:
        last = self._last.get(peer)
        if last is not None and now - last < self.INTERVAL:
            return False
        if len(self._last) >= self.LIMIT:
            self._last.clear()
        self._last[peer] = now
        return True


_refusals = RefusalLog()


def access_decision(environ: dict, policy: access.AccessPolicy) -> access.Allowed | access.Refused:
    """The access rule for one request, from its environ, before anything of its body is read."""
    headers = [(name, environ[key]) for name, key in _CREDENTIAL_ENVIRON if key in environ]
    credentials = [c.value for c in client_credentials(headers, environ.get("QUERY_STRING", ""))]
    return access.check(policy, peer=environ.get("REMOTE_ADDR", ""), host=environ.get("HTTP_HOST", ""),
                        origin=environ.get("HTTP_ORIGIN"), credentials=credentials)


def checked_access(environ: dict, policy: access.AccessPolicy,
                   log: logging.LoggerAdapter) -> access.Allowed | access.Refused:
    """:func:`access_decision`, with a refusal logged (at most once a minute per peer).

    Every route that can spend the owner's keys or tell what they are for - the
    client prefixes, /status, /metrics - asks this before anything else, in
    the request's context (the log line names its path, without the query).
    """
    decision = access_decision(environ, policy)
    if isinstance(decision, access.Refused):
        peer = environ.get("REMOTE_ADDR", "") or "a local socket"
        if _refusals.should_log(peer, time.monotonic()):
            log.warning("refused %s %s from %s with %d: %s (further refusals of this peer are not logged "
                        "for a minute)", environ.get("REQUEST_METHOD"), request.path, peer, decision.status,
                        decision.reason)
    return decision


def current_runtime() -> Runtime:
    return current_app.extensions[RUNTIME]


def client_blueprint(client: ClientKind) -> Blueprint:
    """The Blueprint that serves ``client`` under its prefix."""
    blueprint = Blueprint(client.name, __name__, url_prefix=client.prefix)
    log = get_logger(client.name)

    @blueprint.before_request
    def check_access() -> Response | None:
        # Before the body is read and before any provider is contacted: a
        # refused request costs the owner nothing, and comes before a 413.
        environ = request.environ
        decision = checked_access(environ, current_runtime().snapshot.access, log)
        if isinstance(decision, access.Allowed):
            environ[proxy.TOKEN_NAME] = decision.token_name
            return None
        return proxy.error_response(client, decision.status, decision.message)

    @blueprint.before_request
    def refuse_websocket() -> Response | None:
        # Codex tries Responses-over-WebSocket first and falls back to plain
        # HTTP at once on a 426; any other answer ends its run or costs it
        # seconds. clipal relays HTTP only.
        if "websocket" not in request.environ.get("HTTP_UPGRADE", "").lower():
            return None
        log.info("WebSocket upgrade for %s answered 426 (clipal relays plain HTTP; the client falls back to it)",
                 proxy.raw_subpath(request.environ, client.prefix) or "/")
        refusal = proxy.error_response(client, 426, "clipal does not relay WebSocket connections; use HTTP")
        refusal.headers["Connection"] = "close"
        return refusal

    def forward(subpath: str = "") -> Response:
        runtime = current_runtime()
        return proxy.serve(client, request.environ, runtime.snapshot, runtime.session)

    for rule in ("", "/", "/<path:subpath>"):
        blueprint.add_url_rule(rule, "proxy", forward, methods=METHODS, provide_automatic_options=False,
                               strict_slashes=False)

    @blueprint.errorhandler(Exception)
    def internal_error(error: Exception) -> Response:
        if isinstance(error, HTTPException):  # Flask's own answers (none expected under a prefix)
            return proxy.error_response(client, error.code or 500, f"clipal: {error.description}")
        # Logged through clipal's logger, which redacts keys (Flask's would not).
        log.error("internal error serving %s %s", request.method, request.path, exc_info=error)
        return proxy.error_response(client, 500, "clipal: internal error")

    return blueprint
