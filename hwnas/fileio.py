"""Writing output files safely: atomically, with the user's umask, and without leaving litter.

Every file hwnas writes (checkpoints, search states, results, tables) goes through a temporary
file in the same folder that is renamed over the target once complete, so a reader (or a run
resumed after a kill) sees the old file or the new one, never a part. `tempfile.mkstemp` creates
its file 0600; the finished file gets the mode an ordinary `open(path, "w")` would have given it
(0666 minus the umask), so a shared group or a results server can read it as the user intends.

A kill between creating the temporary file and renaming it leaves ``<name>.<random>.tmp`` behind;
`clean_orphans` removes those of one target (the writer holds `hwnas.locks.output_lock`, so no
live writer's temporary file is removed).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hwnas.errors import UserError

TMP_SUFFIX = ".tmp"


def default_mode() -> int:
    """0666 minus the process umask: the mode `open(path, "w")` gives a new file."""
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


def _check_target(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"output {str(path)!r} is a folder; give a file name")


@contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` to write into; on success it replaces `path` (mode 0666
    minus the umask), on any exception it is removed and `path` is left as it was.

    For writers that want a file name (`torch.save`, `onnx.save`, `fig.savefig`); `suffix`
    ends the temporary name for writers that choose a format by it (``.png``, ``.onnx``)."""
    path = Path(path)
    _check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX + suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:  # durable before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path: Path) -> None:
    """Before expensive work: a `UserError` if `path` (a file to be written) cannot be, because
    its folder cannot be made or written, or it is a folder itself."""
    path = Path(path)
    _check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r} ({e.strerror or e}); choose another output "
                        "or fix the folder's permissions") from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of `text` in UTF-8 (newlines written as given)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def clean_orphans(path: Path) -> list[Path]:
    """Remove the temporary files a killed writer of `path` left (``<name>.*.tmp[.ext]``, as
    `atomic_path` names them); the removed paths. Call it while holding `output_lock(path)`."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for p in path.parent.glob(f"{glob_escape(path.name)}.*{TMP_SUFFIX}*"):
        if p.is_file() and not p.is_symlink():
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def glob_escape(name: str) -> str:
    """`name` with glob metacharacters made literal."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
