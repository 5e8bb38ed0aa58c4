"""The platform seam (clipal.platforms) and the Windows service manager behind it.

``CLIPAL_TEST_PLATFORM`` makes the seam answer for macOS or Windows on this
Linux machine; these tests check what it then says, and that ``clipal
service`` drives ``schtasks`` (a stand-in on PATH recording its arguments)
with the right command lines.
"""

from __future__ import annotations

import plistlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from clipal import platforms, service
from test_service import calls_of, dry_run_file, fake_tool, use_path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


# --------------------------------------------------------------------------- the seam


def test_the_test_platform_variable_is_what_the_seam_answers(monkeypatch):
    monkeypatch.delenv(platforms.ENV_PLATFORM, raising=False)
    assert platforms.platform_name() == ("linux" if sys.platform.startswith("linux") else sys.platform)
    monkeypatch.setenv(platforms.ENV_PLATFORM, "linux2")
    assert platforms.platform_name() == "linux"
    monkeypatch.setenv(platforms.ENV_PLATFORM, "win32")
    assert platforms.platform_name() == service.current_platform() == "win32"


def test_windows_has_no_inotify_no_glibc_tuning_no_sighup_and_task_scheduler(monkeypatch):
    monkeypatch.setenv(platforms.ENV_PLATFORM, "win32")
    here = platforms.current()
    assert (here.name, here.inotify, here.glibc_malloc, here.gevent_signals, here.service_manager) == (
        "win32", False, False, False, "schtasks")
    assert here.reload_signal is None
    assert here.shutdown_signals[0] == signal.SIGINT and signal.SIGTERM not in here.shutdown_signals
    assert platforms.inotify_module() is None and platforms.glibc_malloc() is None


