"""gevent's monkey-patching, done once before anything imports sockets, ssl or threading.

Standard library only at the top: this runs before the rest of clipal is imported.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any


def patch_with_gevent() -> None:
    """``gevent.monkey.patch_all()``, reading the installed packages' entry points once.

    gevent announces every module it patches to plugins registered as entry
    points, and looks them up afresh for each of its ~25 announcements; each
    lookup reads the metadata of every installed distribution, which made up
    about half of clipal's start-up. The plugins still run: their entry points
    are read once and selected per announcement from that one reading.
    """
    from gevent import monkey

    read = metadata.entry_points
    everything = read()

    def entry_points(**selection: Any) -> Any:
        return everything.select(**selection) if selection else everything

    metadata.entry_points = entry_points  # type: ignore[assignment]
    try:
        monkey.patch_all()
    finally:
        metadata.entry_points = read  # type: ignore[assignment]
