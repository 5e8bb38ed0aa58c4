"""`clipal update`: replace the running clipal with the newest release from a package index.

The index is a PyPI-style JSON API (``<index-url>/clipal/json``). The wheel it names is
downloaded into a temporary directory under its own file name (pip reads the name to learn
the version and tags), its SHA-256 is checked against the digest the index publishes, and
only that verified file is handed to the running interpreter's pip. Any failure before pip
runs leaves the installation untouched and removes the download.

Versions and wheel file names are read with `packaging`, the library pip itself uses for
them; the network side is the standard library (urllib, hashlib), and nothing here pulls
in gevent.

Pre-releases: the newest release counts as an update only when it is a final release, or
when the running clipal is itself a pre-release (see `is_newer`).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import hmac
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from packaging.tags import sys_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

PACKAGE = "clipal"
DEFAULT_INDEX_URL = "https://pypi.org/pypi"
# Applies to each blocking network step (connect, each read), so a slow but moving
# download is fine while a silent server fails after this long.
DEFAULT_TIMEOUT = 30.0
_CHUNK = 64 * 1024


class UpdateError(Exception):
    """A failure to report as one line on stderr; nothing has been installed."""


class HTTPStatusError(UpdateError):
    """The server answered, with an error status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class WheelFile:
    """One wheel of a release, as the index describes it."""

    filename: str
    url: str
    sha256: str


@dataclass(frozen=True)
class Release:
    """The newest release the index knows and the wheels published for it."""

    version: str
    wheels: tuple[WheelFile, ...]


# --------------------------------------------------------------------------- versions


def parse_version(text: str) -> Version:
    """`text` as a PEP 440 version; UpdateError when it is not one."""
    try:
        return Version(text)
    except InvalidVersion:
        raise UpdateError(f"cannot understand version {text!r}") from None


def is_newer(candidate: str, current: str) -> bool:
    """Whether `candidate` is an update for a clipal at version `current`.

    A pre-release (alpha, beta, release candidate or dev release) is an update only for
    someone already running a pre-release: they have opted in to them, which is also how
    pip decides. PyPI's ``info.version`` already skips pre-releases unless a project has
    nothing else, so this matters mostly for private indexes.
    """
    candidate_version, current_version = parse_version(candidate), parse_version(current)
    if candidate_version.is_prerelease and not current_version.is_prerelease:
        return False
    return candidate_version > current_version


# --------------------------------------------------------------------------- index


