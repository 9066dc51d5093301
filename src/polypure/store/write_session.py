"""The one writer of a store: its lock, its working copy, and commits by atomic rename.

HDF5 has no journal: a process killed while the library writes metadata can leave a file that no longer
opens (measured here: one kill in 40 at random moments of a writer that flushes after every write). So a
run never writes the store itself. It writes a working copy next to it (``<store>.writing``) and
*commits* by copying the flushed working copy to ``<store>.commit``, syncing it to disk and renaming it
over the store, which is atomic. At every moment the store is a complete file: the last commit. A run
killed at any moment (``kill -9`` included) leaves it intact, and the next run continues from it (the
stages resume from what the store holds); a working copy left behind is discarded.

Commits happen at the end of every stage, when a run stops (an error, Ctrl-C, SIGTERM), and on the stages'
checkpoints once ``commit_every`` seconds have passed since the last (or ten commits' durations, for a
store that takes long to copy), so a kill loses at most that much work. Readers (``polypure inspect``, ``report``, ``compare``, :class:`polypure.Results`) open the store
itself, never the working copy, so they work while a run writes.

One process writes a store at a time: ``<store>.lock`` holds an exclusive ``flock`` for the writer's
lifetime, and names the writer (pid, host, start time) for the error a second writer gets. The operating
system drops the lock when its holder dies, so a lock left by a killed run is taken over without a flag.
(``flock`` is local to a machine on some network file systems: two machines writing one store on NFS are
not stopped.)

Example
-------
>>> import tempfile, pathlib
>>> from polypure.store.write_session import WriteSession
>>> path = pathlib.Path(tempfile.mkdtemp()) / "s.h5"
>>> with WriteSession(path) as session:
...     session.work_path.name
's.h5.writing'
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

from polypure.config.paths import require_output_file
from polypure.errors import DiskFullError, StoreError, StoreLockedError

#: Seconds between commits on checkpoints (the config's ``commit_every`` overrides it).
COMMIT_EVERY = 30.0


def check_writable(path: str | Path) -> None:
    """Refuse a store path whose folder cannot take the files a run writes, before any work starts.

    A run never writes the store itself: it creates ``<store>.lock``, ``<store>.writing`` and
    ``<store>.commit`` next to it and renames the last over the store. So the folder must take a new file
    even when the store exists. The nearest existing folder is tried with a temporary file that leaves
    nothing behind, so that permissions, read-only file systems and quotas all count (``os.access`` would
    say yes to root on a read-only file system). A lock file left by an earlier run must open for writing.
    The store itself must be a regular file or nothing, below folders (:mod:`polypure.config.paths`).

    Parameters
    ----------
    path : str or Path
        The store.

    Raises
    ------
    StoreError
        Naming the store, the folder (or lock file) and the reason; or the store's path, what was expected
        and what was found there (a folder, ``/dev/null``).
    """
    import tempfile

    path = require_output_file(path, "store", StoreError)
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # folders still to be made are made in the nearest one that exists
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise StoreError(f"store {str(path)!r} cannot be written: folder {str(folder)!r} is not writable "
                         f"({exc.strerror or exc}); set another store path") from None
    lock = lock_path(path)
    if lock.exists():
        try:
            os.close(os.open(lock, os.O_RDWR))
        except OSError as exc:
            raise StoreError(f"store {str(path)!r} cannot be written: its lock file {str(lock)!r} cannot be opened "
                             f"for writing ({exc.strerror or exc}); remove it or set another store path") from None


def lock_path(path: Path) -> Path:
    """The lock file of a store."""
    return path.with_name(path.name + ".lock")


def work_path(path: Path) -> Path:
    """The working copy a run writes."""
    return path.with_name(path.name + ".writing")


class WriteSession:
    """Holds a store's lock and working copy; :meth:`commit` makes the working copy the store.

    Parameters
    ----------
    path : str or Path
        The store.
    commit_every : float
        Seconds between commits made on checkpoints (:meth:`checkpoint`).
    """

    def __init__(self, path: str | Path, commit_every: float = COMMIT_EVERY):
        self.path = Path(path)
        self.commit_every = commit_every
        self._lock_fd: int | None = None
        self._last_commit = 0.0
        self._commit_seconds = 0.0
        self.commits = 0

    @property
    def work_path(self) -> Path:
        """The working copy (``<store>.writing``)."""
        return work_path(self.path)

    # -- lifecycle ---------------------------------------------------------------------------------

    def open(self) -> WriteSession:
        """Take the lock and start the working copy from the store (or from nothing)."""
        # checked first: the store's kind and folder before any folder is made for it
        check_writable(self.path)
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"store {str(self.path)!r}: cannot create its folder ({exc.strerror})") from None
        self._lock()
        try:
            # a working copy left by a killed run may be torn: the store is the last complete state
            self.work_path.unlink(missing_ok=True)
            self.path.with_name(self.path.name + ".commit").unlink(missing_ok=True)
            if self.path.exists():
                self._copy(self.path, self.work_path)
        except BaseException:
            self._unlock()
            raise
        self._last_commit = time.monotonic()
        return self

    def close(self, commit: bool = True) -> None:
        """Commit (unless told not to), drop the working copy and release the lock."""
        if self._lock_fd is None:
            return
        try:
            if commit and self.work_path.exists():
                self.commit()
        finally:
            self.work_path.unlink(missing_ok=True)
            self._unlock()

    def __enter__(self) -> WriteSession:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- commits -----------------------------------------------------------------------------------

    def commit(self) -> None:
        """Make the (flushed) working copy the store: copy, sync, rename over the store.

        Raises
        ------
        DiskFullError
            When the copy does not fit; the store stays as it was.
        """
        if not self.work_path.exists():
            return
        staged = self.path.with_name(self.path.name + ".commit")
        start = time.monotonic()
        try:
            self._copy(self.work_path, staged)
            _kill_for_test("commit")
            os.replace(staged, self.path)
            _sync_folder(self.path.parent)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        self._last_commit = time.monotonic()
        self._commit_seconds = self._last_commit - start
        self.commits += 1

    def checkpoint(self) -> None:
        """Commit if ``commit_every`` seconds have passed since the last commit (called after a flush).

        For a store so large that copying it takes a while (about 6 s a GiB here), the interval grows to ten
        times the last commit's duration, so that commits never take more than a tenth of a run.
        """
        if time.monotonic() - self._last_commit >= max(self.commit_every, 10 * self._commit_seconds):
            self.commit()

    def _copy(self, source: Path, target: Path) -> None:
        try:
            with open(source, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
                dst.flush()
                os.fsync(dst.fileno())
        except OSError as exc:
            target.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(self.path, source.stat().st_size) from None
            raise

    # -- the lock ----------------------------------------------------------------------------------

    def _lock(self) -> None:
        import fcntl

        path = lock_path(self.path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise StoreLockedError(f"store {str(self.path)!r} is being written by {holder}; wait for that run to "
                                   "end or stop it (reading the store works meanwhile)") from None
        started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            # the file stays: removing it would race with a writer that just opened it
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that a run stops the same clean way (command-line exit status 143)."""


