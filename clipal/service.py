"""``clipal service``: run this clipal at login as a per-user service.

``install`` writes a systemd user unit (Linux) or a launchd agent (macOS),
or creates a Task Scheduler task run at logon (Windows, with ``schtasks``),
that runs the interpreter running this command with ``-m clipal
--config-dir DIR`` - so the service runs the same clipal, from the same
virtualenv, as the command that installed it - restarts it when it fails,
and sends its stdout nowhere (clipal's daily files in the log directory are
the log; stderr keeps start-up errors). ``uninstall`` stops and removes it;
``start``, ``stop`` and ``status`` ask the service manager. ``--dry-run``
prints the file and the commands and changes nothing.

The unit and the plist have one source: the templates below. deploy/'s
``clipal.service`` and ``io.github.clipal.plist``, for installing by hand,
are the same templates rendered with the paths a hand install uses
(:func:`deploy_files`; tests/test_service.py checks that they match).

:func:`current_platform` asks :mod:`clipal.platforms` which platform this is; each
platform's manager is a :class:`ServiceManager` in :data:`MANAGERS`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from . import platforms
from .status import default_config_dir

UNIT_NAME = "clipal.service"
LABEL = "io.github.clipal"
#: The Task Scheduler task's name (Windows).
TASK_NAME = "clipal"
#: schtasks refuses a /TR command line longer than this.
MAX_TASK_COMMAND = 261
ACTIONS = ("install", "uninstall", "start", "stop", "status")
#: A service manager that takes longer than this to answer is treated as refusing.
COMMAND_TIMEOUT = 60.0

# --------------------------------------------------------------------------- the one source

UNIT_TEMPLATE = """\
{header}

[Unit]
Description=clipal failover proxy for coding agents
# No network dependency: clipal binds loopback and reaches upstreams per request, and
# a user manager cannot order itself after system units such as network-online.target.

[Service]
Type=simple
ExecStart={exec_start}
Environment={environment}
# Restart after a crash or a start-up failure (e.g. an invalid config: fix the file
# and the next attempt picks it up). A clean stop (exit 0 on SIGTERM) stays stopped.
Restart=on-failure
RestartSec=5s
# clipal stops accepting on SIGTERM and lets in-flight responses finish (~5 s).
KillSignal=SIGTERM
TimeoutStopSec=10s
# File logging only. Start-up errors (one line on stderr) still reach
# `journalctl --user -u clipal`, since stderr would otherwise follow stdout to null.
StandardOutput=null
StandardError=journal
# Config files hold API keys; keep the logs and anything else clipal writes private.
UMask=0077
NoNewPrivileges=yes

[Install]
WantedBy=default.target
"""

#: The header of deploy/clipal.service, installed by hand.
HAND_UNIT_HEADER = """\
# clipal as a systemd *user* service: starts at login (or at boot with lingering),
# restarts after a crash, logs to files in ~/.clipal/logs and not to the journal.
#
# Install (see deploy/README.md):
#   mkdir -p ~/.config/systemd/user
#   cp deploy/clipal.service ~/.config/systemd/user/
#   systemctl --user daemon-reload && systemctl --user enable --now clipal
#
# ExecStart assumes `pip install --user clipal` or pipx (both put the script in
# ~/.local/bin). If `command -v clipal` prints another path, put that path here.
# Set `log_stdout: false` in ~/.clipal/config.yaml: stdout goes nowhere below, and the
# daily files in <config-dir>/logs are the log."""

#: The header of a unit `clipal service install` writes.
INSTALLED_UNIT_HEADER = """\
# clipal as a systemd *user* service, written by `clipal service install`: starts at
# login (or at boot with lingering), restarts after a crash, logs to files in the
# config directory's logs/ and not to the journal. `clipal service install` again
# rewrites it; `clipal service uninstall` stops and removes it.
#
# Set `log_stdout: false` in config.yaml: stdout goes nowhere below, and the daily
# files in <config-dir>/logs are the log."""

