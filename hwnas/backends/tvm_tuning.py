"""MetaSchedule tuning for the TVM backend: a tuning database that outlives candidates and runs.

A database is a folder::

    meta.json                      target + TVM/tvm-ffi versions it was made for, and its id
    database_workload.json         MetaSchedule's JSONDatabase (workloads, tuning records)
    database_tuning_record.json
    tuned.json                     ledger: workload hash → trials spent, seconds, task name

(MetaSchedule's per-task logs go to ``$TMPDIR/hwnas-tvm-logs/<id>/``: they explain a tuning run
but are not needed to reproduce it, so the folder holds only what is worth committing.)

Only tasks with an anchor block (a reduction: conv, matmul, pooling) are tuned; injective glue
(slices, concats) is cheap, has no schedule space worth a trial, and would cost a build batch
each. A task is tuned once, ever: the ledger says how many trials it already had, and a task that
had at least the device's budget is never tuned again, so a candidate whose workloads are all in
the database compiles without tuning, and a killed tuning run resumes task by task.
A database made for another target or TVM version is refused: its records would be applied to
kernels they were not measured for.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from hwnas.errors import UserError
from hwnas.fileio import atomic_write_text

FORMAT = 1


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("apache-tvm", "apache-tvm-ffi"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


@dataclass
class TuningReport:
    """What one compile asked of the database: tasks found, tuned now, and the time it took."""

    tasks: int = 0  # anchor (tunable) tasks in the model
    reused: int = 0  # of those, already tuned to the budget
    tuned: list[str] = field(default_factory=list)  # task names tuned now
    trials: int = 0
    seconds: float = 0.0
    complete: bool = True  # False when a deadline stopped tuning before every task was tuned


class TuningDatabase:
    """A tuning-database folder for one (target, TVM version); see the module docstring."""

    def __init__(self, path: Path, target: dict[str, Any]):
        self.path = Path(path)
        self.target = target
        self.meta_path = self.path / "meta.json"
        self.ledger_path = self.path / "tuned.json"
        meta = check_database(self.path, target)
        if meta is None:
            meta = {"format": FORMAT, "id": uuid.uuid4().hex[:12], "target": target,
                    "versions": versions(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            self.path.mkdir(parents=True, exist_ok=True)
            _write_json(self.meta_path, meta)
        self.meta = meta

    @property
    def id(self) -> str:
        return self.meta["id"]

    def ledger(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.ledger_path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise UserError(f"tuning ledger {self.ledger_path} is malformed; restore it, or delete "
                            "it (every task is then tuned again)") from None

    def ms_database(self):
        from tvm.s_tir import meta_schedule as ms

        return ms.database.JSONDatabase(work_dir=str(self.path), module_equality="structural")

    @property
    def log_dir(self) -> Path:
        return Path(tempfile.gettempdir()) / "hwnas-tvm-logs" / self.id

    def lock(self):
        return _locked(self.meta_path)


def check_database(path: Path, target: dict[str, Any]) -> dict[str, Any] | None:
    """The database's meta if it exists and was made for `target` and this TVM; None if there is
    none yet; a `UserError` saying why otherwise."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        return None
    want = {"target": target, "versions": versions()}
    try:
        meta = json.loads(meta_path.read_text())
        got = {"target": meta["target"], "versions": meta["versions"]}
        meta["id"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"tuning database {path} has a malformed meta.json; restore it, or move "
                        "the folder away (tuning then starts afresh)") from None
    if got != want:
        diffs = [f"{k}: {got['target'].get(k)!r} → {target.get(k)!r}"
                 for k in sorted(set(got["target"]) | set(target))
                 if got["target"].get(k) != target.get(k)]
        diffs += [f"{k} {got['versions'].get(k)} → {v}" for k, v in want["versions"].items()
                  if got["versions"].get(k) != v]
        raise UserError(f"tuning database {path} was made for another target or TVM "
                        f"({'; '.join(diffs)}); its records do not apply here: move it away or "
                        "set [options] database to another folder")
    return meta


@contextlib.contextmanager
def _locked(meta_path: Path):
    """One tuner per database at a time (two would append to the same files): an exclusive
    flock on its meta.json, so no lock file is left in the folder."""
    with open(meta_path) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def compact(path: Path) -> tuple[int, int]:
    """Keep only each workload's best record (all that compiling applies), in place; the ledger
    is kept, so compacted tasks are not tuned again. Returns (records before, after): the full
    history is ~200 KB per task, too much to commit for a whole space."""
    from tvm.s_tir import meta_schedule as ms

    path = Path(path)
    names = ("database_workload.json", "database_tuning_record.json")
    with _locked(path / "meta.json"):
        src = ms.database.JSONDatabase(work_dir=str(path))
        before = len(src)
        tmp = path / ".compact"
        for n in names:
            (tmp / n).unlink(missing_ok=True)
        tmp.mkdir(exist_ok=True)
        dst = ms.database.JSONDatabase(work_dir=str(tmp))
        src.dump_pruned(dst)
        after = len(ms.database.JSONDatabase(work_dir=str(tmp)))
        for n in names:
            (tmp / n).replace(path / n)
        tmp.rmdir()
    return before, after


