"""``GET /status`` and ``clipal status``: what a running clipal knows of its providers.

:func:`status_document` builds the /status JSON from the runtime: every
client (always all three) with its file, mode and current provider, and each
provider's routing state, keys in service and this process's attempt
counters. It is built only from names, numbers and the failover table's own
words: no key, token or query string can reach it.

A disabled provider is listed after the enabled ones with ``enabled:
false`` and the state ``deactivated``, reason ``disabled``, no
``retry_in_s`` (it never comes back by itself) and no key in service:
requests never try it, which is what deactivated means, and the five
states stay the only ones a reader must know.

:func:`main` is ``clipal status``: it never starts a server. It reads
config.yaml for the address, port and first access token, asks the running
clipal's /status, and prints a table (or, with ``--json``, the document as
it came). It imports only the standard library and clipal's configuration
parsing - no gevent, Flask or requests - so it answers at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .clients import CLIENTS
from .config import ConfigError, format_duration, load_config

if TYPE_CHECKING:
    from .routing import ClientRouting
    from .runtime import Runtime

#: States in which a provider is out of service: requests skip it.
OUT_OF_SERVICE = frozenset({"deactivated", "cooling"})


def default_config_dir() -> Path:
    """``$CLIPAL_CONFIG_DIR``, else ``~/.clipal``."""
    return Path(os.environ.get("CLIPAL_CONFIG_DIR") or "~/.clipal").expanduser()


def listen_text(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- the document


def _client_entry(routing: ClientRouting | None, file: str, mode: str) -> dict[str, Any]:
    if routing is None:  # a configuration built without this client (never from load_config)
        return {"file": file, "mode": mode, "current": None, "providers": []}
    current = routing.pinned if routing.manual else routing.current()
    providers = []
    for view in routing.views():
        provider = view.provider
        counters = routing.counters.get(provider.name)
        providers.append({
            "name": provider.name, "priority": provider.priority, "enabled": True, "state": view.state,
            "reason": view.reason,
            "retry_in_s": round(view.retry_in, 1) if view.retry_in is not None else None,
            "keys": {"total": len(provider.api_keys), "available": view.keys_available},
            "breaker": view.breaker,
            "requests": counters.requests if counters else 0, "failures": counters.failures if counters else 0,
        })
    for provider in routing.all_providers:
        if provider.enabled:
            continue
        counters = routing.counters.get(provider.name)
        providers.append({
            "name": provider.name, "priority": provider.priority, "enabled": False, "state": "deactivated",
            "reason": "disabled", "retry_in_s": None, "keys": {"total": len(provider.api_keys), "available": 0},
            "breaker": "closed",
            "requests": counters.requests if counters else 0, "failures": counters.failures if counters else 0,
        })
    return {"file": file, "mode": mode, "current": current.name if current is not None else None,
            "providers": providers}


def status_document(runtime: Runtime, uptime: float) -> dict[str, Any]:
    """The /status document for ``runtime``, ``uptime`` seconds after the app was built.

    ``listen`` is what the configuration says clipal listens on (what the ``clipal``
    command binds; under gunicorn, its own --bind decides instead).
    """
    snapshot = runtime.snapshot
    config = snapshot.config
    settings = config.settings
    return {
        "version": __version__,
        "uptime_s": round(uptime, 1),
        "config_dir": str(config.config_dir),
        "listen": listen_text(settings.listen_addr, settings.port),
        "state": runtime.store.describe(),
        "clients": {client.name: _client_entry(snapshot.routing.clients.get(client.name), client.file,
                                               config.mode(client.name))
                    for client in CLIENTS},
    }


def unavailable_clients(document: dict[str, Any]) -> list[str]:
    """Clients with enabled providers of which none is in service (a circuit-open one still is: it is tried last)."""
    names = []
    for name, client in document["clients"].items():
        enabled = [p for p in client["providers"] if p["enabled"]]
        if enabled and all(p["state"] in OUT_OF_SERVICE for p in enabled):
            names.append(name)
    return names


# --------------------------------------------------------------------------- clipal status


class StatusError(Exception):
    """Why there is no status to show: one line for the user."""


def _ask_host(listen_addr: str) -> str:
    """Where to ask: a wildcard listener is reached over loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen_addr, listen_addr)


def _is_status_document(document: object) -> bool:
    return isinstance(document, dict) and {"version", "listen", "clients"} <= document.keys() \
        and isinstance(document["clients"], dict)


