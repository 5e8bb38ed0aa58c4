"""Watch a few file names in one directory and call back when any of them changes.

This is the trigger half of hot reload: it knows nothing about YAML or clipal's
configuration, it only says "one of these files may be different now". The caller re-reads
and validates.

It runs as a single gevent greenlet and only ever waits through gevent (an io watcher on a
non-blocking inotify descriptor, or ``gevent.sleep`` when polling), so it never blocks the
event loop, whether or not the process is monkey-patched.

Two ways to notice changes:

* inotify watches the *directory*, not the files: editors replace a file by renaming a new
  one over it, and a watch on the old inode would go silent after the first save. It also
  watches each directory on the way to it for the one name that leads on, so that the
  directory being created, deleted, renamed or swapped for another (or a directory or symlink
  above it) is an event too. At rest it then waits on the inotify descriptor alone, with no
  timer: nothing wakes the process until something on that path changes.
* polling stats each watched file every ``poll_interval`` and compares (device, inode, size,
  mtime). It is the fallback wherever inotify is missing or exhausted. Like any mtime-based
  poller it can miss a rewrite that keeps the size and lands within the same timestamp tick
  as the previous poll.

Bursts of events (an editor's save dance, a script rewriting a file 100 times) are coalesced:
the callback runs once the burst has been quiet for ``debounce`` seconds, but never later than
about a second after the first change, so a continuous stream of writes cannot starve it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

import gevent
from gevent.socket import wait_read

from .platforms import inotify_module

if TYPE_CHECKING:
    import inotify_simple

log = logging.getLogger("clipal")

MODES = ("auto", "inotify", "poll")
#: Overrides a mode of "auto" (tests of the app use it to force polling).
ENV_MODE = "CLIPAL_WATCH_MODE"

# Event bits from <sys/inotify.h>; they are kernel ABI, so spelling them out here keeps this
# module importable (and the poll mode usable) where inotify_simple is not.
IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_MASK_ADD = 0x20000000

# What happens to a file name in the directory. CLOSE_WRITE is the usual "a writer finished";
# MODIFY also catches truncate(2) and writers that keep the file open (it fires mid-write,
# which the debounce absorbs); CREATE/DELETE/MOVED_TO/MOVED_FROM cover create, unlink,
# rename-over and the rename-away of vim's backup dance. ATTRIB is left out on purpose:
# a chmod or touch does not change what the file says.
_FILE_EVENTS = IN_CLOSE_WRITE | IN_MODIFY | IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM
# The directory itself went away (deleted, renamed, unmounted); the watch is then dead.
# IN_IGNORED and IN_UNMOUNT are always reported, whatever the mask.
_DIR_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED
_WATCH_MASK = _FILE_EVENTS | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
# In a directory on the way to the watched one, what can change where the path leads: the
# next name created, deleted or renamed (rename-over included). MASK_ADD, because the same
# directory can be on the way and be the watched one (a symlink back up the path), and a
# plain add would narrow the watched directory's mask to these events.
_PATH_EVENTS = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO
_PATH_MASK = _PATH_EVENTS | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_MASK_ADD
#: Symlinks followed in one lookup before it counts as a loop (the kernel's MAXSYMLINKS).
_MAX_SYMLINKS = 40

#: Upper bound on how long a continuous burst can postpone the callback.
MAX_LATENCY = 1.0
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0
_REPEAT_WARNING_AFTER = 60.0

# (st_dev, st_ino, st_size, st_mtime_ns) of a file, or None when it does not exist.
_FileState = Optional[Tuple[int, int, int, int]]
_Snapshot = Dict[str, _FileState]


class _WaitTimedOut(Exception):
    """Raised by gevent's wait_read when its timeout expires; caught right there."""


