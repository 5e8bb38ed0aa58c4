"""DirectoryWatcher, in both modes, driven from the test's own greenlet.

The process is not monkey-patched: the watcher must cooperate with gevent through gevent's
own APIs. Every wait below yields to the hub (gevent.sleep), which is what lets the watcher
greenlet run; a watcher that blocked the loop would hang these tests.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from pathlib import Path
from typing import Callable, List, Optional

import gevent
import inotify_simple
import pytest

from clipal import platforms, watch
from clipal.watch import DirectoryWatcher

NAMES = ("config.yaml", "codex.yaml")
MODES = ["inotify", "poll"]
FAST = {"poll_interval": 0.03, "debounce": 0.05}


class Recorder:
    """An on_change callback that remembers what config.yaml said at each call."""

    def __init__(self, directory: Path, then: Optional[Callable[[int], None]] = None) -> None:
        self.directory = directory
        self.seen: List[Optional[str]] = []
        self.then = then

    def __call__(self) -> None:
        try:
            content: Optional[str] = (self.directory / "config.yaml").read_text()
        except OSError:
            content = None
        self.seen.append(content)
        if self.then is not None:
            self.then(len(self.seen))

    @property
    def calls(self) -> int:
        return len(self.seen)

    def last_is(self, content: Optional[str]) -> Callable[[], bool]:
        return lambda: bool(self.seen) and self.seen[-1] == content


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        gevent.sleep(0.01)
    return True


@pytest.fixture(autouse=True)
def no_forced_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(watch.ENV_MODE, raising=False)


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    directory = tmp_path / "conf"
    directory.mkdir()
    (directory / "config.yaml").write_text("v: 0\n")
    return directory


@pytest.fixture
def start(tmp_path: Path):
    """start(mode, ...) -> (watcher, recorder); every watcher is stopped afterwards."""
    watchers: List[DirectoryWatcher] = []

    def start(mode: str, directory: Optional[Path] = None,
              then: Optional[Callable[[int], None]] = None, **options):
        directory = directory or tmp_path / "conf"
        recorder = Recorder(directory, then)
        watcher = DirectoryWatcher(directory, NAMES, recorder, mode=mode, **{**FAST, **options})
        watchers.append(watcher)
        watcher.start()
        return watcher, recorder

    yield start
    for watcher in watchers:
        watcher.stop()


# -- the kinds of change ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_write_in_place(mode, conf, start):
    watcher, rec = start(mode)
    assert watcher.mode_in_use == mode
    gevent.sleep(0.02)
    with open(conf / "config.yaml", "r+") as f:  # same inode, same size: only mtime moves
        f.seek(3)
        f.write("1")
    assert wait_until(rec.last_is("v: 1\n"))
    assert rec.calls == 1


@pytest.mark.parametrize("mode", MODES)
def test_truncate_and_rewrite(mode, conf, start):
    _, rec = start(mode)
    gevent.sleep(0.02)
    with open(conf / "config.yaml", "r+") as f:
        f.truncate(0)
        f.flush()
        gevent.sleep(0.01)
        f.write("v: 22\n")
    assert wait_until(rec.last_is("v: 22\n"))


@pytest.mark.parametrize("mode", MODES)
def test_replace_by_rename(mode, conf, start):
    _, rec = start(mode)
    gevent.sleep(0.02)
    (conf / ".config.yaml.tmp").write_text("v: 3\n")
    os.replace(conf / ".config.yaml.tmp", conf / "config.yaml")
    assert wait_until(rec.last_is("v: 3\n"))
    # vim's backup dance: rename the original away, write a new file, drop the backup.
    os.rename(conf / "config.yaml", conf / "config.yaml~")
    (conf / "config.yaml").write_text("v: 4\n")
    os.unlink(conf / "config.yaml~")
    assert wait_until(rec.last_is("v: 4\n"))
    # A replacement with the same size and mtime (cp -p, rsync): only the inode differs.
    current = os.stat(conf / "config.yaml")
    (conf / "incoming").write_text("v: 5\n")
    os.utime(conf / "incoming", ns=(current.st_atime_ns, current.st_mtime_ns))
    os.replace(conf / "incoming", conf / "config.yaml")
    assert wait_until(rec.last_is("v: 5\n"))


@pytest.mark.parametrize("mode", MODES)
def test_create_and_delete(mode, tmp_path, start):
    directory = tmp_path / "conf"
    directory.mkdir()
    _, rec = start(mode)
    gevent.sleep(0.02)
    (directory / "config.yaml").write_text("v: 5\n")
    assert wait_until(rec.last_is("v: 5\n"))
    (directory / "config.yaml").unlink()
    assert wait_until(rec.last_is(None))
    calls = rec.calls
    (directory / "codex.yaml").write_text("x: 1\n")  # any watched name counts
    assert wait_until(lambda: rec.calls > calls)


@pytest.mark.parametrize("mode", MODES)
def test_other_files_are_ignored(mode, conf, start):
    _, rec = start(mode)
    gevent.sleep(0.02)
    (conf / "notes.txt").write_text("hello")
    (conf / ".config.yaml.swp").write_text("swap")
    os.rename(conf / "notes.txt", conf / "notes.old")
    (conf / "config.yaml").chmod(0o600)  # a chmod says nothing new either
    gevent.sleep(0.3)
    assert rec.calls == 0
    (conf / "config.yaml").write_text("v: 6\n")  # and the watcher is still listening
    assert wait_until(rec.last_is("v: 6\n"))


@pytest.mark.parametrize("mode", MODES)
def test_burst_is_coalesced_but_not_starved(mode, conf, start, monkeypatch):
    monkeypatch.setattr(watch, "MAX_LATENCY", 0.4)  # so the test need not outlast a second
    _, rec = start(mode, debounce=0.15)
    gevent.sleep(0.02)
    began = time.monotonic()
    for i in range(100):
        (conf / "config.yaml").write_text(f"v: {i:03d}\n")
        gevent.sleep(0.005)
    burst = time.monotonic() - began
    calls_during_burst = rec.calls
    assert wait_until(rec.last_is("v: 099\n"))
    # The writes never paused for the debounce, yet the burst, outlasting MAX_LATENCY,
    # still produced a call while it went on; all told only a few calls.
    assert burst > 0.5
    assert calls_during_burst >= 1
    assert 1 <= rec.calls <= 5


# -- the directory itself ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_directory_deleted_and_recreated(mode, conf, start):
    _, rec = start(mode)
    gevent.sleep(0.02)
    for name in os.listdir(conf):
        os.unlink(conf / name)
    conf.rmdir()
    assert wait_until(rec.last_is(None))
    gevent.sleep(0.05)  # nothing to watch for a moment
    conf.mkdir()
    gevent.sleep(0.1)
    (conf / "config.yaml").write_text("v: 7\n")
    assert wait_until(rec.last_is("v: 7\n"))


def inotify_watched_inodes() -> List[int]:
    """The inode of each watch held by this process's inotify descriptors, as the kernel reports them."""
    inodes: List[int] = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                for line in info:
                    if line.startswith("inotify wd:"):
                        fields = dict(field.split(":", 1) for field in line.split()[1:])
                        inodes.append(int(fields["ino"], 16))
        except OSError:
            continue
    return inodes