_deferred: dict = {"depth": 0, "pending": None}


def _raise_for(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise Terminated
    raise KeyboardInterrupt


def _defer(signum, frame) -> None:
    _deferred["pending"] = signum


@contextlib.contextmanager
def whole_write():
    """Hold Ctrl-C and SIGTERM until the write inside has finished, then raise them.

    A store write stopped halfway (a top-K checkpoint's values without its indices) would be committed
    as it is when the run stops; deferred, the run stops after the write, with nothing torn.
    """
    main = threading.current_thread() is threading.main_thread()
    if _deferred["depth"] == 0 and main:
        saved = (signal.signal(signal.SIGINT, _defer), signal.signal(signal.SIGTERM, _defer))
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
        if _deferred["depth"] == 0 and main:
            signal.signal(signal.SIGINT, saved[0])
            signal.signal(signal.SIGTERM, saved[1])
            pending, _deferred["pending"] = _deferred["pending"], None
            if pending is not None:
                handler = saved[0] if pending == signal.SIGINT else saved[1]
                if callable(handler):
                    # Python's own SIGINT handler raises KeyboardInterrupt; the command line's SIGTERM one Terminated
                    handler(pending, None)
                elif handler == signal.SIG_DFL:
                    os.kill(os.getpid(), pending)  # the default action, now that the write is whole


def terminate_as_interrupt() -> None:
    """Make SIGTERM raise :class:`Terminated` (the command line does this; a library leaves signals alone)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: _raise_for(signum))


def disk_full(path: Path, needed: int) -> DiskFullError:
    """The one line for a full disk: the store, the space it needs and what is kept."""
    free = shutil.disk_usage(path.parent).free
    return DiskFullError(f"store {str(path)!r}: the disk is full ({free / 2**20:.1f} MiB free in "
                         f"{str(path.parent)!r}, a commit needs about {2 * needed / 2**20:.1f} MiB); everything up to "
                         "the last commit is kept, free some space and rerun the same command")


def _sync_folder(folder: Path) -> None:
    # the rename itself must reach the disk, or a power cut could bring the old store back
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: Environment variable of the crash harness: ``KIND:N`` kills this process with SIGKILL at the N-th call
#: of the hook of that kind (``write``: inside a store write, ``commit``: between copying and renaming).
KILL_AT_ENV = "POLYPURE_TEST_KILL_AT"
_calls: dict[str, int] = {}


def _kill_for_test(kind: str) -> None:
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    want, _, count = spec.partition(":")
    if want != kind:
        return
    _calls[kind] = _calls.get(kind, 0) + 1
    if _calls[kind] == int(count or 1):
        os.kill(os.getpid(), 9)


def kill_inside_write_for_test() -> None:
    """The crash harness's hook inside store writes (:data:`KILL_AT_ENV` ``write:N``)."""
    _kill_for_test("write")

