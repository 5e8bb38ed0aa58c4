"""Serve the app with gevent's WSGIServer: socket options, client-socket access, clean shutdown.

The process must be monkey-patched before this module is imported (see
:mod:`clipal.cli`).
"""

from __future__ import annotations

import ctypes
import gc
import http.client
import signal
import socket

import gevent
from flask import Flask
from gevent.event import Event
from gevent.pool import Pool
from gevent.pywsgi import OldMessage, WSGIHandler, WSGIServer

from .headerparse import parse_headers
from .logs import get_logger

#: How long in-flight responses may take to finish after SIGTERM/SIGINT.
SHUTDOWN_GRACE = 5.0
#: A first body write up to this size is sent together with the response headers.
COALESCE_LIMIT = 64 * 1024


class ProxyHandler(WSGIHandler):
    """pywsgi's handler, plus what a low-latency proxy needs.

    - TCP_NODELAY on the client connection: without it, a small response
      written in two pieces meets the client's delayed ACK (~40 ms).
    - The client socket in the environ, so :mod:`clipal.clientwatch` can
      notice a hang-up while the proxy waits on an upstream.
    - ``RAW_URI``: the request target exactly as sent, so the upstream path
      keeps the client's percent-encoding.
    - Shutdown: while it waits for a request on a kept-alive connection the
      connection is idle and :meth:`ProxyServer.drain` may close it; once the
      server drains, no further request is read on any connection.
    """

    def __init__(self, sock, address, server, rfile=None):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass  # not TCP (a Unix socket in tests); nothing to tune
        super().__init__(sock, address, server, rfile)

    def read_requestline(self):
        idle = getattr(self.server, "idle_sockets", None)
        if idle is None:  # not a ProxyServer
            return super().read_requestline()
        if self.server.draining:
            return ""  # shutting down: close this connection instead of reading another request
        idle.add(self.socket)
        try:
            return super().read_requestline()
        finally:
            idle.discard(self.socket)

    def MessageClass(self, fp, *args):
        # pywsgi's headers_factory, with clipal's fast header parser
        # (:mod:`clipal.headerparse`: the same result as http.client's).
        try:
            return parse_headers(fp, _class=OldMessage)
        except http.client.LineTooLong:
            message = OldMessage()
            message.status = "Line too long"
            return message

    def log_request(self):
        """No access log: clipal serves with ``log=None`` and logs each completion itself.

        pywsgi would still format an access line (with a datetime) per
        request, only to hand it to a no-op log.
        """

    def _write_with_headers(self, data):
        # pywsgi sends the header block and the first body bytes with two
        # sendall() calls. A small first write (a whole small JSON answer, or
        # an SSE stream's first event) goes out in the same call as the
        # headers instead: half the syscalls for a small response, one TCP
        # segment. Larger writes keep pywsgi's path, which avoids the copy.
        if len(data) > COALESCE_LIMIT:
            return super()._write_with_headers(data)
        self.headers_sent = True
        self.finalize_headers()
        # as pywsgi: status and headers are already latin-1 bytes from start_response
        towrite = bytearray(b"HTTP/1.1 ")
        towrite += self.status
        towrite += b"\r\n"
        for header, value in self.response_headers:
            towrite += header
            towrite += b": "
            towrite += value
            towrite += b"\r\n"
        towrite += b"\r\n"
        if data:
            if self.response_use_chunked:
                towrite += b"%x\r\n" % len(data)
                towrite += data
                towrite += b"\r\n"
            else:
                towrite += data
        self._sendall(towrite)

    def _sendall(self, data):
        # pywsgi's _sendall, with one plain send() first: gevent's sendall()
        # adds a getsockopt(SO_SNDBUF) syscall and memoryview slicing to every
        # call, and a response chunk nearly always fits the socket buffer.
        try:
            sent = self.socket.send(data)
            if sent < len(data):
                self.socket.sendall(memoryview(data)[sent:])
        except OSError as ex:
            self.status = "socket error: %s" % ex
            if self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data)

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


