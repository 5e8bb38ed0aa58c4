"""In-process checks behind two hot-reload failures found by the live tests (issue 4).

- A config directory deleted while something inside it is still open (clipal's own log
  file under the default log_dir) gets no IN_DELETE_SELF from the kernel until that file
  closes; the watcher must still notice and follow the directory when it comes back.
- A FIFO (or a device) named like a config file must be refused at once: opening a FIFO
  waits for a writer, and that wait would freeze the whole gevent process.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import gevent
import pytest

from clipal.config import ConfigError, load_config
from clipal.watch import DirectoryWatcher


def _wait(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.02)
    return True


def test_watcher_follows_a_deleted_directory_that_an_open_file_keeps_alive(tmp_path):
    config_dir = tmp_path / "config"
    (config_dir / "logs").mkdir(parents=True)
    calls: list[float] = []
    watcher = DirectoryWatcher(config_dir, ["codex.yaml"], lambda: calls.append(time.monotonic()),
                               mode="inotify", poll_interval=0.1, debounce=0.02)
    with open(config_dir / "logs" / "clipal.log", "a"):  # as clipal's log file is, all the time
        watcher.start()
        try:
            assert watcher.mode_in_use == "inotify"
            gevent.sleep(0.05)
            shutil.rmtree(config_dir)
            assert _wait(lambda: len(calls) == 1), "deletion not noticed"
            config_dir.mkdir()
            (config_dir / "codex.yaml").write_text("providers: []\n")
            assert _wait(lambda: len(calls) == 2), "the recreated directory is not watched"
            (config_dir / "codex.yaml").write_text("providers: []\n# again\n")
            assert _wait(lambda: len(calls) == 3), "a later edit is not seen"
        finally:
            watcher.stop()


def _load_in_thread(config_dir: Path) -> BaseException | None:
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            load_config(config_dir)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(2)
    if thread.is_alive():  # unblock it, so no thread is left behind
        with open(config_dir / "codex.yaml", "w"):
            pass
        thread.join(2)
        pytest.fail("load_config blocked on a FIFO")
    return outcome[0]


def test_a_fifo_named_like_a_config_file_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "codex.yaml")
    error = _load_in_thread(tmp_path)
    assert isinstance(error, ConfigError)
    assert str(error) == "codex.yaml: is not a regular file"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_device_named_like_a_config_file_is_refused(tmp_path):
    (tmp_path / "config.yaml").symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match=r"^config.yaml: is not a regular file$"):
        load_config(tmp_path)


def test_a_symlink_to_a_regular_file_is_still_read(tmp_path):
    (tmp_path / "real.yaml").write_text("log_level: debug\n")
    (tmp_path / "config.yaml").symlink_to(tmp_path / "real.yaml")
    assert load_config(tmp_path).settings.log_level == "debug"