PLIST_TEMPLATE = """\
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!--
{header}
-->
<plist version="1.0">
<dict>
    <key>Label</key>
    <string>{label}</string>

    <key>ProgramArguments</key>
    <array>
{program_arguments}
    </array>

    <key>EnvironmentVariables</key>
    <dict>
        <key>CLIPAL_CONFIG_DIR</key>
        <string>{config_dir}</string>
    </dict>

    <!-- Start when loaded (at login) and start again whenever it exits; stop it for
         good with `launchctl bootout`. launchd waits ThrottleInterval seconds between
         restarts, so an invalid config does not spin. -->
    <key>RunAtLoad</key>
    <true/>
    <key>KeepAlive</key>
    <true/>
    <key>ThrottleInterval</key>
    <integer>10</integer>

    <!-- clipal drains in-flight responses for ~5 s after SIGTERM. -->
    <key>ExitTimeOut</key>
    <integer>10</integer>

    <!-- Standard, not Background: Background jobs get throttled CPU and I/O, and every
         request of an interactive coding agent passes through this process. -->
    <key>ProcessType</key>
    <string>Standard</string>

    <!-- Config files hold API keys; keep what clipal writes private (octal 077). -->
    <key>Umask</key>
    <integer>63</integer>

    <!-- File logging only: stdout is discarded. stderr keeps start-up errors (an
         invalid config is one line there) in a file that always has a directory. -->
    <key>StandardOutPath</key>
    <string>/dev/null</string>
    <key>StandardErrorPath</key>
    <string>{stderr_path}</string>
</dict>
</plist>
"""

#: The comment of deploy/io.github.clipal.plist, installed by hand.
HAND_PLIST_HEADER = """\
  clipal as a launchd LaunchAgent (per user): starts at login, restarted if it exits,
  logs to files in ~/.clipal/logs.

  launchd expands neither ~ nor $HOME, so the paths below are absolute with a placeholder.
  Install with the paths filled in (see deploy/README.md):

    sed -e "s|/Users/YOUR_USER/.local/bin/clipal|$(command -v clipal)|" \\
        -e "s|/Users/YOUR_USER|$HOME|g" \\
        deploy/io.github.clipal.plist > ~/Library/LaunchAgents/io.github.clipal.plist
    launchctl bootstrap "gui/$(id -u)" ~/Library/LaunchAgents/io.github.clipal.plist

  Set `log_stdout: false` in ~/.clipal/config.yaml: stdout is discarded below."""

#: The comment of a plist `clipal service install` writes.
INSTALLED_PLIST_HEADER = """\
  clipal as a launchd LaunchAgent (per user), written by `clipal service install`:
  starts at login, restarted if it exits, logs to files in the config directory's logs/.
  `clipal service install` again rewrites it; `clipal service uninstall` stops and
  removes it.

  Set `log_stdout: false` in config.yaml: stdout is discarded below."""

#: Where a hand install's placeholders point (deploy/README.md says how to fill them).
HAND_HOME = "/Users/YOUR_USER"


_SYSTEMD_PLAIN = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def systemd_word(text: str, *, expands_variables: bool = True) -> str:
    """``text`` as one word of a unit file line: ``%`` (and in ExecStart ``$``) escaped, quoted if needed."""
    text = text.replace("%", "%%")
    if expands_variables:
        text = text.replace("$", "$$")
    if _SYSTEMD_PLAIN.fullmatch(text.replace("%%", "").replace("$$", "")):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(header: str, exec_start: str, environment: str) -> str:
    """The systemd unit; ``exec_start`` and ``environment`` (``CLIPAL_CONFIG_DIR=...``) in unit-file syntax."""
    return UNIT_TEMPLATE.format(header=header, exec_start=exec_start, environment=environment)


def render_plist(header: str, arguments: list[str], config_dir: str, stderr_path: str) -> str:
    """The launchd agent, with every path XML-escaped."""
    lines = "\n".join(f"        <string>{escape(argument)}</string>" for argument in arguments)
    return PLIST_TEMPLATE.format(header=header, label=LABEL, program_arguments=lines,
                                 config_dir=escape(config_dir), stderr_path=escape(stderr_path))


