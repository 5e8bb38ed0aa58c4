"""Serve the app with gevent's WSGIServer: the front door's rules, socket options, clean shutdown.

The process must be monkey-patched before this module is imported (see
:mod:`clipal.cli`).
"""

from __future__ import annotations

import gc
import io
import logging
import os
import socket
import time
from typing import Any, Callable

import gevent
from flask import Flask
from gevent.event import Event
from gevent.pool import Pool
from gevent.pywsgi import MAX_REQUEST_LINE, Input, OldMessage, WSGIHandler, WSGIServer
# pywsgi's own error classes (private names): a malformed chunked body, a malformed request line.
from gevent.pywsgi import _InvalidClientInput, _InvalidClientRequest
from werkzeug.exceptions import HTTPException

from .frontdoor import (MAX_HEADER_BLOCK, MAX_HEADER_LINES, NO_FILE_DESCRIPTORS, TOO_MANY_LINES, Refusal,
                        Refused, framing_problem, header_block_problem, refusal_response, too_large)
from .headerparse import parse_headers
from .logs import get_logger
from .platforms import glibc_malloc, handle_signals

try:  # imported now: out of file descriptors, an import (which opens files) would fail
    import resource
except ImportError:  # not Unix
    resource = None  # type: ignore[assignment]

#: How long in-flight responses may take to finish after SIGTERM/SIGINT.
SHUTDOWN_GRACE = 5.0
#: A first body write up to this size is sent together with the response headers.
COALESCE_LIMIT = 64 * 1024


def _limit_for_tests(name: str, default: float) -> float:
    """A limit below, shortened through the environment by clipal's own tests only.

    Not a setting: users have nothing to tune here, and config.yaml does not
    know these names.
    """
    text = os.environ.get(name)
    return float(text) if text else default


# The slow-client limits are nginx's defaults: a client that holds a connection without
# sending costs clipal a file descriptor and a greenlet, and nothing else ever frees them.
#: The request line and headers must all arrive within this long of the connection opening,
#: or of the first byte of the next request on a kept-alive connection.
HEADER_TIMEOUT = _limit_for_tests("CLIPAL_HEADER_TIMEOUT", 30.0)
#: Each read of a request body must get bytes within this long.
BODY_TIMEOUT = _limit_for_tests("CLIPAL_BODY_TIMEOUT", 60.0)
#: A kept-alive connection with no next request within this long is closed.
KEEPALIVE_TIMEOUT = _limit_for_tests("CLIPAL_KEEPALIVE_TIMEOUT", 75.0)
#: Client connections open at once; more wait in the listening socket's backlog, not accepted.
MAX_CONNECTIONS = int(_limit_for_tests("CLIPAL_MAX_CONNECTIONS", 2000))
#: After a refusal, what the client still sends is read and dropped for up to this long (and
#: this many bytes) before the close: closing on unread input sends a reset, which can destroy
#: the refusal before the client has read it.
LINGER_TIME = 2.0
LINGER_BYTES = 1 << 20
#: How often accepting is tried again while clipal is out of file descriptors.
ACCEPT_RETRY = 0.1
#: The out-of-file-descriptors line is repeated at most this often while it lasts.
FD_LOG_INTERVAL = 30.0


class BodyRefused(HTTPException):
    """Raised from a read of the request body that clipal will not finish.

    An HTTPException, so the app answers it in the client's own shape (the
    client Blueprints' error handler) and logs nothing as its own error; the
    server then closes the connection.
    """

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(description=refusal.reason)
        self.code = refusal.status
        self.refusal = refusal


class _FramedInput(Input):
    """pywsgi's request body reader, with a timeout on each socket read and errors the app answers.

    pywsgi raises its own errors for a malformed chunked body and a plain
    IOError for one cut short; to the app either would be an internal error
    (a 500 and a traceback). Here both, and a read that waited too long,
    become :class:`BodyRefused`, and the connection closes after the answer:
    where the next request would start is unknown.
    """

    __slots__ = ("_handler",)

    def __init__(self, handler: FrontDoorHandler, rfile: io.BufferedReader, content_length: int | None,
                 continue_socket: socket.socket | None, chunked: bool) -> None:
        super().__init__(rfile, content_length, socket=continue_socket, chunked_input=chunked)
        self._handler = handler

    def read(self, length: int | None = None) -> bytes:
        return self._guarded(Input.read, length)

    def readline(self, size: int | None = None) -> bytes:
        return self._guarded(Input.readline, size)

    def _guarded(self, read: Callable[[Input, int | None], bytes], size: int | None) -> bytes:
        sock = self._handler.socket
        sock.settimeout(BODY_TIMEOUT)  # per recv, so a large body arriving steadily never times out
        try:
            return read(self, size)
        except OSError as error:  # pywsgi's chunk errors are OSErrors too, like a timeout or a reset
            self._chunked_input_error = True  # pywsgi then never reads on to discard the rest
            raise BodyRefused(self._handler.body_failed(error)) from None
        finally:
            sock.settimeout(None)

    def _discard(self) -> None:
        # pywsgi reads what the app left of the body, to reach the next request
        try:
            super()._discard()
        except BodyRefused:
            pass  # the connection closes instead: nothing after this body is read


