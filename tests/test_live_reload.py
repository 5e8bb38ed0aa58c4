"""Hot reload, end to end (SPEC §5, issue 4 acceptance 1, 2 and 5).

Each test starts a real ``python -m clipal`` and edits its config directory the
way a user or an editor does, then watches what requests do. "Takes effect"
is measured from the end of the edit to the first request that shows the new
configuration; SPEC says "within a second or two", and the assertions allow
``APPLY_LIMIT`` (3 s) for the shared 2-core machine. Measured times are
printed (``pytest -rP`` shows them).

The watcher modes are both exercised: inotify, and polling forced with
``CLIPAL_WATCH_MODE=poll``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable

import pytest
import requests
import yaml

from conftest import CLIENT_FILES, ClipalProcess, free_port, provider, write_yaml
from fakeupstream import Reply

#: Longest a change may take to apply: SPEC's "a second or two" plus a margin for a busy 2-core box.
APPLY_LIMIT = 3.0

MODES = ("inotify", "poll")

_BODIES = {
    "claudecode": ("/claudecode/v1/messages", {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}),
    "codex": ("/codex/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    "gemini": ("/gemini/v1beta/models/m:generateContent", {"contents": [{"parts": [{"text": "hi"}]}]}),
}


def call(proxy: ClipalProcess, client: str = "codex", **kwargs) -> requests.Response:
    path, body = _BODIES[client]
    return requests.post(proxy.url + path, json=body, timeout=kwargs.pop("timeout", 10), **kwargs)


def served_by(proxy: ClipalProcess, client: str = "codex") -> str | None:
    """Which provider answered one request (None for clipal's own errors)."""
    return call(proxy, client).headers.get("X-Clipal-Provider")


def wait_until(condition: Callable[[], bool], what: str, proxy: ClipalProcess | None = None,
               limit: float = APPLY_LIMIT) -> float:
    """Poll ``condition`` until true; returns the seconds it took, fails after ``limit``."""
    start = time.monotonic()
    while True:
        if condition():
            elapsed = time.monotonic() - start
            print(f"{what}: applied after {elapsed:.2f}s")
            return elapsed
        if time.monotonic() - start > limit:
            output = f"; clipal said:\n{proxy.output()}" if proxy is not None else ""
            raise AssertionError(f"{what}: not applied within {limit}s{output}")
        time.sleep(0.02)


def providers_yaml(*providers: dict) -> str:
    return yaml.safe_dump({"providers": list(providers)}, sort_keys=False)


def replace_by_rename(path: Path, text: str) -> None:
    """Save as most editors do: write a temporary file next to it, rename it over."""
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temp.write_text(text)
    temp.chmod(0o600)
    os.replace(temp, path)


def rewrite_in_place(path: Path, text: str) -> None:
    """Truncate the same inode, then write: two separate steps, as `>` in a shell does."""
    with open(path, "r+") as f:
        f.truncate(0)
        f.flush()
        os.fsync(f.fileno())
        f.seek(0)
        f.write(text)


def settings_yaml(proxy: ClipalProcess, **settings) -> str:
    return yaml.safe_dump({"log_dir": str(proxy.config_dir / "logs"), **settings}, sort_keys=False)


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture
def mode_env(mode) -> dict:
    return {"CLIPAL_WATCH_MODE": mode}


# --- acceptance 1: every kind of edit applies, with both watcher modes ------------------------


def test_replace_by_rename_applies(clipal, upstream_factory, mode, mode_env):
    a, b = upstream_factory("A"), upstream_factory("B")
    proxy = clipal(codex=[provider("A", a)], settings={"log_level": "debug"}, env=mode_env)
    # The watcher really runs in the mode under test.
    assert f"for changes ({mode})" in proxy.output()
    assert served_by(proxy) == "A"

    replace_by_rename(proxy.config_dir / "codex.yaml", providers_yaml(provider("B", b)))
    wait_until(lambda: served_by(proxy) == "B", f"rename save [{mode}]", proxy)
    assert "configuration reloaded" in proxy.output()
    assert call(proxy).json()["choices"][0]["message"]["content"] == "hello from B"


def test_truncate_and_rewrite_in_place_applies(clipal, upstream_factory, mode, mode_env):
    a, b = upstream_factory("A"), upstream_factory("B")
    proxy = clipal(claudecode=[provider("A", a)], env=mode_env)
    path = proxy.config_dir / "claude-code.yaml"
    inode = path.stat().st_ino
    assert served_by(proxy, "claudecode") == "A"

    rewrite_in_place(path, providers_yaml(provider("B", b)))
    assert path.stat().st_ino == inode
    wait_until(lambda: served_by(proxy, "claudecode") == "B", f"in-place rewrite [{mode}]", proxy)


def test_creating_a_missing_client_file_applies(clipal, upstream_factory, mode, mode_env):
    g = upstream_factory("G")
    proxy = clipal(codex=[provider("A", upstream_factory("A"))], env=mode_env)
    path = proxy.config_dir / "gemini.yaml"
    assert not path.exists()
    missing = call(proxy, "gemini")
    assert missing.status_code == 503
    assert str(path) in missing.json()["error"]["message"]

    write_yaml(path, {"providers": [provider("G", g)]})
    wait_until(lambda: call(proxy, "gemini").status_code == 200, f"created gemini.yaml [{mode}]", proxy)
    assert served_by(proxy, "gemini") == "G"


def test_deleting_a_client_file_answers_503_naming_it(clipal, upstream_factory, mode, mode_env):
    a = upstream_factory("A")
    proxy = clipal(codex=[provider("A", a)], env=mode_env)
    assert served_by(proxy) == "A"
    path = proxy.config_dir / "codex.yaml"

    path.unlink()
    wait_until(lambda: call(proxy).status_code == 503, f"deleted codex.yaml [{mode}]", proxy)
    answer = call(proxy)
    assert str(path) in answer.json()["error"]["message"]
    assert "X-Clipal-Provider" not in answer.headers
    requests_before = len(a.requests)
    call(proxy)
    assert len(a.requests) == requests_before


def test_editing_config_yaml_applies_log_level_and_failover_settings(clipal, upstream_factory, mode, mode_env):
    # Claude Code: S answers after 0.8 s, B at once -> shows upstream_idle_timeout.
    slow, b = upstream_factory("S"), upstream_factory("B")
    slow.default = Reply.answer().headers_after(0.8)
    # Codex: C always 401, D always 503 -> shows reactivate_after (0 = never deactivate).
    c, d = upstream_factory("C"), upstream_factory("D")
    c.default = Reply.openai_error(401)
    d.default = Reply.openai_error(503)
    proxy = clipal(claudecode=[provider("S", slow), provider("B", b)], codex=[provider("C", c), provider("D", d)],
                   settings={"log_level": "info", "upstream_idle_timeout": "5s", "reactivate_after": 0},
                   env=mode_env)

    assert served_by(proxy, "claudecode") == "S"  # 0.8 s is within 5 s
    for _ in range(2):
        assert call(proxy).status_code == 503
    assert len(c.requests) == 2  # never deactivated
    assert "request received" not in proxy.output()

    write_yaml(proxy.config_dir / "config.yaml",
               settings_yaml(proxy, log_level="debug", upstream_idle_timeout="0.3s", reactivate_after="1h"))
    # gemini has no providers: each probe is answered by clipal alone, and logs at debug.
    wait_until(lambda: call(proxy, "gemini").status_code == 503 and "request received" in proxy.output(),
               f"config.yaml log_level [{mode}]", proxy)

    assert served_by(proxy, "claudecode") == "B"  # S no longer answers within 0.3 s
    c_before = len(c.requests)
    assert call(proxy).status_code == 503
    assert len(c.requests) == c_before + 1  # C tried once, now deactivated for 1h ...
    assert call(proxy).status_code == 503
    assert len(c.requests) == c_before + 1  # ... so the next request skips it
    assert "provider C deactivated for 1h" in proxy.output()


# --- acceptance 2: what a reload does and does not do ------------------------------------------


def test_reload_clears_deactivation_so_a_fixed_key_is_used_at_once(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    a.default = Reply.openai_error(401, "Incorrect API key provided")
    proxy = clipal(codex=[provider("A", a, key="sk-wrong-key-for-a-000000000000"), provider("B", b)],
                   settings={"reactivate_after": "1h"})
    assert served_by(proxy) == "B"
    assert "provider A deactivated" in proxy.output()
    a.default = Reply.answer()  # the upstream would now accept a right key
    assert served_by(proxy) == "B"
    assert len(a.requests) == 1  # deactivated: not even tried

    fixed_key = "sk-fixed-key-for-a-11111111111111"
    write_yaml(proxy.config_dir / "codex.yaml",
               {"providers": [provider("A", a, key=fixed_key), provider("B", b)]})
    wait_until(lambda: served_by(proxy) == "A", "fixed key re-validates A", proxy)
    assert a.requests[-1].headers["authorization"] == f"Bearer {fixed_key}"


def _broken_client_files(url: str) -> list[tuple[str, str, str]]:
    """(id, text of a broken codex.yaml that would route to B, what the warning must say)."""
    return [
        ("invalid-yaml", f"providers:\n  - name: B\n    base_url: {url}\n    api_key: [unclosed\n", "is not valid YAML"),
        ("unknown-key", providers_yaml({**provider("B", url), "wieght": 2}), "unknown key 'wieght'"),
        ("missing-api-key", providers_yaml({"name": "B", "base_url": url}), 'provider "B": api_key is required'),
    ]


@pytest.mark.parametrize("case", ["invalid-yaml", "unknown-key", "missing-api-key"])
def test_broken_client_file_keeps_the_old_providers_and_names_the_problem(clipal, upstream_factory, case):
    a, b = upstream_factory("A"), upstream_factory("B")
    proxy = clipal(codex=[provider("A", a)])
    text, problem = next((t, p) for name, t, p in _broken_client_files(b.url) if name == case)

    write_yaml(proxy.config_dir / "codex.yaml", text)
    out = proxy.wait_for_output(problem, timeout=APPLY_LIMIT)
    warning = next(line for line in out.splitlines() if problem in line)
    assert warning.startswith("[WARN]") and "codex.yaml" in warning
    for _ in range(3):
        assert served_by(proxy) == "A"
    assert not b.requests

    # The watcher is still alive: fixing the file applies it.
    write_yaml(proxy.config_dir / "codex.yaml", {"providers": [provider("B", b)]})
    wait_until(lambda: served_by(proxy) == "B", f"fixed after {case}", proxy)


def test_broken_config_yaml_keeps_the_running_settings(clipal, upstream_factory):
    a = upstream_factory("A")
    proxy = clipal(codex=[provider("A", a)], settings={"log_level": "info"})
    write_yaml(proxy.config_dir / "config.yaml", settings_yaml(proxy, log_level="debug", upstream_idle_timeout="soon"))
    out = proxy.wait_for_output("upstream_idle_timeout invalid duration", timeout=APPLY_LIMIT)
    warning = next(line for line in out.splitlines() if "upstream_idle_timeout" in line)
    assert warning.startswith("[WARN]") and "config.yaml" in warning
    assert served_by(proxy) == "A"
    assert "request received" not in proxy.output()  # log_level debug was not applied either


class ConfigPortClipal(ClipalProcess):
    """clipal started without --port, so the port comes from config.yaml as for most users."""

    def __init__(self, config_dir: Path, port: int) -> None:
        self.config_dir = config_dir
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.output_path = config_dir.parent / f"clipal-{port}.out"
        self._out = open(self.output_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "clipal", "--config-dir", str(config_dir)],
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture
def config_port_clipal(tmp_path):
    started: list[ConfigPortClipal] = []

    def start(config_dir: Path, port: int) -> ConfigPortClipal:
        proc = ConfigPortClipal(config_dir, port)
        started.append(proc)
        return proc.wait_healthy()

    yield start
    for proc in started:
        proc.stop()


def test_listen_change_is_logged_as_needing_restart_and_old_port_keeps_serving(config_port_clipal, upstream_factory,
                                                                               tmp_path):
    a = upstream_factory("A")
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    port, new_port = free_port(), free_port()
    base = {"log_dir": str(config_dir / "logs"), "port": port}
    write_yaml(config_dir / "config.yaml", base)
    write_yaml(config_dir / "codex.yaml", {"providers": [provider("A", a)]})
    proxy = config_port_clipal(config_dir, port)

    # The port change comes with a log level change: the rest of the file still applies.
    write_yaml(config_dir / "config.yaml", {**base, "port": new_port, "listen_addr": "127.0.0.2", "log_level": "debug"})
    out = proxy.wait_for_output(f"port changed to {new_port}; restart clipal to apply it", timeout=APPLY_LIMIT)
    assert "listen_addr changed to '127.0.0.2'; restart clipal to apply it" in out
    restart_lines = [line for line in out.splitlines() if "restart clipal" in line]
    assert all(line.startswith("[WARN]") and "config.yaml" in line for line in restart_lines)
    assert served_by(proxy) == "A"
    assert "request received" in proxy.output()  # log_level applied at once
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{new_port}/health", timeout=1)

    # Another edit while the file still asks for the new port: still needs a restart, still said.
    write_yaml(config_dir / "config.yaml", {**base, "port": new_port, "listen_addr": "127.0.0.2", "log_level": "info"})
    wait_until(lambda: proxy.output().count(f"port changed to {new_port}") == 2, "second edit", proxy)

    # Putting the running values back needs no restart, and clipal must not ask for one.
    write_yaml(config_dir / "config.yaml", base)
    wait_until(lambda: proxy.output().count("configuration reloaded") == 3, "revert edit", proxy)
    assert f"port changed to {port}" not in proxy.output()
    assert "listen_addr changed to '127.0.0.1'" not in proxy.output()
    assert requests.get(proxy.url + "/health", timeout=2).status_code == 200


def test_in_flight_stream_finishes_on_the_configuration_it_started_with(clipal, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    # Seven events 0.4 s apart: a 2.4 s stream whose gaps exceed the new idle timeout below.
    a.default = Reply.answer("one two three four", delay=0.4)
    proxy = clipal(codex=[provider("A", a)], settings={"upstream_idle_timeout": "5s"})
    path, body = _BODIES["codex"]
    stream = requests.post(proxy.url + path, json={**body, "stream": True}, stream=True, timeout=10)
    assert stream.headers["X-Clipal-Provider"] == "A"
    chunks = stream.iter_content(chunk_size=None)
    received = [next(chunks)]

    # Switch everything: providers to B, and an idle timeout the old stream could not meet.
    write_yaml(proxy.config_dir / "config.yaml", settings_yaml(proxy, upstream_idle_timeout="0.2s"))
    write_yaml(proxy.config_dir / "codex.yaml", {"providers": [provider("B", b)]})
    wait_until(lambda: served_by(proxy) == "B", "switch to B during a stream", proxy)
    assert "upstream_idle_timeout = 0.2" in proxy.output()

    received.extend(chunks)
    text = b"".join(received).decode()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "one two three four"
    assert text.rstrip().endswith("data: [DONE]")
    assert "stalled" not in proxy.output()
    assert "request completed via A (200" in proxy.output()
    a_requests = len(a.requests)
    assert served_by(proxy) == "B"
    assert len(a.requests) == a_requests


# --- acceptance 5: the watcher survives ---------------------------------------------------------


def test_deleting_every_file_falls_back_to_defaults_and_recreating_applies(clipal, upstream_factory, mode, mode_env):
    a, b = upstream_factory("A"), upstream_factory("B")
    proxy = clipal(codex=[provider("A", a)], claudecode=[provider("A", a)], settings={"log_level": "debug"},
                   env=mode_env)
    config_dir = proxy.config_dir
    assert served_by(proxy) == "A"

    for name in ("config.yaml", *CLIENT_FILES.values()):
        (config_dir / name).unlink(missing_ok=True)
    # Client files gone: no providers, 503 naming the file. config.yaml gone: defaults (info level).
    wait_until(lambda: call(proxy).status_code == 503 and call(proxy, "claudecode").status_code == 503,
               f"all files deleted [{mode}]", proxy)
    wait_until(lambda: "log_level = 'info'" in proxy.output(), f"defaults after deleting config.yaml [{mode}]", proxy)
    assert "codex.yaml" in call(proxy).json()["error"]["message"]
    debug_lines = proxy.output().count("request received")
    call(proxy)
    assert proxy.output().count("request received") == debug_lines
    assert requests.get(proxy.url + "/health", timeout=2).status_code == 200

    # The whole directory goes (with the log directory inside it, whose open file keeps the
    # deleted directory alive in the kernel), then comes back with a file in it.
    shutil.rmtree(config_dir)
    time.sleep(0.2)
    # The watcher sees the directory go at once, and the reload that follows may already have
    # made it again for the log directory inside it (the log file was deleted too).
    config_dir.mkdir(exist_ok=True)
    write_yaml(config_dir / "codex.yaml", {"providers": [provider("B", b)]})
    wait_until(lambda: served_by(proxy) == "B", f"directory recreated [{mode}]", proxy)
    # Logging goes on in a new file at the same place, not into the deleted one.
    log_file = config_dir / "logs" / f"clipal-{date.today():%Y-%m-%d}.log"
    wait_until(lambda: log_file.exists() and "request completed via B" in log_file.read_text(),
               f"log file recreated [{mode}]", proxy)


def _make_unreadable(path: Path, how: str) -> None:
    path.unlink()
    if how == "directory":
        path.mkdir()  # read() fails with EISDIR
    elif how == "fifo":
        os.mkfifo(path)  # open() would wait for a writer forever
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["directory", "fifo"])
def test_unreadable_client_file_keeps_the_old_providers(clipal, upstream_factory, how):
    """Tests run as root, where chmod 000 does not stop a read; these two fail for root too."""
    a, b = upstream_factory("A"), upstream_factory("B")
    proxy = clipal(codex=[provider("A", a)])
    path = proxy.config_dir / "codex.yaml"
    _make_unreadable(path, how)
    problem = {"directory": "codex.yaml: cannot be read: Is a directory",
               "fifo": "codex.yaml: is not a regular file"}[how]
    out = proxy.wait_for_output(problem, timeout=APPLY_LIMIT)
    warning = next(line for line in out.splitlines() if problem in line)
    assert warning.startswith("[WARN]")
    assert served_by(proxy) == "A"
    assert requests.get(proxy.url + "/health", timeout=2).status_code == 200

    # Put a real file back: the watcher still works.
    if path.is_dir():
        path.rmdir()
    else:
        path.unlink()
    write_yaml(path, {"providers": [provider("B", b)]})
    wait_until(lambda: served_by(proxy) == "B", f"readable again after {how}", proxy)


@pytest.fixture
def nobody_dir():
    """A config dir outside root's private tmp, owned by the unprivileged 'nobody' user."""
    if os.geteuid() != 0:
        directory = Path(tempfile.mkdtemp(prefix="clipal-perm-"))
        yield directory, None
        shutil.rmtree(directory, ignore_errors=True)
        return
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv to run clipal as an unprivileged user")
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' user")
    # The checkout or the interpreter may live where 'nobody' cannot read (a
    # clone under a root-only directory in CI): then this test cannot run.
    probe = subprocess.run(
        [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
         sys.executable, "-c", "import clipal.cli"],
        capture_output=True, timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip("user 'nobody' cannot import clipal from this checkout/interpreter")
    directory = Path(tempfile.mkdtemp(prefix="clipal-perm-"))
    directory.chmod(0o755)
    yield directory, (setpriv, nobody)
    shutil.rmtree(directory, ignore_errors=True)


def test_permission_denied_client_file_keeps_the_old_providers(nobody_dir, upstream_factory):
    """A real EACCES: clipal runs as 'nobody' (via setpriv) and the file is chmod 000."""
    directory, identity = nobody_dir
    a, b = upstream_factory("A"), upstream_factory("B")
    config_dir = directory / "config"
    config_dir.mkdir()
    write_yaml(config_dir / "config.yaml", {"log_dir": str(config_dir / "logs")})
    write_yaml(config_dir / "codex.yaml", {"providers": [provider("A", a)]})
    prefix: list[str] = []
    if identity is not None:
        setpriv, nobody = identity
        for path in (directory, config_dir, config_dir / "config.yaml", config_dir / "codex.yaml"):
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        prefix = [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    port = free_port()
    out_path = directory / "clipal.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "clipal", "--config-dir", str(config_dir),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=directory)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 15
        while True:
            try:
                if requests.get(url + "/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, out_path.read_text()
            time.sleep(0.05)
        codex = f"{url}/codex/v1/chat/completions"
        body = _BODIES["codex"][1]
        assert requests.post(codex, json=body, timeout=10).headers["X-Clipal-Provider"] == "A"

        path = config_dir / "codex.yaml"
        path.write_text(providers_yaml(provider("B", b)))  # an edit clipal cannot read
        path.chmod(0o000)
        wait_until(lambda: "Permission denied" in out_path.read_text(), "permission error reported")
        warning = next(line for line in out_path.read_text().splitlines() if "Permission denied" in line)
        assert warning.startswith("[WARN]") and "codex.yaml" in warning
        assert requests.post(codex, json=body, timeout=10).headers["X-Clipal-Provider"] == "A"
        # clipal looks again every second (a chmod is not an edit the watcher reports),
        # quietly: the warning is not repeated while the problem stays the same.
        time.sleep(2.3)
        assert out_path.read_text().count("Permission denied") == 1
        assert requests.post(codex, json=body, timeout=10).headers["X-Clipal-Provider"] == "A"

        path.chmod(0o600)  # fixing the permission is enough, no further edit needed
        wait_until(lambda: requests.post(codex, json=body, timeout=10).headers.get("X-Clipal-Provider") == "B",
                   "readable again after EACCES")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_burst_of_100_writes_ends_on_the_last_valid_config(clipal, upstream_factory, mode, mode_env):
    a, b, final, later = (upstream_factory(n) for n in ("A", "B", "F", "L"))
    proxy = clipal(codex=[provider("A", a)], env=mode_env)
    path = proxy.config_dir / "codex.yaml"
    valid = providers_yaml(provider("B", b))
    invalid = providers_yaml({"name": "B", "base_url": b.url})  # api_key missing

    start = time.monotonic()
    for i in range(99):
        text = valid if i % 2 else invalid
        if i % 3:
            rewrite_in_place(path, text)
        else:
            replace_by_rename(path, text)
        time.sleep(0.005)
    replace_by_rename(path, providers_yaml(provider("F", final)))
    burst = time.monotonic() - start
    assert burst < 1.5, f"the burst took {burst:.2f}s"
    print(f"100 writes in {burst:.2f}s")

    wait_until(lambda: served_by(proxy) == "F", f"last of 100 writes [{mode}]", proxy)
    time.sleep(0.5)  # nothing left pending may undo it
    assert served_by(proxy) == "F"
    out = proxy.output()
    reloads = out.count("configuration reloaded") + out.count("config reload rejected")
    assert 1 <= reloads <= 20, f"{reloads} reloads for one burst"

    write_yaml(path, {"providers": [provider("L", later)]})
    wait_until(lambda: served_by(proxy) == "L", f"edit after the burst [{mode}]", proxy)
    assert requests.get(proxy.url + "/health", timeout=2).status_code == 200