def fetch_status(host: str, port: int, token: str | None, timeout: float) -> tuple[str, dict[str, Any]]:
    """The running clipal's /status, as text and parsed; raises :class:`StatusError` saying why not."""
    where = listen_text(host, port)
    request = urllib.request.Request(f"http://{where}/status", headers={"Accept": "application/json"})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    # No proxy: the question is for this machine's clipal, whatever http_proxy says.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    except urllib.error.URLError as error:
        raise _connection_error(error.reason, where, timeout) from None
    except OSError as error:  # raised while reading the answer, not wrapped by urllib
        raise _connection_error(error, where, timeout) from None
    text = body.decode("utf-8", "replace")
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if status == 200 and _is_status_document(document):
        return text, document
    message = document.get("error", {}).get("message") if isinstance(document, dict) and \
        isinstance(document.get("error"), dict) else None
    if status in (401, 403) and isinstance(message, str) and message.startswith("clipal"):
        raise StatusError(f"clipal on {where} refused the request ({status}): {message}")
    raise StatusError(f"something else is listening on {where}: it answered {status} to /status, "
                      "not clipal's status document")


def _connection_error(reason: object, where: str, timeout: float) -> StatusError:
    if isinstance(reason, ConnectionRefusedError):
        return StatusError(f"clipal is not running: nothing listens on {where} (connection refused)")
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return StatusError(f"no answer from {where} within {format_duration(timeout)} (timeout)")
    text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
    return StatusError(f"cannot reach {where}: {text}")


def _left(seconds: float | None) -> str:
    return f", {format_duration(math.ceil(seconds))} left" if seconds is not None and seconds > 0 else ""


def describe_provider(provider: dict[str, Any]) -> str:
    """A provider's state in words: ``cooling, 25s left: rate_limit``."""
    state = provider["state"]
    if not provider["enabled"]:
        return "disabled"
    if state == "circuit_open":
        return f"circuit open{_left(provider['retry_in_s'])} (degraded: tried last)"
    if state == "half_open":
        return "circuit half-open (degraded: being probed)"
    if state in OUT_OF_SERVICE:
        return f"{state}{_left(provider['retry_in_s'])}: {provider['reason']}"
    return state


def render_table(document: dict[str, Any]) -> str:
    """What ``clipal status`` prints: a heading, then each client and its providers, in aligned columns."""
    state = document["state"]
    backend = state.get("backend", "?")
    if "connected" in state:
        backend += " (connected)" if state["connected"] else " (NOT connected)"
    lines = [f"clipal {document['version']} on {document['listen']}, up "
             f"{format_duration(math.floor(document['uptime_s']))}, config {document['config_dir']}, "
             f"state in {backend}"]
    providers = [p for client in document["clients"].values() for p in client["providers"]]
    name_width = max((len(p["name"]) for p in providers), default=0)
    state_width = max((len(describe_provider(p)) for p in providers), default=0)
    for name, client in document["clients"].items():
        heading = f"{name} ({client['file']}" + (", manual)" if client["mode"] == "manual" else ")")
        if not client["providers"]:
            lines.append(f"{heading}: no providers")
            continue
        lines.append(f"{heading}: current {client['current'] or '(none)'}")
        for provider in client["providers"]:
            line = f"  {provider['name']:<{name_width}}  {describe_provider(provider):<{state_width}}"
            if provider["enabled"]:
                line += f"  keys {provider['keys']['available']} of {provider['keys']['total']}"
            lines.append(line.rstrip())
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipal status",
                                     description="Show the running clipal's providers (asks its /status).")
    parser.add_argument("--config-dir", metavar="DIR",
                        help="configuration directory (default: $CLIPAL_CONFIG_DIR or ~/.clipal)")
    parser.add_argument("--json", action="store_true", help="print the /status document as it came")
    parser.add_argument("--timeout", type=_positive_seconds, default=3.0, metavar="SECONDS",
                        help="give up waiting for an answer after this long (default 3)")
    return parser


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return value


def main(argv: list[str]) -> int:
    """``clipal status``: 0 when clipal answers and every client with providers has one in service."""
    args = _parser().parse_args(argv)
    config_dir = Path(args.config_dir).expanduser() if args.config_dir else default_config_dir()
    try:
        settings = load_config(config_dir).settings
    except ConfigError as error:
        print(f"clipal status: {error}", file=sys.stderr)
        return 1
    token = settings.access_tokens[0].token if settings.access_tokens else None
    try:
        text, document = fetch_status(_ask_host(settings.listen_addr), settings.port, token, args.timeout)
    except StatusError as error:
        print(f"clipal status: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(text if args.json else render_table(document))
    if args.json and not text.endswith("\n"):
        sys.stdout.write("\n")
    stuck = unavailable_clients(document)
    if stuck:
        print(f"clipal status: nothing available for {', '.join(stuck)}: every provider is deactivated or cooling",
              file=sys.stderr)
        return 1
    return 0