class DirectoryWatcher:
    """Call ``on_change()`` when any of ``filenames`` in ``directory`` changes.

    ``on_change`` runs in the watcher's greenlet. Changes that happen while it runs are not
    lost: they trigger another call once it returns. Exceptions it raises are logged and the
    watcher carries on; so does every error of the watcher's own (a missing or unreadable
    directory, a failing read), with a short backoff while the error persists.

    A watcher runs once: ``start()`` it, ``stop()`` it, make a new one to start again.
    Use it from the thread that runs its gevent hub.
    """

    mode_in_use: str
    """``"inotify"`` or ``"poll"`` once started (it can turn to ``"poll"`` later if the
    inotify watch limit is hit when the directory reappears); ``""`` before."""

    def __init__(
        self,
        directory: Path,
        filenames: Iterable[str],
        on_change: Callable[[], None],
        *,
        mode: str = "auto",
        poll_interval: float = 0.5,
        debounce: float = 0.15,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"watch mode must be one of {', '.join(MODES)}, not {mode!r}")
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        if debounce < 0:
            raise ValueError("debounce must not be negative")
        names = frozenset(filenames)
        for name in names:
            if not name or os.sep in name or (os.altsep and os.altsep in name):
                raise ValueError(f"watched names are plain file names, not {name!r}")
        self.directory = Path(directory)
        self.filenames = names
        self.on_change = on_change
        self.mode = mode
        self.poll_interval = poll_interval
        self.debounce = debounce
        self.mode_in_use = ""

        self._greenlet: Optional[gevent.Greenlet] = None
        self._started = False
        self._stopping = False
        self._inotify: Optional["inotify_simple.INotify"] = None
        self._wd: Optional[int] = None  # None while the directory is not being watched
        self._watched_id: Optional[Tuple[int, int]] = None  # (st_dev, st_ino) of the watched directory
        # The directories on the way to the watched one: wd -> the names looked up in it.
        self._path_wds: Dict[int, FrozenSet[str]] = {}
        # When to look at the path again with no event to say so: None while every directory
        # on the way is watched; a poll interval ahead while one is not (or a look failed).
        self._resync_at: Optional[float] = None
        self._seen: Optional[_Snapshot] = None  # poll mode; None means "not known yet"
        self._first_change: Optional[float] = None  # start of the pending burst, if any
        self._last_change = 0.0
        self._last_warning: Optional[Tuple[str, float]] = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Set up the watch and spawn the watcher greenlet; returns at once.

        The inotify watch (or the polling baseline) is taken here rather than in the
        greenlet, so that a change made right after ``start()`` returns is already seen.
        """
        if self._started:
            if self._stopping:
                raise RuntimeError("a stopped DirectoryWatcher cannot be restarted")
            return
        self._started = True
        if self._resolve_mode() != "poll":
            self._inotify = self._open_inotify()
        if self._inotify is None:
            self._use_polling(self._snapshot_or_unknown())
        else:
            self.mode_in_use = "inotify"
            try:
                self._resync(time.monotonic(), announce=False)
            except OSError as exc:  # e.g. EACCES: the greenlet retries and reports
                self._warn(f"config watcher: cannot watch {self.directory}: {exc}")
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Kill the greenlet and close the inotify descriptor. Idempotent.

        Safe to call from inside ``on_change``: the loop then ends when the callback returns.
        """
        if not self._started:
            return
        self._stopping = True
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None and greenlet is not gevent.getcurrent():
            # Kill first: closing the descriptor under a live io watcher is not allowed.
            greenlet.kill()
        self._close_inotify()

    # -- mode selection --------------------------------------------------------------------

    def _resolve_mode(self) -> str:
        mode = self.mode
        if mode == "auto":
            forced = os.environ.get(ENV_MODE, "").strip().lower()
            if forced in MODES:
                mode = forced
            elif forced:
                self._warn(f"config watcher: ignoring {ENV_MODE}={forced!r} "
                           f"(expected one of {', '.join(MODES)})")
        return mode

    def _open_inotify(self) -> Optional["inotify_simple.INotify"]:
        """A non-blocking inotify instance, or None (logged) when there is none to be had."""
        inotify = inotify_module()  # None where inotify_simple is missing or the kernel is not Linux
        if inotify is None:
            log.info("config watcher: inotify is not available here; polling every %gs",
                     self.poll_interval)
            return None
        try:
            # EMFILE (per-user instance limit), ENOSYS; AttributeError when libc lacks
            # inotify_init1 altogether.
            return inotify.INotify(nonblocking=True)
        except (OSError, AttributeError) as exc:
            log.warning("config watcher: inotify unavailable (%s); polling every %gs",
                        exc, self.poll_interval)
            return None

    def _use_polling(self, baseline: Optional[_Snapshot]) -> None:
        self._close_inotify()
        self._wd = None
        self._path_wds = {}
        self._resync_at = None
        self._seen = baseline
        self.mode_in_use = "poll"

    def _close_inotify(self) -> None:
        inotify, self._inotify = self._inotify, None
        if inotify is not None:
            inotify.close()

    # -- the loop --------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                if self._inotify is not None:
                    self._inotify_step()
                else:
                    self._poll_step()
            except Exception as exc:  # the watcher must outlive any error; GreenletExit is not one
                failures += 1
                delay = min(_BACKOFF_FIRST * 2 ** (failures - 1), _BACKOFF_MAX)
                self._warn(f"config watcher: {type(exc).__name__}: {exc}; retrying",
                           exc_info=not isinstance(exc, OSError))
                gevent.sleep(delay)
            else:
                failures = 0

    def _inotify_step(self) -> None:
        assert self._inotify is not None
        now = time.monotonic()
        if self._resync_at is not None and now >= self._resync_at:
            self._resync(now)
            if self._inotify is None:  # hit the watch limit and fell back to polling
                return
        self._wait_readable(self._timeout(now))
        events = self._inotify.read(timeout=0)  # non-blocking: whatever the kernel has queued
        now = time.monotonic()
        if self._handle_events(events, now):
            self._resync(now)
            if self._inotify is None:
                return
        fire_at = self._fire_at()
        if fire_at is not None and now >= fire_at:
            self._fire()

    def _poll_step(self) -> None:
        now = time.monotonic()
        snapshot = self._snapshot()
        if snapshot != self._seen:
            # Taken before any callback runs, so a write during the callback differs from it.
            self._seen = snapshot
            self._note_change(now)
        fire_at = self._fire_at()
        if fire_at is not None and now >= fire_at:
            self._fire()
            return
        wake = now + self.poll_interval
        if fire_at is not None:
            wake = min(wake, fire_at)
        gevent.sleep(max(0.0, wake - time.monotonic()))

    def _timeout(self, now: float) -> Optional[float]:
        """How long the inotify step may wait for events before it has something to do;
        None (no timer at all) when only an event can give it something."""
        deadlines = [t for t in (self._fire_at(), self._resync_at) if t is not None]
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _wait_readable(self, timeout: Optional[float]) -> None:
        assert self._inotify is not None
        try:
            wait_read(self._inotify.fileno(), timeout=timeout, timeout_exc=_WaitTimedOut)
        except _WaitTimedOut:
            pass

    # -- inotify -----------------------------------------------------------------------------

    def _resync(self, now: float, *, announce: bool = True) -> None:
        """Bring the watches in line with where the directory's path leads now.

        Runs at start, when an event on the way says the path may lead elsewhere, and every
        poll interval while some directory on the way cannot be watched. A directory that
        has been deleted, or replaced by another, loses its watch and counts as a change;
        one that is there and not watched yet gets one.
        """
        assert self._inotify is not None
        self._resync_at = now + self.poll_interval  # stays if anything below fails
        path_watched = self._watch_path()
        if self._wd is not None and self._directory_id() != self._watched_id:
            self._drop_directory_watch()
            self._note_change(now)
        if self._wd is None:
            self._add_watch(now, announce=announce)
            if self._inotify is None:
                return
        if path_watched:
            self._resync_at = None

    def _watch_path(self) -> bool:
        """Watch each directory that a lookup of the directory's path goes through, for the
        name looked up in it, following symlinks as the kernel does; unwatch those it no
        longer goes through.

        Each directory is watched before the name is looked up in it, so a change right
        after the look is still an event. A directory that is deleted while something
        holds it open (clipal's own log file, a shell's working directory) sends no
        IN_DELETE_SELF until that goes; the IN_DELETE of its name in the directory above
        comes at once. True when every directory on the way is watched; False when one
        could not be (permissions, the watch limit, a symlink loop), and then the caller
        looks again every poll interval.
        """
        assert self._inotify is not None
        watched: Dict[int, Set[str]] = {}
        complete = True
        # join() keeps an absolute path as it is; ".." is resolved below, after symlinks, as the kernel does
        pending = _components(os.path.join(os.getcwd(), self.directory))
        pending.reverse()  # a stack: the next name last
        current = "/"
        links = 0
        while pending:
            name = pending.pop()
            if name == "..":
                current = os.path.dirname(current)
                continue
            try:
                wd = self._inotify.add_watch(current, _PATH_MASK)
            except (FileNotFoundError, NotADirectoryError):
                break  # gone or replaced since it was looked up: the watch above has the event
            except OSError as exc:  # EACCES, ENOSPC: look again every poll interval
                self._warn(f"config watcher: cannot watch {current} ({exc}); "
                           f"looking at {self.directory} every {self.poll_interval:g}s")
                complete = False
                break
            watched.setdefault(wd, set()).add(name)
            path = os.path.join(current, name)
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                break  # not there (yet): its arrival is an event of the watch just taken
            except OSError:
                complete = False
                break
            if not stat.S_ISLNK(st.st_mode):
                current = path
                continue
            links += 1
            try:
                target = os.readlink(path)
            except OSError:
                complete = False
                break
            if links > _MAX_SYMLINKS:
                complete = False
                break
            if target.startswith("/"):
                current = "/"
            pending.extend(reversed(_components(target)))
        for wd in self._path_wds.keys() - watched.keys():
            if wd != self._wd:  # the watched directory was also on the way; its watch stays
                self._remove_watch(wd)
        self._path_wds = {wd: frozenset(names) for wd, names in watched.items()}
        return complete

    def _add_watch(self, now: float, *, announce: bool) -> None:
        """Watch the directory if it exists (its arrival is an event on the path's watches).

        With ``announce``, a directory that (re)appears already holding watched files counts
        as a change: they arrived while nothing was watching, so no event will say so.
        """
        assert self._inotify is not None
        try:
            self._wd = self._inotify.add_watch(self.directory, _WATCH_MASK)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            log.warning("config watcher: inotify watch limit reached "
                        "(fs.inotify.max_user_watches); polling every %gs", self.poll_interval)
            if announce:
                # Files the directory brings back count as changed, as they would with inotify.
                self._use_polling({name: None for name in self.filenames})
            else:
                self._use_polling(self._snapshot_or_unknown())
            return
        self._watched_id = self._directory_id()
        if announce and self._any_watched_file():
            self._note_change(now)

    def _drop_directory_watch(self) -> None:
        wd, self._wd = self._wd, None
        if wd is not None and wd not in self._path_wds:
            self._remove_watch(wd)

    def _remove_watch(self, wd: int) -> None:
        try:
            self._inotify.rm_watch(wd)  # type: ignore[union-attr]
        except OSError:
            pass  # already gone with its directory

    def _directory_id(self) -> Optional[Tuple[int, int]]:
        """(device, inode) of the directory now; None when it is gone, the watched one's
        when it cannot be looked at (so an unreadable parent does not drop a good watch)."""
        try:
            st = os.stat(self.directory)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError:
            return self._watched_id
        return (st.st_dev, st.st_ino)

    def _handle_events(self, events: Iterable["inotify_simple.Event"], now: float) -> bool:
        """Note the changes the events say; True when the path may lead elsewhere now."""
        path_changed = False
        for event in events:
            names = self._path_wds.get(event.wd)
            if names is not None and (event.name in names or event.mask & _DIR_GONE):
                path_changed = True
            if event.mask & IN_Q_OVERFLOW:
                # The kernel dropped events: anything may have changed, the path too.
                self._note_change(now)
                path_changed = True
            elif self._wd is None or event.wd != self._wd:
                continue  # left over from a watch that was already dropped
            elif event.mask & _DIR_GONE:
                if event.mask & IN_MOVE_SELF:
                    # A renamed directory keeps its watch (and would keep reporting from its
                    # new place); drop it. Its IN_IGNORED then arrives with a stale wd.
                    self._drop_directory_watch()
                self._wd = None
                self._note_change(now)
                path_changed = True  # whatever is at the path now gets the watch
            elif event.mask & _FILE_EVENTS and event.name in self.filenames:
                self._note_change(now)
        return path_changed

    def _any_watched_file(self) -> bool:
        for name in self.filenames:
            try:
                os.lstat(self.directory / name)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError:
                return True  # cannot tell: let the callback look
            return True
        return False

    # -- polling -----------------------------------------------------------------------------

    def _snapshot(self) -> _Snapshot:
        """What each watched file looks like now; raises on errors other than "not there"."""
        snapshot: _Snapshot = {}
        for name in self.filenames:
            try:
                st = os.stat(self.directory / name)
            except (FileNotFoundError, NotADirectoryError):
                snapshot[name] = None
            else:
                snapshot[name] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return snapshot

    def _snapshot_or_unknown(self) -> Optional[_Snapshot]:
        """A baseline for start(); None ("unknown") if the files cannot be looked at now,
        in which case the first successful poll counts as a change."""
        try:
            return self._snapshot()
        except OSError as exc:
            self._warn(f"config watcher: cannot stat files in {self.directory}: {exc}")
            return None

    # -- debounce and callback ---------------------------------------------------------------

    def _note_change(self, now: float) -> None:
        if self._first_change is None:
            self._first_change = now
        self._last_change = now

    def _fire_at(self) -> Optional[float]:
        """When the pending burst is due: quiet for ``debounce``, or at the latest
        ``MAX_LATENCY`` after it began."""
        if self._first_change is None:
            return None
        return min(self._last_change + self.debounce,
                   self._first_change + max(self.debounce, MAX_LATENCY))

    def _fire(self) -> None:
        self._first_change = None
        try:
            self.on_change()
        except Exception:
            log.warning("config watcher: on_change failed", exc_info=True)

    def _warn(self, message: str, *, exc_info: bool = False) -> None:
        """Log a warning, but not the same one over and over while a problem persists
        (an unreadable directory would otherwise say so every poll interval)."""
        now = time.monotonic()
        last = self._last_warning
        if last is not None and last[0] == message and now - last[1] < _REPEAT_WARNING_AFTER:
            return
        self._last_warning = (message, now)
        log.warning("%s", message, exc_info=exc_info)


def _components(path: str) -> List[str]:
    """The names of a path, in order; "." and empty ones (from "//") mean nothing."""
    return [name for name in path.split("/") if name not in ("", ".")]
