"""The Flask application: one Blueprint per client, /health, and the shared runtime.

``create_app(config_dir)`` is the app factory every entry point uses (the
``clipal`` command, ``python -m clipal`` and gunicorn via :mod:`clipal.wsgi`).
The process must already be monkey-patched by gevent when it is called.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from flask import Blueprint, Flask, Response, request
from werkzeug.exceptions import HTTPException

from . import forward, proxy
from .clients import CLIENTS, ClientKind
from .config import Config, config_files, load_config
from .failover import FailoverState
from .logs import configure_logging, get_logger, warn_if_readable_by_others
from .proxy import Snapshot

#: Every HTTP method is forwarded; Flask must not answer OPTIONS or HEAD itself.
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

_EXTENSION = "clipal"
#: The endpoint name of every client Blueprint's proxy view.
_PROXY_ENDPOINT = "proxy"


def default_config_dir() -> Path:
    """``$CLIPAL_CONFIG_DIR``, else ``~/.clipal``."""
    return Path(os.environ.get("CLIPAL_CONFIG_DIR") or "~/.clipal").expanduser()


class Runtime:
    """What requests share: the current :class:`Snapshot` and the upstream session.

    ``snapshot`` is replaced whole on reload (one reference swap), so a
    request that read it keeps a consistent configuration and failover state
    until it finishes.
    """

    def __init__(self, config: Config, overrides: Mapping[str, Any] | None = None) -> None:
        self.overrides = dict(overrides or {})
        self.session = forward.new_session()
        self.snapshot = self._build(config)

    def _build(self, config: Config) -> Snapshot:
        if self.overrides:
            config = dataclasses.replace(config, settings=dataclasses.replace(config.settings, **self.overrides))
        settings = config.settings
        state = FailoverState(config.providers, reactivate_after=settings.reactivate_after,
                              isolate_count_tokens=settings.ignore_count_tokens_failover)
        return Snapshot(config=config, state=state)

    def apply(self, config: Config) -> Snapshot:
        """Install a new configuration: fresh failover state, logging settings at once."""
        snapshot = self._build(config)
        self.snapshot = snapshot
        apply_logging(snapshot.config)
        return snapshot


def apply_logging(config: Config) -> None:
    settings = config.settings
    configure_logging(level=settings.log_level, log_dir=config.log_dir, retention_days=settings.log_retention_days,
                      to_stdout=settings.log_stdout, secrets=config.secrets())


def warn_about_permissions(config: Config) -> None:
    for path in config_files(config.config_dir):
        if path.exists():
            warn_if_readable_by_others(path)


def _client_blueprint(client: ClientKind) -> Blueprint:
    blueprint = Blueprint(client.name, __name__, url_prefix=client.prefix)

    def view(subpath: str = "") -> Response:
        runtime: Runtime = _runtime()
        return proxy.handle(client, request.environ, runtime.snapshot, runtime.session)

    for rule in ("", "/", "/<path:subpath>"):
        blueprint.add_url_rule(rule, _PROXY_ENDPOINT, view, methods=_METHODS, provide_automatic_options=False,
                               strict_slashes=False)
    return blueprint


class _ProxyDispatch:
    """The app's WSGI entry: proxied requests go to the proxy without Flask's per-request work.

    Flask's request context, signals, session interface and response
    finalisation cost about 100 us per request on a small machine (a sixth of
    clipal's CPU for a small proxied request), and a proxied request uses none
    of them. Routing stays Flask's: the app's URL map, built from the client
    Blueprints, decides. A request it routes to a Blueprint's proxy view is
    served here the way that view would serve it; everything else (/health,
    404, 405) goes through Flask unchanged.
    """

    def __init__(self, app: Flask, runtime: Runtime) -> None:
        self.flask_wsgi_app = app.wsgi_app
        self.url_map = app.url_map
        self.runtime = runtime
        self.clients = {f"{client.name}.{_PROXY_ENDPOINT}": client for client in CLIENTS}

    def __call__(self, environ: dict, start_response):
        try:
            # websocket=False: an upgrade request is routed like any other, so
            # the client's proxy answers it (426) instead of werkzeug's HTML 400.
            endpoint, _ = self.url_map.bind_to_environ(environ).match(websocket=False)
        except HTTPException:  # 404, 405: Flask answers with its error handlers
            endpoint = None
        client = self.clients.get(endpoint)
        if client is None:
            return self.flask_wsgi_app(environ, start_response)
        runtime = self.runtime
        try:
            response = proxy.serve(client, environ, runtime.snapshot, runtime.session)
        except Exception:  # what Flask would do: log it (redacted) and answer 500
            get_logger(client.name).exception("internal error serving %s %s", environ.get("REQUEST_METHOD"),
                                              environ.get("PATH_INFO"))
            response = proxy.error_response(client, 500, "clipal: internal error")
        return response(environ, start_response)


def _runtime() -> Runtime:
    from flask import current_app

    return current_app.extensions[_EXTENSION]


def create_app(config_dir: Path | str | None = None, *, config: Config | None = None,
               overrides: Mapping[str, Any] | None = None, watch: bool = True) -> Flask:
    """Build the app for ``config_dir`` (default: $CLIPAL_CONFIG_DIR or ~/.clipal).

    Raises :class:`clipal.config.ConfigError` when the configuration is
    invalid. ``overrides`` are command-line settings that win over
    config.yaml, now and after every reload. With ``watch`` the config
    directory is watched for changes (SPEC §5).
    """
    if config is None:
        config = load_config(Path(config_dir).expanduser() if config_dir else default_config_dir())
    runtime = Runtime(config, overrides)
    apply_logging(runtime.snapshot.config)
    log = get_logger()
    warn_about_permissions(config)
    for client in CLIENTS:
        names = [p.name for p in runtime.snapshot.state.pool(client.name).providers]
        if names:
            log.info("%s: %d provider(s) loaded: %s", client.file, len(names), ", ".join(names))
        else:
            log.info("%s: no providers; %s requests will get 503", client.file, client.prefix)

    app = Flask("clipal")
    app.url_map.merge_slashes = False
    app.extensions[_EXTENSION] = runtime
    for client in CLIENTS:
        app.register_blueprint(_client_blueprint(client))

    @app.get("/health")
    def health() -> Response:
        return Response('{"status": "healthy"}', mimetype="application/json")

    @app.errorhandler(404)
    def not_found(_error: Exception) -> Response:
        return proxy.error_response(None, 404, f"clipal: no route for {request.path}; use /claudecode, /codex or /gemini")

    @app.errorhandler(405)
    def not_allowed(_error: Exception) -> Response:
        return proxy.error_response(None, 405, f"clipal: method {request.method} not allowed for {request.path}")

    app.wsgi_app = _ProxyDispatch(app, runtime)

    if watch:
        from .reload import start_watching

        app.extensions["clipal.watcher"] = start_watching(runtime)
    return app
