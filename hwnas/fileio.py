"""The one atomic write: readers see the old file or the new one, never a part.

Every file hwnas writes (tables, sidecars, journals, checkpoints, ONNX, plots, results) goes
through `atomic_write_bytes`/`atomic_write_text`, or `atomic_path` for writers that want a path
(torch.save, onnx.save, matplotlib). The temporary file sits beside the target (same file
system, so the rename is atomic), is fsynced, gets the mode a plain `open()` would have given
under the current umask (mkstemp makes 0600), and is removed if the write fails.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it replaces `path`.

    `suffix` is kept at the end of the temporary name for writers that choose a format by it
    (``.png``, ``.onnx``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=TMP_SUFFIX + suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
