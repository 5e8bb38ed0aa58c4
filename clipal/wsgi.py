"""``gunicorn -k gevent 'clipal.wsgi:app'``: the app for a gunicorn gevent worker.

The config directory comes from ``$CLIPAL_CONFIG_DIR`` (else ~/.clipal).
gunicorn's gevent worker has already monkey-patched the process when it
imports this module. Each worker process builds its own app and its own
config watcher (every worker reloads on its own). The failover state is
each worker's own too, unless ``state_url`` names a Redis: then every
worker (and host) using it shares one.

The front door's rules (:mod:`clipal.frontdoor`) hold under gunicorn too.
gunicorn's own parser (its "gevent" worker, which deploy/gunicorn.conf.py
uses) already refuses, and closes the connection on: Content-Length with
Transfer-Encoding, several Content-Lengths, one that is not digits, two
``chunked`` codings, an unknown coding (501), a malformed chunk size, an
obs-fold, a CR, NUL or other control character in a header, a request cut
before the end of its headers. What it lets through is refused here, before
the app runs (:class:`GunicornFrontDoor`): a Transfer-Encoding that merely
ends in ``chunked`` (``gzip, chunked``) and a header block over 64 KiB but
within gunicorn's own limits. Its body reads get a timeout, and its errors
reach the app as :class:`clipal.server.BodyRefused` instead of a 500.
gunicorn's pywsgi worker gets clipal's own handler from
deploy/gunicorn.conf.py (:func:`use_front_door_handler`).
"""

from __future__ import annotations

from gevent import monkey

if not monkey.is_module_patched("socket"):  # imported outside a gevent worker
    from .patch import patch_with_gevent

    patch_with_gevent()

import logging  # noqa: E402
from typing import Any, Callable, Iterable  # noqa: E402

from .app import create_app  # noqa: E402
from .frontdoor import Refusal, environ_problem  # noqa: E402
from .logs import get_logger  # noqa: E402
from .server import (BODY_TIMEOUT, BodyRefused, FrontDoorHandler, freeze_startup_objects,  # noqa: E402
                     return_large_buffers_to_the_os)

try:
    from gunicorn.http.errors import InvalidHeader, LimitRequestHeaders, ParseException, UnsupportedTransferCoding
    from gunicorn.workers.ggevent import GeventPyWSGIWorker, PyWSGIHandler
except ImportError:  # served by another WSGI server: GunicornFrontDoor then never acts
    GeventPyWSGIWorker = PyWSGIHandler = None  # type: ignore[assignment,misc]
    ParseException = ()  # type: ignore[assignment,misc]  (an except clause matching nothing)


class GunicornFrontDoor:
    """WSGI middleware: the front door's rules gunicorn's parser does not apply, for requests it parsed.

    A refusal is raised as gunicorn's own parser error, before anything
    else runs: gunicorn answers it as it answers its own (400, 431 or 501),
    logs it as a warning and closes the connection. A request that
    gunicorn's pywsgi worker parsed (no ``gunicorn.socket``) passes as it is.
    """

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict, start_response: Callable[..., Any]) -> Iterable[bytes]:
        sock = environ.get("gunicorn.socket")
        if sock is None:
            return self.app(environ, start_response)
        refusal = environ_problem(environ)
        if refusal is not None:
            raise _gunicorn_error(refusal)
        body = environ["wsgi.input"] = _GunicornBody(environ["wsgi.input"], sock, environ)

        def respond(status: str, headers: list, exc_info: Any = None) -> Callable[[bytes], Any]:
            if body.parse_error is not None:
                # A malformed chunked body: gunicorn answers it as its parser's error, with
                # Connection: close (to the app's answer it would say keep-alive, then close).
                raise body.parse_error
            return start_response(status, headers, exc_info)

        return self.app(environ, respond)


def _gunicorn_error(refusal: Refusal) -> Exception:
    if refusal.status == 431:
        return LimitRequestHeaders(refusal.reason)
    if refusal.status == 501:
        return UnsupportedTransferCoding(refusal.reason)
    return InvalidHeader(refusal.reason)