@pytest.mark.parametrize("mode", MODES)
def test_directory_swapped_for_a_full_one(mode, conf, tmp_path, start):
    """A directory that reappears already holding files produces no file events at all."""
    _, rec = start(mode)
    gevent.sleep(0.02)
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "config.yaml").write_text("v: 8\n")
    os.rename(conf, tmp_path / "old")
    os.rename(staging, conf)
    assert wait_until(rec.last_is("v: 8\n"))
    (tmp_path / "old" / "config.yaml").write_text("stale")  # the old dir no longer counts
    (conf / "config.yaml").write_text("v: 9\n")  # the new one does
    assert wait_until(rec.last_is("v: 9\n"))
    assert "stale" not in rec.seen
    if mode == "inotify":
        watched = inotify_watched_inodes()
        assert os.stat(tmp_path / "old").st_ino not in watched  # the renamed-away directory's watch was dropped
        assert watched.count(os.stat(conf).st_ino) == 1


@pytest.mark.parametrize("mode", MODES)
def test_directory_missing_at_start(mode, tmp_path, start):
    watcher, rec = start(mode)
    assert watcher.mode_in_use == mode
    gevent.sleep(0.1)
    assert rec.calls == 0
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "config.yaml").write_text("v: 10\n")
    os.rename(staging, tmp_path / "conf")
    assert wait_until(rec.last_is("v: 10\n"))
    (tmp_path / "conf" / "config.yaml").write_text("v: 11\n")
    assert wait_until(rec.last_is("v: 11\n"))


