"""`hwnas demo`: the main job end to end on the embedded defaults.

profile (reusing a committed LUT) → validate a few held-out candidates → a latency-budgeted
pick priced by the LUT (for now: the candidate with the most MACs under the budget among a
seeded sample) → export it, check it against torch, and measure it against the budget.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hwnas.backends import compile_model, compiled
from hwnas.devices import load_device
from hwnas.errors import UserError
from hwnas.export import check_export, export_onnx
from hwnas.latency.lookup import Drift, check_canary_mode, open_predictor
from hwnas.latency.predict import LutPredictor
from hwnas.latency.profile import candidate_builder, measure_opened, profile
from hwnas.latency.table import shape_text
from hwnas.latency.validate import budget_verdict, validate
from hwnas.measure import Protocol
from hwnas.spaces import count_macs, get_space


@dataclass
class DemoConfig:
    device: str = "cpu-ort-fp32"
    space: str = "det20"
    input_shape: tuple[int, ...] = (1, 3, 320, 320)
    tables: Path | None = None
    out: Path | None = None  # default: a new run folder
    canary: str = "correct"  # re-time the canary; price with the host's drift since the table
    budget_ms: float | None = None  # default: the median predicted latency of the sample
    validate_n: int = 5
    sample_n: int = 20000
    seed: int = 0
    protocol: Protocol = Protocol()
    progress: bool = True


def macs_grid(space, input_shape) -> tuple[float, np.ndarray]:
    """(fixed MACs, [layers, choices] MACs) from the same key walk the LUT uses."""
    fixed, grid = space.key_grid(input_shape)
    macs = {}
    for k in fixed + [k for row in grid for k in row]:
        if str(k) not in macs:
            macs[str(k)] = count_macs(space.build_op(k), k.in_shape)
    return (float(sum(macs[str(k)] for k in fixed)),
            np.array([[macs[str(k)] for k in row] for row in grid], dtype=np.float64))


def pick_most_macs(predictor: LutPredictor, budget_ms: float | None, n: int, seed: int):
    """Among `n` seeded random candidates, the one with the most MACs within `budget_ms`."""
    space = predictor.space
    archs = space.sample_many(n, np.random.default_rng(seed))
    lat = predictor.predict_many(archs)
    fixed, grid = macs_grid(space, predictor.input_shape)
    macs = fixed + grid[np.arange(archs.shape[1]), archs].sum(1)
    if budget_ms is None:
        # the median, rounded *up* to 3 significant digits: at least half the sample fits
        # (rounding to a fixed 0.01 ms fell below every candidate of a 0.03 ms space)
        median = float(np.median(lat))
        step = 10.0 ** (math.floor(math.log10(median)) - 2)
        budget_ms = round(math.ceil(median / step - 1e-9) * step, 12)
    predictor.require_feasible(budget_ms)
    fastest = predictor.fastest_ms()
    ok = np.flatnonzero(lat <= budget_ms)
    if not len(ok):
        raise UserError(f"none of {n} sampled candidates fits {budget_ms} ms (fastest possible "
                        f"{fastest:.3f} ms); raise --budget-ms")
    best = int(ok[np.argmax(macs[ok])])
    arch = space.arch(archs[best])
    return arch, float(lat[best]), float(macs[best]), budget_ms


def run_demo(cfg: DemoConfig) -> dict:
    """profile this host if it has no table (progress bar with ETA) → validate a few held-out
    candidates, timed with the table's reference candidates (the host's drift since the table
    was made) → pick under the budget, priced with that drift → export, check against torch,
    measure it interleaved with the references against the budget. The verdict allows for the host's change between pricing and
    measuring (the reference candidates' ratio, `host_shift_pct`); `keeps_budget_raw` ignores it."""
    from hwnas.latency.table import tables_dir
    from hwnas.runs import new_run_dir

    device, space = load_device(cfg.device), get_space(cfg.space)
    root = cfg.tables or tables_dir()
    out = cfg.out or new_run_dir("demo", f"{device.name}-{space.name}")
    prof = profile(device, space, cfg.input_shape, root, cfg.protocol, progress=cfg.progress)
    check_canary_mode(cfg.canary)
    predictor, _ = open_predictor(device, space, cfg.input_shape, root, protocol=cfg.protocol)
    if cfg.budget_ms is not None:  # before anything is measured
        predictor.require_feasible(cfg.budget_ms)
    table = predictor.table
    noise_file = table.path.parent / "noise.json"
    out_prefix = out / f"{space.name}_{shape_text(cfg.input_shape)}"
    # the held-out candidates and the drift's reference candidates in one interleaved
    # measurement (one protocol span instead of two)
    val = validate(predictor, device, cfg.validate_n, cfg.seed + 1000, out_prefix,
                   noise_file=noise_file, protocol=cfg.protocol, progress=cfg.progress,
                   canary=cfg.canary != "off")
    drift = Drift.from_dict(val.drift) if val.drift else None
    if drift is not None and cfg.canary == "correct":
        predictor = predictor.scaled(drift.ratio)
    arch, predicted, macs, budget = pick_most_macs(predictor, cfg.budget_ms, cfg.sample_n,
                                                   cfg.seed)
    model = space.build(arch)
    onnx_path = export_onnx(model, cfg.input_shape, out / f"{str(arch).replace(':', '_')}.onnx")
    check = check_export(model, onnx_path, cfg.input_shape)
    # the pick is timed interleaved with the drift's reference candidates: on a host whose speed
    # swings by 10% within minutes, they say how much the host changed between pricing and
    # verifying (a pick that is itself a reference is timed once)
    labels = list(dict.fromkeys([str(arch), *(drift.refs if drift else [])]))
    build = candidate_builder(space, cfg.input_shape)

    def open_runner(label: str):  # the pick as exported above (not exported again)
        return (compile_model(onnx_path, device, module=model) if label == str(arch)
                else compiled(*build(label), device))

    got = measure_opened(labels, open_runner, cfg.protocol, progress=False)
    measured = got.stats[str(arch)].best_ms
    shift = drift.shift({k: got.stats[k].best_ms for k in labels[1:]}) if drift else 1.0
    verdict = budget_verdict(measured, budget, noise_file, shift)
    return {
        "device": device.name, "space": space.name, "input_shape": list(cfg.input_shape),
        "host": table.host, "out": str(out),
        "profile": prof.to_dict(), "drift": drift.to_dict() if drift else None,
        "validation": val.to_dict(),
        "pick": {"arch": str(arch), "macs_m": round(macs / 1e6, 2), "budget_ms": budget,
                 "predicted_ms": round(predicted, 4), "measured_ms": round(measured, 4),
                 "error_pct": round((predicted / measured - 1) * 100, 2),
                 "onnx": str(onnx_path), "onnx_max_rel_err_vs_torch": check.rel_err,
                 "tolerance_pct": verdict["tolerance_pct"],
                 "host_shift_pct": verdict["host_shift_pct"],
                 "keeps_budget": verdict["keeps_budget"],
                 "keeps_budget_raw": verdict["keeps_budget_raw"],
                 "contention": got.contention.to_dict()},
        "seed": cfg.seed,
    }
