"""Config limits through a real clipal: a huge file never freezes traffic, a pasted key works.

- A 5 MB client file written while requests flow is refused with a warning,
  the running providers stay, and no request waits: loading happens off the
  event loop, and a file over 1 MiB is refused by its size, unparsed.
- At start the same file is one error line and exit status 1.
- A key with the line break it was pasted with is trimmed and works; one
  with whitespace inside is a one-line error that never shows the key.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import requests
import yaml

from conftest import free_port, provider, write_config, write_yaml

CHAT = "/codex/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def huge_providers_file(first: dict, size: int = 5 * 1024 * 1024) -> str:
    """A valid client file of ``size`` bytes: ``first``, then disabled providers."""
    assert yaml.safe_dump({"providers": [{"a": 1}]}) == "providers:\n- a: 1\n"  # the entries' indentation
    head = yaml.safe_dump({"providers": [first]}, sort_keys=False)
    entry = "- name: spare-{0}\n  base_url: https://spare.example/{0}\n  api_key: sk-spare-{0:08d}\n  enabled: false\n"
    parts, total, i = [head], len(head), 0
    while total < size:
        parts.append(entry.format(i))
        total += len(parts[-1])
        i += 1
    return "".join(parts)


class RequestLoop:
    """Requests one after another in a thread; when each ended, and what went wrong."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.done: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    r = session.post(self.url, json=BODY, timeout=2)
                    if r.status_code != 200 or r.headers.get("X-Clipal-Provider") != "A":
                        self.failures.append(f"{r.status_code} {r.headers.get('X-Clipal-Provider')}")
                except requests.RequestException as error:
                    self.failures.append(repr(error))
                self.done.append(time.monotonic())

    def __enter__(self) -> "RequestLoop":
        self._thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *_exc: object) -> None:
        time.sleep(0.5)
        self._stop.set()
        self._thread.join(10)

    def longest_gap(self) -> float:
        return max(later - earlier for earlier, later in zip(self.done, self.done[1:]))


@pytest.mark.parametrize("size,outcome", [
    (5 * 1024 * 1024, "config reload rejected"),  # refused by its size
    (1000 * 1024, "configuration reloaded"),  # read and parsed (seconds of work) off the event loop
])
def test_a_big_file_on_reload_never_stops_the_requests(clipal, upstream_factory, size, outcome):
    a = upstream_factory("A")
    proxy = clipal(codex=[provider("A", a)])
    with RequestLoop(proxy.url + CHAT) as loop:
        write_yaml(proxy.config_dir / "codex.yaml", huge_providers_file(provider("A", a), size))
        out = proxy.wait_for_output(outcome, timeout=30)
    line = next(line for line in out.splitlines() if outcome in line)
    if size > 1024 * 1024:
        assert line.startswith("[WARN]") and "codex.yaml: is larger than 1 MiB" in line
    assert not loop.failures, loop.failures[:5]
    print(f"{size} bytes: {len(loop.done)} requests, longest gap {loop.longest_gap() * 1000:.0f} ms")
    assert len(loop.done) > 20 and loop.longest_gap() < 0.5


def run_clipal(config_dir) -> subprocess.CompletedProcess:
    """clipal started on a configuration it must refuse (it would serve on a free port otherwise)."""
    return subprocess.run([sys.executable, "-m", "clipal", "--config-dir", str(config_dir),
                           "--port", str(free_port())], capture_output=True, text=True, timeout=30)


def test_a_5_mb_file_at_start_is_one_error_line_and_exit_1(tmp_path):
    write_config(tmp_path)
    write_yaml(tmp_path / "codex.yaml", huge_providers_file(provider("A", "https://a.example")))
    started = time.monotonic()
    result = run_clipal(tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("clipal: codex.yaml: is larger than 1 MiB (")
    assert time.monotonic() - started < 10  # refused by its size, not after parsing it


def test_a_key_pasted_with_its_line_break_is_trimmed_and_works(clipal, upstream_factory):
    a = upstream_factory("A")
    proxy = clipal(codex=[provider("A", a, key="sk-test-pasted-0123456789abcdef\n")])
    r = requests.post(proxy.url + CHAT, json=BODY, timeout=10)
    assert r.status_code == 200
    assert a.requests[0].headers["Authorization"] == "Bearer sk-test-pasted-0123456789abcdef"


KEY_WITH_SPACE = "sk-test-pasted 0123456789abcdef"


def test_a_key_with_whitespace_inside_is_one_error_line_at_start_that_hides_the_key(tmp_path):
    write_config(tmp_path, codex=[provider("A", "https://a.example", key=KEY_WITH_SPACE)])
    result = run_clipal(tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith('clipal: codex.yaml: provider "A": api_key has whitespace inside')
    assert "pasted" not in result.stderr and "0123456789" not in result.stderr


def test_a_key_with_whitespace_inside_is_refused_on_reload_without_showing_it(clipal, upstream_factory):
    a = upstream_factory("A")
    proxy = clipal(codex=[provider("A", a)])
    write_yaml(proxy.config_dir / "codex.yaml", {"providers": [provider("A", a, key=KEY_WITH_SPACE)]})
    out = proxy.wait_for_output("api_key has whitespace inside", timeout=10)
    assert "pasted" not in out and "0123456789" not in out
    r = requests.post(proxy.url + CHAT, json=BODY, timeout=10)
    assert r.status_code == 200 and r.headers["X-Clipal-Provider"] == "A"