# -- staying alive -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_callback_exception_is_logged_and_survived(mode, conf, start, caplog):
    def fail_first(call: int) -> None:
        if call == 1:
            raise RuntimeError("bad reload")

    _, rec = start(mode, then=fail_first)
    gevent.sleep(0.02)
    (conf / "config.yaml").write_text("v: 12\n")
    assert wait_until(lambda: rec.calls == 1)
    assert any("config watcher: on_change failed" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)
    (conf / "config.yaml").write_text("v: 13\n")
    assert wait_until(rec.last_is("v: 13\n"))


@pytest.mark.parametrize("mode", MODES)
def test_permission_error_is_logged_and_survived(mode, conf, start, caplog, monkeypatch):
    _, rec = start(mode)
    failures: List[str] = []
    if mode == "inotify":
        real_read = inotify_simple.INotify.read

        def read(self, *args, **kwargs):
            if not failures:
                failures.append("read")
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_read(self, *args, **kwargs)

        monkeypatch.setattr(inotify_simple.INotify, "read", read)
    else:
        real_stat = os.stat

        def stat(path, *args, **kwargs):
            if not failures and str(path).startswith(str(conf)):
                failures.append(str(path))
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_stat(path, *args, **kwargs)

        monkeypatch.setattr(os, "stat", stat)

    gevent.sleep(0.02)
    (conf / "config.yaml").write_text("v: 14\n")  # in inotify mode, this makes the read fail
    assert wait_until(rec.last_is("v: 14\n"))
    assert failures
    assert any("config watcher: PermissionError" in r.getMessage() for r in caplog.records)


