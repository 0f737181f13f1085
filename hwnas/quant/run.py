"""`hwnas quantize`, as a library call: price, check the budget, weigh sensitivity, assign,
realise, measure, score.

`run_quantize(cfg)` does, in order (the cheap refusals first, before any heavy work):

1. the device must run int8; the candidate's mixed table must exist on this host;
2. the checkpoint must be of this candidate (`hwnas.quant.target.load_target`);
3. the budget must be at least the fastest assignment's predicted latency (the ILP with latency
   as its objective), else a one-line error naming it; where the fastest is all fp32, int8
   does not pay on this host and the result says so;
4. sensitivity: Hessian traces and Ω (cached per checkpoint and settings), and, once, the
   measured single-unit drops with their rank correlation;
5. the method's assignment (ILP by default; greedy and random for comparison);
6. the realised QDQ model, calibrated on real training images, written atomically to the
   output with a JSON sidecar;
7. its latency with the protocol (the file itself when the checkpoint is the priced model, else
   its latency twin), interleaved with the table's canary, and the budget verdict; its metric
   on the evaluation split.

`compare_assignments` realises, times and scores several assignments together: what
``--compare`` and `tools/bench_quant.py` use for the latency–accuracy plane.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hwnas.devices import Device, load_device
from hwnas.errors import UserError
from hwnas.fileio import atomic_write_text, check_writable
from hwnas.latency.table import host_dir
from hwnas.latency.validate import budget_verdict, noise_tolerance_pct
from hwnas.locks import output_lock
from hwnas.measure import MIXED_ESTIMATE, Protocol
from hwnas.quant.assign import METHODS, Problem, choose, choose_k, fastest, fastest_k
from hwnas.quant.latency import (MARGIN_QUANTILE, MixedPredictor, WholeModels, assign_label,
                                 band_evidence, load_mixed, margin_evidence, measure_runners,
                                 profile_mixed, time_references, under_quantile_pct)
from hwnas.quant.realise import assignment_device, realise
from hwnas.quant.sensitivity import (DEFAULT_OBJECTIVE, Sensitivity, hessian_sensitivity,
                                     measure_drops)
from hwnas.quant.units import PrecisionSpace, device_precisions
from hwnas.spaces import get_space
from hwnas.spaces.base import Arch, SearchSpace, Shape


@dataclass
class QuantizeConfig:
    device: str
    space: str
    arch: str
    ckpt: Path | None = None
    budget_ms: float | None = None
    output: Path | None = None
    size_mb: float | None = None
    input_shape: Shape | None = None
    tables: Path | None = None
    host: str | None = None
    strict: bool = False
    method: str = "ilp"
    precisions: tuple[str, ...] | None = None  # a subset of the device's (default: all)
    assignment: str | None = None  # realise this assignment (``ffii…``) instead of choosing
    data: str | None = None
    calibration_images: int = 64  # real training images the quantiser calibrates on
    hutchinson_samples: int = 48
    hutchinson_batches: int = 12
    hessian_batch_size: int = 16
    drop_split: str = "val"  # where single-unit drops are measured
    drop_images: int | None = None  # that split of the generated data drawn with so many
    objective: str = DEFAULT_OBJECTIVE  # what the methods minimise: `Sensitivity.costs`
    eval_split: str = "test"  # where the realised model's metric is reported
    measure: bool = True
    compare: bool = False
    force: bool = False
    fresh_sensitivity: bool = False
    seed: int = 0
    # a new mixed table's statistic (hwnas.measure): mixed tables read the interleaved
    # whole assignments jointly (MIXED_ESTIMATE); an existing table's own is used against it
    protocol: Protocol = field(default_factory=lambda: Protocol(estimate=MIXED_ESTIMATE))
    progress: bool = True
    margin_pct: float | None = None  # choose under budget / (1 + margin); None: the table's own
    canary: str = "correct"  # off | report | correct: time the table's references first
    repair: int = 2  # re-choose at most this many times when the pick measures over budget
    verify: int = 0  # time this many of the method's best answers near the budget (0: off)


def choice_budget(pred: MixedPredictor, budget_ms: float, margin_pct: float | None,
                  fast: Arch) -> tuple[float, float, str]:
    """(the budget the methods choose under, the margin in %, where the margin came from):
    ``budget / (1 + margin)``, the margin given or the table's own (`margin_evidence`). A
    budget below the fastest assignment `fast`, or within the margin of it, is a `UserError`
    naming the lowest budget that can be kept."""
    fast_ms = pred.predict(fast)
    if budget_ms < fast_ms - 1e-9:
        raise UserError(f"budget {budget_ms:g} ms is infeasible: below the fastest precision "
                        f"assignment of {pred.ps.arch} the mixed table can price "
                        f"({pred.ps.text(fast)}, {fast_ms:.3f} ms); raise --budget-ms to at "
                        f"least {fast_ms:.3f}")
    if margin_pct is None:
        margin, source = margin_evidence(pred)
    else:
        margin, source = float(margin_pct), "--margin"
    under = budget_ms / (1 + margin / 100)
    if under < fast_ms - 1e-9:
        raise UserError(f"budget {budget_ms:g} ms is within the {margin:.1f}% margin of the "
                        f"fastest assignment ({pred.ps.text(fast)}, {fast_ms:.3f} ms) that the "
                        "table's own error calls for; raise --budget-ms to at least "
                        f"{fast_ms * (1 + margin / 100):.3f}, or pass --margin 0 to choose "
                        "under the budget as priced")
    return under, margin, source


def repaired_under(predicted_ms: float, measured_ms: float, budget_ms: float) -> float:
    """What a method must choose under after its pick, priced `predicted_ms`, measured
    `measured_ms` (at the host's speed when priced) over `budget_ms`: that price scaled by
    budget / measured. An assignment mis-priced as the pick was (the table's error near the
    fastest) then lands within the budget, and the pick itself, priced above it, is out."""
    return predicted_ms * budget_ms / measured_ms


NEAREST = 6  # assignments the measured search times where the table has nothing faster


def verify_picks(prob: Problem, tasks: dict, measured: dict[str, float], measure, k: int,
                 band_pct: float, guard_pct: float, size_mb: float | None = None,
                 seed: int = 0) -> tuple[dict, dict]:
    """The verified choice: let timing decide among the answers the table cannot tell apart.

    `tasks` maps a key to (budget_ms, under_ms: the price the method chose under, method,
    its pick's text or None); `measured` and `measure` as in `repair_picks` (at the host's
    speed when priced). For each task, the method's `k` best answers (`choose_k`) priced
    within ``under × (1 + band_pct/100)`` (`band_evidence`: how much the table over-prices,
    by its own validation) are timed with its pick, and the one of least perturbation among
    those timed within ``budget / (1 + guard_pct/100)`` (the pick itself: within the budget)
    is taken, the faster as timed on a tie. So the pick gives way to an answer of less
    perturbation that ran within that, or, when over its budget, to any that did; else it
    stays (and `repair_picks` may follow).

    Why: the table's error (a few %) is larger than the price differences between many
    assignments, so an answer priced just above the budget may run well within it. On the
    detector (cpu-ort-int8-noprop, 2026-11-23 10:56) random search's ``…fifffiif``, priced
    2.837 ms, ran 2.795, faster than the ILP's pick at the tightest budget (priced 2.824); the
    ILP never looked at it. The guard is the timing's own noise floor (the budget verdict's
    tolerance, the other way): another answer is taken for a fast timing, so its next one is
    likely slower. With the table's margin as the guard instead (0.5% on the detector), a
    sweep at 11:22 took answers that had run 0.5-2% fast and missed 6 of 20 budgets in the
    fresh timing, against none without the verified choice. Returns (key → final text, key →
    [one dict: every candidate's timing, the bound, the pick] where verified)."""
    ps = prob.ps
    cands = {}
    for key, (budget, under, method, t) in tasks.items():
        if t is None:
            continue
        got = choose_k(prob, method, k, under * (1 + band_pct / 100), size_mb, seed)
        cands[key] = list(dict.fromkeys([t] + [ps.text(a) for a in got]))
    new = list(dict.fromkeys(t for ts in cands.values() for t in ts if t not in measured))
    measured = dict(measured)
    if new:
        measured.update(measure(new))
    final = {key: t for key, (_, _, _, t) in tasks.items()}
    history: dict = {key: [] for key in tasks}
    for key, pool in cands.items():
        budget, _, _, pick = tasks[key]
        within = budget / (1 + guard_pct / 100)
        keep = [t for t in pool
                if measured[t] <= within or (t == pick and measured[t] <= budget)]
        if keep:
            final[key] = min(keep, key=lambda t: (float(prob.perturbation(
                ps.parse(t).choices)[0]), measured[t]))
        history[key].append({"verified": {t: measured[t] for t in pool},
                             "within_ms": within, "assignment": final[key],
                             "keeps": bool(keep)})
    return final, history


def repair_picks(prob: Problem, tasks: dict, measured: dict[str, float], measure, rounds: int,
                 size_mb: float | None = None, seed: int = 0, nearest: int = NEAREST
                 ) -> tuple[dict, dict]:
    """Choose again where a pick measured over its budget, at most `rounds` times.

    `tasks` maps a key to (budget_ms, method, assignment text or None); `measured` holds the
    picks' first timing (text → ms) and `measure(texts)` times new picks (realised, with the
    protocol), both at the host's speed when the prices were made (`time_texts`): what the
    repair corrects is the table's error, not a slow spell of the host after pricing, which
    no other assignment would escape (the budget verdict allows for that). Every round
    re-chooses, under `repaired_under`, each task whose pick is over budget, then times the
    new picks together. A task whose method finds nothing under its repaired price keeps its
    pick, and then, if it is still over, goes to a measured search: the `nearest` fastest
    assignments as priced are timed, and the one of least perturbation among those that keep
    the budget is taken (the fastest as measured where none does). Near the fastest the
    table's error (a few %) exceeds the price differences between assignments, so there only
    timing them tells which are faster. Returns (key → final text, key → the repairs: one dict
    per round with the pick, its price and measurement, and the price chosen under; a measured
    search adds one with every candidate's timing). The caller times the final picks afresh
    for its verdict: the measurement that ended the loop was selected by it."""
    ps = prob.ps
    current = {k: t for k, (_, _, t) in tasks.items()}
    history: dict = {k: [] for k in tasks}
    measured = dict(measured)
    for _ in range(rounds):
        # over budget, and not already found to have nothing faster under the same price
        redo = [k for k, t in current.items() if t and measured[t] > tasks[k][0]
                and not (history[k] and not history[k][-1]["found"])]
        if not redo:
            break
        for k in redo:
            budget, method, t = tasks[k][0], tasks[k][1], current[k]
            price = prob.latency_ms(ps.parse(t).choices)[0]
            under = repaired_under(float(price), measured[t], budget)
            a = choose(prob, method, under, size_mb, seed)
            history[k].append({"assignment": t, "predicted_ms": float(price),
                               "measured_ms": measured[t], "chosen_under_ms": under,
                               "found": a is not None})
            if a is not None:
                current[k] = ps.text(a)
        new = [t for t in dict.fromkeys(current[k] for k in redo) if t not in measured]
        if not new:
            break
        measured.update(measure(new))
    stuck = [k for k, t in current.items() if t and measured[t] > tasks[k][0]
             and history[k] and not history[k][-1]["found"]]
    if stuck and nearest:
        cands = [ps.text(a) for a in fastest_k(prob, nearest, size_mb)]
        new = [t for t in cands if t not in measured]
        if new:
            measured.update(measure(new))
        for k in stuck:
            budget, pool = tasks[k][0], list(dict.fromkeys(cands + [current[k]]))
            keep = [t for t in pool if measured[t] <= budget]
            if keep:  # least perturbation, then the faster as measured
                best = min(keep, key=lambda t: (float(prob.perturbation(
                    ps.parse(t).choices)[0]), measured[t]))
            else:
                best = min(pool, key=lambda t: measured[t])
            history[k].append({"measured_search": {t: measured[t] for t in pool},
                               "assignment": best, "keeps": bool(keep)})
            current[k] = best
    return current, history


def parse_arch(space: SearchSpace, text: str) -> Arch:
    """`text` as an arch of `space`: ``<space>:<tokens>``, or the tokens under the name of the
    same base space at any width (``det20:…`` for det20-fcos-w0.5, as checkpoints write it)."""
    from hwnas.train.supernet import base_name

    prefix, sep, tokens = text.strip().rpartition(":")
    own = getattr(space, "backbone", space)
    if sep and prefix != space.name:
        try:
            other = get_space(prefix)
        except UserError:
            other = None
        if other is None or base_name(other.name) != base_name(own.name):
            raise UserError(f"arch {text!r} is not a candidate of {space.name}; write it as "
                            f"{space.name}:<tokens> (or {base_name(own.name)}:<tokens>)")
    return space.parse(f"{space.name}:{tokens if sep else text.strip()}")


def _precision_space(cfg: QuantizeConfig) -> tuple[Device, PrecisionSpace]:
    from hwnas.quant.units import PRECISION_CODES

    device = load_device(cfg.device)
    precisions = device_precisions(device)
    if cfg.precisions:
        bad = [p for p in cfg.precisions if p not in PRECISION_CODES]
        if bad:
            raise UserError(f"unknown precision {bad[0]!r}; known: {', '.join(PRECISION_CODES)}")
        bad = [p for p in cfg.precisions if p not in precisions]
        if bad:
            raise UserError(f"device {device.name} cannot run {bad[0]} (it runs "
                            f"{', '.join(precisions)})")
        if "int8" not in cfg.precisions:
            raise UserError("--precisions must include int8 (mixed precision here is int8 "
                            "against the float precisions)")
        precisions = tuple(p for p in precisions if p == "fp32" or p in cfg.precisions)
    space = get_space(cfg.space)
    arch = parse_arch(space, cfg.arch)
    shape = tuple(cfg.input_shape or space.default_input)
    try:
        space.op_keys(arch, shape)
    except ValueError as e:  # a detector space is built for one input size
        raise UserError(f"space {space.name}: {e}") from None
    return device, PrecisionSpace(space, arch, shape, precisions)


def _root(cfg: QuantizeConfig) -> Path:
    from hwnas.latency.table import tables_dir

    return Path(cfg.tables) if cfg.tables else tables_dir()


def whole_models(target, ps: PrecisionSpace, workdir: Path, seed: int = 0) -> WholeModels:
    """Whole models for timing: the trained checkpoint (when it is the priced model) on a
    real training image, else fresh seeded weights on a real training image resized."""
    feed = target.calibration_feeds(1, seed + 101, ps.input_shape)[0]
    if target.matches_priced:
        path = Path(workdir) / "whole-fp32.onnx"
        if not path.is_file():
            target.export(path)
        return WholeModels(path, feed, f"the trained checkpoint {target.ckpt} (sha256 "
                           f"{target.identity()['ckpt_sha256'][:12]}) on a real training image")
    return WholeModels(None, feed, "fresh seeded weights on a real training image (resized "
                       f"from {target.ckpt})")


def _whole_for(cfg: QuantizeConfig, ps: PrecisionSpace, workdir: Path) -> WholeModels:
    from hwnas.quant.target import load_target

    if cfg.ckpt is None:
        return WholeModels()
    target = load_target(Path(cfg.ckpt), ps.base, ps.arch, ps.input_shape, cfg.data)
    return whole_models(target, ps, workdir, cfg.seed)


def run_profile(cfg: QuantizeConfig, calibration_n: int = 24, require_quiet: bool = False
                ) -> dict:
    device, ps = _precision_space(cfg)
    with tempfile.TemporaryDirectory(prefix="hwnas-quant-") as tmp:
        rep = profile_mixed(device, ps, _root(cfg), cfg.protocol, calibration_n, cfg.seed,
                            cfg.progress, require_quiet, _whole_for(cfg, ps, Path(tmp)))
    return rep.to_dict()


def run_validate(cfg: QuantizeConfig, n: int, out: Path | None, publish: bool,
                 group: int = 25, require_quiet: bool = False, quiet_retries: int = 0):
    from hwnas.quant.latency import MixedTable, mixed_table_path, validate_mixed
    from hwnas.runs import new_run_dir

    device, ps = _precision_space(cfg)
    root = _root(cfg)
    table = load_mixed(root, device, ps, cfg.host, cfg.strict)
    pred = MixedPredictor(table, ps)
    if publish:
        prefix = mixed_table_path(root, device, ps).with_suffix("")
    else:
        prefix = out or new_run_dir("quantize", "validate") / "mixed"
    with tempfile.TemporaryDirectory(prefix="hwnas-quant-") as tmp:
        whole = _whole_for(cfg, ps, Path(tmp))
        if whole.what != table.meta.get("whole_models", WholeModels().what):
            emit_warning(f"the table's whole models were {table.meta.get('whole_models')!r}; "
                         f"these are {whole.what!r}")
        rep = validate_mixed(pred, device, n, cfg.seed + 1, Path(prefix),
                             host_dir(root, device) / "noise.json", cfg.protocol, group,
                             cfg.progress, require_quiet, whole, quiet_retries)
    if publish:  # the held-out evidence the table's margin is taken from (`margin_evidence`)
        import csv

        with open(rep.csv, newline="") as f:
            rows = list(csv.DictReader(f))
        with output_lock(table.path):
            now = MixedTable.load(table.path)
            if now.meta.get("calibration") != table.meta.get("calibration"):
                raise UserError(f"{table.path} was re-profiled while this validation ran; its "
                                "CSV is written but not recorded in the table: validate again")
            record_validation(now, rows, rep)
    return rep


def record_validation(table, rows: list[dict], rep) -> None:
    """Write a published validation's margin evidence (`margin_evidence`) into `table`'s
    sidecar: the under-prediction at `MARGIN_QUANTILE`, as priced and drift-corrected."""
    from hwnas.latency.table import now_iso

    meas = [float(r["measured_ms"]) for r in rows]
    table.meta["validation"] = {
        "csv": Path(rep.csv).name, "n": len(rows), "measured": now_iso(),
        "quantile": MARGIN_QUANTILE,
        "under_pct": under_quantile_pct(meas, [float(r["predicted_ms"]) for r in rows]),
        "corrected_under_pct": under_quantile_pct(
            meas, [float(r["canary_corrected_ms"]) for r in rows]),
        "within_5pct": rep.within_5pct,
        "corrected_within_5pct": (rep.canary_corrected or {}).get("within_5pct"),
        "what": "measured / priced - 1 at that quantile, in %, as priced and with the "
                "references' drift taken out"}
    table.save()


# ---- sensitivity, cached ---------------------------------------------------------------------------
SENSITIVITY_VERSION = 2  # bump when what a cached sensitivity holds changes


def _cache_dir() -> Path:
    from hwnas.data import cache_dir

    return cache_dir() / "quant"


def sensitivity_for(target, ps: PrecisionSpace, device: Device, cfg: QuantizeConfig,
                    fp32_onnx: Path, workdir: Path) -> tuple[Sensitivity, Path]:
    """The checkpoint's sensitivity (from the cache when the same checkpoint, candidate,
    quantiser options and settings made it before)."""
    key = {**target.identity(), "version": SENSITIVITY_VERSION, "precisions": list(ps.precisions),
           "quantiser": {k: v for k, v in device.options.items() if k.startswith("int8_")},
           "samples": cfg.hutchinson_samples, "batches": cfg.hutchinson_batches,
           "batch_size": cfg.hessian_batch_size, "seed": cfg.seed,
           "calibration_images": cfg.calibration_images, "drop_split": cfg.drop_split,
           **({"drop_images": cfg.drop_images} if cfg.drop_images else {})}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = _cache_dir() / f"sensitivity-{digest}.json"
    if path.is_file() and not cfg.fresh_sensitivity:
        try:
            doc = json.loads(path.read_text())
            if doc.get("key") == key:
                return Sensitivity.from_dict(doc["sensitivity"]), path
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is recomputed
    s = hessian_sensitivity(target, ps, cfg.hutchinson_samples, cfg.hutchinson_batches,
                            cfg.hessian_batch_size, cfg.seed, cfg.progress)
    feeds = target.calibration_feeds(cfg.calibration_images, cfg.seed)
    s.metric = target.metric_name
    s.base_metric, s.drop = measure_drops(target, ps, device, fp32_onnx, feeds, cfg.drop_split,
                                          workdir, cfg.progress, cfg.drop_images)
    s.drop_split = cfg.drop_split
    s.settings["drop_images"] = cfg.drop_images
    s.correlate()
    atomic_write_text(path, json.dumps({"key": key, "sensitivity": s.to_dict()}, indent=1))
    return s, path


# ---- realise + time + score several assignments ----------------------------------------------------
@dataclass
class Scored:
    name: str
    assignment: str
    predicted_ms: float
    measured_ms: float | None = None
    metric: float | None = None
    size_mb: float | None = None  # of the realised file
    path: str | None = None


def latency_of(target, ps: PrecisionSpace) -> str:
    return ("the realised file" if target.matches_priced else
            f"its latency twin: {ps.base.name} {ps.arch} @ {'x'.join(map(str, ps.input_shape))} "
            "with the same assignment and quantiser (the checkpoint is a proxy of it)")


def realise_all(target, ps: PrecisionSpace, device: Device, texts: list[str], workdir: Path,
                cfg: QuantizeConfig, progress: bool = False
                ) -> tuple[dict[str, Path], dict[str, Path]]:
    """(realised file, file to time) per assignment text: the checkpoint's model calibrated on
    real training images; the file to time is that file, or its latency twin (the priced
    candidate, realised the same way on the same images resized) when the checkpoint is a
    proxy of the priced model."""
    from tqdm import tqdm

    workdir = Path(workdir)
    fp32 = workdir / "fp32.onnx"
    if not fp32.is_file():
        target.export(fp32)
    feeds = target.calibration_feeds(cfg.calibration_images, cfg.seed)
    files, timed = {}, {}
    twin_fp32 = twin_feeds = None
    if not target.matches_priced:
        from hwnas.export import export_onnx

        twin_fp32 = workdir / "twin.onnx"
        if not twin_fp32.is_file():
            export_onnx(ps.base.build(ps.arch), ps.input_shape, twin_fp32)
        twin_feeds = target.calibration_feeds(min(cfg.calibration_images, 16), cfg.seed,
                                              ps.input_shape)
    for t in tqdm(texts, desc="realising", unit="model", file=sys.stderr,
                  disable=not progress, leave=False, dynamic_ncols=True):
        a = ps.parse(t)
        files[t] = workdir / f"q-{t}.onnx"
        if not files[t].is_file():
            realise(fp32, files[t], device, ps, a, feeds)
        timed[t] = files[t]
        if twin_fp32 is not None:
            timed[t] = workdir / f"twin-{t}.onnx"
            if not timed[t].is_file():
                realise(twin_fp32, timed[t], device, ps, a, twin_feeds)
    return files, timed


def compare_assignments(target, ps: PrecisionSpace, device: Device, pred: MixedPredictor,
                        assigns: dict[str, Arch], workdir: Path, cfg: QuantizeConfig,
                        keep: dict[str, Path] | None = None) -> tuple[list[Scored], dict]:
    """Realise every distinct assignment (real calibration), time them all interleaved with the
    table's canary (the realised files, or their latency twins when the checkpoint is a proxy),
    and score each on `cfg.eval_split`. `keep[name]` is where to leave that realised file.
    Returns the rows and the measurement's record (contention, drift)."""
    workdir = Path(workdir)
    texts = {name: ps.text(a) for name, a in assigns.items()}
    distinct = list(dict.fromkeys(texts.values()))
    files, timed = realise_all(target, ps, device, distinct, workdir, cfg)
    record: dict = {"latency_of": latency_of(target, ps)}
    measured: dict[str, float] = {}
    if cfg.measure:
        measured, timing = time_files(ps, device, pred, timed, cfg.protocol, workdir,
                                      progress=cfg.progress,
                                      whole=whole_models(target, ps, workdir, cfg.seed))
        record.update(timing)
    metrics = {t: target.evaluate(files[t], cfg.eval_split) for t in distinct}
    rows = []
    for name, t in texts.items():
        a = ps.parse(t)
        dest = files[t]
        if keep and name in keep:
            import shutil

            from hwnas.fileio import atomic_path

            with atomic_path(Path(keep[name]), ".onnx") as tmp:
                shutil.copyfile(files[t], tmp)
            dest = Path(keep[name])
        rows.append(Scored(name, t, pred.predict(a), measured.get(t), metrics[t],
                           files[t].stat().st_size / 1e6, str(dest)))
    return rows, record


def time_texts(target, ps: PrecisionSpace, device: Device, pred: MixedPredictor,
               texts: list[str], workdir: Path, cfg: QuantizeConfig, group: int = 60,
               priced_at=None, raw: dict[str, float] | None = None) -> dict[str, float]:
    """Realise `texts` (or reuse their files in `workdir`) and time them with the protocol,
    `group` at a time (`time_files`): assignment text → ms at the host's speed when the prices
    were made, each measurement divided by the host's change since (`measuring_shift` from the
    references timed with it; `priced_at`: the drift the prices were scaled by, if any). The
    measurements as timed go into `raw` when given."""
    _, timed = realise_all(target, ps, device, list(texts), workdir, cfg)
    measured, record = time_files(ps, device, pred, timed, cfg.protocol, workdir, group,
                                  cfg.progress, whole_models(target, ps, workdir, cfg.seed))
    if raw is not None:
        raw.update(measured)
    return {t: ms / measuring_shift(record, t, priced_at) for t, ms in measured.items()}


def time_files(ps: PrecisionSpace, device: Device, pred: MixedPredictor, files: dict[str, Path],
               protocol: Protocol, workdir: Path, group: int = 60, progress: bool = True,
               whole: WholeModels = WholeModels()) -> tuple[dict[str, float], dict]:
    """Time the QDQ `files` (assignment text → file) with the protocol on `whole.feed`, `group`
    at a time interleaved with the table's reference assignments (the canary, the all-fp32
    assignment, first; built as `whole` says); their latencies and a record of the host's
    contention and drift (``ratio`` per file: its group's references now / in the table)."""
    from hwnas.backends import compile_model
    from hwnas.latency.lookup import drift_from, drift_over, references
    from hwnas.measure import Contention
    from hwnas.quant.latency import Builder, SameFeed, table_protocol

    protocol = table_protocol(pred.table, protocol)
    has_canary = bool(pred.table.meta.get("canary"))
    # the table's reference assignments (the canary first), or the canary alone without one
    refs = list(references(pred.table)) if has_canary else [assign_label(ps, ps.canary())]
    builder = Builder(ps, device, Path(workdir), whole)

    def open_runner(label: str):
        if not label.startswith("file:"):
            return builder(label)
        # the assignment's own device: a realised QDQ file runs as it is, and an all-fp32
        # one must not be quantised at compile time by an int8 device
        text = label[5:]
        r = compile_model(files[text], assignment_device(device, ps, ps.parse(text)))
        return SameFeed(r, whole.feed) if whole.feed is not None else r

    texts = list(files)
    measured: dict[str, float] = {}
    ratios: dict[str, float] = {}
    group_of: dict[str, int] = {}
    parts, now = [], []
    for start in range(0, len(texts), group):
        chunk = [f"file:{t}" for t in texts[start:start + group]]
        got = measure_runners(chunk + refs, open_runner, protocol,
                              desc=f"timing {start + len(chunk)}/{len(texts)}", progress=progress)
        measured.update({lb[5:]: got.stats[lb].best_ms for lb in chunk})
        parts.append(got.contention)
        now.append({r: got.stats[r].best_ms for r in refs})
        if has_canary:
            r = drift_from(pred.table, now[-1]).ratio
            ratios.update({lb[5:]: r for lb in chunk})
        group_of.update({lb[5:]: len(now) - 1 for lb in chunk})
    record: dict = {"contention": Contention.combine(parts).to_dict(), "groups": len(parts),
                    "whole_models": whole.what,
                    # the references as timed with each group, and each file's group
                    "refs_now": now, "group_of": group_of}
    if has_canary:
        record["drift"] = drift_over(pred.table, now).to_dict()
        record["ratio"] = ratios
    return measured, record


def measuring_shift(record: dict | None, text: str, priced_at=None) -> float:
    """The host's change between pricing and measuring assignment `text` (`time_files`'s
    record): since the table, from the references timed with it; or, when the prices were
    scaled by a drift timed before choosing (`priced_at`, a `Drift`), since then."""
    record = record or {}
    if priced_at is not None and text in record.get("group_of", {}):
        return priced_at.shift(record["refs_now"][record["group_of"][text]])
    return record.get("ratio", {}).get(text, 1.0)


def pareto_plot(rows: list[dict], path: Path, title: str, metric: str,
                budgets: list[float] | None = None) -> None:
    """Measured latency vs metric, one colour per method (uniform fp32/int8 as stars)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hwnas.fileio import atomic_path

    # the ILP last and filled, the baselines hollow: where they pick the same point, both show
    style = {"random": ("tab:green", "^"), "greedy": ("tab:orange", "s"),
             "fp32": ("black", "*"), "int8": ("tab:red", "*"), "ilp": ("tab:blue", "o")}
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    for name, (color, marker) in style.items():
        pts = [(r["measured_ms"], r["metric"]) for r in rows
               if r["name"] == name and r.get("measured_ms") is not None]
        if pts:
            xs, ys = zip(*sorted(pts))
            hollow = name in ("greedy", "random")
            ax.scatter(xs, ys, marker=marker, s=60 if marker == "*" else 40 if hollow else 18,
                       facecolors="none" if hollow else color, edgecolors=color,
                       label={"fp32": "uniform fp32", "int8": "uniform int8"}.get(name, name),
                       zorder=4 if name == "ilp" else 3, alpha=0.9)
            fx, fy = [], []  # its front: the best metric reached at or below each latency
            for x, y in sorted(set(pts)):
                if not fy or y > fy[-1]:
                    fx.append(x)
                    fy.append(y)
            if len(fx) > 1 and marker != "*":
                ax.step(fx + [max(xs)], fy + [fy[-1]], where="post", c=color, alpha=0.6,
                        lw=1.6 if name == "ilp" else 1, ls="-" if name == "ilp" else "--")
    for b in budgets or []:
        ax.axvline(b, color="grey", lw=0.3, alpha=0.4)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel(metric)
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(Path(path), ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ---- the command ------------------------------------------------------------------------------------
def _int8_notes(ps: PrecisionSpace, pred: MixedPredictor, fast: Arch) -> list[str]:
    """What the table says about int8 here, in measured terms."""
    fp32_ms, int8_ms, fast_ms = (pred.predict(ps.canary()), pred.predict(ps.uniform("int8")),
                                 pred.predict(fast))
    notes = []
    if ps.text(fast) == ps.text(ps.canary()):
        notes.append(f"int8 does not pay for this candidate on this host: the fastest assignment "
                     f"is all fp32 ({fp32_ms:.3f} ms; all int8 {int8_ms:.3f} ms); the ILP keeps "
                     "fp32")
    else:
        int8_units = [u.name for u, p in zip(ps.units, ps.unit_precisions(fast)) if p == "int8"]
        notes.append(f"fastest assignment {ps.text(fast)} at {fast_ms:.3f} ms (all fp32 "
                     f"{fp32_ms:.3f} ms, all int8 {int8_ms:.3f} ms): int8 pays in "
                     f"{len(int8_units)} of {len(ps.units)} units")
    return notes


def run_quantize(cfg: QuantizeConfig) -> dict:
    from hwnas.latency.lookup import check_canary_mode
    from hwnas.quant.target import load_target

    if cfg.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, not {cfg.method!r}")
    check_canary_mode(cfg.canary)
    if cfg.ckpt is None or cfg.output is None or (cfg.budget_ms is None
                                                  and cfg.assignment is None):
        raise UserError("give --ckpt, --budget-ms (or --assignment) and -o (or --profile / "
                        "--validate N)")
    out = Path(cfg.output)
    if out.suffix != ".onnx":
        raise UserError(f"output {str(out)!r} should end in .onnx")
    if out.exists() and not cfg.force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    check_writable(out)
    device, ps = _precision_space(cfg)
    given = ps.parse(cfg.assignment) if cfg.assignment is not None else None
    # the checkpoint first: a checkpoint of another arch is the mistake to name, not the
    # missing table of the arch it was given with
    target = load_target(Path(cfg.ckpt), ps.base, ps.arch, ps.input_shape, cfg.data)
    target.check_draw(cfg.drop_split, cfg.drop_images)
    table = load_mixed(_root(cfg), device, ps, cfg.host, cfg.strict)
    pred = MixedPredictor(table, ps)
    counts = ps.weight_counts()
    free = Problem.build(pred, np.zeros((len(ps.units), pred.unit_ms.shape[1])), counts)
    fast = fastest(free, cfg.size_mb)
    if fast is None:  # only the size can make the program infeasible without a budget
        smallest = float(np.nansum(np.nanmin(free.size_bytes, axis=1))) / 1e6
        raise UserError(f"no assignment fits --size-mb {cfg.size_mb:g}: the smallest is "
                        f"{smallest:.3f} MB (every unit at its narrowest precision)")
    fast_ms = pred.predict(fast)
    under = margin = source = drift = None
    if cfg.budget_ms is not None:  # refused at once, before any timing
        under, margin, source = choice_budget(pred, cfg.budget_ms, cfg.margin_pct, fast)
    from hwnas.backends.ort import disabled_optimizers

    off = disabled_optimizers(device)
    # the measured latency holds only in a session configured the same way
    deploy = [f"deploy with onnxruntime.InferenceSession(..., disabled_optimizers={off!r}), "
              f"as {device.name} times it"] if off else []
    notes = _int8_notes(ps, pred, fast) + deploy
    with output_lock(out), tempfile.TemporaryDirectory(prefix="hwnas-quant-") as tmp:
        work = Path(tmp)
        fp32 = target.export(work / "fp32.onnx")
        sens, sens_path = sensitivity_for(target, ps, device, cfg, fp32, work)
        if cfg.canary != "off" and cfg.measure and given is None:
            # price with the host's speed now: the references timed first (seconds)
            drift = time_references(pred, device, cfg.protocol,
                                    whole_models(target, ps, work, cfg.seed))
            if cfg.canary == "correct":  # one factor on every price: the fastest stays fastest
                pred = pred.scaled(drift.ratio)
                fast_ms = pred.predict(fast)
                notes = _int8_notes(ps, pred, fast) + deploy
                if cfg.budget_ms is not None:
                    try:
                        under, margin, source = choice_budget(pred, cfg.budget_ms,
                                                              cfg.margin_pct, fast)
                    except UserError as e:
                        raise UserError(f"{e} (prices scaled by the host's drift of "
                                        f"{100 * (drift.ratio - 1):+.1f}% since the table, its "
                                        "references timed just now; --canary report keeps "
                                        "them as the table has them)") from None
        corrected = drift is not None and cfg.canary == "correct"
        priced_at = drift if corrected else None  # what measuring_shift measures from
        prob = Problem.build(pred, sens.omega_matrix(ps, cfg.objective), counts)
        method = "given" if given is not None else cfg.method
        chosen: dict[str, Arch] = {"given": given} if given is not None else {}
        if cfg.budget_ms is not None:
            for m in (list(METHODS) if cfg.compare else [] if given else [cfg.method]):
                a = choose(prob, m, under, cfg.size_mb, cfg.seed)
                if a is not None:
                    chosen[m] = a
        for m in (METHODS if cfg.compare and cfg.budget_ms is not None else ()):
            if m not in chosen:
                notes.append(f"{m} found no assignment within {under:.3f} ms")
        if method not in chosen:
            raise UserError(f"method {cfg.method} found no assignment within {under:.3f} ms "
                            f"(--budget-ms {cfg.budget_ms:g} less the {margin:.1f}% margin; "
                            f"the ILP does: fastest {fast_ms:.3f} ms); use --method ilp")
        assigns = {**chosen}
        if cfg.compare:
            assigns.update({"fp32": ps.uniform("fp32"), "int8": ps.uniform("int8")})
        rows, record = compare_assignments(target, ps, device, pred, assigns, work, cfg,
                                           keep={method: out})
        pick = next(r for r in rows if r.name == method)
        repairs: list[dict] = []
        band = band_source = guard = None

        def as_priced(r):  # the pick's latency at the host's speed when it was priced
            return r.measured_ms / measuring_shift(record, r.assignment, priced_at)

        def timing(texts):
            return time_texts(target, ps, device, pred, texts, work, cfg, priced_at=priced_at)

        def retime(text):  # the final pick realised and timed afresh (compare_assignments)
            nonlocal rows, pick, record
            chosen[method] = ps.parse(text)
            again, record = compare_assignments(target, ps, device, pred,
                                                {method: chosen[method]}, work, cfg,
                                                keep={method: out})
            rows = [again[0] if r.name == method else r for r in rows]
            pick = again[0]
        chooses = given is None and cfg.budget_ms is not None and pick.measured_ms is not None
        if chooses and cfg.verify:  # timing decides among the answers priced near the budget
            band, band_source = band_evidence(pred)
            guard = noise_tolerance_pct(host_dir(_root(cfg), device) / "noise.json")
            final, hist = verify_picks(
                prob, {method: (cfg.budget_ms, under, method, pick.assignment)},
                {pick.assignment: as_priced(pick)}, timing, cfg.verify, band,
                guard, cfg.size_mb, cfg.seed)
            repairs += hist[method]
            if final[method] != pick.assignment:
                retime(final[method])
        if chooses and cfg.repair and as_priced(pick) > cfg.budget_ms:
            # over budget beyond the host's change: choose again under the pick's price scaled
            # by its miss, then realise the final pick and time it afresh
            final, hist = repair_picks(
                prob, {method: (cfg.budget_ms, method, pick.assignment)},
                {pick.assignment: as_priced(pick)}, timing, cfg.repair, cfg.size_mb, cfg.seed)
            repairs += hist[method]
            if final[method] != pick.assignment:
                retime(final[method])
            if as_priced(pick) > cfg.budget_ms:
                searched = [r for r in hist[method] if "measured_search" in r]
                lowest = [r for r in hist[method]
                          if "chosen_under_ms" in r][-1]["chosen_under_ms"]
                notes.append(f"measured over budget after {len(hist[method])} repair(s) "
                             f"(--repair {cfg.repair}): no assignment priced under "
                             f"{lowest:.3f} ms was found or kept it"
                             + (f", nor any of the {len(searched[-1]['measured_search'])} "
                                "fastest as priced, timed" if searched else ""))
        if (pick.measured_ms is not None and cfg.budget_ms is not None
                and pick.measured_ms > cfg.budget_ms >= as_priced(pick)):
            notes.append(f"measured {pick.measured_ms:.3f} ms, over the budget only by the "
                         "host's slowdown since pricing (the references timed with it); not "
                         "repaired: no assignment escapes that")
    a = chosen[method]
    verdict = None
    if pick.measured_ms is not None and cfg.budget_ms is not None:
        shift = measuring_shift(record, ps.text(a), priced_at)
        verdict = budget_verdict(pick.measured_ms, cfg.budget_ms,
                                 host_dir(_root(cfg), device) / "noise.json", shift)
    res = {
        "output": str(out), "device": device.name, "host": table.host, "space": ps.base.name,
        "arch": str(ps.arch), "input_shape": list(ps.input_shape), "method": method,
        "budget_ms": cfg.budget_ms, "size_mb_limit": cfg.size_mb,
        "margin": None if under is None else {"pct": margin, "source": source,
                                              "chosen_under_ms": under},
        "assignment": ps.text(a),
        "units": {u.name: p for u, p in zip(ps.units, ps.unit_precisions(a))},
        "predicted_ms": pick.predicted_ms, "measured_ms": pick.measured_ms,
        "budget": verdict, "repairs": repairs,
        "verify": {"k": cfg.verify, "band_pct": band, "source": band_source,
                   "guard_pct": guard}
        if band is not None else None,
        "metric_name": target.metric_name, "metric": pick.metric,
        "eval_split": cfg.eval_split, "fp32_metric_on_drop_split": sens.base_metric,
        "objective": cfg.objective, "perturbation": float(prob.perturbation(a.choices)[0]),
        "predicted_size_mb": float(prob.size_mb(a.choices)[0]),
        "file_size_mb": pick.size_mb,
        "fastest": {"assignment": ps.text(fast), "predicted_ms": fast_ms},
        "uniform_predicted_ms": {"fp32": pred.predict(ps.uniform("fp32")),
                                 "int8": pred.predict(ps.uniform("int8"))},
        "notes": notes, "timing": record, "table": str(table.path),
        "canary": {"mode": cfg.canary, "drift": drift.to_dict() if drift else None,
                   "corrected": corrected},
        "sensitivity": {"cache": str(sens_path),
                        "rank_correlation": sens.rank_correlation,
                        "units": [{"unit": u, "trace": t, "trace_se": se, "n_weights": n,
                                   "omega_int8": sens.omega.get("int8", [None] * len(sens.units))[i],
                                   "drop": None if sens.drop is None else sens.drop[i]}
                                  for i, (u, t, se, n) in enumerate(zip(
                                      sens.units, sens.trace, sens.trace_se, sens.n_weights))]},
        "checkpoint": target.identity(), "seed": cfg.seed,
        "compare": [asdict(r) for r in rows] if cfg.compare else None,
    }
    if cfg.compare:
        plot = out.with_suffix(".pareto.png")
        pareto_plot([asdict(r) for r in rows], plot,
                    f"{ps.base.name} {ps.arch} on {device.name}, budget {cfg.budget_ms:g} ms",
                    f"{target.metric_name} ({cfg.eval_split})", [cfg.budget_ms])
        res["pareto_plot"] = str(plot)
    atomic_write_text(out.with_suffix(".json"), json.dumps(res, indent=1) + "\n")
    return res


def lines(res: dict) -> list[str]:
    under = f" under {res['budget_ms']:g} ms" if res["budget_ms"] is not None else ""
    out = [f"{res['method']}{under}: {res['assignment']} "
           f"({sum(p == 'int8' for p in res['units'].values())}/{len(res['units'])} units int8)"]
    m = res["measured_ms"]
    v = res["budget"]
    out.append(f"  predicted {res['predicted_ms']:.3f} ms" + (
        f", measured {m:.3f} ms ({res['timing']['latency_of']}): "
        + ("" if v is None else 'KEPT' if v['keeps_budget'] else 'MISSED')
        if m is not None else ""))
    for r in res.get("repairs") or []:
        if "verified" in r:
            out.append(f"  verified: {len(r['verified'])} answers priced up to "
                       f"{res['verify']['band_pct']:.1f}% above the price chosen under timed; "
                       + (f"took {r['assignment']}, the least perturbation that ran within "
                          f"{r['within_ms']:.3f} ms (the pick: the budget)" if r["keeps"]
                          else "none ran within the budget"))
            continue
        if "measured_search" in r:
            out.append(f"  measured search: the {len(r['measured_search'])} fastest as priced "
                       f"timed; took {r['assignment']} ("
                       + ("the least perturbation that keeps the budget)" if r["keeps"]
                          else "none keeps the budget: the fastest as measured)"))
            continue
        out.append(f"  repaired: {r['assignment']} priced {r['predicted_ms']:.3f} ms measured "
                   f"{r['measured_ms']:.3f} ms, over budget; chose again under "
                   f"{r['chosen_under_ms']:.3f} ms" + ("" if r["found"] else " (found none)"))
    cn = res.get("canary") or {}
    if cn.get("drift"):
        out.append(f"  host drift {cn['drift']['drift_pct']:+.1f}% since the table (its "
                   "references timed now)" + (": prices scaled by it" if cn["corrected"]
                                              else ""))
    if res.get("margin"):
        mg = res["margin"]
        out.append(f"  chosen under {mg['chosen_under_ms']:.3f} ms: the budget less a "
                   f"{mg['pct']:.1f}% margin ({mg['source']})")
    out.append(f"  {res['metric_name']} {res['metric']:.4f} on {res['eval_split']}; "
               f"{res['file_size_mb']:.2f} MB file -> {res['output']}")
    out += [f"  {n}" for n in res["notes"]]
    return out


def emit_warning(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)
