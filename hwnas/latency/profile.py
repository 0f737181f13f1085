"""Building a LUT: a resumable sweep over a space's unique op keys, then calibration.

Every op still missing from the table is exported alone (`export_onnx`), compiled for the
device, and measured with the protocol, all ops interleaved round by round so that the host's
slow drifts touch every op alike. After every round the rounds so far are saved to a journal
(``<table>.partial.json``); a killed sweep rerun with the same command resumes from it, losing
at most the round in flight, and rows are added to the table only once, when complete.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch import nn
from tqdm import tqdm

from hwnas.backends import Runner, compiled
from hwnas.devices import Device, fingerprint_diff, fingerprint_hash
from hwnas.errors import UserError
from hwnas.fileio import atomic_write_text, clean_orphans
from hwnas.hosts import host_id, record_host
from hwnas.locks import output_lock
from hwnas.latency.predict import fit_calibration
from hwnas.latency.table import LatencyTable, new_table, now_iso, table_path
from hwnas.measure import Contention, LatencyStats, Protocol, measure_interleaved
from hwnas.spaces.base import Arch, OpKey, SearchSpace, Shape


@dataclass
class Labelled:
    """What `measure_labelled` returns: stats by label, the rounds taken over from a journal,
    and how quiet the host was while the rounds were timed."""

    stats: dict[str, LatencyStats]
    resumed_rounds: int
    contention: Contention


def measure_labelled(labels: Sequence[str], build: Callable[[str], tuple[nn.Module, Shape]],
                     device: Device, protocol: Protocol, journal: Path | None = None,
                     desc: str = "measuring", progress: bool = True) -> Labelled:
    """Export, compile and measure the items named `labels`, interleaved, resumably.

    `build(label) -> (module, input shape)` makes one item; `backends.compiled` exports and
    compiles it. With a `journal`, the rounds measured so far are saved after every round and
    reused when the same labels are measured again with the same protocol.
    """
    return measure_opened(labels, lambda label: compiled(*build(label), device), protocol,
                          journal, desc, progress)


def measure_opened(labels: Sequence[str],
                   open_runner: Callable[[str], "contextlib.AbstractContextManager[Runner]"],
                   protocol: Protocol, journal: Path | None = None, desc: str = "measuring",
                   progress: bool = True,
                   wrap: Callable[[list[Runner]], Sequence[Runner]] | None = None) -> Labelled:
    """`measure_labelled` for items that open their own runner: `open_runner(label)` is a
    context manager giving a compiled `Runner`; `wrap` may replace the opened runners before
    timing (e.g. `hwnas.quant.latency.same_feeds`: one input for models compared together)."""
    prior = None
    if journal is not None and journal.is_file():
        try:
            saved = json.loads(journal.read_text())
            if saved.get("labels") == list(labels) and saved.get("protocol") == protocol.to_dict():
                prior = saved["rounds"]
        except (ValueError, KeyError, TypeError, AttributeError):
            prior = None  # an unreadable journal costs only its rounds
    bar = tqdm(total=None, desc=desc, unit="round", disable=not progress, leave=False,
               mininterval=0.5, dynamic_ncols=True)
    with contextlib.ExitStack() as stack:
        runners: list[Runner] = []
        for i, label in enumerate(labels):
            bar.set_postfix_str(f"compiling {i + 1}/{len(labels)}")
            runners.append(stack.enter_context(open_runner(label)))
        bar.set_postfix_str("")

        def on_round(done: int, total: int, rounds) -> None:
            if bar.total != total:
                bar.total = total
                bar.n = done - 1
            bar.update(1)
            if journal is not None:
                atomic_write_text(journal, json.dumps({"labels": list(labels),
                                                       "protocol": protocol.to_dict(),
                                                       "rounds": rounds}))

        m = measure_interleaved(wrap(runners) if wrap else runners, protocol, prior_rounds=prior,
                                on_round=on_round)
    bar.close()
    return Labelled(dict(zip(labels, m.stats)), len(prior[0]) if prior else 0, m.contention)


def contention_check(c: Contention, what: str, require_quiet: bool,
                     journal: Path | None = None) -> None:
    """Warn about a measurement taken on a busy host; with `require_quiet`, refuse it (its
    journal is dropped, so a rerun measures afresh instead of resuming the busy rounds)."""
    if not c.contended:
        return
    msg = (f"{what} was measured on a busy host: {c.line()}; its figures may be off. Check the "
           "host with `python tools/host_regimes.py` and rerun when it is quiet")
    if require_quiet:
        if journal is not None:
            journal.unlink(missing_ok=True)
        raise UserError(msg + " (--require-quiet: nothing was saved)")
    print(f"warning: {msg}", file=sys.stderr)


@dataclass
class ProfileReport:
    table: LatencyTable
    measured_ops: int
    reused_ops: int
    calibrated: bool
    resumed_rounds: int = 0  # rounds taken over from an interrupted run's journal

    def to_dict(self) -> dict:
        cal = self.table.meta.get("calibration") or {}
        return {"table": str(self.table.path), "host": self.table.host,
                "rows": len(self.table.rows),
                "measured_ops": self.measured_ops, "reused_ops": self.reused_ops,
                "calibrated_now": self.calibrated, "resumed_rounds": self.resumed_rounds,
                "calibration": {k: cal.get(k) for k in ("intercept_ms", "slopes",
                                                        "fit_max_abs_err_pct")},
                "canary": self.table.meta.get("canary"),
                "contention": self.table.meta.get("contention")}


def open_table(root: Path, device: Device, space: SearchSpace, input_shape: Shape,
               protocol: Protocol, fingerprint: dict | None = None) -> LatencyTable:
    """The table to extend: the existing one (checked) or a new, empty one. The host is the one
    `fingerprint` names (a fleet worker's), by default this host."""
    host = host_id(fingerprint) if fingerprint is not None else None
    path = table_path(root, device, space.name, input_shape, host)
    if not path.exists():
        return new_table(path, device, space.name, input_shape, protocol.to_dict(), fingerprint)
    table = LatencyTable.load(path)
    want = {"device": device.name, "space": space.name, "input_shape": list(input_shape)}
    got = {k: table.meta.get(k) for k in want}
    if got != want:
        raise UserError(f"latency table {path} is for {got}, not {want}; move it away or pass "
                        "--tables DIR")
    return table


def profile(device: Device, space: SearchSpace, input_shape: Shape, root: Path,
            protocol: Protocol = Protocol(), calibration_n: int = 20, seed: int = 0,
            progress: bool = True, require_quiet: bool = False) -> ProfileReport:
    """Measure every unique op key of `space` at `input_shape` that this host's table lacks,
    then calibrate on `calibration_n` whole random candidates (seeded) and time the canary.
    Resumes where it stopped. One run per table: a second exits at once naming the first."""
    path = table_path(root, device, space.name, input_shape)
    with output_lock(path):
        clean_profile_orphans(path, root)
        return _profile(device, space, input_shape, root, protocol, calibration_n, seed,
                        progress, require_quiet)


def clean_profile_orphans(path: Path, root: Path) -> None:
    """A kill during a save leaves its temporary file (the caller holds the table's lock)."""
    for p in (path, path.with_suffix(".json"), path.with_suffix(".partial.json"),
              path.with_suffix(".calibration.partial.json"),
              path.with_suffix(".shards.partial.json"), Path(root) / "hosts.json"):
        clean_orphans(p)


@dataclass
class ProfilePlan:
    """What one profile run of one table measures: the ops the table lacks (`todo`), the
    calibration candidates (`archs`) and the canary, as one list of `labels` (op key strings,
    then arch strings) measured interleaved."""

    table: LatencyTable
    keys: dict[str, OpKey]
    todo: list[str]
    archs: list[Arch]
    labels: list[str]
    seed: int

    def builder(self, space: SearchSpace, input_shape: Shape):
        """`build(label) -> (module, input shapes)` for `measure_labelled`."""
        return label_builder(space, input_shape, self.keys)

    @property
    def what(self) -> str:
        return (f"{len(self.todo)} ops, " if self.todo else "") + (
            f"{len(self.archs)} calibration candidates" if self.archs else "the canary")


def label_builder(space: SearchSpace, input_shape: Shape, keys: dict[str, OpKey]):
    def build(label: str):
        if label in keys:  # an op: one input per shape (an FPN takes every level)
            return space.build_op(keys[label]), keys[label].in_shapes
        return space.build(space.parse(label)), input_shape
    return build


def plan_profile(device: Device, space: SearchSpace, input_shape: Shape, root: Path,
                 protocol: Protocol, calibration_n: int, seed: int,
                 fingerprint: dict | None = None) -> ProfilePlan:
    """The labels a profile run measures for the table of the host `fingerprint` names (by
    default this host, measured here): the same plan for the same table, seed and space, so a
    resumed run (in-process or on a fleet) asks for the same labels."""
    if calibration_n < 0 or 0 < calibration_n < space.num_kinds() + 2:
        raise UserError(f"--calibration-n must be 0 (no calibration) or at least "
                        f"{space.num_kinds() + 2} (an intercept and a slope per choice)")
    table = open_table(root, device, space, input_shape, protocol, fingerprint)
    keys = {str(k): k for k in space.unique_op_keys(input_shape, device.precision)}
    todo = [k for k in keys if k not in table.rows]
    if todo and table.rows:
        diffs = fingerprint_diff(table.meta["fingerprint"], fingerprint or device.fingerprint())
        if diffs:
            raise UserError(f"latency table {table.path} was measured with another setup "
                            f"({'; '.join(diffs)}); adding rows here would mix them: pass "
                            "--tables DIR to build a separate table")
    # The missing ops, the calibration candidates and the canary are measured in ONE interleaved
    # run: on a host whose speed drifts by 10-20% over tens of seconds (the AMD EPYC here), ops
    # timed in one phase and whole candidates in another gave slopes of 1.6-1.7 and a fit error
    # of 8%; sharing every round, the rows, the fit and the canary see the same host.
    calibrate = calibration_n > 0 and (bool(todo) or table.meta.get("calibration") is None)
    archs = calibration_archs(space, calibration_n, seed) if calibrate else []
    canary = str(space.canary())
    need_canary = bool(todo) or calibrate or not table.meta.get("canary")
    labels = todo + [str(a) for a in archs] + ([canary] if need_canary and canary not in
                                               {str(a) for a in archs} else [])
    return ProfilePlan(table, keys, todo, archs, labels, seed)


def finish_profile(plan: ProfilePlan, space: SearchSpace, input_shape: Shape, root: Path,
                   device: Device, stats: dict[str, LatencyStats] | None,
                   contention: Contention | None, fingerprint: dict | None = None,
                   resumed_rounds: int = 0) -> ProfileReport:
    """Merge the measured `stats` (of every label of `plan`) into its table, fit the
    calibration, set the canary, save, and index the host. `fingerprint` is the measuring
    machine's (default: this one's)."""
    table, todo, archs = plan.table, plan.todo, plan.archs
    if plan.labels:
        if todo and table.rows:
            table.meta["calibration"] = None  # rows will change: the old fit no longer applies
        table.rows.update({k: stats[k] for k in todo})
        if todo:  # this run's record covers the rows; a recalibration adds its own beside
            table.meta["contention"] = {"profile": contention.to_dict()}
            table.meta["fingerprint"] = fingerprint or device.fingerprint()
            table.meta["fingerprint_hash"] = fingerprint_hash(table.meta["fingerprint"])
        else:
            table.meta.setdefault("contention", {})["calibration"] = contention.to_dict()
        if archs:
            cal = fit_calibration(space, table, input_shape, archs,
                                  [stats[str(a)].best_ms for a in archs])
            table.meta["calibration"] = cal.to_dict()
            table.meta["calibration_seed"] = plan.seed
        set_canary(table, space, stats)
        table.save()
    # a run killed between saving its rows and removing its journal leaves one behind; an
    # older hwnas kept the calibration's rounds in a journal of their own
    table.path.with_suffix(".partial.json").unlink(missing_ok=True)
    table.path.with_suffix(".calibration.partial.json").unlink(missing_ok=True)
    record_host(root, table.meta["fingerprint"], device.name, table.meta["created"])
    return ProfileReport(table, len(todo), len(plan.keys) - len(todo), bool(archs),
                         resumed_rounds)


def _profile(device: Device, space: SearchSpace, input_shape: Shape, root: Path,
             protocol: Protocol, calibration_n: int, seed: int, progress: bool,
             require_quiet: bool) -> ProfileReport:
    plan = plan_profile(device, space, input_shape, root, protocol, calibration_n, seed)
    journal = plan.table.path.with_suffix(".partial.json")
    if not plan.labels:
        return finish_profile(plan, space, input_shape, root, device, None, None)
    got = measure_labelled(plan.labels, plan.builder(space, input_shape), device, protocol,
                           journal, desc=f"profiling {plan.what} of {space.name}",
                           progress=progress)
    contention_check(got.contention, f"{plan.table.path.name}", require_quiet, journal)
    return finish_profile(plan, space, input_shape, root, device, got.stats, got.contention,
                          resumed_rounds=got.resumed_rounds)


CANARY_WHAT = ("a fixed reference candidate (choice 0 at every layer) timed with the table; "
               "timing it again later and dividing gives the host's drift since the table was "
               "made (`--canary report|correct`)")


def set_canary(table: LatencyTable, space: SearchSpace, stats: dict[str, LatencyStats],
               source: str = "measured interleaved with the table's ops and calibration"
               ) -> None:
    arch = str(space.canary())
    table.meta["canary"] = {"arch": arch, "latency_ms": stats[arch].best_ms,
                            "measured": now_iso(), "source": source, "what": CANARY_WHAT}


def candidate_builder(space: SearchSpace, input_shape: Shape):
    """`build` for `measure_labelled` when the labels are arch strings of `space`."""
    return lambda label: (space.build(space.parse(label)), input_shape)


def calibration_archs(space: SearchSpace, n: int, seed: int) -> list[Arch]:
    """The uniform candidates (every layer one choice: the extremes give the fit leverage; the
    first is the canary), then seeded random ones up to `n`."""
    uniform = space.uniform_archs()
    rest = space.sample_distinct(n - len(uniform), np.random.default_rng(seed),
                                 exclude={str(a) for a in uniform})
    return uniform + rest
