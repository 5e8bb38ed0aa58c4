"""gunicorn settings for serving clipal with gevent workers.

    CLIPAL_CONFIG_DIR=~/.clipal gunicorn -c deploy/gunicorn.conf.py 'clipal.wsgi:app'

Environment (all optional):
    CLIPAL_CONFIG_DIR  config directory read by clipal.wsgi (default ~/.clipal)
    CLIPAL_BIND        address to listen on (default 127.0.0.1:3333); gunicorn's --bind wins
    CLIPAL_WORKERS     number of worker processes (default 2)
    PROMETHEUS_MULTIPROC_DIR  an empty directory: /metrics then sums every worker's counters
                       (without it, a scrape sees only the worker that answers it)

Each worker is a separate process with its OWN config watcher, and - unless config.yaml
sets state_url - its OWN failover state. Without state_url, failover is learned per
worker: a provider that worker 1 has deactivated (bad key, quota) or is cooling down (429)
may still be tried once by worker 2, and each worker keeps its own "current provider".
With state_url: redis://... all workers (and every other clipal on that Redis and
state_prefix) share one failover state, and Redis being down only makes each worker fall
back on its own memory (deploy/README.md, "A team box"). Every worker reloads the config
files by itself when they change, within a second or two of each other. With 2 workers
you get a spare process if one dies; one gevent worker already serves many concurrent
streams, so CLIPAL_WORKERS=1 gives a single failover memory without Redis. `clipal`
itself (one process) is the simplest choice for one user; gunicorn is for running it
under an existing gunicorn setup, or for a team box.

clipal's own settings in config.yaml (timeouts, body limit, logging) apply unchanged;
listen_addr and port in config.yaml are ignored here: gunicorn owns the socket.
"""

import os

# gevent: every request is a greenlet, so long streaming responses do not tie up a
# process. The worker monkey-patches before it imports the app (see preload_app).
worker_class = "gevent"

bind = [os.environ.get("CLIPAL_BIND", "127.0.0.1:3333")]

workers = int(os.environ.get("CLIPAL_WORKERS", "2"))

# Client connections open at once, 2000 in all as with `clipal` itself, shared out among the
# workers; more wait in the listening socket's backlog. An agent session holds a few at a
# time; the upstream requests are made from the same greenlets.
worker_connections = max(1, 2000 // workers)

# Import the app in each worker after the fork, not once in the master: gevent must
# patch sockets before clipal imports requests/ssl, and the config-watcher greenlet and
# the failover state have to belong to the worker that uses them.
preload_app = False

# For gevent workers `timeout` is not a per-request limit: the worker's main greenlet
# reports to the master every second however long a response streams (answers can
# stream for many minutes). It only restarts a worker whose event loop has been blocked
# this long. clipal bounds upstream waits itself (upstream_idle_timeout).
timeout = 60

# On SIGTERM / SIGINT, stop accepting and let in-flight responses finish for up to this
# long before the workers are killed (as clipal does when run on its own).
graceful_timeout = 5

# Seconds an idle client connection is kept open for its next request (nginx's default, as
# with `clipal`). Agents reuse connections; closing sooner than the client expects races with
# its next request. The gevent worker bounds the wait for a request's line and headers with
# the same timer, so a client sending them slowly is cut off after 75 s too (not 30 s as
# with `clipal`); a body read gets 60 s (clipal.wsgi).
keepalive = 75

# No request-size limit here: the body limit is clipal's max_request_body_bytes
# (32 MiB by default, answered with 413). gunicorn's limits cover only the request line
# and headers; these are its defaults, which agents' requests are far below. They let a
# header block grow to about 800 KiB; clipal.wsgi answers one over 64 KiB with 431.
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190

# clipal logs each request itself (<config-dir>/logs and, if log_stdout, stdout);
# gunicorn's access log would duplicate it. gunicorn's own messages go to stderr.
accesslog = None
errorlog = "-"
loglevel = "info"

proc_name = "clipal"

# gunicorn >= 25.1 opens a control socket at one fixed path per user
# ($XDG_RUNTIME_DIR/gunicorn.ctl or ~/.gunicorn/gunicorn.ctl), shared by every
# gunicorn that user runs; clipal needs no runtime control, so don't claim it.
# (Older gunicorn ignores the unknown name.)
control_socket_disable = True


def post_worker_init(worker: object) -> None:
    """gunicorn's pywsgi worker (``-k gunicorn.workers.ggevent.GeventPyWSGIWorker``) parses requests
    with gevent's pywsgi; this gives it clipal's request framing rules. Other workers are untouched."""
    from clipal.wsgi import use_front_door_handler

    use_front_door_handler(worker)


def child_exit(server, worker):  # noqa: ARG001 - gunicorn's hook signature
    """A worker is gone: with PROMETHEUS_MULTIPROC_DIR, its live gauge files go too.

    clipal_active_streams adds up the live workers' files; a dead worker's file
    would keep its streams counted forever. Its counters stay in the sums.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
