"""The Flask application: one Blueprint per client, /health, and the shared runtime.

``create_app(config_dir)`` is the app factory every entry point uses (the
``clipal`` command, ``python -m clipal`` and gunicorn via :mod:`clipal.wsgi`).
The process must already be monkey-patched by gevent when it is called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from flask import Flask, Response, request

from . import proxy
from .blueprints import RUNTIME, client_blueprint
from .clients import CLIENTS
from .access import is_loopback_address
from .config import CONFIG_FILE, Config, load_config
from .logs import get_logger
from .runtime import Runtime, apply_logging, warn_about_permissions


def default_config_dir() -> Path:
    """``$CLIPAL_CONFIG_DIR``, else ``~/.clipal``."""
    return Path(os.environ.get("CLIPAL_CONFIG_DIR") or "~/.clipal").expanduser()


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

    by_name = {client.name: client for client in CLIENTS}

    @app.before_request
    def refuse_unservable_paths() -> Response | None:
        # Runs before every Blueprint's hooks and for unrouted paths too, so a
        # dot segment is refused whatever it is attached to.
        return proxy.refuse_path(request.environ, by_name.get(request.blueprint or ""))

    @app.get("/health")
    def health() -> Response:
        return Response('{"status": "healthy"}', mimetype="application/json")

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