def test_unreadable_at_start_counts_as_a_change_once_readable(conf, start, monkeypatch):
    real_stat = os.stat

    def stat(path, *args, **kwargs):
        if str(path).startswith(str(conf)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    _, rec = start("poll")
    gevent.sleep(0.1)
    assert rec.calls == 0  # nothing known, nothing said
    monkeypatch.setattr(os, "stat", real_stat)
    # Whoever loaded the files at start could not have read them either: say "changed".
    assert wait_until(rec.last_is("v: 0\n"))
    gevent.sleep(0.1)
    assert rec.calls == 1


@pytest.mark.parametrize("mode", MODES)
def test_changes_during_a_slow_callback_are_not_lost(mode, conf, start):
    def rewrite_while_busy(call: int) -> None:
        if call == 1:
            (conf / "config.yaml").write_text("v: 16\n")
            gevent.sleep(0.2)

    _, rec = start(mode, then=rewrite_while_busy)
    gevent.sleep(0.02)
    (conf / "config.yaml").write_text("v: 15\n")
    assert wait_until(rec.last_is("v: 16\n"))
    assert rec.seen == ["v: 15\n", "v: 16\n"]


# -- lifecycle ---------------------------------------------------------------------------------

def open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("mode", MODES)
def test_stop_is_idempotent_and_final(mode, conf):
    gevent.sleep(0)  # the hub's own descriptors exist before we count
    before = open_fds()
    rec = Recorder(conf)
    watcher = DirectoryWatcher(conf, NAMES, rec, mode=mode, **FAST)
    watcher.stop()  # before start: nothing to do
    watcher.start()
    gevent.sleep(0.02)
    watcher.stop()
    watcher.stop()
    assert open_fds() == before
    (conf / "config.yaml").write_text("v: 17\n")
    gevent.sleep(0.2)
    assert rec.calls == 0
    with pytest.raises(RuntimeError):
        watcher.start()


@pytest.mark.parametrize("mode", MODES)
def test_stop_from_inside_the_callback(mode, conf):
    watcher: DirectoryWatcher
    rec = Recorder(conf, then=lambda call: watcher.stop())
    watcher = DirectoryWatcher(conf, NAMES, rec, mode=mode, **FAST)
    watcher.start()
    gevent.sleep(0.02)
    (conf / "config.yaml").write_text("v: 18\n")
    assert wait_until(lambda: rec.calls == 1)
    (conf / "config.yaml").write_text("v: 19\n")
    gevent.sleep(0.2)
    assert rec.seen == ["v: 18\n"]


def test_bad_arguments_are_refused(conf):
    with pytest.raises(ValueError):
        DirectoryWatcher(conf, NAMES, lambda: None, mode="fanotify")
    with pytest.raises(ValueError):
        DirectoryWatcher(conf, ["sub/config.yaml"], lambda: None)


# -- choosing the mode -------------------------------------------------------------------------

def test_environment_forces_polling(conf, start, monkeypatch):
    monkeypatch.setenv(watch.ENV_MODE, "poll")
    watcher, rec = start("auto")
    assert watcher.mode_in_use == "poll"
    gevent.sleep(0.02)
    (conf / "config.yaml").write_text("v: 20\n")
    assert wait_until(rec.last_is("v: 20\n"))


def test_environment_only_overrides_auto(conf, start, monkeypatch):
    monkeypatch.setenv(watch.ENV_MODE, "poll")
    watcher, _ = start("inotify")
    assert watcher.mode_in_use == "inotify"


def test_auto_prefers_inotify_and_ignores_a_bad_environment_value(conf, start, monkeypatch, caplog):
    monkeypatch.setenv(watch.ENV_MODE, "sometimes")
    watcher, _ = start("auto")
    assert watcher.mode_in_use == "inotify"
    assert any("CLIPAL_WATCH_MODE" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("requested", ["auto", "inotify"])
def test_no_inotify_module_means_polling(requested, conf, start, monkeypatch):
    monkeypatch.setattr(platforms, "inotify_simple", None)
    watcher, rec = start(requested)
    assert watcher.mode_in_use == "poll"
    gevent.sleep(0.02)
    (conf / "config.yaml").write_text("v: 21\n")
    assert wait_until(rec.last_is("v: 21\n"))


def test_inotify_init_failure_means_polling(conf, start, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(inotify_simple, "INotify", refuse)
    watcher, rec = start("auto")
    assert watcher.mode_in_use == "poll"
    gevent.sleep(0.02)
    (conf / "config.yaml").write_text("v: 22\n")
    assert wait_until(rec.last_is("v: 22\n"))


def no_watches_left(self, path, mask):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_watch_limit_at_start_means_polling(conf, start, monkeypatch):
    monkeypatch.setattr(inotify_simple.INotify, "add_watch", no_watches_left)
    watcher, rec = start("auto")
    assert watcher.mode_in_use == "poll"
    gevent.sleep(0.1)
    assert rec.calls == 0  # the baseline was the files as they were
    (conf / "config.yaml").write_text("v: 23\n")
    assert wait_until(rec.last_is("v: 23\n"))


def test_watch_limit_when_the_directory_returns_means_polling(conf, tmp_path, start, monkeypatch):
    watcher, rec = start("inotify")
    gevent.sleep(0.02)
    os.rename(conf, tmp_path / "old")
    assert wait_until(rec.last_is(None))
    monkeypatch.setattr(inotify_simple.INotify, "add_watch", no_watches_left)
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "config.yaml").write_text("v: 24\n")
    os.rename(staging, conf)
    assert wait_until(rec.last_is("v: 24\n"))
    assert watcher.mode_in_use == "poll"
    (conf / "config.yaml").write_text("v: 25\n")
    assert wait_until(rec.last_is("v: 25\n"))


# -- at rest, and the path to the directory (inotify) ---------------------------------------------
# With a poll interval of a minute, anything noticed below within seconds came from an event.
AT_REST = {"poll_interval": 60.0}


class CountingStat:
    """os.stat and os.lstat, counting the calls the watcher makes under ``root``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.calls: List[str] = []
        self.root = str(root)
        for name in ("stat", "lstat"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._counting(real))

    def _counting(self, real: Callable) -> Callable:
        def counted(path, *args, **kwargs):
            if str(path).startswith(self.root):
                self.calls.append(str(path))
            return real(path, *args, **kwargs)
        return counted


def test_inotify_at_rest_looks_at_nothing(conf, tmp_path, start, monkeypatch):
    counter = CountingStat(monkeypatch, tmp_path)
    watcher, rec = start("inotify")  # FAST: a poll interval of 0.03 s
    assert watcher.mode_in_use == "inotify"
    counter.calls.clear()
    gevent.sleep(0.3)  # ten poll intervals
    assert counter.calls == []  # neither the directory nor the files were looked at
    (conf / "config.yaml").write_text("v: 30\n")
    assert wait_until(rec.last_is("v: 30\n"))
    assert counter.calls == []  # an edit inside needs no look at the path either


@pytest.mark.parametrize("held", ["held open", "not held"])
def test_directory_deleted_and_recreated_is_an_event(held, conf, start):
    """rmdir of a directory still held open sends no IN_DELETE_SELF; the name's IN_DELETE above it says it."""
    _, rec = start("inotify", **AT_REST)
    fd = os.open(conf, os.O_RDONLY) if held == "held open" else None
    try:
        for name in os.listdir(conf):
            os.unlink(conf / name)
        conf.rmdir()
        assert wait_until(rec.last_is(None))
        conf.mkdir()
        (conf / "config.yaml").write_text("v: 31\n")
        assert wait_until(rec.last_is("v: 31\n"))
        (conf / "config.yaml").write_text("v: 32\n")  # and the new directory is the one watched
        assert wait_until(rec.last_is("v: 32\n"))
    finally:
        if fd is not None:
            os.close(fd)


def test_directory_swapped_or_created_later_is_an_event(tmp_path, start):
    conf = tmp_path / "conf"
    _, rec = start("inotify", **AT_REST)
    gevent.sleep(0.05)
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "config.yaml").write_text("v: 33\n")
    os.rename(staging, conf)
    assert wait_until(rec.last_is("v: 33\n"))
    staging.mkdir()
    (staging / "config.yaml").write_text("v: 34\n")
    os.rename(conf, tmp_path / "old")
    os.rename(staging, conf)
    assert wait_until(rec.last_is("v: 34\n"))


def test_a_directory_above_renamed_or_created_later_is_an_event(tmp_path, start):
    directory = tmp_path / "a" / "b" / "conf"
    _, rec = start("inotify", directory=directory, **AT_REST)
    gevent.sleep(0.05)
    directory.mkdir(parents=True)  # two missing directories above it, then it
    (directory / "config.yaml").write_text("v: 35\n")
    assert wait_until(rec.last_is("v: 35\n"))
    os.rename(tmp_path / "a", tmp_path / "moved")  # the path now leads nowhere
    assert wait_until(rec.last_is(None))
    (tmp_path / "moved" / "b" / "conf" / "config.yaml").write_text("stale")
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text("v: 36\n")
    assert wait_until(rec.last_is("v: 36\n"))
    assert "stale" not in rec.seen


def test_a_symlink_on_the_way_re_pointed_is_an_event(tmp_path, start):
    first, second = tmp_path / "first", tmp_path / "second"
    for directory, version in ((first, 37), (second, 38)):
        directory.mkdir()
        (directory / "config.yaml").write_text(f"v: {version}\n")
    link = tmp_path / "link"
    link.symlink_to("first")
    _, rec = start("inotify", directory=link / ".." / "link", **AT_REST)  # ".." after a symlink, too
    gevent.sleep(0.05)
    (tmp_path / "link.new").symlink_to(second)
    os.replace(tmp_path / "link.new", link)  # ln -sfn: a new symlink renamed over the old
    assert wait_until(rec.last_is("v: 38\n"))
    (first / "config.yaml").write_text("stale")
    (second / "config.yaml").write_text("v: 39\n")
    assert wait_until(rec.last_is("v: 39\n"))
    assert "stale" not in rec.seen


def test_a_directory_above_that_cannot_be_watched_means_looking_every_poll_interval(
        conf, tmp_path, start, monkeypatch, caplog):
    real_add_watch = inotify_simple.INotify.add_watch

    def refuse_above(self, path, mask):
        if Path(path) != conf:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_add_watch(self, path, mask)

    monkeypatch.setattr(inotify_simple.INotify, "add_watch", refuse_above)
    counter = CountingStat(monkeypatch, tmp_path)
    watcher, rec = start("inotify")
    assert watcher.mode_in_use == "inotify"
    assert any("config watcher: cannot watch /" in r.getMessage() for r in caplog.records)
    assert wait_until(lambda: len(counter.calls) >= 3)  # looked at again and again
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "config.yaml").write_text("v: 40\n")
    os.rename(conf, tmp_path / "old")
    os.rename(staging, conf)
    assert wait_until(rec.last_is("v: 40\n"))
    (conf / "config.yaml").write_text("v: 41\n")
    assert wait_until(rec.last_is("v: 41\n"))


def test_a_symlink_loop_on_the_way_means_looking_every_poll_interval(tmp_path, start):
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    watcher, rec = start("inotify", directory=loop / "conf")
    gevent.sleep(0.1)
    assert watcher.mode_in_use == "inotify"
    assert rec.calls == 0
    loop.unlink()
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "conf").mkdir()
    (tmp_path / "staging" / "conf" / "config.yaml").write_text("v: 42\n")
    os.rename(tmp_path / "staging", loop)
    assert wait_until(rec.last_is("v: 42\n"))
