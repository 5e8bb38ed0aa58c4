"""The ``clipal`` command, the entry point of both ``clipal`` and ``python -m clipal``.

``clipal status`` and ``clipal service`` only read files and ask a running
clipal or the service manager: they are dispatched first, before gevent,
Flask or requests are imported, so they answer at once. Everything else
needs gevent to patch the standard library before anything imports
sockets, ssl, threading or requests (logging, imported by clipal.config,
makes a lock at import), so :func:`main` patches before importing any of
the rest; this module imports nothing but the standard library at the top.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .config import Flag, Setting

_EPILOG = """subcommands:
  clipal status [--config-dir DIR] [--json] [--timeout SECONDS]
      the running clipal's providers: state, current provider, keys
  clipal service install|uninstall|start|stop|status [--config-dir DIR] [--dry-run]
      run clipal at login as a per-user service (systemd, launchd)
  clipal update [--check] [--dry-run] [--index-url URL]
      update clipal"""


def _flags() -> tuple[tuple[Setting[Any], Flag], ...]:
    """Each setting that has a command-line flag, with its flag (Setting, Flag), in the order --help lists them."""
    from .config import SETTINGS

    return tuple((setting, setting.flag) for setting in SETTINGS if setting.flag is not None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipal",
        description="A local failover proxy for Claude Code, Codex CLI and Gemini CLI.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-dir", metavar="DIR",
                        help="configuration directory (default: $CLIPAL_CONFIG_DIR or ~/.clipal)")
    for setting, flag in _flags():
        parser.add_argument(flag.option, dest=setting.name, metavar=flag.metavar,
                            help=f"{setting.help} (default {setting.default})")
    parser.add_argument("--version", action="version", version=f"clipal {__version__}")
    return parser


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line settings, validated by the same rules as config.yaml."""
    from .config import parse_settings

    raw: dict[str, object] = {}
    for setting, flag in _flags():
        text = getattr(args, setting.name)
        if text is not None:
            raw[setting.name] = flag.parse(text)
    settings = parse_settings(raw, file="command line")
    return {key: getattr(settings, key) for key in raw}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The two subcommands that never serve, before gevent (see the module docstring).
    if argv[:1] == ["status"]:
        from .status import main as status_main

        return status_main(argv[1:])
    if argv[:1] == ["service"]:
        from .service import main as service_main

        return service_main(argv[1:])
    if "--version" in argv:  # answered before any of the server is imported
        print(f"clipal {__version__}")
        return 0

    from .patch import patch_with_gevent

    patch_with_gevent()
    from .config import ConfigError

    if argv[:1] == ["update"]:
        from .update import main as update_main

        return update_main(argv[1:])

    args = _parser().parse_args(argv)
    try:
        overrides = flag_overrides(args)
        from .app import create_app, default_config_dir

        config_dir = Path(args.config_dir).expanduser() if args.config_dir else default_config_dir()
        app = create_app(config_dir, overrides=overrides)
    except ConfigError as error:
        print(f"clipal: {error}", file=sys.stderr)
        return 1

    from .logs import get_logger
    from .server import make_server, serve

    runtime = app.extensions["clipal"]
    settings = runtime.snapshot.config.settings
    try:
        server = make_server(app, settings.listen_addr, settings.port)
    except OSError as error:
        print(f"clipal: cannot listen on {settings.listen_addr}:{settings.port}: {error.strerror or error}",
              file=sys.stderr)
        return 1
    get_logger().info("clipal %s listening on http://%s:%d (config: %s)", __version__, settings.listen_addr,
                      settings.port, config_dir)
    watcher = app.extensions.get("clipal.watcher")
    serve(server, on_stop=watcher.stop if watcher is not None else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