class FrontDoorHandler(WSGIHandler):
    """pywsgi's handler, holding every request to :mod:`clipal.frontdoor`'s rules before the app sees it.

    - The request line and header block are read here, under one deadline
      (:data:`HEADER_TIMEOUT`), bounded in size, and must end with their blank
      line: nothing of a request whose client left before it runs.
    - The header block is checked as read (:func:`~clipal.frontdoor.header_block_problem`),
      the framing once parsed (:func:`~clipal.frontdoor.framing_problem`). A
      refusal is answered with a small JSON error and ``Connection: close``,
      then the connection closes without reading another request.
    - The body is read through :class:`_FramedInput`; ``Expect: 100-continue``
      is answered (whatever its case) when the app starts reading it.
    - A kept-alive connection waits at most :data:`KEEPALIVE_TIMEOUT` for its
      next request.
    - A client's protocol error is logged as a warning at most: it is not clipal's.

    While it waits for a request the connection is idle, and
    :meth:`ProxyServer.drain` may close it; once the server drains, no further
    request is read on any connection.
    """

    _requests_read = 0
    _head: bytes | Refusal | None = None
    #: Why this connection closes after its current response, and the log level that deserves.
    _refusal: tuple[Refusal, int] | None = None

    def __init__(self, sock: socket.socket, address: Any, server: WSGIServer, rfile: Any = None) -> None:
        super().__init__(sock, address, server, rfile)
        self._connected_at = time.monotonic()

    # --- the head ---------------------------------------------------------------------

    def handle_one_request(self) -> bool | None:
        self._refusal = None
        self.path = None  # a refusal's JSON shape comes from this request's path, not the last one's
        result = super().handle_one_request()
        if self._refusal is None and not isinstance(result, tuple):
            return result
        if isinstance(result, tuple):  # a head refused, here or by pywsgi itself (414)
            if self._refusal is None:
                self._refusal = (Refusal(int(result[0]), f"request line over {MAX_REQUEST_LINE} bytes"),
                                 logging.WARNING)
            try:
                self.socket.sendall(result[1])
            except OSError:
                pass
        refusal, level = self._refusal
        get_logger().log(level, "refused a request from %s: %s (answered %d, connection closed)",
                         _address(self.client_address), refusal.reason, refusal.status)
        self._linger()
        return None

    def read_requestline(self) -> str:
        server = self.server
        idle = getattr(server, "idle_sockets", None)
        if idle is None:  # not a ProxyServer (gunicorn's pywsgi worker)
            return self._read_head()
        if server.draining:
            return ""  # shutting down: close this connection instead of reading another request
        idle.add(self.socket)
        try:
            return self._read_head()
        finally:
            idle.discard(self.socket)

    def _read_head(self) -> str:
        """The request line, with the header block read into ``self._head``; "" to close quietly."""
        self._head = None
        kept_alive = self._requests_read > 0
        if kept_alive:
            arrived = self._first_bytes(KEEPALIVE_TIMEOUT)
            deadline = time.monotonic() + HEADER_TIMEOUT  # the head's time starts with its first byte
        else:
            deadline = self._connected_at + HEADER_TIMEOUT
            arrived = self._first_bytes(deadline - time.monotonic())
        if not arrived:
            if arrived is None and not kept_alive:
                self._log_header_timeout()
            return ""  # nothing came (an idle kept-alive connection ends here), or the client closed
        # The whole head nearly always comes in the first segment: it is then taken in one
        # read, with no timer. A blank line (an empty line after a line end) ends a head.
        end = _head_end(arrived)
        if end:
            line, _, block = self.rfile.read(end).partition(b"\n")
            self._head = self._checked(block)
            self._requests_read += 1
            return (line + b"\n").decode("latin-1")
        timer = gevent.Timeout(max(deadline - time.monotonic(), 0.001))
        timer.start()
        try:
            line = self.rfile.readline(MAX_REQUEST_LINE)
            if len(line) >= MAX_REQUEST_LINE:
                return line.decode("latin-1")  # pywsgi answers 414
            if not line.endswith(b"\n"):
                return ""  # the client left before the end of the request line
            self._head = self._read_header_block()
            if self._head is None:
                get_logger().debug("client %s left in the middle of its request headers",
                                   _address(self.client_address))
                return ""
        except gevent.Timeout as expired:
            if expired is not timer:
                raise
            self._log_header_timeout()
            return ""
        except OSError:
            return ""  # a reset: nobody to answer
        finally:
            timer.close()
        self._requests_read += 1
        return line.decode("latin-1")

    def _first_bytes(self, wait: float) -> bytes | None:
        """What has arrived of the next request, waiting up to ``wait`` for a first byte; None if none came.

        A socket timeout rather than a gevent.Timeout: it costs a timer only
        when the read has to wait.
        """
        sock = self.socket
        sock.settimeout(max(wait, 0.001))
        try:
            return self.rfile.peek(1)  # all that is buffered, after at most one read
        except TimeoutError:
            return None
        except OSError:
            return b""
        finally:
            sock.settimeout(None)

    def _log_header_timeout(self) -> None:
        get_logger().info("client %s did not send its request headers within %gs; connection closed",
                          _address(self.client_address), HEADER_TIMEOUT)

    def _read_header_block(self) -> bytes | Refusal | None:
        """The header block, read a line at a time up to its blank line; None if the client left first."""
        lines: list[bytes] = []
        size = 0
        readline = self.rfile.readline
        while True:
            line = readline(MAX_HEADER_BLOCK + 1 - size)  # so an oversized block is never buffered whole
            size += len(line)
            if size > MAX_HEADER_BLOCK:
                return too_large(size)
            if not line.endswith(b"\n"):
                return None
            lines.append(line)
            if line == b"\r\n" or line == b"\n":
                return self._checked(b"".join(lines))
            if len(lines) >= MAX_HEADER_LINES:
                return TOO_MANY_LINES

    @staticmethod
    def _checked(block: bytes) -> bytes | Refusal:
        return header_block_problem(block) or block

    def MessageClass(self, fp: Any, *args: Any) -> OldMessage:
        # pywsgi's headers_factory, over the block _read_head already read and checked, with
        # clipal's fast header parser (:mod:`clipal.headerparse`: the same result as http.client's).
        head = self._head
        if isinstance(head, Refusal):
            raise Refused(head)
        message = parse_headers(io.BytesIO(head), _class=OldMessage)
        # pywsgi's read_request would frame the body with int() and a Transfer-Encoding it
        # only half reads; refuse anything ambiguous before it does
        problem = framing_problem(message._headers, self.request_version)  # headerparse's (name, value) list
        if problem is not None:
            raise Refused(problem)
        return message

    def _handle_client_error(self, ex: Exception) -> tuple[str, bytes]:
        # pywsgi calls this for what read_request raised: its own checks of the request line,
        # and the rules above. Its version logs the error as the server's and answers a bare 400.
        if isinstance(ex, Refused):
            refusal = ex.refusal
        elif isinstance(ex, _InvalidClientRequest):
            # its messages start with what is wrong, then echo the client's bytes
            refusal = Refusal(400, ex.formatted_message.split(":", 1)[0].split(";", 1)[0][:80])
        else:
            refusal = Refusal(400, "malformed request line")
        self._refusal = (refusal, logging.WARNING)
        return (str(refusal.status), refusal_response(refusal, self.path))

    # --- the body and the response ------------------------------------------------------

    def body_failed(self, error: OSError) -> Refusal:
        """Record why the body was not read to its end (the connection then closes); the refusal to answer."""
        if isinstance(error, TimeoutError):
            refusal, level = Refusal(408, f"no request body bytes within {BODY_TIMEOUT:g}s"), logging.INFO
        elif isinstance(error, _InvalidClientInput):
            refusal, level = Refusal(400, "malformed or incomplete chunked request body"), logging.WARNING
        else:  # end of file, or a reset
            refusal, level = Refusal(400, "request body cut short by the client"), logging.INFO
        self._refusal = (refusal, level)
        self.close_connection = True
        return refusal

    def get_environ(self) -> dict:
        environ = super().get_environ()
        # pywsgi answers Expect only when it is exactly "100-continue"; it is case-insensitive
        # (RFC 9110 section 10.1.1), and an HTTP/1.0 client never waits for it
        expects = (self.request_version == "HTTP/1.1"
                   and environ.get("HTTP_EXPECT", "").lower() == "100-continue")
        self.wsgi_input = _FramedInput(self, self.rfile, self.content_length, self.socket if expects else None,
                                       self.wsgi_input.chunked_input)
        # Also for an Upgrade request, which pywsgi would hand the raw socket file: clipal
        # upgrades nothing (the client Blueprints answer 426), so its body is framed like any other.
        environ["wsgi.input"] = self.wsgi_input
        environ["wsgi.input_terminated"] = True
        return environ

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
        if self._refusal is not None and self.request_version == "HTTP/1.1":
            # the body was refused: say that the connection closes (pywsgi would not, for HTTP/1.1)
            headers = [(name, value) for name, value in headers if name.lower() != "connection"]
            headers.append(("Connection", "close"))
        return super().start_response(status, headers, exc_info)

    def _linger(self) -> None:
        """Close after a refusal as nginx does: stop writing, then drop what the client still sends, briefly."""
        sock = self.socket
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        drained = 0
        with gevent.Timeout(LINGER_TIME, False):
            try:
                while drained < LINGER_BYTES:
                    data = sock.recv(65536)
                    if not data:
                        break
                    drained += len(data)
            except OSError:
                pass