def deploy_files() -> dict[str, str]:
    """deploy/'s unit and plist, by file name: the templates with a hand install's paths."""
    return {
        UNIT_NAME: render_unit(HAND_UNIT_HEADER, "%h/.local/bin/clipal", "CLIPAL_CONFIG_DIR=%h/.clipal"),
        f"{LABEL}.plist": render_plist(HAND_PLIST_HEADER, [f"{HAND_HOME}/.local/bin/clipal"], f"{HAND_HOME}/.clipal",
                                       f"{HAND_HOME}/Library/Logs/clipal.stderr.log"),
    }


def write_deploy_files(directory: Path | str) -> None:
    """Write :func:`deploy_files` into ``directory`` (deploy/ of a checkout, after editing a template)."""
    for name, text in deploy_files().items():
        (Path(directory) / name).write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- managers


class ServiceError(Exception):
    """Why the service command could not do what was asked: one line for the user."""


@dataclass(frozen=True)
class Command:
    """A service manager command, and whether its failure is expected at times and ignored."""

    argv: tuple[str, ...]
    #: e.g. unloading what is not loaded, before loading it again
    may_fail: bool = False
    #: shown quoted as Windows parses a command line (schtasks' /TR value holds spaces and quotes)
    windows: bool = False

    def __str__(self) -> str:
        return subprocess.list2cmdline(self.argv) if self.windows else " ".join(self.argv)


@dataclass
class Plan:
    """What an action does, in order: commands, then the file change, then more commands."""

    before: list[Command] = field(default_factory=list)
    write: tuple[Path, str] | None = None
    remove: Path | None = None
    after: list[Command] = field(default_factory=list)


