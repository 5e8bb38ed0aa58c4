"""One Flask Blueprint per client: the request path of every proxied request.

``/claudecode/*``, ``/codex/*`` and ``/gemini/*`` are each a Blueprint that
owns its client: its proxy view serves the client's requests
(:func:`clipal.proxy.serve`), its ``before_request`` hooks turn away what
must never be forwarded before anything of the request is read, and its
error handler answers in the client's own error shape, so the agent's SDK
surfaces clipal's errors as ordinary API errors.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import HTTPException

from . import proxy
from .clients import ClientKind
from .logs import get_logger
from .runtime import Runtime

#: Every HTTP method is forwarded; Flask must not answer OPTIONS or HEAD itself.
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
#: Where the app keeps its :class:`Runtime` (``app.extensions[RUNTIME]``).
RUNTIME = "clipal"


def current_runtime() -> Runtime:
    return current_app.extensions[RUNTIME]


def client_blueprint(client: ClientKind) -> Blueprint:
    """The Blueprint that serves ``client`` under its prefix."""
    blueprint = Blueprint(client.name, __name__, url_prefix=client.prefix)
    log = get_logger(client.name)

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