def _head_end(data: bytes) -> int:
    """Where the head at the start of ``data`` ends (after its blank line); 0 if it is not all there."""
    end = data.find(b"\n\r\n")  # the usual CRLF blank line first: it stops at the head's end
    bare = data.find(b"\n\n", 0, end if end >= 0 else len(data))  # http.client also takes LF-only lines
    if bare >= 0:
        return bare + 2
    return end + 3 if end >= 0 else 0


def _address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address or "a local socket")


class ProxyHandler(FrontDoorHandler):
    """The front door's handler, plus what a low-latency proxy needs.

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


class ConnectionPool(Pool):
    """The pool of connection handlers, which says when the open connections reach a burst.

    :func:`release_memory_after_bursts` needs to know when a burst begins, and
    sampling the count on a timer would wake the process all day long with
    nothing open. Instead each connection's handler, as it joins the pool,
    compares the count with :data:`BURST_CONNECTIONS`: one length and one
    comparison per connection, and a call only at the burst's threshold while
    someone is listening.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)
        #: Called when a connection brings the count to :data:`BURST_CONNECTIONS` or more;
        #: the listener clears it while it follows a burst, so a burst calls it once.
        self.on_burst: Callable[[], None] | None = None

    def add(self, greenlet: gevent.Greenlet, blocking: bool = True, timeout: float | None = None) -> None:
        Pool.add(self, greenlet, blocking, timeout)
        if self.on_burst is not None and len(self.greenlets) >= BURST_CONNECTIONS:
            self.on_burst()


