"""``gunicorn -k gevent 'clipal.wsgi:app'``: the app for a gunicorn gevent worker.

The config directory comes from ``$CLIPAL_CONFIG_DIR`` (else ~/.clipal).
gunicorn's gevent worker has already monkey-patched the process when it
imports this module. Each worker process builds its own app, so each has
its own failover state and its own config watcher: failovers and
deactivations are learned per worker, and every worker reloads on its own.
"""

from gevent import monkey

if not monkey.is_module_patched("socket"):  # imported outside a gevent worker
    monkey.patch_all()

from .app import create_app  # noqa: E402
from .server import freeze_startup_objects, return_large_buffers_to_the_os  # noqa: E402

app = create_app()

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
