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


class StageJournal:
    """A long job's finished stages, kept in one JSON file so that a stopped job run again with
    the same settings resumes after its last finished stage instead of doing it again.

    Why: a 40-minute mixed-precision sweep wrote its results only at the end, and a stop in its
    scoring lost 30 minutes of timing that cannot be reproduced (the host's speed is not the
    same twice). Each `stage` is computed once, its JSON value written atomically
    (`hwnas.fileio.atomic_write_text`) before the job goes on, and returned from the file on a
    resume. A stage may carry a `key` (what it was asked, e.g. the assignments a timing call
    timed): a resumed stage whose key differs means the job took another path than the one
    journalled, an internal error. `settings` are what the stages depend on; a journal written
    under other settings is refused (`UserError` naming the differences) rather than mixed in.
    The caller holds `hwnas.locks.output_lock` on the journal, so two jobs never share one."""

    def __init__(self, path: Path, settings: dict, note=None):
        import json

        from hwnas.errors import UserError

        self.path, self.settings = Path(path), json.loads(json.dumps(settings))
        self.stages: dict[str, dict] = {}
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            old = saved.get("settings", {})
            diff = [f"{k} {old.get(k)!r} (journal) vs {self.settings.get(k)!r} (now)"
                    for k in sorted(set(old) | set(self.settings))
                    if old.get(k) != self.settings.get(k)]
            if diff:
                raise UserError(f"{self.path} holds an unfinished run with other settings: "
                                f"{'; '.join(diff)}; run with those settings to resume it, or "
                                "move it away to start afresh")
            self.stages = saved.get("stages", {})
            if self.stages and note:
                note(f"resuming {self.path}: {len(self.stages)} finished stages "
                     f"({', '.join(self.stages)})")

    def stage(self, name: str, compute, key=None, dump=lambda v: v, load=lambda v: v):
        """`compute()`'s value, journalled under `name` (`dump` makes it JSON, `load` undoes
        that), or the journalled one on a resume; always as read back from JSON, so that a
        fresh run and a resumed one go on from the same values."""
        import json

        from hwnas.fileio import atomic_write_text

        key = json.loads(json.dumps(key))
        if name in self.stages:
            got = self.stages[name]
            if got.get("key") != key:
                raise RuntimeError(f"stage {name} of {self.path} was journalled for "
                                   f"{got.get('key')!r}, resumed for {key!r}")
            return load(got["value"])
        self.stages[name] = {"key": key, "value": json.loads(json.dumps(dump(compute())))}
        atomic_write_text(self.path, json.dumps({"settings": self.settings,
                                                 "stages": self.stages}) + "\n")
        return load(self.stages[name]["value"])  # as a resume would see it, on every run

    def finish(self) -> None:
        """The job's results are written: the journal goes (a new run starts afresh)."""
        self.path.unlink(missing_ok=True)