class _GunicornBody:
    """gunicorn's ``wsgi.input``, with a timeout on each socket read; what goes wrong becomes BodyRefused.

    The app then answers in the client's shape, logging nothing as its own
    error. gunicorn marks its body as failed when a read raises and closes the
    connection after the response, so that answer is the last thing on it.
    """

    def __init__(self, body: Any, sock: Any, environ: dict) -> None:
        self._body = body
        self._sock = sock
        self._client = f"{environ.get('REMOTE_ADDR', '')}:{environ.get('REMOTE_PORT', '')}"
        #: gunicorn's error for a malformed chunked body, raised again in place of the app's answer.
        self.parse_error: Exception | None = None

    def read(self, size: int | None = None) -> bytes:
        return self._guarded(self._body.read, size)

    def readline(self, size: int | None = None) -> bytes:
        return self._guarded(self._body.readline, size)

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return self._guarded(self._body.readlines, hint)

    def __iter__(self) -> _GunicornBody:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def _guarded(self, read: Callable[[Any], Any], size: Any) -> Any:
        previous = self._sock.gettimeout()
        self._sock.settimeout(BODY_TIMEOUT)  # per recv, so a large body arriving steadily never times out
        try:
            return read(size)
        except TimeoutError:
            raise self._refused(Refusal(408, f"no request body bytes within {BODY_TIMEOUT:g}s"), logging.INFO)
        except OSError:  # gunicorn's NoMoreData is one, as is a reset
            raise self._refused(Refusal(400, "request body cut short by the client"), logging.INFO)
        except ParseException as error:  # gunicorn logs it when it answers (GunicornFrontDoor)
            self.parse_error = error
            raise BodyRefused(Refusal(400, "malformed or incomplete chunked request body")) from None
        finally:
            self._sock.settimeout(previous)

    def _refused(self, refusal: Refusal, level: int) -> BodyRefused:
        get_logger().log(level, "refused a request from %s: %s (answered %d, connection closed)",
                         self._client, refusal.reason, refusal.status)
        return BodyRefused(refusal)


if PyWSGIHandler is not None:
    class GunicornPyWSGIHandler(FrontDoorHandler, PyWSGIHandler):
        """gunicorn's pywsgi handler (its access log, its environ) behind clipal's front door."""


def use_front_door_handler(worker: Any) -> None:
    """Serve a gunicorn pywsgi worker's connections with clipal's handler (a post_worker_init hook).

    That worker parses requests with gevent's pywsgi, which on its own
    frames bodies as loosely as the ``clipal`` command used to; its other
    workers are left as they are.
    """
    if GeventPyWSGIWorker is not None and isinstance(worker, GeventPyWSGIWorker):
        worker.wsgi_handler = GunicornPyWSGIHandler


app = create_app()
app.wsgi_app = GunicornFrontDoor(app.wsgi_app)  # type: ignore[method-assign]

# The memory tuning `clipal` does in clipal.server.serve(), done here rather than in a
# hook of deploy/gunicorn.conf.py so that every way of running this module gets it,
# `gunicorn -k gevent clipal.wsgi:app` without that file included. Without --preload
# gunicorn imports this module in each worker, after the fork; with --preload it
# imports it once in the master, and each forked worker inherits both settings (the
# malloc parameter and the frozen generation are process memory, copied by fork).
# After create_app(), so that the objects frozen are those of the built app.
return_large_buffers_to_the_os()
freeze_startup_objects()
# Not release_memory_after_bursts(): it counts open client connections in the server's
# pool, and a gunicorn gevent worker keeps its pool as a local variable of
# GeventWorker.run() (gunicorn/workers/ggevent.py), which neither the app nor a
# config hook can reach without patching gunicorn's classes. Under gunicorn the free
# heap left after a burst of streams stays with the worker, as glibc does by default.
