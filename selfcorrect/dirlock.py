"""One writer per directory: a run directory, or an evaluation output directory, is written by one process at a time.

A writer holds an OS file lock (``flock``) on the directory's lock file (:data:`selfcorrect.rundir.LOCK`) while it
writes. The kernel releases it when the process ends, however it ends (SIGKILL, an OOM kill, a node reboot), so a
killed run leaves no stale lock behind: a lock file that nobody holds is locked again by the next writer. The holder
writes its identity into the lock file (PID, host, start time, command line); a second writer stops with a one-line
:class:`~selfcorrect.errors.UserError` naming it, or with ``wait`` waits until it lets go.

* Under a multi-process launch (``torchrun``, ``accelerate launch``: ``RANK`` is set) only global rank 0 locks.
* A holder lists the directories it holds in ``$SELFCORRECT_LOCKED_DIRS`` while it holds them, so the processes it
  starts (the pipeline's training stages) write into them without waiting for their parent.
* The same process may hold the same directory again (the pipeline's in-process evaluation): the inner hold is a
  no-op, and waits as the outer one does unless told otherwise.
* The lock file exists only while its directory is held (or after its holder was killed: unlocked, it is taken over).
  A holder removes it before it lets go, and removes the directories it created if nothing else was written into
  them, so a command refused for bad input leaves the disk as it was. A waiter that got a lock file its holder had
  just removed takes a fresh one.
* A file system without ``flock`` (Lustre mounted without ``-o flock``, some FUSE file systems) gives a one-line
  warning, and the command runs without the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from selfcorrect.errors import UserError
from selfcorrect.io import check_writable_dir
from selfcorrect.rundir import lock_file

ENV = "SELFCORRECT_LOCKED_DIRS"  # the directories this process (or its parent) holds, os.pathsep-separated
HELD_ERRNOS = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})  # another process holds it
UNSUPPORTED_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOLCK", "EOPNOTSUPP", "ENOTSUP", "ENOSYS") if hasattr(errno, name)
)
READ_HOLDER_S = 2.0  # how long to wait for a new holder to write its identity

_held: set[Path] = set()  # the directories this process holds
_waits: list[bool] = []  # the wait of each enclosing hold, innermost last


@contextmanager
def hold(directory: str | Path, *, wait: bool | None = None, what: str = "output directory") -> Iterator[None]:
    """Hold ``directory``'s lock while the block runs (creating the directory if needed).

    ``wait``: if another process holds it, wait until it lets go (printing one line to stderr saying for whom)
    instead of raising a one-line UserError naming the holder; None: as the enclosing hold of this process does
    (else no). ``what`` names the directory in the error of one that cannot be written (``--output``).
    """
    wait = (_waits[-1] if _waits else False) if wait is None else wait
    path = Path(directory).expanduser().resolve()
    _waits.append(wait)
    try:
        if path in _held or _skipped(path):  # held by this process already, or by its parent for it
            yield
            return
        check_writable_dir(directory, what)  # its one-line error before anything is created
        created = _missing_dirs(path)
        try:
            fd = _acquire(path, wait)
        except BaseException:  # refused (or interrupted while waiting): leave no directory behind
            _remove_empty(created)
            raise
        _held.add(path)
        _set_env(path, present=True)
        try:
            yield
        finally:
            _set_env(path, present=False)
            _held.discard(path)
            _release(path, fd)
            _remove_empty(created)
    finally:
        _waits.pop()


def holder(directory: str | Path) -> dict | None:
    """The identity the holder of ``directory`` wrote into its lock file (``pid``, ``host``, ``since``,
    ``command``), or None when there is no lock file or it names nobody yet (it may name a killed holder)."""
    try:
        return _parse(lock_file(Path(directory)).read_text())
    except OSError:
        return None


def describe(identity: dict | None) -> str:
    """A holder in words: ``PID 1234 on host h since 2026-12-07T04:00:00Z (selfcorrect ppo cfg.yaml)``."""
    if not identity:
        return "another process (it has not written its name yet)"
    return (
        f"PID {identity.get('pid', '?')} on host {identity.get('host', '?')} since {identity.get('since', '?')} "
        f"({identity.get('command', '?')})"
    )


# ---- inside ------------------------------------------------------------------------------------------------------


def _skipped(path: Path) -> bool:
    """Whether this process must not lock ``path``: a rank other than 0, or a parent process holds it for us."""
    if os.environ.get("RANK", "0").strip() not in ("", "0"):
        return True
    return str(path) in os.environ.get(ENV, "").split(os.pathsep)


def _set_env(path: Path, *, present: bool) -> None:
    """Add ``path`` to (or remove it from) $SELFCORRECT_LOCKED_DIRS, which the processes started from here inherit."""
    entries = [e for e in os.environ.get(ENV, "").split(os.pathsep) if e and e != str(path)]
    if present:
        entries.append(str(path))
    if entries:
        os.environ[ENV] = os.pathsep.join(entries)
    else:
        os.environ.pop(ENV, None)


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (what :func:`hold` creates)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _identity() -> dict:
    argv = sys.argv or ["python"]
    program = Path(argv[0]).name
    if program in ("__main__.py", "selfcorrect"):  # python -m selfcorrect, accelerate launch -m selfcorrect, the script
        program = "selfcorrect"
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join([program, *argv[1:]])[:300],
    }


def _parse(text: str) -> dict | None:
    try:
        identity = json.loads(text)
    except ValueError:
        return None
    return identity if isinstance(identity, dict) else None


def _read_holder(fd: int) -> dict | None:
    """The holder's identity from the open lock file, waiting a little for a holder that has just locked it."""
    deadline = time.monotonic() + READ_HOLDER_S
    while True:
        identity = _parse(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        if identity is not None or time.monotonic() > deadline:
            return identity
        time.sleep(0.05)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the open file ``fd`` (its last holder may have removed it while we waited)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _acquire(path: Path, wait: bool) -> int | None:
    """Lock ``path``'s lock file and write this process's identity into it; returns the open file, or None on a
    file system without locks (after a warning)."""
    lock = lock_file(path)
    announced = False
    while True:
        path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the directory was removed just now by a holder that had created it
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in HELD_ERRNOS:
                    raise
                who = describe(_read_holder(fd))
                if not wait:
                    raise UserError(
                        f"{path}: in use by {who}; wait for it to end, or rerun with --wait-for-lock"
                    ) from None
                if not announced:
                    print(f"selfcorrect: {path}: in use by {who}; waiting for it to end", file=sys.stderr, flush=True)
                    announced = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            if not _same_file(fd, lock):  # we waited on a lock file its holder has removed: take a fresh one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_identity()) + "\n").encode(), 0)
            return fd
        except OSError as exc:
            os.close(fd)
            if exc.errno not in UNSUPPORTED_ERRNOS:
                raise
            print(
                f"selfcorrect: warning: {path}: this file system does not support file locks "
                f"({exc.strerror or exc}); running without the one-writer lock (Lustre: mount with -o flock)",
                file=sys.stderr,
                flush=True,
            )
            return None
        except BaseException:
            os.close(fd)
            raise


def _release(path: Path, fd: int | None) -> None:
    """Remove the lock file while still holding it, then let go (``fd`` None: a file system without locks, where
    nobody holds it)."""
    try:
        os.unlink(lock_file(path))
    except FileNotFoundError:  # removed by someone else
        pass
    finally:
        if fd is not None:
            os.close(fd)


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories :func:`hold` created (deepest first) that nothing else was written into."""
    for directory in created:
        try:
            directory.rmdir()
        except OSError:  # not empty (the command wrote into it), or already gone
            break