class ProxyServer(WSGIServer):
    """WSGIServer that can drain, caps its connections and survives running out of file descriptors.

    Connection handlers run in a pool of :data:`MAX_CONNECTIONS`: while it is
    full, gevent stops accepting and further clients wait in the kernel's
    backlog. The pool also lets ``stop(timeout)`` wait for in-flight
    responses; without one gevent's ``stop`` returns at once and the process
    exits in the middle of a client's stream.

    Draining closes idle kept-alive connections and reads no new requests.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("spawn", ConnectionPool(MAX_CONNECTIONS))
        super().__init__(*args, **kwargs)
        self.idle_sockets: set = set()
        self.draining = False
        self._out_of_fds = False
        self._out_of_fds_logged = float("-inf")

    def drain(self) -> None:
        self.draining = True
        for sock in list(self.idle_sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the handler's read with EOF; it then closes
            except OSError:
                pass

    def do_read(self):
        # gevent reports a failed accept() as an error of the server, with a traceback; out of
        # file descriptors, the cause is known and passes once connections close.
        try:
            accepted = super().do_read()
        except OSError as error:
            if error.errno not in NO_FILE_DESCRIPTORS:
                raise
            self._wait_for_file_descriptors(error)
            return None
        if self._out_of_fds and accepted:
            self._out_of_fds = False
            get_logger().info("file descriptors available again: accepting connections")
        return accepted

    def _wait_for_file_descriptors(self, error: OSError) -> None:
        now = time.monotonic()
        if not self._out_of_fds and now - self._out_of_fds_logged >= FD_LOG_INTERVAL:
            self._out_of_fds_logged = now
            get_logger().error("clipal ran out of file descriptors (%s%s): new connections wait until some "
                               "close", error.strerror or error, _fd_limit())
        self._out_of_fds = True
        # Not at once: the listening socket stays readable, so accept() would fail in a busy loop.
        self.stop_accepting()
        gevent.spawn_later(ACCEPT_RETRY, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self.started and not self.closed:
            self.start_accepting()


def _fd_limit() -> str:
    if resource is None:
        return ""
    return f"; ulimit -n is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}"


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
    time. A fixed threshold turns that adjustment off. Elsewhere (musl, macOS,
    Windows) this does nothing.
    """
    malloc = glibc_malloc()
    if malloc is None:
        return
    # The debug line is how a test sees that a gunicorn worker was tuned too (see clipal.wsgi).
    if malloc.mallopt(_M_MMAP_THRESHOLD, LARGE_ALLOCATION) == 1:
        get_logger().debug("memory: allocations of %d bytes and up are returned to the OS when freed",
                           LARGE_ALLOCATION)