def workload_key(task) -> str:
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(task.dispatched[0]):016x}"


def tunable_tasks(mod, target) -> list:
    """The tasks of a fused Relax module that have an anchor block (see the module docstring)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import find_anchor_sblock

    tasks = ms.relax_integration.extract_tasks(mod, target)
    return [t for t in tasks if find_anchor_sblock(t.dispatched[0]) is not None]


def _in_process_builder():
    """A builder that compiles candidates in this process.

    MetaSchedule's LocalBuilder starts a fresh worker pool for every batch, and each worker
    imports `tvm.s_tir.tensor_intrin` (21 s on this host) before building anything: most of a
    small task's tuning time. Building a CPU kernel in-process takes ~0.05 s; the runner still
    measures in its own process, so a bad kernel cannot take this one down.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs):
            out = []
            for bi in build_inputs:
                try:
                    out.append(ms.builder.BuilderResult(
                        default_export(default_build(bi.mod, bi.target, None)), None))
                except Exception as e:  # a failed candidate is a result, not a crash
                    out.append(ms.builder.BuilderResult(None, f"{type(e).__name__}: {e}"))
            return out

    return InProcessBuilder()


def tune(mod, target, db: TuningDatabase, trials_per_task: int, seed: int = 0,
         progress: bool = True, deadline: float | None = None) -> TuningReport:
    """Tune every anchor task of `mod` that had fewer than `trials_per_task` trials, one task at
    a time, recording each in the ledger as it finishes. With a `deadline` (`time.monotonic()`
    value) no task is started after it; the report's `complete` says whether all were tuned."""
    from tvm.s_tir import meta_schedule as ms

    tasks = tunable_tasks(mod, target)
    uniq = {}
    for t in tasks:
        uniq.setdefault(workload_key(t), t)
    report = TuningReport(tasks=len(uniq))
    todo = {k: t for k, t in uniq.items()
            if db.ledger().get(k, {}).get("trials", 0) < trials_per_task}
    report.reused = len(uniq) - len(todo)
    if not todo:
        return report
    with db.lock():
        ledger = db.ledger()  # another process may have tuned some while we waited
        todo = {k: t for k, t in todo.items()
                if ledger.get(k, {}).get("trials", 0) < trials_per_task}
        report.reused = len(uniq) - len(todo)
        bar = tqdm(total=len(todo), desc=f"tuning {len(todo)} TVM tasks", unit="task",
                   disable=not progress or not todo, dynamic_ncols=True, leave=False)
        database = db.ms_database()
        for key, task in todo.items():
            if deadline is not None and time.monotonic() > deadline:
                report.complete = False
                break
            done = ledger.get(key, {}).get("trials", 0)
            trials = trials_per_task - done
            bar.set_postfix_str(task.task_name)
            t0 = time.perf_counter()  # tuning cost, for the record; not a device latency
            with _quiet_logs():
                ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                    [task], work_dir=str(db.log_dir), seed=seed)
                ms.tune_tasks(tasks=ctxs, task_weights=weights, work_dir=str(db.log_dir),
                              max_trials_global=trials, max_trials_per_task=trials,
                              num_trials_per_iter=min(64, trials),
                              builder=_in_process_builder(), runner="local", database=database,
                              cost_model="xgb", task_scheduler="round-robin")
            seconds = time.perf_counter() - t0
            prior = ledger.get(key, {})
            ledger[key] = {"task": task.task_name, "trials": done + trials,
                           "seconds": round(prior.get("seconds", 0.0) + seconds, 2)}
            _write_json(db.ledger_path, ledger)
            report.tuned.append(task.task_name)
            report.trials += trials
            report.seconds += seconds
            bar.update(1)
        bar.close()
    return report


@contextlib.contextmanager
def _quiet_logs():
    """MetaSchedule logs every trial to stdout at INFO (stdout carries `--json` output). Its
    console handler takes the level of the `tvm.s_tir.meta_schedule` logger when tuning starts;
    the per-task log files under logs/ keep everything."""
    import logging

    lg = logging.getLogger("tvm.s_tir.meta_schedule")
    old = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(old)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def describe(db_path: Path) -> str:
    """One line about a database folder, for tools and error messages."""
    try:
        meta = json.loads((Path(db_path) / "meta.json").read_text())
        ledger = json.loads((Path(db_path) / "tuned.json").read_text())
    except (OSError, ValueError):
        return f"{db_path}: no tuning database"
    secs = sum(e["seconds"] for e in ledger.values())
    return (f"{db_path}: id {meta['id']}, {len(ledger)} tasks tuned, {secs / 60:.1f} min of "
            f"tuning, target {json.dumps(meta['target'], sort_keys=True)}")


if __name__ == "__main__":  # pragma: no cover - a convenience for looking at a database
    for p in sys.argv[1:]:
        print(describe(Path(p)))