def test_macos_keeps_the_posix_signals_and_uses_launchd(monkeypatch):
    monkeypatch.setenv(platforms.ENV_PLATFORM, "darwin")
    here = platforms.current()
    assert (here.inotify, here.glibc_malloc, here.gevent_signals, here.service_manager) == (
        False, False, True, "launchd")
    assert here.shutdown_signals == (signal.SIGTERM, signal.SIGINT)
    assert here.reload_signal == getattr(signal, "SIGHUP", None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify and glibc are Linux's")
def test_linux_has_inotify_glibc_and_sighup(monkeypatch):
    monkeypatch.delenv(platforms.ENV_PLATFORM, raising=False)
    here = platforms.current()
    assert (here.name, here.inotify, here.glibc_malloc, here.service_manager) == ("linux", True, True, "systemd")
    assert here.reload_signal == signal.SIGHUP
    monkeypatch.setattr(platforms, "inotify_simple", None)
    assert platforms.current().inotify is False


# --------------------------------------------------------------------------- schtasks


def expected_task_command(config_dir: Path) -> str:
    return subprocess.list2cmdline([sys.executable, "-m", "clipal", "--config-dir", str(config_dir)])


def dry_run_install(platform: str, home: Path, config_dir: Path) -> subprocess.CompletedProcess:
    """``clipal service install --dry-run`` as a user on ``platform`` runs it (no service manager on PATH)."""
    return subprocess.run([sys.executable, "-m", "clipal", "service", "install", "--dry-run",
                           "--config-dir", str(config_dir)], capture_output=True, text=True,
                          env={"PATH": "/nonexistent", "HOME": str(home), platforms.ENV_PLATFORM: platform})


def test_dry_run_on_windows_prints_the_schtasks_command_lines(tmp_path, home):
    config_dir = tmp_path / "config dir"
    result = dry_run_install("win32", home, config_dir)
    assert result.returncode == 0, result.stderr
    task = subprocess.list2cmdline([expected_task_command(config_dir)])  # quoted once more as /TR's value
    assert result.stdout.splitlines() == [
        "would run: schtasks /End /TN clipal",
        f"would run: schtasks /Create /SC ONLOGON /TN clipal /TR {task} /F",
        "would run: schtasks /Run /TN clipal",
    ]
    assert '--config-dir \\"' in task  # the space made the inner path quoted, and /TR escapes those quotes
    assert list(home.iterdir()) == []


def test_dry_run_on_macos_prints_the_plist(tmp_path, home):
    config_dir = tmp_path / "config"
    result = dry_run_install("darwin", home, config_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"would write {home}/Library/LaunchAgents/io.github.clipal.plist:\n")
    plist = plistlib.loads(dry_run_file(result.stdout).encode())
    assert plist["ProgramArguments"] == [sys.executable, "-m", "clipal", "--config-dir", str(config_dir)]


def test_install_start_stop_status_uninstall_with_schtasks(tmp_path, home, monkeypatch, capsys):
    monkeypatch.setenv(platforms.ENV_PLATFORM, "win32")
    bin_dir = tmp_path / "bin"
    calls = fake_tool(bin_dir, "schtasks")
    use_path(monkeypatch, bin_dir)
    config_dir = tmp_path / "config"

    assert service.main(["install", "--config-dir", str(config_dir)]) == 0
    assert capsys.readouterr().out == "clipal service: install done (Task Scheduler task clipal)\n"
    assert calls_of(calls) == ["/End /TN clipal",
                               f"/Create /SC ONLOGON /TN clipal /TR {expected_task_command(config_dir)} /F",
                               "/Run /TN clipal"]
    assert list(home.iterdir()) == []  # Task Scheduler keeps the task; clipal writes no file

    calls.unlink()
    for action in ("start", "stop", "status"):
        assert service.main([action]) == 0
    assert calls_of(calls) == ["/Run /TN clipal", "/End /TN clipal", "/Query /TN clipal /V /FO LIST"]

    calls.unlink()
    assert service.main(["uninstall"]) == 0
    assert calls_of(calls) == ["/Query /TN clipal", "/End /TN clipal", "/Delete /TN clipal /F"]


def test_uninstall_of_a_missing_task_runs_nothing_else(tmp_path, home, monkeypatch, capsys):
    monkeypatch.setenv(platforms.ENV_PLATFORM, "win32")
    bin_dir = tmp_path / "bin"
    calls = fake_tool(bin_dir, "schtasks", exit_code=1, message="ERROR: The system cannot find the file specified.")
    use_path(monkeypatch, bin_dir)
    assert service.main(["uninstall"]) == 0
    assert capsys.readouterr().out == "clipal service: not installed (no Task Scheduler task named clipal)\n"
    assert calls_of(calls) == ["/Query /TN clipal"]


def test_a_refusing_schtasks_is_exit_1_with_its_message(tmp_path, home, monkeypatch, capsys):
    monkeypatch.setenv(platforms.ENV_PLATFORM, "win32")
    bin_dir = tmp_path / "bin"
    calls = fake_tool(bin_dir, "schtasks", exit_code=1, message="ERROR: Access is denied.")
    use_path(monkeypatch, bin_dir)
    assert service.main(["install", "--config-dir", str(tmp_path / "config")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("clipal service: schtasks /Create /SC ONLOGON /TN clipal /TR ")
    assert err.rstrip().endswith("failed (exit 1): ERROR: Access is denied.")
    # /End's failure (nothing running) is ignored; /Create's stops the install before /Run.
    assert [line.split()[0] for line in calls_of(calls)] == ["/End", "/Create"]


def test_the_task_runs_pythonw_beside_python_exe_and_refuses_an_overlong_command(tmp_path, home, capsys):
    scripts = tmp_path / "Scripts"
    scripts.mkdir()
    (scripts / "python.exe").touch()
    manager = service.Schtasks(tmp_path / "config", str(scripts / "python.exe"), home)
    assert manager.arguments[0] == str(scripts / "python.exe")  # no pythonw.exe: python.exe it is
    (scripts / "pythonw.exe").touch()
    assert manager.arguments[0] == str(scripts / "pythonw.exe")

    long_dir = service.Schtasks(tmp_path / ("d" * 300), sys.executable, home)
    with pytest.raises(service.ServiceError, match="more than schtasks takes"):
        long_dir.plan("install")
