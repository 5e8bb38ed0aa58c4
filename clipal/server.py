"""Serve the app with gevent's WSGIServer: socket options, client-socket access, clean shutdown.

The process must be monkey-patched before this module is imported (see
:mod:`clipal.cli`).
"""

from __future__ import annotations

import signal
import socket

import gevent
from flask import Flask
from gevent.event import Event
from gevent.pywsgi import WSGIHandler, WSGIServer

from .logs import get_logger

#: How long in-flight responses may take to finish after SIGTERM/SIGINT (SPEC §1).
SHUTDOWN_GRACE = 5.0


class ProxyHandler(WSGIHandler):
    """pywsgi's handler, plus what a low-latency proxy needs.

    - TCP_NODELAY on the client connection: without it, a small response
      written in two pieces meets the client's delayed ACK (~40 ms).
    - The client socket in the environ, so :mod:`clipal.clientwatch` can
      notice a hang-up while the proxy waits on an upstream.
    - ``RAW_URI``: the request target exactly as sent, so the upstream path
      keeps the client's percent-encoding.
    """

    def __init__(self, sock, address, server, rfile=None):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass  # not TCP (a Unix socket in tests); nothing to tune
        super().__init__(sock, address, server, rfile)

    def get_environ(self):
        environ = super().get_environ()
        environ["clipal.client_socket"] = self.socket
        environ["RAW_URI"] = self.path
        return environ


class _ErrorLog:
    """pywsgi's error log, routed to clipal's log (which redacts keys)."""

    def write(self, text: str) -> None:
        text = text.strip()
        if text:
            get_logger().error("server: %s", text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


def make_server(app: Flask, listen_addr: str, port: int) -> WSGIServer:
    """Bind now (so a port in use fails at start) and return the server, not yet serving."""
    server = WSGIServer((listen_addr, port), app, handler_class=ProxyHandler, log=None,
                        error_log=_ErrorLog(), backlog=2048)
    server.init_socket()
    return server


def serve(server: WSGIServer, on_stop=None) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and let in-flight responses finish."""
    stopping = Event()

    def shutdown() -> None:
        if stopping.is_set():
            return
        stopping.set()
        get_logger().info("shutting down: no new connections, finishing in-flight requests (up to %gs)",
                          SHUTDOWN_GRACE)
        if on_stop is not None:
            on_stop()
        server.stop(timeout=SHUTDOWN_GRACE)

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, lambda: gevent.spawn(shutdown))
    server.serve_forever()
    get_logger().info("stopped")
