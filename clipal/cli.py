"""The ``clipal`` command.

gevent must patch the standard library before anything imports sockets,
ssl or requests, so the patch comes first in this module, which is the
entry point of both ``clipal`` and ``python -m clipal``.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402  (imports after patching, on purpose)
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from . import __version__  # noqa: E402
from .config import SETTINGS, ConfigError, Flag, Setting, parse_settings  # noqa: E402

#: Each setting that has a command-line flag, with its flag, in the order --help lists them.
FLAGS: tuple[tuple[Setting[Any], Flag], ...] = tuple(
    (setting, setting.flag) for setting in SETTINGS if setting.flag is not None)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipal",
        description="A local failover proxy for Claude Code, Codex CLI and Gemini CLI.",
        epilog="Subcommand: 'clipal update [--check] [--dry-run] [--index-url URL]' updates clipal.",
    )
    parser.add_argument("--config-dir", metavar="DIR",
                        help="configuration directory (default: $CLIPAL_CONFIG_DIR or ~/.clipal)")
    for setting, flag in FLAGS:
        parser.add_argument(flag.option, dest=setting.name, metavar=flag.metavar,
                            help=f"{setting.help} (default {setting.default})")
    parser.add_argument("--version", action="version", version=f"clipal {__version__}")
    return parser


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line settings, validated by the same rules as config.yaml."""
    raw: dict[str, object] = {}
    for setting, flag in FLAGS:
        text = getattr(args, setting.name)
        if text is not None:
            raw[setting.name] = flag.parse(text)
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
