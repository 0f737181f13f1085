"""One writer per output: `output_lock(path)` refuses a second run on the same output at once.

Two searches with one ``-o``, two trainings into one checkpoint or two profiles of one table would
each resume the other's half-written state and overwrite each other's saves. The lock is an
exclusive, non-blocking `fcntl.flock` on ``<path>.lock``, held for the whole run; the holder's PID
and command are written inside so that the refusal can name them.

Why flock and not a PID file alone: the kernel releases a flock when its holder's last file
descriptor closes, including when the process is killed (SIGKILL, OOM, a lost node), so a stale
lock file is simply taken over by the next run — no guessing from a PID that may have been reused
by an unrelated process. The lock file itself is left in place after release: deleting it would
race with a second process that has opened it but not yet locked it (both would then "hold" locks
on different inodes).

Within one process the lock is re-entrant (counted per resolved path): a search that holds the
lock on its state file may be called by a runner that holds it already. flock is advisory and
needs a local file system (on NFS it is emulated with fcntl locks by Linux, which also works).
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hwnas.errors import UserError

_held: dict[str, list] = {}  # resolved lock path → [fd, count]
_mutex = threading.Lock()


def lock_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _holder(lp: Path) -> str:
    try:
        text = lp.read_text(errors="replace").strip()
    except OSError:
        return "another process"
    pid, _, cmd = text.partition(" ")
    if not pid.isdigit():
        return "another process"
    return f"process {pid}" + (f" ({cmd[:120]})" if cmd else "")


def acquire(path: Path) -> None:
    """Take the lock on `path` (see `output_lock`); pair with `release(path)`."""
    lp = lock_path(path)
    lp.parent.mkdir(parents=True, exist_ok=True)
    key = str(lp.resolve())
    with _mutex:
        if key in _held:
            _held[key][1] += 1
            return
        fd = os.open(lp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(f"{str(path)!r} is in use by {_holder(lp)}: another run is writing "
                            f"this output (lock {str(lp)!r}); wait for it to finish, stop it, "
                            "or choose another output") from None
        # ours now; a stale holder's PID (killed process) is overwritten
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {' '.join(sys.argv)[:500]}\n".encode())
        _held[key] = [fd, 1]


def release(path: Path) -> None:
    key = str(lock_path(path).resolve())
    with _mutex:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            fd = entry[0]
            try:
                os.ftruncate(fd, 0)  # no PID of a finished run left behind
            except OSError:
                pass
            os.close(fd)  # closing the last descriptor releases the flock


@contextmanager
def output_lock(path: Path) -> Iterator[Path]:
    """Hold the exclusive lock on output `path` for the block; a `UserError` naming the
    holder's PID at once if another process holds it. Yields the lock file's path."""
    acquire(path)
    try:
        yield lock_path(path)
    finally:
        release(path)


def is_held(path: Path) -> bool:
    """Whether this process holds the lock on `path`."""
    return str(lock_path(path).resolve()) in _held