#: A burst is at least this many open client connections; when it is over, free heap goes back.
BURST_CONNECTIONS = 64
#: How often the connection count is sampled while a burst lasts.
BURST_CHECK_INTERVAL = 0.25


def release_memory_after_bursts(server: ProxyServer, stopping: Event) -> None:
    """After a burst of concurrent connections, hand the heap's free pages back to the OS (glibc).

    A thousand concurrent streams grow the heap by ~35 MB of small buffers
    and objects; once they end, that memory is free but glibc keeps it (only
    the heap's top is returned on its own). ``malloc_trim(0)`` releases every
    free page, ~15 MB there, in under 2 ms, so it runs once when the number
    of open connections falls to a quarter of a burst's peak, never while
    the burst is going on. Elsewhere than glibc this does nothing.

    Returns at once. The count is sampled only from the moment a burst
    begins (the pool says so, see :class:`ConnectionPool`) until it is over:
    between bursts nothing here is scheduled, so an idle clipal is not woken.
    """
    malloc = glibc_malloc()
    if malloc is None:
        return
    malloc_trim = malloc.malloc_trim
    pool = getattr(server, "pool", None)
    if not isinstance(pool, ConnectionPool):
        return

    def follow_burst() -> None:
        peak = len(pool)
        try:
            # Sampled rather than acted on at each close: the trim then never runs in the
            # middle of a wave of closes, and the close path stays as it was.
            while peak >= BURST_CONNECTIONS and not stopping.wait(BURST_CHECK_INTERVAL):
                connections = len(pool)
                peak = max(peak, connections)
                if connections <= peak // 4:
                    malloc_trim(0)
                    peak = connections  # a burst still this large goes on being followed
        finally:
            if not stopping.is_set():
                pool.on_burst = burst_began

    def burst_began() -> None:
        pool.on_burst = None  # one follower per burst; the connections after this one pay nothing
        gevent.spawn(follow_burst)

    pool.on_burst = burst_began


#: Seconds after start-up when the objects of the loaded app leave garbage collection.
FREEZE_DELAY = 1.0


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
    """Serve until SIGTERM or SIGINT, then stop accepting and let in-flight responses finish.

    SIGHUP reloads the configuration, as it does for nginx (and for gunicorn's master).
    On Windows, Ctrl+C (SIGINT) or Ctrl+Break (SIGBREAK) stops it and there is no
    SIGHUP: edits reload through the config watcher only (see :mod:`clipal.platforms`).
    """
    return_large_buffers_to_the_os()
    # Not before the first request: the collection it starts with would delay the first answer.
    gevent.spawn_later(FREEZE_DELAY, freeze_startup_objects)
    stopping = Event()
    release_memory_after_bursts(server, stopping)

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

    def reload() -> None:
        if not stopping.is_set():
            reload_configuration(server.application)

    platform = handle_signals(shutdown, reload)
    get_logger().debug("platform %s: stops on %s%s", platform.name,
                       ", ".join(sig.name for sig in platform.shutdown_signals),
                       f", reloads on {platform.reload_signal.name}" if platform.reload_signal else
                       ", reloads on file changes only")
    # serve_forever wakes as soon as stop() closes the listener and runs its own
    # stop(stop_timeout): that one must grant the same grace, or it kills the
    # in-flight responses after gevent's default of one second.
    server.serve_forever(stop_timeout=SHUTDOWN_GRACE)
    get_logger().info("stopped")


def reload_configuration(app: Flask) -> None:
    """What SIGHUP does: the hot reload a config edit triggers, now."""
    log = get_logger()
    log.info("SIGHUP: reloading configuration")
    watcher = app.extensions.get("clipal.watcher")
    if watcher is not None:
        apply = watcher.on_change  # the watcher's own reloader, so both share its retry state
    else:
        from .blueprints import RUNTIME
        from .reload import Reloader

        apply = Reloader(app.extensions[RUNTIME]).reload
    try:
        apply()
    except Exception:  # as the watcher does: a failed reload never stops clipal
        log.warning("config reload failed", exc_info=True)
