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

app = create_app()