class ServiceManager(ABC):
    """One platform's per-user service manager: where it keeps the service, and its commands."""

    #: the program every command runs (checked for on PATH before anything changes)
    tool = ""
    #: what the service is called in messages
    kind = ""

    def __init__(self, config_dir: Path, python: str, home: Path) -> None:
        self.config_dir = config_dir
        self.python = python
        self.home = home

    @property
    def arguments(self) -> list[str]:
        """What the service runs: this interpreter's clipal with this config directory."""
        return [self.python, "-m", "clipal", "--config-dir", str(self.config_dir)]

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the service is defined, for messages (a file, or a task's name)."""

    @abstractmethod
    def not_installed(self) -> str | None:
        """Why ``uninstall`` has nothing to do, or None when the service is installed."""

    @abstractmethod
    def plan(self, action: str) -> Plan:
        """What ``action`` (one of :data:`ACTIONS`) does."""


class FileServiceManager(ServiceManager):
    """A service manager that reads the service from a file clipal writes (systemd, launchd)."""

    @property
    @abstractmethod
    def path(self) -> Path:
        """The file the service manager reads the service from."""

    @abstractmethod
    def render(self) -> str:
        """That file's text for this clipal."""

    @property
    def location(self) -> str:
        return str(self.path)

    def not_installed(self) -> str | None:
        return None if self.path.exists() else f"{self.path} does not exist"


class Systemd(FileServiceManager):
    """A systemd user unit in ~/.config/systemd/user, run by the user's manager (``systemctl --user``)."""

    tool = "systemctl"
    kind = "systemd user unit"

    @property
    def path(self) -> Path:
        config_home = os.environ.get("XDG_CONFIG_HOME") or str(self.home / ".config")
        return Path(config_home) / "systemd" / "user" / UNIT_NAME

    def render(self) -> str:
        return render_unit(INSTALLED_UNIT_HEADER, " ".join(systemd_word(a) for a in self.arguments),
                           systemd_word(f"CLIPAL_CONFIG_DIR={self.config_dir}", expands_variables=False))

    def _systemctl(self, *args: str, may_fail: bool = False) -> Command:
        return Command(("systemctl", "--user", *args), may_fail)

    def plan(self, action: str) -> Plan:
        if action == "install":
            after = [self._systemctl("daemon-reload"), self._systemctl("enable", "--now", UNIT_NAME)]
            if self.path.exists() and self.path.read_text(encoding="utf-8", errors="replace") != self.render():
                # enable --now leaves a running service as it is; the new unit must replace it.
                after.append(self._systemctl("try-restart", UNIT_NAME))
            return Plan(write=(self.path, self.render()), after=after)
        if action == "uninstall":
            return Plan(before=[self._systemctl("disable", "--now", UNIT_NAME)], remove=self.path,
                        after=[self._systemctl("daemon-reload")])
        return Plan(before=[self._systemctl(action, UNIT_NAME)])


class Launchd(FileServiceManager):
    """A launchd agent in ~/Library/LaunchAgents, in the user's GUI domain (``launchctl``)."""

    tool = "launchctl"
    kind = "launchd agent"

    @property
    def path(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"

    @property
    def domain(self) -> str:
        return f"gui/{os.getuid()}"

    def render(self) -> str:
        return render_plist(INSTALLED_PLIST_HEADER, self.arguments, str(self.config_dir),
                            str(self.home / "Library" / "Logs" / "clipal.stderr.log"))

    def plan(self, action: str) -> Plan:
        bootout = Command(("launchctl", "bootout", f"{self.domain}/{LABEL}"), may_fail=True)
        bootstrap = Command(("launchctl", "bootstrap", self.domain, str(self.path)))
        if action == "install":
            # A loaded agent cannot be bootstrapped again: unload the old one (if loaded) first.
            return Plan(before=[bootout] if self.path.exists() else [], write=(self.path, self.render()),
                        after=[bootstrap])
        if action == "uninstall":
            return Plan(before=[bootout], remove=self.path)
        if action == "start":
            return Plan(before=[bootstrap])
        if action == "stop":  # KeepAlive would start it again after a plain kill: unload it (until next login)
            return Plan(before=[Command(bootout.argv)])
        return Plan(before=[Command(("launchctl", "print", f"{self.domain}/{LABEL}"))])


class Schtasks(ServiceManager):
    """A Task Scheduler task started at logon (``schtasks``); Task Scheduler keeps it, clipal writes no file.

    The task runs ``pythonw.exe`` when the interpreter has one beside it: with
    ``python.exe`` every logon would open a console window, and closing it would
    stop clipal. Nothing reads the task's output, so the log is clipal's daily
    files in the config directory's logs/ (clipal writes nowhere when stdout is
    missing, as it is under pythonw).
    """

    tool = "schtasks"
    kind = "Task Scheduler task"

    @property
    def arguments(self) -> list[str]:
        windowless = Path(self.python).with_name("pythonw.exe")
        python = str(windowless) if Path(self.python).name.lower() == "python.exe" and windowless.exists() \
            else self.python
        return [python, "-m", "clipal", "--config-dir", str(self.config_dir)]

    @property
    def location(self) -> str:
        return TASK_NAME

    @property
    def task_command(self) -> str:
        """The /TR value: the arguments as one Windows command line."""
        command = subprocess.list2cmdline(self.arguments)
        if len(command) > MAX_TASK_COMMAND:
            raise ServiceError(f"the task's command line is {len(command)} characters, more than schtasks "
                               f"takes ({MAX_TASK_COMMAND}); use a shorter --config-dir: {command}")
        return command

    def _schtasks(self, *args: str, may_fail: bool = False) -> Command:
        return Command(("schtasks", *args), may_fail, windows=True)

    def not_installed(self) -> str | None:
        if shutil.which(self.tool) is None:
            raise ServiceError(f"{self.tool} not found on PATH: clipal service needs Task Scheduler")
        result = subprocess.run(self._schtasks("/Query", "/TN", TASK_NAME).argv, capture_output=True,
                                timeout=COMMAND_TIMEOUT)
        return None if result.returncode == 0 else f"no {self.kind} named {TASK_NAME}"

    def plan(self, action: str) -> Plan:
        # /End before /Create and /Delete: a running clipal keeps the old command line (or
        # keeps running after its task is gone) otherwise. It fails when nothing runs.
        end = self._schtasks("/End", "/TN", TASK_NAME, may_fail=True)
        if action == "install":
            create = self._schtasks("/Create", "/SC", "ONLOGON", "/TN", TASK_NAME, "/TR", self.task_command, "/F")
            return Plan(before=[end, create, self._schtasks("/Run", "/TN", TASK_NAME)])
        if action == "uninstall":
            return Plan(before=[end, self._schtasks("/Delete", "/TN", TASK_NAME, "/F")])
        if action == "start":
            return Plan(before=[self._schtasks("/Run", "/TN", TASK_NAME)])
        if action == "stop":
            return Plan(before=[self._schtasks("/End", "/TN", TASK_NAME)])
        return Plan(before=[self._schtasks("/Query", "/TN", TASK_NAME, "/V", "/FO", "LIST")])


#: Each platform's manager, by :func:`current_platform`'s answer.
MANAGERS: dict[str, type[ServiceManager]] = {"linux": Systemd, "darwin": Launchd, "win32": Schtasks}


def current_platform() -> str:
    """``linux``, ``darwin``, ``win32`` or another ``sys.platform``, as :mod:`clipal.platforms` says."""
    return platforms.platform_name()


def manager_for(config_dir: Path) -> ServiceManager:
    platform = current_platform()
    manager = MANAGERS.get(platform)
    if manager is None:
        raise ServiceError(f"no per-user service manager that clipal knows on this platform ({platform}); "
                           f"supported: {', '.join(sorted(MANAGERS))}")
    return manager(config_dir, sys.executable, Path.home())


# --------------------------------------------------------------------------- running a plan


def run_command(command: Command) -> str:
    """Run ``command``; its output. Raises :class:`ServiceError` with its message when it refuses."""
    try:
        result = subprocess.run(command.argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except FileNotFoundError:
        raise ServiceError(f"{command.argv[0]} not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise ServiceError(f"{command} did not answer within {COMMAND_TIMEOUT:g}s") from None
    output = "\n".join(text.strip() for text in (result.stdout, result.stderr) if text.strip())
    if result.returncode != 0 and not command.may_fail:
        raise ServiceError(f"{command} failed (exit {result.returncode}): {output or 'no message'}")
    return output


def describe(plan: Plan) -> str:
    """What ``--dry-run`` prints: each step, the file's whole text included."""
    lines = [f"would run: {command}" for command in plan.before]
    if plan.write is not None:
        path, text = plan.write
        lines.append(f"would write {path}:")
        lines.append(text.rstrip("\n"))
    if plan.remove is not None:
        lines.append(f"would remove {plan.remove}")
    lines += [f"would run: {command}" for command in plan.after]
    return "\n".join(lines) + "\n"


def carry_out(plan: Plan, manager: ServiceManager) -> str:
    """Do ``plan``; the output of the last command (what ``status`` shows)."""
    if shutil.which(manager.tool) is None:
        raise ServiceError(f"{manager.tool} not found on PATH: clipal service needs the {manager.kind}'s "
                           f"service manager")
    output = ""
    for command in plan.before:
        output = run_command(command)
    if plan.write is not None:
        path, text = plan.write
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    if plan.remove is not None:
        plan.remove.unlink(missing_ok=True)
        print(f"removed {plan.remove}")
    for command in plan.after:
        output = run_command(command)
    return output


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipal service",
                                     description="Run clipal at login as a per-user service (systemd, launchd, "
                                                 "Task Scheduler).")
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("--config-dir", metavar="DIR",
                        help="configuration directory the service uses (default: $CLIPAL_CONFIG_DIR or ~/.clipal)")
    parser.add_argument("--dry-run", action="store_true", help="print the file and the commands; change nothing")
    return parser


def main(argv: list[str]) -> int:
    """``clipal service ACTION``: 0 when done; 1, with the service manager's message, when it is missing or refuses."""
    args = _parser().parse_args(argv)
    config_dir = Path(os.path.abspath(Path(args.config_dir).expanduser() if args.config_dir
                                      else default_config_dir()))
    try:
        manager = manager_for(config_dir)
        if args.action == "uninstall" and not args.dry_run:
            missing = manager.not_installed()
            if missing is not None:
                print(f"clipal service: not installed ({missing})")
                return 0
        plan = manager.plan(args.action)
        if args.dry_run:
            sys.stdout.write(describe(plan))
            return 0
        output = carry_out(plan, manager)
    except ServiceError as error:
        print(f"clipal service: {error}", file=sys.stderr)
        return 1
    if args.action == "status" and output:
        print(output)
    elif args.action != "status":
        print(f"clipal service: {args.action} done ({manager.kind} {manager.location})")
    return 0
