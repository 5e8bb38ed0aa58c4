"""Tests for `clipal update` against a fake PyPI-style JSON index on 127.0.0.1.

Most tests run `clipal.update.main` in-process with the installer replaced, so they can
prove pip was never reached. `test_real_install_into_throwaway_venv` at the end installs
for real: it builds two tiny wheels named `clipal`, installs the old one into a fresh
venv and lets that venv's `python -m clipal.update` upgrade itself (offline, ~10 s).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

import clipal
from clipal import update

REPO = Path(__file__).resolve().parent.parent
# What setup.py declares; the real-install test gives its wheels the same requirement.
PACKAGING_REQUIREMENT = "packaging>=23"


# --------------------------------------------------------------------------- helpers


def build_wheel(dest: Path, version: str, modules: dict[str, str], requires: tuple[str, ...] = ()) -> Path:
    """Write a minimal but valid pure-Python wheel of a package named `clipal`.

    Built by hand with zipfile so the tests need neither the `wheel` package nor a
    network connection. `requires` become its Requires-Dist lines.
    """
    files = {f"clipal/{name}": text.encode() for name, text in modules.items()}
    return write_wheel(dest, "clipal", version, files, requires)


def repack_installed(dest: Path, project: str) -> Path:
    """A wheel of the pure-Python distribution `project` as installed here, re-packed
    from its files, so an offline venv can install it."""
    dist = importlib.metadata.distribution(project)
    files = {
        str(file): file.read_binary()
        for file in dist.files or ()
        if ".dist-info/" not in str(file) and "__pycache__" not in str(file) and not str(file).startswith("..")
    }
    return write_wheel(dest, dist.metadata["Name"], dist.version, files)


def write_wheel(dest: Path, name: str, version: str, files: dict[str, bytes], requires: tuple[str, ...] = ()) -> Path:
    dist_info = f"{name}-{version}.dist-info"
    files = dict(files)
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {requirement}\n" for requirement in requires)
    files[f"{dist_info}/METADATA"] = metadata.encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: clipal-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()

    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeIndex:
    """A PyPI-style JSON API on a free loopback port; records every path requested."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes]] = {}
        self.requested: list[str] = []
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                index.requested.append(self.path)
                status, body = index.routes.get(self.path, (404, b"not found"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, version: str, wheel: Path | None, sha256: str | None = None, extra: list | None = None) -> None:
        """Serve `version` as the newest release, with `wheel` (and its digest) if given."""
        urls = list(extra or [])
        if wheel is not None:
            self.routes[f"/files/{wheel.name}"] = (200, wheel.read_bytes())
            urls.append(
                {
                    "packagetype": "bdist_wheel",
                    "filename": wheel.name,
                    "url": f"{self.url}/files/{wheel.name}",
                    "digests": {"sha256": sha256 if sha256 is not None else sha256_of(wheel)},
                }
            )
        document = {"info": {"name": "clipal", "version": version}, "urls": urls}
        self.routes["/clipal/json"] = (200, json.dumps(document).encode())

    def downloads(self) -> list[str]:
        return [path for path in self.requested if path.startswith("/files/")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def index() -> Iterator[FakeIndex]:
    fake = FakeIndex()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def new_wheel(tmp_path: Path) -> Path:
    return build_wheel(tmp_path / "dist", "99.0.0", {"__init__.py": '__version__ = "99.0.0"\n'})


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make tempfile use an empty directory we can inspect for leftovers."""
    directory = tmp_path / "scratch"
    directory.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(directory))
    return directory


@pytest.fixture
def installs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, bytes]]:
    """Replace the installer; record each wheel it is given (and its bytes at that time)."""
    calls: list[tuple[Path, bytes]] = []

    def fake_install(path: str | os.PathLike[str], python: str = sys.executable) -> None:
        calls.append((Path(path), Path(path).read_bytes()))

    monkeypatch.setattr(update, "install_wheel", fake_install)
    monkeypatch.setattr(clipal, "__version__", "0.1.0")
    return calls


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- command


def test_check_reports_newer_version_without_downloading(index, new_wheel, installs, capsys):
    index.publish("99.0.0", new_wheel)
    assert update.main(["--check", "--index-url", index.url]) == 0
    assert capsys.readouterr().out.strip() == "update available: 0.1.0 -> 99.0.0"
    assert index.downloads() == [] and installs == []


def test_check_up_to_date(index, installs, capsys, tmp_path):
    same = build_wheel(tmp_path / "d", "0.1.0", {"__init__.py": ""})
    index.publish("0.1.0", same)
    assert update.main(["--check", "--index-url", index.url]) == 0
    assert "up to date" in capsys.readouterr().out
    assert index.downloads() == []


@pytest.mark.parametrize("published", ["0.1.0", "0.0.9", "0.1"])
def test_up_to_date_downloads_and_installs_nothing(index, installs, capsys, tmp_path, published):
    wheel = build_wheel(tmp_path / "d", published, {"__init__.py": ""})
    index.publish(published, wheel)
    assert update.main(["--index-url", index.url]) == 0
    assert capsys.readouterr().out.strip() == f"clipal 0.1.0 is up to date (newest release: {published})"
    assert index.downloads() == [] and installs == []


def test_pre_release_is_not_offered_to_a_final_release(index, installs, capsys, tmp_path):
    wheel = build_wheel(tmp_path / "d", "2.0.0rc1", {"__init__.py": ""})
    index.publish("2.0.0rc1", wheel)
    assert update.main(["--index-url", index.url]) == 0
    assert "2.0.0rc1 is a pre-release" in capsys.readouterr().out
    assert index.downloads() == [] and installs == []


def test_dry_run_verifies_checksum_and_installs_nothing(index, new_wheel, installs, scratch, capsys):
    index.publish("99.0.0", new_wheel)
    assert update.main(["--dry-run", "--index-url", index.url]) == 0
    out = capsys.readouterr().out
    assert f"sha256 verified: {sha256_of(new_wheel)}" in out
    assert "dry run" in out
    assert index.downloads() == [f"/files/{new_wheel.name}"]
    assert installs == []
    assert list(scratch.iterdir()) == []


def test_update_installs_the_verified_file_under_its_wheel_name(index, new_wheel, installs, scratch, capsys):
    index.publish("99.0.0", new_wheel)
    assert update.main(["--index-url", index.url]) == 0
    [(path, data)] = installs
    assert path.name == new_wheel.name
    assert path.parent.parent == scratch
    assert data == new_wheel.read_bytes()
    assert "updated clipal: 0.1.0 -> 99.0.0" in capsys.readouterr().out
    assert list(scratch.iterdir()) == []  # the download is removed after installing


def test_checksum_mismatch_names_both_checksums_and_changes_nothing(index, new_wheel, installs, scratch, capsys):
    wrong = "0" * 64
    index.publish("99.0.0", new_wheel, sha256=wrong)
    assert update.main(["--index-url", index.url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "checksum mismatch" in err
    assert wrong in err and sha256_of(new_wheel) in err
    assert installs == []
    assert list(scratch.iterdir()) == []


def test_missing_checksum_is_refused(index, new_wheel, installs, scratch, capsys):
    index.publish("99.0.0", new_wheel, sha256="")
    assert update.main(["--index-url", index.url]) == 1
    assert "no valid sha256" in capsys.readouterr().err
    assert installs == [] and index.downloads() == []
    assert list(scratch.iterdir()) == []


def test_connection_refused_is_a_clear_one_line_error(installs, capsys):
    url = f"http://127.0.0.1:{closed_port()}"
    assert update.main(["--check", "--index-url", url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("clipal update: error: cannot reach ")
    assert "Connection refused" in err
    assert installs == []


def test_unknown_project_on_the_index(index, installs, capsys):
    assert update.main(["--index-url", index.url]) == 1  # nothing published: 404
    assert "the index has no project named clipal" in capsys.readouterr().err


def test_http_error_from_the_index(index, installs, capsys):
    index.routes["/clipal/json"] = (503, b"down for maintenance")
    assert update.main(["--check", "--index-url", index.url]) == 1
    assert "HTTP 503" in capsys.readouterr().err


def test_wheel_download_failure_changes_nothing(index, new_wheel, installs, scratch, capsys):
    index.publish("99.0.0", new_wheel)
    del index.routes[f"/files/{new_wheel.name}"]
    assert update.main(["--index-url", index.url]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert installs == [] and list(scratch.iterdir()) == []


def test_bad_json_is_reported(index, installs, capsys):
    index.routes["/clipal/json"] = (200, b"<html>not json</html>")
    assert update.main(["--index-url", index.url]) == 1
    assert "not a PyPI-style JSON release document" in capsys.readouterr().err


def test_release_without_wheel_is_reported(index, installs, capsys):
    sdist = {"packagetype": "sdist", "filename": "clipal-99.0.0.tar.gz", "url": "x", "digests": {"sha256": "0" * 64}}
    index.publish("99.0.0", None, extra=[sdist])
    assert update.main(["--index-url", index.url]) == 1
    assert "has no wheel" in capsys.readouterr().err
    assert installs == []


def test_silent_server_times_out():
    with socket.socket() as listener:  # accepts connections (backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(update.UpdateError, match="timed out"):
            update.fetch_release_info(url, timeout=0.3)


def test_setup_py_declares_packaging():
    assert f'"{PACKAGING_REQUIREMENT}"' in (REPO / "setup.py").read_text()


def test_default_index_is_public_pypi_json_api():
    assert update.DEFAULT_INDEX_URL == "https://pypi.org/pypi"
    assert update.DEFAULT_TIMEOUT == 30.0


# --------------------------------------------------------------------------- pieces


def test_fetch_release_info_reads_wheels_resolving_relative_urls(index, new_wheel):
    yanked = {
        "packagetype": "bdist_wheel",
        "filename": "clipal-99.0.0-py2-none-any.whl",
        "url": "/files/old.whl",
        "yanked": True,
        "digests": {"sha256": "1" * 64},
    }
    relative = {
        "packagetype": "bdist_wheel",
        "filename": new_wheel.name,
        "url": f"../files/{new_wheel.name}",
        "digests": {"sha256": sha256_of(new_wheel).upper()},
    }
    index.publish("99.0.0", None, extra=[yanked, relative])
    release = update.fetch_release_info(index.url)
    assert release == update.Release(
        "99.0.0",
        (update.WheelFile(new_wheel.name, f"{index.url}/files/{new_wheel.name}", sha256_of(new_wheel)),),
    )


def test_pick_wheel_takes_the_compatible_wheel_of_that_release():
    good = update.WheelFile("clipal-1.2.0-py3-none-any.whl", "http://x/good", "a" * 64)
    release = update.Release(
        "1.2.0",
        (
            update.WheelFile("clipal-1.2.0-cp27-cp27mu-manylinux1_x86_64.whl", "http://x/a", "a" * 64),
            update.WheelFile("clipal-1.1.0-py3-none-any.whl", "http://x/b", "a" * 64),
            update.WheelFile("other-1.2.0-py3-none-any.whl", "http://x/c", "a" * 64),
            update.WheelFile("../clipal-1.2.0-py3-none-any.whl", "http://x/d", "a" * 64),
            good,
        ),
    )
    assert update.pick_wheel(release) is good
    universal = update.WheelFile("clipal-1.2-py2.py3-none-any.whl", "http://x/u", "a" * 64)
    assert update.pick_wheel(update.Release("1.2.0", (universal,))) is universal


def test_pick_wheel_without_a_usable_wheel():
    with pytest.raises(update.UpdateError, match="no wheel for this Python"):
        update.pick_wheel(update.Release("1.0", (update.WheelFile("clipal-1.0-cp27-none-win32.whl", "u", ""),)))


def test_download_refuses_a_path_as_file_name(tmp_path):
    wheel = update.WheelFile("../evil.whl", "http://127.0.0.1:1/evil.whl", "a" * 64)
    with pytest.raises(update.UpdateError, match="unsafe wheel file name"):
        update.download_and_verify(wheel, tmp_path)


def test_only_http_urls_are_fetched(tmp_path):
    wheel = update.WheelFile("clipal-1.0-py3-none-any.whl", "file:///etc/passwd", "a" * 64)
    with pytest.raises(update.UpdateError, match="only http and https"):
        update.download_and_verify(wheel, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_install_wheel_runs_this_interpreters_pip(monkeypatch, tmp_path):
    commands: list[list[str]] = []

    def fake_run(command: list[str], check: bool) -> subprocess.CompletedProcess:
        commands.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(update.subprocess, "run", fake_run)
    update.install_wheel(tmp_path / "clipal-9-py3-none-any.whl")
    assert commands == [[sys.executable, "-m", "pip", "install", "--upgrade", str(tmp_path / "clipal-9-py3-none-any.whl")]]

    monkeypatch.setattr(update.subprocess, "run", lambda command, check: subprocess.CompletedProcess(command, 3))
    with pytest.raises(update.UpdateError, match="exit status 3"):
        update.install_wheel(tmp_path / "x.whl")


# --------------------------------------------------------------------------- versions

ORDERED = [
    "0.9", "0.10.0.dev1", "0.10.0a1", "0.10.0a2.dev1", "0.10.0a2", "0.10.0b1", "0.10.0rc1",
    "0.10.0", "0.10.0.post1.dev1", "0.10.0.post1", "0.10.1", "1.0", "1!0.1",
]


def test_version_order():
    assert sorted(reversed(ORDERED), key=update.parse_version) == ORDERED
    assert update.parse_version("1.0") == update.parse_version("1.0.0")
    assert update.parse_version("1.0.0-RC1") == update.parse_version("1.0.0rc1")


def test_is_newer():
    assert update.is_newer("0.10.0", "0.9.0")  # numeric, not string, comparison
    assert update.is_newer("0.1.0.post1", "0.1.0")
    assert not update.is_newer("0.1.0", "0.1.0")
    assert not update.is_newer("0.1", "0.1.0")
    assert not update.is_newer("0.0.9", "0.1.0")
    assert not update.is_newer("2.0.0rc1", "0.1.0")  # pre-releases only for pre-release users
    assert not update.is_newer("2.0.0.dev1", "0.1.0")
    assert update.is_newer("2.0.0rc1", "2.0.0b1")
    assert update.is_newer("2.0.0", "2.0.0rc1")
    with pytest.raises(update.UpdateError, match="cannot understand version"):
        update.is_newer("latest", "0.1.0")


# --------------------------------------------------------------------------- real install


def test_real_install_into_throwaway_venv(tmp_path, index):
    """REAL INSTALL (slow, ~10 s, offline): a venv with an installed clipal 0.1.0 (carrying
    this update.py) upgrades itself to 99.0.0 from the fake index with its own pip.

    The old wheel declares `packaging` as update.py needs it; pip finds it offline in a
    wheel re-packed from this environment's copy, which also proves the venv gets it as a
    dependency and not by accident.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV"))}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    def installed_version() -> str:
        result = run("-c", "import clipal; print(clipal.__version__)")
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    old = build_wheel(
        tmp_path / "old",
        "0.1.0",
        {"__init__.py": '__version__ = "0.1.0"\n', "update.py": (REPO / "clipal" / "update.py").read_text()},
        requires=(PACKAGING_REQUIREMENT,),
    )
    new = build_wheel(
        tmp_path / "new", "99.0.0", {"__init__.py": '__version__ = "99.0.0"\n'}, requires=(PACKAGING_REQUIREMENT,)
    )
    assert run("-c", "import packaging").returncode != 0
    links = tmp_path / "links"
    repack_installed(links, "packaging")
    installed = run("-m", "pip", "install", "--quiet", "--find-links", str(links), str(old))
    assert installed.returncode == 0, installed.stderr
    assert installed_version() == "0.1.0"

    index.publish("99.0.0", new, sha256="f" * 64)
    mismatch = run("-m", "clipal.update", "--index-url", index.url)
    assert mismatch.returncode == 1 and "checksum mismatch" in mismatch.stderr
    assert installed_version() == "0.1.0"

    index.publish("99.0.0", new)
    dry = run("-m", "clipal.update", "--dry-run", "--index-url", index.url)
    assert dry.returncode == 0, dry.stderr
    assert installed_version() == "0.1.0"

    real = run("-m", "clipal.update", "--index-url", index.url)
    assert real.returncode == 0, real.stdout + real.stderr
    assert "updated clipal: 0.1.0 -> 99.0.0" in real.stdout
    assert installed_version() == "99.0.0"
    # pip replaced the old installation rather than unpacking over it.
    assert run("-c", "import clipal.update").returncode != 0
