"""Run folders: where a command's results go unless told otherwise.

Evidence is never overwritten behind the user's back: `validate`, `noise` and `demo` write into
a fresh ``hwnas-runs/<command>-<UTC time>-<what>/`` folder (``$HWNAS_RUNS`` moves the parent)
and say where. Publishing beside a table (`--publish`) or to a chosen place (`--out`) is asked
for explicitly.
"""

from __future__ import annotations

import os
import re
from datetime import datetime, timezone
from pathlib import Path


def runs_root() -> Path:
    return Path(os.environ.get("HWNAS_RUNS") or "hwnas-runs")


def new_run_dir(command: str, what: str) -> Path:
    """A new, empty folder for one run of `command` on `what` (never an existing one)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = f"{command}-{stamp}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', what)}"
    root = runs_root()
    for i in range(1000):
        path = root / (base if i == 0 else f"{base}-{i + 1}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not make a new run folder under {root}")
