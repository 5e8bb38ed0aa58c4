"""clipal as it runs on macOS and Windows, simulated on Linux, and the wheel it installs from.

A ``sitecustomize.py`` first on PYTHONPATH takes the Linux-only pieces away
before clipal imports anything: ``inotify_simple`` cannot be imported,
``ctypes.CDLL(None)`` (the program's own C library, where glibc's malloc
calls live) raises OSError, and ``signal.SIGHUP`` is gone. The seam is told
which platform to answer for with ``CLIPAL_TEST_PLATFORM`` (read only by
clipal.platforms; patching ``sys.platform`` would change the standard
library too). clipal must then start, proxy a streaming and a plain
request, pick up a provider file edit by polling, and stop cleanly on the
signal that platform has: SIGTERM on macOS, SIGINT (Ctrl+C) on Windows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests
import yaml

from conftest import provider, write_yaml

ROOT = Path(__file__).resolve().parent.parent

SITECUSTOMIZE = '''\
import ctypes
import signal
import sys

sys.modules["inotify_simple"] = None  # "import inotify_simple" now raises ImportError


class _WithoutTheProgramsLibrary(ctypes.CDLL):
    def __init__(self, name, *args, **kwargs):
        if name is None:
            raise OSError("simulated: no C library to open")
        super().__init__(name, *args, **kwargs)


ctypes.CDLL = _WithoutTheProgramsLibrary
del signal.SIGHUP
open(__file__ + ".loaded", "w").close()
'''

CHAT = "/codex/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("platform,stop_signal", [("darwin", signal.SIGTERM), ("win32", signal.SIGINT)])
def test_clipal_without_the_linux_only_pieces(platform, stop_signal, clipal, upstream_factory, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    a, b = upstream_factory("A"), upstream_factory("B")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "CLIPAL_TEST_PLATFORM": platform, "CLIPAL_WATCH_MODE": ""}
    proxy = clipal(codex=[provider("A", a)], settings={"log_level": "debug"}, env=env)
    assert (site / "sitecustomize.py.loaded").exists()

    out = proxy.wait_for_output("polling every")
    assert "inotify is not available here" in out
    assert "memory: allocations" not in out  # the glibc tuning was skipped, not attempted
    stops = "SIGINT" if platform == "win32" else "SIGTERM, SIGINT"
    assert f"platform {platform}: stops on {stops}, reloads on file changes only" in out

    plain = requests.post(proxy.url + CHAT, json=BODY, timeout=10)
    assert plain.status_code == 200 and plain.headers["X-Clipal-Provider"] == "A"
    assert "hello from A" in plain.text
    with requests.post(proxy.url + CHAT, json={**BODY, "stream": True}, stream=True, timeout=10) as streamed:
        assert streamed.status_code == 200
        assert streamed.headers["Content-Type"].startswith("text/event-stream")
        events = b"".join(streamed.iter_content(None)).decode()
    assert events.rstrip().endswith("data: [DONE]") and "hello" in events

    edited = time.monotonic()
    write_yaml(proxy.config_dir / "codex.yaml", yaml.safe_dump({"providers": [provider("B", b)]}))
    while requests.post(proxy.url + CHAT, json=BODY, timeout=10).headers.get("X-Clipal-Provider") != "B":
        assert time.monotonic() - edited < 2.0, f"the edit was not applied within 2 s:\n{proxy.output()}"
        time.sleep(0.05)

    proxy.proc.send_signal(stop_signal)
    assert proxy.proc.wait(10) == 0, proxy.output()
    assert "stopped" in proxy.output().splitlines()[-1]


def test_the_wheel_is_pure_python(tmp_path):
    wheels = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("clipal-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/WHEEL"))
        text = archive.read(metadata).decode()
        names = archive.namelist()
    assert "Root-Is-Purelib: true" in text and "Tag: py3-none-any" in text
    assert not [n for n in names if n.endswith((".so", ".pyd", ".dylib"))]
    assert "clipal/platforms.py" in names
