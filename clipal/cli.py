"""The ``clipal`` command (SPEC §1).

gevent must patch the standard library before anything imports sockets,
ssl or requests, so the patch comes first in this module, which is the
entry point of both ``clipal`` and ``python -m clipal``.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (imports after patching, on purpose)
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from . import __version__  # noqa: E402
from .config import ConfigError, parse_settings  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipal",
        description="A local failover proxy for Claude Code, Codex CLI and Gemini CLI.",
        epilog="Subcommand: 'clipal update [--check] [--dry-run] [--index-url URL]' updates clipal.",
    )
    parser.add_argument("--config-dir", metavar="DIR",
                        help="configuration directory (default: $CLIPAL_CONFIG_DIR or ~/.clipal)")
    parser.add_argument("--listen-addr", metavar="ADDR", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", metavar="N", help="port to listen on (default 3333)")
    parser.add_argument("--log-level", metavar="LEVEL", help="debug, info, warn or error (default info)")
    parser.add_argument("--version", action="version", version=f"clipal {__version__}")
    return parser


def flag_overrides(args: argparse.Namespace) -> dict:
    """Command-line settings, validated by the same rules as config.yaml."""
    raw = {}
    if args.listen_addr is not None:
        raw["listen_addr"] = args.listen_addr
    if args.port is not None:
        try:
            raw["port"] = int(args.port)
        except ValueError:
            raw["port"] = args.port
    if args.log_level is not None:
        raw["log_level"] = args.log_level
    settings = parse_settings(raw, file="command line")
    return {key: getattr(settings, key) for key in raw}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
