"""clipal: a local reverse proxy that keeps coding agents working when a provider fails.

This module stays import-light on purpose: entry points must be able to
monkey-patch with gevent before anything imports sockets, ssl or requests.
"""

__version__ = "0.1.0"
