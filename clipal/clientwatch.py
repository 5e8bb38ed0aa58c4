"""Notice, while waiting on an upstream, that the agent hung up.

A WSGI app normally learns that its client went away only when a write
fails, which for a proxy is far too late: it would keep waiting on a stalled
provider and then spend another provider's quota on an answer nobody reads.
:class:`ClientWatch` watches the client socket for readability with a gevent
io watcher (no extra greenlet). After the request body has been read, an
agent sends nothing more until the response ends, so a readable socket that
yields EOF (or a reset) means the client has gone. While a body is still
arriving the socket is readable with its bytes, so a watch made with
``start=False`` starts only when the last of them has been read
(:meth:`ClientWatch.start`); until then, reading the body is what notices a
client that leaves.

Inside :meth:`ClientWatch.guard`, that event raises :class:`ClientGone` in
the waiting greenlet, interrupting whatever upstream wait it is blocked in.
Outside a guard (e.g. while the server writes to the client) it is only
recorded, so gevent's own server code is never interrupted.
"""

from __future__ import annotations

import errno
import socket

import gevent
from gevent import getcurrent


class ClientGone(Exception):
    """The client closed its connection; abandon the attempt without blaming the provider."""


_PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
_READ = 1  # libev/libuv EV_READ


def client_socket(environ: dict) -> socket.socket | None:
    """The client's socket, from clipal's gevent handler or one of gunicorn's gevent workers.

    gunicorn's workers name it differently: ``-k gevent`` (GeventWorker) parses requests
    itself and sets ``gunicorn.socket``; GeventPyWSGIWorker serves through gevent's
    pywsgi with gunicorn's own handler, which sets ``gunicorn.sock``.
    """
    return environ.get("clipal.client_socket") or environ.get("gunicorn.socket") or environ.get("gunicorn.sock")


class ClientWatch:
    def __init__(self, sock: socket.socket | None, *, start: bool = True) -> None:
        self.gone = False
        self._sock = sock
        self._watcher = None
        self._greenlet = None
        self._armed = False
        self._stopped = False
        if start:
            self.start()

    def start(self) -> None:
        """Start watching, unless already watching or stopped."""
        sock = self._sock
        if sock is None or self._watcher is not None or self._stopped:
            return
        try:
            fileno = sock.fileno()
        except OSError:
            return
        if fileno >= 0:
            self._watcher = gevent.get_hub().loop.io(fileno, _READ)
            self._watcher.start(self._on_readable)

    def _on_readable(self) -> None:
        # Runs in the hub. Look without consuming: EOF or reset means gone;
        # actual bytes mean a pipelined request, which is not our business.
        try:
            data = self._sock.recv(1, _PEEK_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                return
            data = b""
        self.stop()
        if data:
            return
        self.gone = True
        if self._armed and self._greenlet is not None:
            self._greenlet.throw(ClientGone())

    def guard(self) -> ClientWatch:
        """Let a client hang-up interrupt the enclosed wait with :class:`ClientGone`.

        Use as ``with watch.guard(): ...``. The watch is its own context
        manager (not a generator-based one): a stream enters it once per
        chunk, and this costs a fraction of contextlib's machinery.
        """
        return self

    def __enter__(self) -> None:
        if self.gone:
            raise ClientGone()
        self._greenlet = getcurrent()
        self._armed = True

    def __exit__(self, *exc_info) -> None:
        self._armed = False
        self._greenlet = None

    def stop(self) -> None:
        self._stopped = True
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher.close()
            self._watcher = None