def _open(url: str, timeout: float) -> http.client.HTTPResponse:
    """Open an http(s) URL, turning every way it can fail into an UpdateError."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise UpdateError(f"refusing to fetch {url!r}: only http and https URLs are supported")
    request = urllib.request.Request(url, headers={"User-Agent": f"{PACKAGE}-update"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise HTTPStatusError(f"HTTP {exc.code} {exc.reason} from {url}", exc.code) from None
    except urllib.error.URLError as exc:
        raise UpdateError(f"cannot reach {url}: {_reason(exc.reason)}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise UpdateError(f"cannot reach {url}: {_reason(exc)}") from None


def _reason(error: object) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def fetch_release_info(index_url: str = DEFAULT_INDEX_URL, timeout: float = DEFAULT_TIMEOUT) -> Release:
    """Read ``<index_url>/clipal/json`` and return the newest release and its wheels.

    Wheel URLs may be relative to the JSON document (handy for a mirror); yanked files
    are skipped. The JSON is small, so it is read whole.
    """
    json_url = index_url.rstrip("/") + f"/{PACKAGE}/json"
    try:
        response = _open(json_url, timeout)
    except HTTPStatusError as exc:
        if exc.status == 404:
            raise UpdateError(f"the index has no project named {PACKAGE} ({json_url}: HTTP 404)") from None
        raise
    with response:
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise UpdateError(f"cannot read {json_url}: {_reason(exc)}") from None
    try:
        document = json.loads(raw)
        version = document["info"]["version"]
        entries = document["urls"]
        if not isinstance(version, str) or not isinstance(entries, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise UpdateError(f"{json_url} is not a PyPI-style JSON release document") from None

    wheels = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("packagetype") != "bdist_wheel":
            continue
        if entry.get("yanked"):
            continue
        url = entry.get("url")
        if not isinstance(url, str) or not url:
            continue
        url = urllib.parse.urljoin(json_url, url)
        filename = entry.get("filename") or urllib.parse.unquote(
            urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]
        )
        digests = entry.get("digests") if isinstance(entry.get("digests"), dict) else {}
        sha256 = digests.get("sha256") if isinstance(digests.get("sha256"), str) else ""
        wheels.append(WheelFile(filename=str(filename), url=url, sha256=sha256.strip().lower()))
    return Release(version=version, wheels=tuple(wheels))


# --------------------------------------------------------------------------- wheels

def pick_wheel(release: Release) -> WheelFile:
    """Choose the release's wheel that this interpreter can install.

    clipal is pure Python, so this is normally its one ``py3-none-any`` wheel. The file
    name must be a bare ``clipal-<version>-...whl`` name: it becomes a path on disk, and a
    wheel of another version or project is not what was asked for.
    """
    if not release.wheels:
        raise UpdateError(f"release {release.version} of {PACKAGE} has no wheel to install")
    supported = set(sys_tags())
    want_version = parse_version(release.version)
    for wheel in release.wheels:
        if os.path.basename(wheel.filename) != wheel.filename:
            continue
        try:
            name, version, _build, tags = parse_wheel_filename(wheel.filename)
        except (InvalidWheelFilename, InvalidVersion):
            continue
        # Both sides are normalised (clipal-1.0 == clipal-1.0.0, Clipal == clipal).
        if name != canonicalize_name(PACKAGE) or version != want_version:
            continue
        if tags & supported:
            return wheel
    names = ", ".join(w.filename for w in release.wheels)
    raise UpdateError(f"release {release.version} has no wheel for this Python ({names})")


def download_and_verify(wheel: WheelFile, dest_dir: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Stream `wheel` into `dest_dir` under its own file name, hashing as it arrives.

    Returns the path only if the SHA-256 matches the index's digest; otherwise the partial
    or wrong file is deleted and UpdateError names both checksums.
    """
    if not re.fullmatch(r"[0-9a-f]{64}", wheel.sha256):
        raise UpdateError(f"the index publishes no valid sha256 for {wheel.filename}; refusing to install it")
    if os.path.basename(wheel.filename) != wheel.filename or wheel.filename in ("", ".", ".."):
        raise UpdateError(f"refusing unsafe wheel file name {wheel.filename!r}")
    path = Path(dest_dir) / wheel.filename
    digest = hashlib.sha256()
    try:
        with _open(wheel.url, timeout) as response, open(path, "wb") as out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise UpdateError(f"download of {wheel.url} failed: {_reason(exc)}") from None
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
        actual = digest.hexdigest()
        if not hmac.compare_digest(actual, wheel.sha256):
            raise UpdateError(
                f"checksum mismatch for {wheel.filename}: expected sha256 {wheel.sha256}, got {actual}"
            )
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def install_wheel(path: str | os.PathLike[str], python: str = sys.executable) -> None:
    """Install the verified wheel with `python -m pip`, pip's output going to the terminal.

    ``--upgrade`` replaces the installed clipal; dependencies are only upgraded when the
    new release needs it (pip's default strategy).
    """
    command = [python, "-m", "pip", "install", "--upgrade", str(path)]
    try:
        result = subprocess.run(command, check=False)
    except OSError as exc:
        raise UpdateError(f"cannot run {python} -m pip: {_reason(exc)}") from None
    if result.returncode != 0:
        raise UpdateError(f"pip install failed with exit status {result.returncode}")


# --------------------------------------------------------------------------- command


def running_version() -> str:
    """The version of the clipal that is running this code."""
    import clipal

    return clipal.__version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{PACKAGE} update",
        description="Install the newest clipal release from the package index, after checking its SHA-256.",
    )
    parser.add_argument("--check", action="store_true", help="only report the current and newest version")
    parser.add_argument("--dry-run", action="store_true", help="download and verify the wheel, but do not install it")
    parser.add_argument(
        "--index-url",
        default=DEFAULT_INDEX_URL,
        metavar="URL",
        help=f"base of a PyPI-style JSON API, read as URL/{PACKAGE}/json (default: {DEFAULT_INDEX_URL})",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `clipal update` with its own flags (`argv` excludes the word "update").

    Returns 0 when up to date, when only checking, after a dry run and after a successful
    install; 1 on any failure (one line on stderr); 2 for bad flags (argparse).
    """
    args = _parser().parse_args(argv)
    try:
        return _update(args)
    except UpdateError as exc:
        print(f"{PACKAGE} update: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PACKAGE} update: interrupted; nothing was installed", file=sys.stderr)
        return 130


def _update(args: argparse.Namespace) -> int:
    current = running_version()
    release = fetch_release_info(args.index_url)
    if not is_newer(release.version, current):
        note = ""
        if parse_version(release.version) > parse_version(current):
            note = f"; {release.version} is a pre-release, offered only to pre-release users"
        print(f"{PACKAGE} {current} is up to date (newest release: {release.version}{note})")
        return 0
    if args.check:
        print(f"update available: {current} -> {release.version}")
        return 0

    wheel = pick_wheel(release)
    if not args.dry_run and importlib.util.find_spec("pip") is None:
        raise UpdateError(f"pip is not available to {sys.executable}; install it or reinstall {PACKAGE} with pip")
    with tempfile.TemporaryDirectory(prefix=f"{PACKAGE}-update-") as workdir:
        print(f"downloading {wheel.filename}")
        path = download_and_verify(wheel, workdir)
        print(f"sha256 verified: {wheel.sha256}")
        if args.dry_run:
            print(f"dry run: {PACKAGE} {release.version} verified, not installed")
            return 0
        install_wheel(path)
    print(f"updated {PACKAGE}: {current} -> {release.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