class ProxyServer(WSGIServer):
    """WSGIServer that can drain: close idle kept-alive connections, read no new requests.

    Connection handlers run in an (unbounded) pool, so that ``stop(timeout)``
    waits for in-flight responses; without a pool gevent's ``stop`` returns at
    once and the process exits in the middle of a client's stream.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("spawn", Pool())
        super().__init__(*args, **kwargs)
        self.idle_sockets: set = set()
        self.draining = False

    def drain(self) -> None:
        self.draining = True
        for sock in list(self.idle_sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the handler's read with EOF; it then closes
            except OSError:
                pass


def make_server(app: Flask, listen_addr: str, port: int) -> ProxyServer:
    """Bind now (so a port in use fails at start) and return the server, not yet serving."""
    server = ProxyServer((listen_addr, port), app, handler_class=ProxyHandler, log=None,
                         error_log=_ErrorLog(), backlog=2048)
    server.init_socket()
    return server


#: glibc's mallopt parameter number for the mmap threshold.
_M_MMAP_THRESHOLD = -3
#: Allocations from this size up get their own memory mapping, returned to the OS when freed.
LARGE_ALLOCATION = 1 << 20


def return_large_buffers_to_the_os() -> None:
    """Keep request bodies in memory only while a request holds them (glibc).

    glibc serves a large allocation (a 10 MiB request body) from its own
    mmap and unmaps it when freed, but it then raises its mmap threshold to
    that size, so the next bodies come from the heap, whose free space it
    keeps: RSS stayed ~45 MB above the baseline after one 10 MiB upload at a
    time. A fixed threshold turns that adjustment off. Elsewhere (musl, macOS)
    this does nothing.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    # The debug line is how a test sees that a gunicorn worker was tuned too (see clipal.wsgi).
    if mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION) == 1:
        get_logger().debug("memory: allocations of %d bytes and up are returned to the OS when freed",
                           LARGE_ALLOCATION)


#: A burst is at least this many open client connections; when it is over, free heap goes back.
BURST_CONNECTIONS = 64
#: How often the connection count is sampled for that.
BURST_CHECK_INTERVAL = 0.25


def release_memory_after_bursts(server: ProxyServer, stopping: Event) -> None:
    """After a burst of concurrent connections, hand the heap's free pages back to the OS (glibc).

    A thousand concurrent streams grow the heap by ~35 MB of small buffers
    and objects; once they end, that memory is free but glibc keeps it (only
    the heap's top is returned on its own). ``malloc_trim(0)`` releases every
    free page, ~15 MB there, in under 2 ms, so it runs once when the number
    of open connections falls to a quarter of a burst's peak, never while
    the burst is going on. Elsewhere than glibc this does nothing.
    """
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    pool = getattr(server, "pool", None)
    if pool is None:
        return
    peak = 0
    while not stopping.wait(BURST_CHECK_INTERVAL):
        connections = len(pool)
        peak = max(peak, connections)
        if peak >= BURST_CONNECTIONS and connections <= peak // 4:
            malloc_trim(0)
            peak = connections


def freeze_startup_objects() -> None:
    """Keep the ~45k objects of the loaded app out of every later full garbage collection.

    A full (generation 2) collection walks every tracked object: ~15 ms here,
    during which no stream moves, and a burst of new streams triggers one.
    What exists once the app is built (modules, config, Flask app) lives as
    long as the process, so it is moved to the permanent generation.
    """
    gc.collect()
    gc.freeze()
    get_logger().debug("memory: %d startup objects kept out of garbage collection", gc.get_freeze_count())


def serve(server: ProxyServer, on_stop=None) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and let in-flight responses finish."""
    return_large_buffers_to_the_os()
    freeze_startup_objects()
    stopping = Event()
    gevent.spawn(release_memory_after_bursts, server, stopping)

    def shutdown() -> None:
        if stopping.is_set():
            return
        stopping.set()
        get_logger().info("shutting down: no new connections, finishing in-flight requests (up to %gs)",
                          SHUTDOWN_GRACE)
        if on_stop is not None:
            on_stop()
        server.drain()
        server.stop(timeout=SHUTDOWN_GRACE)

    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, lambda: gevent.spawn(shutdown))
    # serve_forever wakes as soon as stop() closes the listener and runs its own
    # stop(stop_timeout): that one must grant the same grace, or it kills the
    # in-flight responses after gevent's default of one second.
    server.serve_forever(stop_timeout=SHUTDOWN_GRACE)
    get_logger().info("stopped")
