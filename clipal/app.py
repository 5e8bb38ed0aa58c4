"""The Flask application: one Blueprint per client, /health, /status, /metrics, and the shared runtime.

``create_app(config_dir)`` is the app factory every entry point uses (the
``clipal`` command, ``python -m clipal`` and gunicorn via :mod:`clipal.wsgi`).
The process must already be monkey-patched by gevent when it is called.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from flask import Flask, Response, abort, request

from . import proxy
from .access import Refused, is_loopback_address
from .blueprints import RUNTIME, checked_access, client_blueprint
from .clients import CLIENTS
from .config import CONFIG_FILE, Config, load_config
from .logs import get_logger
from .metrics import CONTENT_TYPE, METER, Metrics
from .routing import ProviderView
from .runtime import Runtime, apply_logging, warn_about_permissions
from .status import default_config_dir, status_document

__all__ = ["METRICS", "ClipalFlask", "create_app", "default_config_dir", "warn_if_open_to_the_network"]

#: Where the app keeps its :class:`clipal.metrics.Metrics` (``app.extensions[METRICS]``).
METRICS = "clipal.metrics"
#: The Blueprint names of the clients, whose requests are measured.
_CLIENT_NAMES = frozenset(client.name for client in CLIENTS)


class ClipalFlask(Flask):
    """Flask, routing WebSocket upgrades like any other request.

    werkzeug refuses an upgrade request for a rule that is not a WebSocket
    rule with an HTML 400 before any view or hook runs; clipal's client
    Blueprints answer it themselves (426, in the client's shape).
    """

    def create_url_adapter(self, request):  # type: ignore[override]
        adapter = super().create_url_adapter(request)
        if adapter is not None:
            adapter.websocket = False
        return adapter


def warn_if_open_to_the_network(config: Config) -> None:
    """Listening beyond this machine without access tokens: say what clipal will do about it."""
    settings = config.settings
    if settings.access_tokens or settings.listen_addr.lower() == "localhost" \
            or is_loopback_address(settings.listen_addr):
        return
    get_logger().warning("listening on %s without access_tokens: only this machine is served (other peers get "
                         "403) until access_tokens are set in %s", settings.listen_addr, CONFIG_FILE)


def create_app(config_dir: Path | str | None = None, *, config: Config | None = None,
               overrides: Mapping[str, Any] | None = None, watch: bool = True) -> Flask:
    """Build the app for ``config_dir`` (default: $CLIPAL_CONFIG_DIR or ~/.clipal).

    Raises :class:`clipal.config.ConfigError` when the configuration is
    invalid. ``overrides`` are command-line settings that win over
    config.yaml, now and after every reload. With ``watch`` the config
    directory is watched, and edits apply without a restart.
    """
    if config is None:
        config = load_config(Path(config_dir).expanduser() if config_dir else default_config_dir())
    runtime = Runtime(config, overrides)
    apply_logging(runtime.snapshot.config)
    log = get_logger()
    warn_about_permissions(config)
    warn_if_open_to_the_network(runtime.snapshot.config)
    for client in CLIENTS:
        names = [p.name for p in runtime.snapshot.routing.client(client.name).providers]
        if names:
            log.info("%s: %d provider(s) loaded: %s", client.file, len(names), ", ".join(names))
        else:
            log.info("%s: no providers; %s requests will get 503", client.file, client.prefix)

    app = ClipalFlask("clipal")
    app.url_map.merge_slashes = False
    app.extensions[RUNTIME] = runtime
    for client in CLIENTS:
        app.register_blueprint(client_blueprint(client))
    started = time.monotonic()

    def routing_views() -> Iterator[tuple[str, list[ProviderView]]]:
        routing = runtime.snapshot.routing
        for client in CLIENTS:
            if client.name in routing.clients:
                yield client.name, routing.clients[client.name].views()

    metrics = app.extensions[METRICS] = Metrics(routing_views)

    @app.before_request
    def start_meter() -> None:
        # Before the client Blueprint's own hooks, so a refused request is counted and timed too.
        if request.blueprint in _CLIENT_NAMES:
            settings = runtime.snapshot.config.settings
            if settings.metrics:
                request.environ[METER] = metrics.meter(request.blueprint, settings.reactivate_after)

    @app.after_request
    def count_answer(response: Response) -> Response:
        meter = request.environ.get(METER)
        if meter is not None:  # a relayed answer is counted by the proxy when it ends
            meter.answered(response.status_code, response.headers.get("X-Clipal-Provider", ""))
        return response

    def refusal() -> Response | None:
        # /status and /metrics tell who the providers are and how they fare: the agents' access rule applies.
        decision = checked_access(request.environ, runtime.snapshot.access, log)
        if isinstance(decision, Refused):
            return proxy.error_response(None, decision.status, decision.message)
        return None

    by_name = {client.name: client for client in CLIENTS}

    @app.before_request
    def refuse_unservable_paths() -> Response | None:
        # Runs before every Blueprint's hooks and for unrouted paths too, so a
        # dot segment is refused whatever it is attached to.
        return proxy.refuse_path(request.environ, by_name.get(request.blueprint or ""))

    @app.get("/health")
    def health() -> Response:
        return Response('{"status": "healthy"}', mimetype="application/json")

    @app.get("/status")
    def status() -> Response:
        refused = refusal()
        if refused is not None:
            return refused
        document = status_document(runtime, time.monotonic() - started)
        return Response(json.dumps(document, indent=2) + "\n", mimetype="application/json",
                        headers={"Cache-Control": "no-store"})

    @app.get("/metrics")
    def metrics_text() -> Response:
        if not runtime.snapshot.config.settings.metrics:
            abort(404)  # as if there were no such route: metrics: false
        refused = refusal()
        if refused is not None:
            return refused
        return Response(metrics.exposition(), content_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})

    @app.errorhandler(404)
    def not_found(_error: Exception) -> Response:
        return proxy.error_response(None, 404, proxy.no_route_message(request.path))

    @app.errorhandler(405)
    def not_allowed(_error: Exception) -> Response:
        return proxy.error_response(None, 405, f"clipal: method {request.method} not allowed for {request.path}")

    if watch:
        from .reload import start_watching

        app.extensions["clipal.watcher"] = start_watching(runtime)
    return app
