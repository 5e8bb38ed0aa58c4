"""Checks of the deploy/ files: the systemd unit, the launchd plist and the gunicorn config."""

from __future__ import annotations

import configparser
import os
import plistlib
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "clipal.service"
PLIST = DEPLOY / "io.github.clipal.plist"
GUNICORN_CONF = DEPLOY / "gunicorn.conf.py"


# --------------------------------------------------------------------------- systemd


def read_unit() -> configparser.ConfigParser:
    # systemd allows repeated keys (Environment=); strict=False keeps the last, which
    # is enough for these checks. Keys are case-sensitive in systemd.
    parser = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT, encoding="utf-8")
    return parser


def test_unit_is_a_restarting_user_service_with_file_logging():
    unit = read_unit()
    service = unit["Service"]
    assert service["ExecStart"] == "%h/.local/bin/clipal"
    assert service["Environment"] == "CLIPAL_CONFIG_DIR=%h/.clipal"
    assert service["Restart"] == "on-failure"
    assert service["RestartSec"]
    assert service["StandardOutput"] == "null"
    assert service["StandardError"] == "journal"
    assert service["KillSignal"] == "SIGTERM"
    assert service["TimeoutStopSec"] == "10s"  # longer than clipal's ~5 s drain
    # A user service: installed into default.target of the user manager, no User=.
    assert unit["Install"]["WantedBy"] == "default.target"
    assert "User" not in service
    assert unit["Unit"]["Description"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # A user manager resolves %h from HOME and needs a runtime dir; verify also checks
    # that ExecStart exists and is executable, so give it a home with ~/.local/bin/clipal.
    home = tmp_path / "home"
    (home / ".local" / "bin").mkdir(parents=True)
    executable = home / ".local" / "bin" / "clipal"
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "notice"}
    result = subprocess.run(
        ["systemd-analyze", "--user", "verify", str(UNIT)], env=env, capture_output=True, text=True, timeout=60
    )
    # verify exits 0 even for unknown keys or bad values ("..., ignoring"), so any
    # output at all is a failure.
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


# --------------------------------------------------------------------------- launchd


def test_plist_is_a_kept_alive_launch_agent():
    with PLIST.open("rb") as handle:
        plist = plistlib.load(handle)
    assert plist["Label"] == "io.github.clipal"
    assert PLIST.name == plist["Label"] + ".plist"  # launchd's naming convention
    arguments = plist["ProgramArguments"]
    assert isinstance(arguments, list) and arguments
    assert all(isinstance(argument, str) for argument in arguments)
    assert arguments[0].endswith("/clipal") and arguments[0].startswith("/")  # launchd expands no ~
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] is True
    assert plist["EnvironmentVariables"]["CLIPAL_CONFIG_DIR"].startswith("/")
    assert plist["StandardOutPath"] == "/dev/null"
    assert plist["StandardErrorPath"].startswith("/")
    assert plist["Umask"] == 0o077
    assert plist["ProcessType"] in {"Standard", "Interactive", "Adaptive", "Background"}


def test_plist_install_command_in_readme_fills_every_placeholder(tmp_path):
    """The sed command documented for macOS leaves no YOUR_USER behind."""
    text = PLIST.read_text()
    filled = text.replace("/Users/YOUR_USER/.local/bin/clipal", "/opt/bin/clipal").replace(
        "/Users/YOUR_USER", "/Users/alice"
    )
    assert "YOUR_USER" not in filled
    plist = plistlib.loads(filled.encode())
    assert plist["ProgramArguments"] == ["/opt/bin/clipal"]
    assert plist["EnvironmentVariables"]["CLIPAL_CONFIG_DIR"] == "/Users/alice/.clipal"
    readme = (DEPLOY / "README.md").read_text()
    assert 's|/Users/YOUR_USER/.local/bin/clipal|$(command -v clipal)|' in readme
    assert 's|/Users/YOUR_USER|$HOME|g' in readme


# --------------------------------------------------------------------------- gunicorn


def load_gunicorn_settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> dict:
    for name in ("CLIPAL_BIND", "CLIPAL_WORKERS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(GUNICORN_CONF))


def test_gunicorn_config_defaults(monkeypatch):
    settings = load_gunicorn_settings(monkeypatch)
    assert settings["worker_class"] == "gevent"
    assert settings["bind"] == ["127.0.0.1:3333"]
    assert settings["workers"] == 2
    assert settings["preload_app"] is False
    assert settings["graceful_timeout"] == 5
    assert settings["timeout"] >= 60 or settings["timeout"] == 0
    assert "each worker" in settings["__doc__"].lower() and "failover state" in settings["__doc__"]


def test_gunicorn_config_reads_bind_and_workers_from_env(monkeypatch):
    settings = load_gunicorn_settings(monkeypatch, CLIPAL_BIND="127.0.0.1:4000", CLIPAL_WORKERS="3")
    assert settings["bind"] == ["127.0.0.1:4000"]
    assert settings["workers"] == 3


def test_gunicorn_accepts_every_setting(monkeypatch):
    """gunicorn's own loader validates each value; a typo'd name would be ignored, so
    also require every module-level name to be a real gunicorn setting."""
    gunicorn_config = pytest.importorskip("gunicorn.config")
    settings = load_gunicorn_settings(monkeypatch)
    known = gunicorn_config.Config().settings
    names = {name for name in settings if not name.startswith("__") and name != "os"}
    assert names <= set(known), names - set(known)
    config = gunicorn_config.Config()
    for name in names:
        config.set(name, settings[name])
    assert config.worker_class_str == "gevent"
    assert config.address == [("127.0.0.1", 3333)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_gunicorn_serves_with_gevent_and_drains_on_sigterm(tmp_path):
    """Start real gunicorn with this config and a tiny WSGI app: the worker is gevent-
    patched before the app is imported, and SIGTERM lets a streaming response finish."""
    pytest.importorskip("gunicorn")
    (tmp_path / "tinyapp.py").write_text(
        textwrap.dedent(
            """
            import time
            from gevent import monkey

            PATCHED_BEFORE_IMPORT = monkey.is_module_patched("socket")

            def app(environ, start_response):
                start_response("200 OK", [("Content-Type", "text/plain")])
                if environ["PATH_INFO"] == "/slow":
                    def body():
                        yield b"start\\n"
                        time.sleep(1.5)  # patched: yields to the hub
                        yield b"end\\n"
                    return body()
                return [b"patched=%s" % str(PATCHED_BEFORE_IMPORT).encode()]
            """
        )
    )
    port = free_port()
    env = {**os.environ, "CLIPAL_BIND": f"127.0.0.1:{port}", "CLIPAL_WORKERS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "--chdir", str(tmp_path), "tinyapp:app"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    assert response.read() == b"patched=True"
                break
            except OSError:
                assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
                assert time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.1)

        slow = urllib.request.urlopen(f"http://127.0.0.1:{port}/slow", timeout=10)
        assert slow.readline() == b"start\n"
        process.send_signal(signal.SIGTERM)
        assert slow.read() == b"end\n"  # finished within graceful_timeout
        slow.close()
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
        if process.stderr:
            process.stderr.close()
