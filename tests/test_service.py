"""``clipal service``: the unit and plist it writes, and the service manager commands it runs.

The files come from the same templates as deploy/'s; the unit must pass
``systemd-analyze --user verify`` and the plist must parse. The service
managers are stand-ins on PATH that record their arguments (and refuse
when told to), so install, uninstall, start, stop and status are checked
for exactly the commands they run, on Linux and, through the one platform
function, on macOS.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clipal import service

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
#: A config directory whose name needs quoting in a unit (space), escaping as a specifier (%) and as a
#: variable ($), and escaping in XML (&, <).
AWKWARD = "clipal dir %h $HOME & <x>"


def fake_tool(bin_dir: Path, name: str, *, exit_code: int = 0, message: str = "") -> Path:
    """A stand-in for ``name`` that appends its arguments, one call a line, to ``bin_dir/name.calls``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    calls = bin_dir / f"{name}.calls"
    script = bin_dir / name
    script.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n'
                      + (f'echo "{message}" >&2\n' if message else "") + f"exit {exit_code}\n")
    script.chmod(0o755)
    return calls


def calls_of(calls: Path) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def dry_run_file(output: str) -> str:
    """The file text ``--dry-run`` printed between ``would write PATH:`` and the next ``would`` line."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("would write "))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("would run: ")), len(lines))
    return "\n".join(lines[start + 1:end]) + "\n"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home directory of our own (the unit and the plist go below it), on Linux unless a test says otherwise."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setattr(service, "current_platform", lambda: "linux")
    return home


@pytest.fixture
def on_macos(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    monkeypatch.setattr(service, "current_platform", lambda: "darwin")
    return home


def use_path(monkeypatch: pytest.MonkeyPatch, bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("PATH", str(bin_dir))  # nothing else: a real systemctl/launchctl is never reached


# --------------------------------------------------------------------------- one source


def test_deploy_files_are_the_templates_rendered_for_a_hand_install():
    for name, text in service.deploy_files().items():
        assert (DEPLOY / name).read_text() == text, (
            f"deploy/{name} differs from clipal/service.py's template; after editing the template run: "
            ".venv/bin/python -c 'from clipal.service import write_deploy_files; write_deploy_files(\"deploy\")'")


def test_systemd_words_escape_specifiers_variables_and_quotes():
    assert service.systemd_word("/usr/bin/python3") == "/usr/bin/python3"
    assert service.systemd_word("50%") == "50%%"
    assert service.systemd_word("$HOME") == "$$HOME"
    assert service.systemd_word("$HOME", expands_variables=False) == '"$HOME"'
    assert service.systemd_word('a "b"\\c') == '"a \\"b\\"\\\\c"'


# --------------------------------------------------------------------------- dry runs


@pytest.mark.live
@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("directory", ["plain", AWKWARD])
def test_dry_run_prints_a_unit_that_systemd_analyze_accepts(tmp_path, directory):
    home = tmp_path / "home"
    home.mkdir()
    config_dir = tmp_path / directory
    env = {**{k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}, "HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "clipal", "service", "install", "--dry-run",
                             "--config-dir", str(config_dir)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    unit_path = home / ".config" / "systemd" / "user" / "clipal.service"
    assert result.stdout.splitlines()[0] == f"would write {unit_path}:"
    assert result.stdout.splitlines()[-2:] == ["would run: systemctl --user daemon-reload",
                                              "would run: systemctl --user enable --now clipal.service"]
    assert not unit_path.exists() and list(home.iterdir()) == []  # changes nothing
    unit = dry_run_file(result.stdout)
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    if directory == "plain":
        assert exec_start == f"ExecStart={sys.executable} -m clipal --config-dir {config_dir}"
    else:
        assert exec_start == (f'ExecStart={sys.executable} -m clipal --config-dir '
                              f'"{tmp_path}/clipal dir %%h $$HOME & <x>"')

    # systemd-analyze checks the unit as the user manager would load it from its place.
    unit_dir = tmp_path / "verify"
    unit_dir.mkdir()
    (unit_dir / "clipal.service").write_text(unit)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    verify = subprocess.run(["systemd-analyze", "--user", "verify", str(unit_dir / "clipal.service")],
                            env={**env, "XDG_RUNTIME_DIR": str(runtime), "SYSTEMD_LOG_LEVEL": "notice"},
                            capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys or bad values ("..., ignoring"): any output is a failure.
    assert verify.returncode == 0 and verify.stdout.strip() == verify.stderr.strip() == "", \
        verify.stdout + verify.stderr


@pytest.mark.parametrize("directory", ["plain", AWKWARD])
def test_dry_run_on_macos_prints_a_plist_that_parses(on_macos, tmp_path, capsys, directory):
    config_dir = tmp_path / directory
    assert service.main(["install", "--dry-run", "--config-dir", str(config_dir)]) == 0
    out = capsys.readouterr().out
    plist_path = on_macos / "Library" / "LaunchAgents" / "io.github.clipal.plist"
    assert out.splitlines()[0] == f"would write {plist_path}:"
    assert out.splitlines()[-1] == f"would run: launchctl bootstrap gui/{os.getuid()} {plist_path}"
    assert list(on_macos.iterdir()) == []
    plist = plistlib.loads(dry_run_file(out).encode())
    assert plist["Label"] == "io.github.clipal"
    assert plist["ProgramArguments"] == [sys.executable, "-m", "clipal", "--config-dir", str(config_dir)]
    assert plist["EnvironmentVariables"] == {"CLIPAL_CONFIG_DIR": str(config_dir)}
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True
    assert plist["StandardOutPath"] == "/dev/null"
    assert plist["StandardErrorPath"] == str(on_macos / "Library" / "Logs" / "clipal.stderr.log")
    assert plist["Umask"] == 0o077


def test_the_config_dir_defaults_to_clipal_config_dir_made_absolute(home, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CLIPAL_CONFIG_DIR", "relative/dir")
    assert service.main(["install", "--dry-run"]) == 0
    assert f"--config-dir {tmp_path}/relative/dir\n" in capsys.readouterr().out


# --------------------------------------------------------------------------- against fake managers


def test_install_start_stop_status_uninstall_with_systemd(home, tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    calls = fake_tool(bin_dir, "systemctl")
    use_path(monkeypatch, bin_dir)
    config_dir = tmp_path / "config"
    unit_path = home / ".config" / "systemd" / "user" / "clipal.service"

    assert service.main(["install", "--dry-run", "--config-dir", str(config_dir)]) == 0
    printed = dry_run_file(capsys.readouterr().out)
    assert service.main(["install", "--config-dir", str(config_dir)]) == 0
    assert unit_path.read_text() == printed
    assert calls_of(calls) == ["--user daemon-reload", "--user enable --now clipal.service"]

    # The same unit again: nothing to restart. Another config directory: the running service takes it.
    calls.unlink()
    assert service.main(["install", "--config-dir", str(config_dir)]) == 0
    assert calls_of(calls) == ["--user daemon-reload", "--user enable --now clipal.service"]
    calls.unlink()
    assert service.main(["install", "--config-dir", str(tmp_path / "other")]) == 0
    assert f"--config-dir {tmp_path}/other" in unit_path.read_text()
    assert calls_of(calls) == ["--user daemon-reload", "--user enable --now clipal.service",
                               "--user try-restart clipal.service"]

    calls.unlink()
    for action in ("start", "stop", "status"):
        assert service.main([action]) == 0
    assert calls_of(calls) == ["--user start clipal.service", "--user stop clipal.service",
                               "--user status clipal.service"]

    calls.unlink()
    assert service.main(["uninstall"]) == 0
    assert calls_of(calls) == ["--user disable --now clipal.service", "--user daemon-reload"]
    assert not unit_path.exists()
    calls.unlink()
    capsys.readouterr()
    assert service.main(["uninstall"]) == 0  # nothing left to remove: said so, nothing run
    assert capsys.readouterr().out == f"clipal service: not installed ({unit_path} does not exist)\n"
    assert calls_of(calls) == []


def test_install_and_uninstall_with_launchd(on_macos, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    calls = fake_tool(bin_dir, "launchctl")
    use_path(monkeypatch, bin_dir)
    plist_path = on_macos / "Library" / "LaunchAgents" / "io.github.clipal.plist"
    domain = f"gui/{os.getuid()}"

    assert service.main(["install", "--config-dir", str(tmp_path / "config")]) == 0
    assert plistlib.loads(plist_path.read_bytes())["ProgramArguments"][-1] == str(tmp_path / "config")
    assert calls_of(calls) == [f"bootstrap {domain} {plist_path}"]
    calls.unlink()
    assert service.main(["install", "--config-dir", str(tmp_path / "config")]) == 0  # loaded: out, then in
    assert calls_of(calls) == [f"bootout {domain}/io.github.clipal", f"bootstrap {domain} {plist_path}"]

    calls.unlink()
    for action in ("stop", "start", "status"):
        assert service.main([action]) == 0
    assert calls_of(calls) == [f"bootout {domain}/io.github.clipal", f"bootstrap {domain} {plist_path}",
                               f"print {domain}/io.github.clipal"]

    calls.unlink()
    assert service.main(["uninstall"]) == 0
    assert calls_of(calls) == [f"bootout {domain}/io.github.clipal"]
    assert not plist_path.exists()


def test_uninstall_goes_on_when_launchd_has_nothing_loaded(on_macos, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "launchctl", exit_code=3, message="Boot-out failed: 3: No such process")
    use_path(monkeypatch, bin_dir)
    plist_path = on_macos / "Library" / "LaunchAgents" / "io.github.clipal.plist"
    plist_path.parent.mkdir(parents=True)
    plist_path.write_text("stopped earlier")
    assert service.main(["uninstall"]) == 0
    assert not plist_path.exists()


@pytest.mark.parametrize("platform,tool", [("linux", "systemctl"), ("darwin", "launchctl"), ("win32", "schtasks")])
def test_a_refusing_service_manager_is_exit_1_with_its_message(home, tmp_path, monkeypatch, capsys, platform,
                                                                tool):
    monkeypatch.setattr(service, "current_platform", lambda: platform)
    bin_dir = tmp_path / "bin"
    calls = fake_tool(bin_dir, tool, exit_code=3, message="Failed to connect to bus: No medium found")
    use_path(monkeypatch, bin_dir)
    for action in ("install", "start", "status"):
        assert service.main([action, "--config-dir", str(tmp_path / "config")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"clipal service: {tool} ") and "failed (exit 3)" in err, err
        assert err.rstrip().endswith("Failed to connect to bus: No medium found")
        assert len(err.splitlines()) == 1
    assert calls_of(calls)


def test_a_missing_service_manager_is_exit_1_and_changes_nothing(home, tmp_path, monkeypatch, capsys):
    use_path(monkeypatch, tmp_path / "empty-bin")
    assert service.main(["install", "--config-dir", str(tmp_path / "config")]) == 1
    assert capsys.readouterr().err == ("clipal service: systemctl not found on PATH: clipal service needs the "
                                       "systemd user unit's service manager\n")
    assert list(home.iterdir()) == []


def test_a_platform_without_a_service_manager_is_exit_1(home, monkeypatch, capsys):
    monkeypatch.setattr(service, "current_platform", lambda: "aix")
    assert service.main(["install", "--dry-run"]) == 1
    assert capsys.readouterr().err == ("clipal service: no per-user service manager that clipal knows on this "
                                       "platform (aix); supported: darwin, linux, win32\n")


@pytest.mark.live
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the command line test drives systemctl")
def test_clipal_service_runs_from_the_command_line_against_a_fake_systemctl(tmp_path):
    """The real command, dispatched by clipal's cli without starting a server."""
    home = tmp_path / "home"
    home.mkdir()
    bin_dir = tmp_path / "bin"
    calls = fake_tool(bin_dir, "systemctl")
    env = {**{k: v for k, v in os.environ.items() if k != "XDG_CONFIG_HOME"}, "HOME": str(home),
           "PATH": str(bin_dir)}
    result = subprocess.run([sys.executable, "-m", "clipal", "service", "install", "--config-dir",
                             str(tmp_path / "config")], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (home / ".config" / "systemd" / "user" / "clipal.service").exists()
    assert calls_of(calls) == ["--user daemon-reload", "--user enable --now clipal.service"]
    assert result.stdout.splitlines()[-1].startswith("clipal service: install done (systemd user unit ")
