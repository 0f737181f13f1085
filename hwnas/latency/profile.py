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
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from torch import nn
from tqdm import tqdm

from hwnas.backends import Runner, compile_model
from hwnas.devices import Device, fingerprint_diff, fingerprint_hash
from hwnas.errors import UserError
from hwnas.export import export_onnx
from hwnas.latency.predict import fit_calibration
from hwnas.latency.table import (LatencyTable, atomic_write_text, new_table, table_path)
from hwnas.measure import LatencyStats, Protocol, measure_interleaved
from hwnas.spaces.base import Arch, SearchSpace, Shape


def measure_labelled(labels: Sequence[str], build: Callable[[str], tuple[nn.Module, Shape]],
                     device: Device, protocol: Protocol, journal: Path | None = None,
                     desc: str = "measuring", progress: bool = True,
                     ) -> tuple[dict[str, LatencyStats], int]:
    """Export, compile and measure the items named `labels`, interleaved, resumably.

    `build(label) -> (module, input shape)` makes one item; it is exported with `export_onnx`
    and compiled for `device` (backends that run torch modules get the module too). With a
    `journal`, the rounds measured so far are saved after every round and reused when the same
    labels are measured again.
    Returns the stats by label and how many rounds were taken over from the journal.
    """
    prior = None
    if journal is not None and journal.is_file():
        try:
            saved = json.loads(journal.read_text())
            if saved.get("labels") == list(labels) and saved.get("protocol") == protocol.to_dict():
                prior = saved["rounds"]
        except (ValueError, KeyError):
            prior = None  # an unreadable journal costs only its rounds
    bar = tqdm(total=None, desc=desc, unit="round", disable=not progress, leave=False,
               mininterval=0.5,
               dynamic_ncols=True)
    with tempfile.TemporaryDirectory(prefix="hwnas-") as tmp, contextlib.ExitStack() as stack:
        runners: list[Runner] = []
        for i, label in enumerate(labels):
            bar.set_postfix_str(f"compiling {i + 1}/{len(labels)}")
            module, shape = build(label)
            path = export_onnx(module, shape, Path(tmp) / f"item{i}.onnx")
            runners.append(stack.enter_context(compile_model(path, device, module=module)))
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

        stats = measure_interleaved(runners, protocol, prior_rounds=prior, on_round=on_round)
    bar.close()
    return dict(zip(labels, stats)), len(prior[0]) if prior else 0


@dataclass
class ProfileReport:
    table: LatencyTable
    measured_ops: int
    reused_ops: int
    calibrated: bool
    resumed_rounds: int = 0  # rounds taken over from an interrupted run's journal

    def to_dict(self) -> dict:
        cal = self.table.meta.get("calibration") or {}
        return {"table": str(self.table.path), "rows": len(self.table.rows),
                "measured_ops": self.measured_ops, "reused_ops": self.reused_ops,
                "calibrated_now": self.calibrated, "resumed_rounds": self.resumed_rounds,
                "calibration": {k: cal.get(k) for k in ("intercept_ms", "slopes",
                                                        "fit_max_abs_err_pct")}}


def open_table(root: Path, device: Device, space: SearchSpace, input_shape: Shape,
               protocol: Protocol) -> LatencyTable:
    """The table to extend: the existing one (checked) or a new, empty one."""
    path = table_path(root, device.name, space.name, input_shape)
    if not path.exists():
        return new_table(path, device, space.name, input_shape, protocol.to_dict())
    table = LatencyTable.load(path)
    want = {"device": device.name, "space": space.name, "input_shape": list(input_shape)}
    got = {k: table.meta.get(k) for k in want}
    if got != want:
        raise UserError(f"latency table {path} is for {got}, not {want}; move it away or pass "
                        "--tables DIR")
    return table


def profile(device: Device, space: SearchSpace, input_shape: Shape, root: Path,
            protocol: Protocol = Protocol(), calibration_n: int = 20, seed: int = 0,
            progress: bool = True) -> ProfileReport:
    """Measure every unique op key of `space` at `input_shape` that the table lacks, then
    calibrate on `calibration_n` whole random candidates (seeded). Resumes where it stopped."""
    if 0 < calibration_n < len(space.choice_names) + 2:
        raise UserError(f"--calibration-n must be 0 (no calibration) or at least "
                        f"{len(space.choice_names) + 2} (an intercept and a slope per choice)")
    table = open_table(root, device, space, input_shape, protocol)
    keys = {str(k): k for k in space.unique_op_keys(input_shape, device.precision)}
    todo = [k for k in keys if k not in table.rows]
    if todo and table.rows:
        diffs = fingerprint_diff(table.meta["fingerprint"], device.fingerprint())
        if diffs:
            raise UserError(f"latency table {table.path} was measured on another machine "
                            f"({'; '.join(diffs)}); adding rows here would mix machines: pass "
                            "--tables DIR to build a separate table")
    if todo:
        journal = table.path.with_suffix(".partial.json")
        stats, resumed = measure_labelled(todo, lambda k: (space.build_op(keys[k]), keys[k].in_shape),
                                          device, protocol, journal,
                                 desc=f"profiling {len(todo)} ops of {space.name}",
                                 progress=progress)
        table.rows.update(stats)
        table.meta["calibration"] = None  # the rows changed: the old fit no longer applies
        table.meta["fingerprint"] = device.fingerprint()
        table.meta["fingerprint_hash"] = fingerprint_hash(table.meta["fingerprint"])
        table.save()
        journal.unlink(missing_ok=True)
    else:
        resumed = 0
        # a run killed between saving its rows and removing its journal leaves one behind
        table.path.with_suffix(".partial.json").unlink(missing_ok=True)
    calibrated = False
    if table.meta.get("calibration") is None and calibration_n > 0:
        resumed += calibrate(table, device, space, input_shape, protocol, calibration_n, seed,
                             progress)
        calibrated = True
    return ProfileReport(table, len(todo), len(keys) - len(todo), calibrated, resumed)


def candidate_builder(space: SearchSpace, input_shape: Shape):
    """`build` for `measure_labelled` when the labels are arch strings of `space`."""
    return lambda label: (space.build(space.parse(label)), input_shape)


def calibration_archs(space: SearchSpace, n: int, seed: int) -> list[Arch]:
    """The uniform candidates (every layer one choice: the extremes give the fit leverage),
    then seeded random ones up to `n`."""
    uniform = [space.arch([c] * space.num_layers) for c in range(len(space.choice_names))]
    rest = space.sample_distinct(n - len(uniform), np.random.default_rng(seed),
                                 exclude={str(a) for a in uniform})
    return uniform + rest


def calibrate(table: LatencyTable, device: Device, space: SearchSpace, input_shape: Shape,
              protocol: Protocol, n: int, seed: int, progress: bool = True) -> int:
    """Measure `n` whole candidates and store the fitted calibration in the sidecar.
    Returns the rounds resumed from an interrupted calibration."""
    archs = calibration_archs(space, n, seed)
    labels = [str(a) for a in archs]
    journal = table.path.with_suffix(".calibration.partial.json")
    stats, resumed = measure_labelled(labels, candidate_builder(space, input_shape), device,
                                      protocol, journal,
                                      desc=f"calibrating on {n} candidates", progress=progress)
    cal = fit_calibration(space, table, input_shape, archs, [stats[l].best_ms for l in labels])
    table.meta["calibration"] = cal.to_dict()
    table.meta["calibration_seed"] = seed
    table.save()
    journal.unlink(missing_ok=True)
    return resumed

