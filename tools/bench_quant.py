"""Benchmarks of `hwnas quantize` (issue 11): sensitivity, budget sweeps and the per-host picture.

    # the checkpoints: a det20 proxy classifier (tools/train_classifier.py) and the detector
    HWNAS_MEASURING_FLAG=/tmp/hwnas-measuring python tools/bench_quant.py sweep --model det20
    HWNAS_MEASURING_FLAG=/tmp/hwnas-measuring python tools/bench_quant.py sweep --model det
    # --model det-searched: the shipped searched detector (hwnas/detection/assets), no training
    python tools/bench_quant.py sensitivity --model det20      # per-unit table, rank correlation
    python tools/bench_quant.py picture --model det20          # which units pay in int8, and why
    HWNAS_MEASURING_FLAG=/tmp/hwnas-measuring python tools/bench_quant.py repeat --model det20 \
        --assignments fff…,iii… --copies 4     # the protocol's noise here; head-to-head
    HWNAS_MEASURING_FLAG=/tmp/hwnas-measuring python tools/bench_quant.py joint --model det20
        # rows, calibration and 100 held-out assignments in one run: fidelity without drift
        # (--triples: also every neighbour triple, held-out priced with pairs and with triples)
    python tools/bench_quant.py transfer --model det20 --joint studies/quant/….json
        # the committed table priced on another run's measured wholes (measures nothing)
    python tools/bench_quant.py objective --model det20 --device cpu-ort-int8-noprop \
        --test-n 20000 [--against kl|drop]   # the ILP under HAWQ's Ω vs under the realised
        # single-unit KL or the measured single-unit drops

`sweep`: as `hwnas quantize` prices and chooses (the table's references timed first and every
price scaled by their drift, `--canary correct`; every method choosing under budget / (1 +
margin), `--margin`), `--budgets` budgets spread evenly from the fastest assignment's price to
the all-fp32 one, both × (1 + margin); at each, the ILP's, greedy's and random search's
assignments (the same sensitivity and table), plus uniform fp32 and int8; every distinct
assignment realised (real calibration), timed with the protocol (groups interleaved with the
table's references) and scored (top-1 on the proxy's test split, or COCO AP on the detector's;
`--test-n` a larger generated one; `--test-skip K` only its images after the first K, which
no smaller draw holds: with `--rescore`, a held-out re-reading of a finished sweep). As
`hwnas quantize --repair`, a pick measured over its budget is chosen again under its price
scaled by the miss (`--repair` rounds, every method alike; `--verify K` first, the verified
choice of `hwnas quantize --verify`), and then every final assignment is timed afresh in one
run (`--final-runs R`: R runs, each assignment at its median): the keeps and the plane come
from that timing, not from the one that ended the repair. Where the ILP's front trails
another's, the JSON lists the budget, both points and the paired 95% interval of the
difference (top-1: per image; AP: a paired bootstrap over images,
`hwnas.detection.evaluate.paired_ap`). Writes ``<out>/sweep.csv``, ``sweep.json`` and
``pareto.png``; realised files are kept in ``<out>/models`` so a rerun resumes. The latency
tables must exist (`hwnas quantize --profile`); the latency validation is `hwnas quantize
--validate 100`.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hwnas.data.shapes import CHUNK  # a draw's images from a multiple of it on are new
from hwnas.fileio import atomic_write_text, sha256_file
from hwnas.latency.table import host_dir
from hwnas.latency.validate import budget_verdict, noise_tolerance_pct
from hwnas.measure import Protocol
from hwnas.quant.assign import Problem, choose, fastest
from hwnas.quant.sensitivity import DEFAULT_OBJECTIVE, OBJECTIVES
from hwnas.quant.latency import (MARGIN_QUANTILE, MixedPredictor, band_evidence,
                                 guard_margin_pct, load_mixed, margin_evidence, time_references)
from hwnas.quant.realise import assignment_device
from hwnas.quant.run import (QuantizeConfig, _precision_space, _root, latency_of,
                             measuring_shift, pareto_plot, realise_all, repair_picks,
                             sensitivity_for, time_files, time_texts, verify_picks, whole_models)
from hwnas.quant.target import load_target


@dataclass(frozen=True)
class Model:
    space: str
    arch: str
    ckpt: str


BOOTSTRAP = 500  # resamples of a paired AP bootstrap (~0.06 s each per model at 2,000 images)

MODELS = {
    "det20": Model("det20", "det20:01230123012301230123", "/work/quant-out/det20-w0.25-cls.pt"),
    "det": Model("det20-fcos-w0.5", "det20:00000000000000000000", "/work/det-out/baseline.pt"),
    # the shipped searched detector: committed, so its sweep runs from a fresh clone
    "det-searched": Model("det20-fcos-w0.5", "det20:10031202020001210332",
                          str(Path(__file__).resolve().parents[1] / "hwnas" / "detection"
                              / "assets" / "det20-w0.5_searched_fcos.pt")),
}


def setup(args):
    m = MODELS[args.model]
    cfg = QuantizeConfig(device=args.device, space=args.space or m.space,
                         arch=args.arch or m.arch, ckpt=Path(args.ckpt or m.ckpt),
                         protocol=Protocol(span_s=args.span_s), seed=args.seed,
                         objective=args.objective, drop_images=args.drop_images)
    device, ps = _precision_space(cfg)
    pred = MixedPredictor(load_mixed(_root(cfg), device, ps), ps)
    target = load_target(cfg.ckpt, ps.base, ps.arch, ps.input_shape)
    out = Path(args.out or f"/work/quant-out/bench-{args.model}")
    (out / "models").mkdir(parents=True, exist_ok=True)
    sens, _ = sensitivity_for(target, ps, device, cfg, _fp32(target, out / "models"),
                              out / "models")
    return cfg, device, ps, pred, target, sens, out


def _fp32(target, work: Path) -> Path:
    path = work / "fp32.onnx"
    if not path.is_file():
        target.export(path)
    return path


def cmd_sensitivity(args) -> None:
    cfg, device, ps, pred, target, sens, out = setup(args)
    print(f"{ps.base.name} {ps.arch}: {sens.metric} fp32 {sens.base_metric:.4f} on "
          f"{sens.drop_split}; Hutchinson {sens.settings}")
    print(f"{'unit':10s} {'trace':>10s} {'±se':>8s} {'n':>8s} {'Tr/n':>10s} {'Omega int8':>11s} "
          f"{'drop':>8s}")
    for i, u in enumerate(sens.units):
        n = sens.n_weights[i]
        d = sens.drop[i] if sens.drop else None
        print(f"{u:10s} {sens.trace[i]:10.3g} {sens.trace_se[i]:8.2g} {n:8d} "
              f"{(sens.trace[i] / n if n else 0):10.3g} {sens.omega['int8'][i]:11.3g} "
              f"{'' if d is None else format(d, '+.4f'):>8s}")
    print("Spearman:", json.dumps(sens.rank_correlation))
    atomic_write_text(out / "sensitivity.json", json.dumps(sens.to_dict(), indent=1) + "\n")


def cmd_picture(args) -> None:
    """Per unit: its rows at fp32 and int8, and the measured edge costs around it."""
    cfg, device, ps, pred, target, sens, out = setup(args)
    t = pred.terms()
    unit, edge = t.unit_ms, t.edge_ms
    f = fastest(Problem.build(pred, np.zeros_like(unit), ps.weight_counts()))
    print(f"{ps.base.name} {ps.arch} on {device.name}, host {pred.table.host}; calibrated "
          f"terms (ms): unit fp32 / int8, then the boundary into the unit at "
          f"fp32>fp32 / fp32>int8 / int8>fp32 / int8>int8")
    into = {e.dst: k for k, e in enumerate(ps.edges)}
    for i, u in enumerate(ps.units):
        k = into.get(i)
        e = "" if k is None else " ".join(f"{edge[k, c, d]:+.3f}" for c in range(2)
                                         for d in range(2))
        pick = ps.unit_precisions(f)[i]
        print(f"  {u.name:10s} {unit[i, 0]:.3f} / {unit[i, 1] if unit.shape[1] > 1 else 0:.3f}"
              f"   {e:32s} fastest: {pick}")
    if t.triples:  # what two neighbouring boundaries cost together beyond their sum
        e = ps.edges
        big = sorted(((float(t.triple_ms[j, c, d, g]), j, (c, d, g))
                      for j in range(len(t.triples)) for c in range(2) for d in range(2)
                      for g in range(2) if np.isfinite(t.triple_ms[j, c, d, g])),
                     key=lambda v: -abs(v[0]))
        print("largest triple terms (ms): " + ", ".join(
            f"{ps.units[e[t.triples[j][0]].src].name}>{ps.units[e[t.triples[j][0]].dst].name}>"
            f"{ps.units[e[t.triples[j][1]].dst].name} at {''.join('fi'[x] for x in cdg)} "
            f"{v:+.3f}" for v, j, cdg in big[:6]))
    print(f"fastest {ps.text(f)} {pred.predict(f):.3f} ms; all fp32 "
          f"{pred.predict(ps.canary()):.3f} ms; all int8 {pred.predict(ps.uniform('int8')):.3f}")


def scorer(args, target):
    """`path -> (metric, per-image correctness or None)` on the model's test split, or on a
    larger generated one (`--test-n`, the built-in generators only: `Target.split`).
    Per-image correctness (classifier) allows paired comparisons; COCO AP does not decompose
    per image, so the detector's comes with `PerImageAP` (paired bootstraps)."""
    from hwnas.errors import UserError

    n = args.test_n or None
    try:
        split = target.split("test", n)
    except UserError as e:
        raise SystemExit(f"--test-n: {e}") from None
    skip = args.test_skip
    if skip:  # a held-out re-reading: the images after the first `skip` only
        if not n or not 0 < skip < n:
            raise SystemExit(f"--test-skip {skip}: needs a --test-n above it")
        # shapes-det renders image i from (seed, split, i) alone: any skip leaves new images
        if target.kind == "classifier" and skip % CHUNK:
            raise SystemExit(f"--test-skip {skip}: the classifier's needs a multiple of "
                             f"{CHUNK} (the generator's chunk)")
        split = split.images_from(skip)
    if target.kind == "classifier":
        from hwnas.quant.target import onnx_correct

        def score(path):
            c = onnx_correct(path, split)
            return float(c.mean()), c
        return score, len(split)
    if not n:
        return (lambda path: (target.evaluate(path, "test"), None)), None
    from hwnas.detection.evaluate import PerImageAP, detect_onnx

    def score_det(path):  # pycocotools' AP, unrounded, kept per image for paired bootstraps
        ev = PerImageAP(split, detect_onnx(path, split))
        return ev.ap(), ev
    return score_det, len(split)


def sweep_settings(args, cfg, pred) -> dict:
    """What a sweep's timings depend on: a journal of other settings is not resumed."""
    return {"space": cfg.space, "arch": cfg.arch, "ckpt": str(cfg.ckpt), "device": cfg.device,
            "table": str(pred.table.path), "table_sha256": sha256_file(pred.table.path),
            **{k: getattr(args, k) for k in ("budgets", "seed", "margin", "canary", "repair",
                                             "verify", "group", "span_s", "objective",
                                             "drop_images")}}


def cmd_sweep(args) -> None:
    """The sweep, resumable: its timings (the references, each timing call of the verify and
    repair, each final run) are journalled in ``<out>/sweep.state.json`` as they finish
    (`hwnas.runs.StageJournal`), so a stopped sweep run again into the same --out goes on from
    there; the journal goes when ``sweep.json`` is written."""
    if args.rescore:
        return rescore(args)
    from hwnas.locks import output_lock
    from hwnas.runs import StageJournal

    cfg, device, ps, pred, target, sens, out = setup(args)
    state = out / "sweep.state.json"
    with output_lock(state):
        journal = StageJournal(state, sweep_settings(args, cfg, pred),
                               note=lambda m: print(f"note: {m}", file=sys.stderr))
        sweep(args, cfg, device, ps, pred, target, sens, out, journal)
        journal.finish()


def sweep(args, cfg, device, ps, pred, target, sens, out, journal) -> None:
    from hwnas.latency.lookup import Drift

    whole = whole_models(target, ps, out / "models", cfg.seed)
    drift = None
    if args.canary == "correct":  # as hwnas quantize: priced with the host's speed now
        drift = journal.stage("references", lambda: time_references(
            pred, device, cfg.protocol, whole), dump=Drift.to_dict, load=Drift.from_dict)
        pred = pred.scaled(drift.ratio)
    prob = Problem.build(pred, sens.omega_matrix(ps, cfg.objective), ps.weight_counts())
    f = fastest(prob)
    # the methods choose under budget / (1 + margin), as `hwnas quantize` does; the budgets
    # span the range where its answer changes: from the lowest it accepts to all fp32
    margin, source = (margin_evidence(pred) if args.margin is None
                      else (args.margin, "--margin"))
    k = 1 + margin / 100
    lo, fp32_ms = pred.predict(f) * k, pred.predict(ps.canary()) * k
    hi = max(fp32_ms, lo * 1.02)
    budgets = [float(b) for b in np.linspace(lo, hi, args.budgets)]
    picks: list[tuple[float, str, str | None]] = []
    for b in budgets:
        for m in ("ilp", "greedy", "random"):
            a = choose(prob, m, b / k, None, args.seed)
            picks.append((b, m, None if a is None else ps.text(a)))
    uniform = {"fp32": ps.text(ps.canary()), "int8": ps.text(ps.uniform("int8"))}
    texts = list(dict.fromkeys([t for _, _, t in picks if t] + list(uniform.values())))
    print(f"{len(budgets)} budgets {lo:.3f}..{hi:.3f} ms; {len(texts)} distinct assignments",
          file=sys.stderr)

    raw_ms: dict[str, float] = {}  # as timed; the repair sees them at the speed of pricing

    calls = itertools.count()  # the verify and repair time in a fixed order: journalled by it

    def timing(ts):
        def run():
            raw: dict[str, float] = {}
            ms = time_texts(target, ps, device, pred, ts, out / "models", cfg, args.group,
                            priced_at=drift, raw=raw)
            return {"ms": ms, "raw": raw}
        got = journal.stage(f"timing-{next(calls)}", run, key=list(ts))
        raw_ms.update(got["raw"])
        return got["ms"]

    first: dict[tuple[float, str], str | None] = {(b, m): t for b, m, t in picks}
    hist: dict = {k: [] for k in first}
    first_ms: dict[str, float] = {}
    band = band_source = guard = None
    if args.verify or args.repair:  # as hwnas quantize, after the picks' first timing
        first_ms = timing(list(dict.fromkeys(t for t in first.values() if t)))
        current, seen = dict(first), dict(first_ms)
        if args.verify:  # timing decides among each method's answers near its budget
            band, band_source = band_evidence(pred)
            guard = noise_tolerance_pct(host_dir(_root(cfg), device) / "noise.json")
            current, vh = verify_picks(prob, {key: (key[0], key[0] / k, key[1], t)
                                              for key, t in current.items()},
                                       seen, timing, args.verify, band, guard, None, args.seed)
            seen.update({t: ms for h in vh.values() for e in h
                         for t, ms in e["verified"].items()})
            for key in hist:
                hist[key] += vh[key]
        if args.repair:  # a pick measured over its budget is chosen again
            current, rh = repair_picks(prob, {key: (key[0], key[1], t)
                                              for key, t in current.items()},
                                       seen, timing, args.repair, None, args.seed)
            for key in hist:
                hist[key] += rh[key]
        picks = [(b, m, current[(b, m)]) for b, m, _ in picks]
        texts = list(dict.fromkeys([t for _, _, t in picks if t] + list(uniform.values())))
        print(f"verified or repaired {sum(current[key] != first[key] for key in first)} "
              f"picks; timing the {len(texts)} final assignments afresh", file=sys.stderr)
    files, timed = realise_all(target, ps, device, texts, out / "models", cfg, progress=True)
    runs = [journal.stage(f"final-{j}", lambda: time_files(
        ps, device, pred, timed, cfg.protocol, out / "models", group=args.group, progress=True,
        whole=whole), key=sorted(timed), load=tuple) for j in range(args.final_runs)]
    measured, record = median_runs(runs)
    score, test_n = scorer(args, target)
    scores, correct = {}, {}
    for t in tqdm(texts, desc="scoring", file=sys.stderr):
        scores[t], correct[t] = score(files[t])
    noise = host_dir(_root(cfg), device) / "noise.json"
    rows = []
    for b, m, t in picks:
        row = {"budget_ms": b, "chosen_under_ms": b / k, "name": m, "assignment": t}
        if t:
            a = ps.parse(t)
            shift = measuring_shift(record, t, drift)  # the host's change since pricing
            row.update(predicted_ms=pred.predict(a), measured_ms=measured[t], metric=scores[t],
                       perturbation=float(prob.perturbation(a.choices)[0]),
                       int8_units=ps.unit_precisions(a).count("int8"),
                       keeps=measured[t] <= b, keeps_drift=measured[t] <= b * shift,
                       drift_ratio=shift)
            v = budget_verdict(measured[t], b, noise, shift)  # the project's rule
            row.update(keeps_floor=v["keeps_budget_raw"], keeps_verdict=v["keeps_budget"])
            f0 = first[(b, m)]  # the first pick and what the repair did with it
            row.update(first_assignment=f0, first_measured_ms=raw_ms.get(f0),
                       first_as_priced_ms=first_ms.get(f0),
                       repairs=hist[(b, m)])
        rows.append(row)
    for name, t in uniform.items():
        a = ps.parse(t)
        rows.append({"budget_ms": None, "name": name, "assignment": t,
                     "predicted_ms": pred.predict(a), "measured_ms": measured[t],
                     "metric": scores[t], "perturbation": float(prob.perturbation(a.choices)[0]),
                     "int8_units": ps.unit_precisions(a).count("int8")})
    summary = summarise(rows, budgets, uniform, scores, measured, pred, ps, correct,
                        record, drift)
    ilp = [r for r in rows if r["name"] == "ilp" and r.get("assignment")]
    summary.update({"verify": {"k": args.verify, "band_pct": band, "source": band_source,
                               "guard_pct": guard},
                    # the ILP's picks the verified choice changed, and those repaired
                    "ilp_verified": sum(any("verified" in h and h["assignment"]
                                            != r["first_assignment"] for h in r["repairs"])
                                        for r in ilp),
                    "repair": args.repair,
                    "ilp_repaired": sum(any("verified" not in h for h in r["repairs"])
                                        for r in ilp),
                    # the first picks as the first timing found them (before any repair)
                    "ilp_first_keeps_measured": (sum(r["first_measured_ms"] <= r["budget_ms"]
                                                     for r in ilp)
                                                 if args.repair or args.verify else None)})
    summary.update({"canary": drift.to_dict() if drift else None, "margin_pct": margin,
                    "margin_source": source, "test_n": test_n, "test_skip": args.test_skip,
                    "model": args.model, "space": ps.base.name, "arch": str(ps.arch),
                    "device": device.name, "host": pred.table.host, "metric": target.metric_name,
                    "latency_of": latency_of(target, ps), "timing": record,
                    "budgets": budgets, "fastest": ps.text(f), "protocol_span_s": args.span_s,
                    "objective": cfg.objective,
                    "sensitivity": {"rank_correlation": sens.rank_correlation,
                                    "fp32_metric_val": sens.base_metric,
                                    "drop_images": cfg.drop_images}})
    write_sweep(out, rows, summary, ps, device, pred, target)


def rescore(args) -> None:
    """`sweep --rescore`: score the realised files of an earlier sweep in `--out` again and
    recompute its summary (a new --test-n, a new comparison), re-using its choices and timing."""
    from hwnas.latency.lookup import Drift

    cfg, device, ps, pred, target, sens, out = setup(args)
    if not (out / "sweep.json").is_file():
        raise SystemExit(f"--rescore: no {out / 'sweep.json'}; run the sweep first")
    old = json.loads((out / "sweep.json").read_text())
    rows, summary = old["rows"], old["summary"]
    drift = Drift.from_dict(summary["canary"]) if summary.get("canary") else None
    if drift is not None:
        pred = pred.scaled(drift.ratio)
    uniform = {n: u["assignment"] for n, u in summary["uniform"].items()}
    measured = {r["assignment"]: r["measured_ms"] for r in rows if r.get("assignment")}
    score, test_n = scorer(args, target)
    scores, correct = {}, {}
    for t in tqdm(measured, desc="scoring", file=sys.stderr):
        scores[t], correct[t] = score(out / "models" / f"q-{t}.onnx")
    for r in rows:
        if r.get("assignment"):
            r["metric"] = scores[r["assignment"]]
    summary.update(summarise(rows, summary["budgets"], uniform, scores, measured, pred, ps,
                             correct, summary["timing"], drift))
    summary["test_n"], summary["test_skip"] = test_n, args.test_skip
    write_sweep(out, rows, summary, ps, device, pred, target)


def write_sweep(out: Path, rows: list[dict], summary: dict, ps, device, pred, target) -> None:
    """``<out>/sweep.csv``, ``sweep.json`` and ``pareto.png``; the summary printed."""
    margin, test_n, budgets = summary["margin_pct"], summary["test_n"], summary["budgets"]
    buf = io.StringIO()
    keys = ["budget_ms", "chosen_under_ms", "name", "assignment", "int8_units", "predicted_ms",
            "measured_ms", "keeps", "keeps_drift", "keeps_floor", "keeps_verdict", "drift_ratio",
            "metric", "perturbation", "first_assignment", "first_measured_ms"]
    w = csv.DictWriter(buf, keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "sweep.csv", buf.getvalue())
    atomic_write_text(out / "sweep.json", json.dumps({"summary": summary, "rows": rows},
                                                    indent=1) + "\n")
    pareto_plot(rows, out / "pareto.png",
                f"{ps.base.name} {ps.arch} on {device.name} ({pred.table.host}): "
                f"{len(budgets)} budgets, margin {margin:.1f}%",
                f"{target.metric_name} (test" + (f", {test_n:,} images" if test_n else "")
                + (f" from image {summary['test_skip']:,})" if summary.get("test_skip") else ")"),
                budgets)
    print(json.dumps(summary, indent=1))


def median_runs(runs: list[tuple[dict[str, float], dict]]) -> tuple[dict[str, float], dict]:
    """`time_files` run R times over the same files in the same groups, as one: each file's
    median latency, each group's references at their median, each file's drift ratio at its
    median; the runs' own latencies kept in the record (``runs_ms``)."""
    if len(runs) == 1:
        return runs[0]
    ms = {t: float(np.median([m[t] for m, _ in runs])) for t in runs[0][0]}
    record = dict(runs[0][1])
    record["refs_now"] = [{r: float(np.median([rec["refs_now"][g][r] for _, rec in runs]))
                           for r in group} for g, group in enumerate(record["refs_now"])]
    if "ratio" in record:
        record["ratio"] = {t: float(np.median([rec["ratio"][t] for _, rec in runs]))
                           for t in record["ratio"]}
    record["runs_ms"] = {t: [m[t] for m, _ in runs] for t in ms}
    record["contention_runs"] = [rec["contention"] for _, rec in runs]
    return ms, record


def paired(correct, a: str, b: str) -> dict | None:
    """The metric of `a` minus `b` on the same images, with its 95% interval: whether a gap is
    more than the test split's noise. Top-1: the normal approximation of the paired per-image
    difference; AP (`PerImageAP`): a paired bootstrap over images."""
    if correct.get(a) is None or correct.get(b) is None:
        return None
    if not isinstance(correct[a], np.ndarray):
        from hwnas.detection.evaluate import paired_ap

        return paired_ap(correct[a], correct[b], resamples=BOOTSTRAP)
    d = correct[a].astype(float) - correct[b].astype(float)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
    return {"diff": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)],
            "significantly_worse": bool(d.mean() + half < 0),
            "significantly_better": bool(d.mean() - half > 0)}


def front(points: list[tuple[float, float, str]], budget: float):
    """The best (metric, assignment) among (measured ms, metric, assignment) points that keep
    `budget` as measured: a method's latency-accuracy front read at that budget; None if none."""
    ok = [(m, t) for ms, m, t in points if ms <= budget]
    return max(ok) if ok else None


def fronts(rows, budgets, uniform, scores, ms: dict[str, float], correct=None) -> dict:
    """The fronts on the latency (`ms`, per assignment) - metric plane, read at every budget:
    each method's best point (over all its picks) that keeps the budget; per other method,
    the budgets where it has a point, where the ILP's is at least as good, where it is
    significantly worse (paired 95%), where the ILP has none, and the budgets it trails at."""
    correct, tol = correct or {}, 1e-9
    points = {m: list({(ms[r["assignment"]], r["metric"], r["assignment"])
                       for r in rows if r["name"] == m and r["assignment"]})
              for m in ("ilp", "greedy", "random")}
    points.update({n: [(ms[t], scores[t], t)] for n, t in uniform.items()})
    out = {}
    for other in ("greedy", "random", "fp32", "int8"):
        cmp, ge, worse, ilp_none, behind = 0, 0, 0, 0, []
        for b in budgets:
            o = front(points[other], b)
            if o is None:
                continue
            cmp += 1
            i = front(points["ilp"], b)
            if i is None:
                ilp_none += 1
                continue
            ge += i[0] >= o[0] - tol
            x = paired(correct, i[1], o[1])
            worse += bool(x and x["significantly_worse"])
            if i[0] < o[0] - tol:  # where the ILP's front trails: by how much, how surely
                behind.append({"budget_ms": b, "ilp": i[1], "ilp_metric": i[0], "other": o[1],
                               "other_metric": o[0], "paired": x})
        out[other] = {"budgets_where_it_has_a_point": cmp, "ilp_front_ge": ge,
                      "ilp_front_significantly_worse": worse, "ilp_front_empty": ilp_none,
                      "behind": behind}
    return out


def summarise(rows, budgets, uniform, scores, measured, pred, ps, correct=None, record=None,
              drift=None) -> dict:
    correct = correct or {}
    ilp = [r for r in rows if r["name"] == "ilp" and r["assignment"]]
    tol = 1e-9
    at_least = {}
    for other in ("greedy", "random"):
        pairs = [(r, o) for r in ilp for o in rows if o["name"] == other and
                 o["budget_ms"] == r["budget_ms"] and o["assignment"]]
        stats = [paired(correct, r["assignment"], o["assignment"]) for r, o in pairs]
        at_least[other] = {"budgets_compared": len(pairs),
                           "ilp_metric_ge": sum(r["metric"] >= o["metric"] - tol for r, o in pairs),
                           "ilp_significantly_worse": sum(bool(x and x["significantly_worse"])
                                                          for x in stats),
                           "ilp_significantly_better": sum(bool(x and x["significantly_better"])
                                                           for x in stats),
                           "ilp_perturbation_le": sum(r["perturbation"] <= o["perturbation"] + tol
                                                      for r, o in pairs),
                           "infeasible": sum(1 for o in rows if o["name"] == other
                                             and not o["assignment"])}
    for name, t in uniform.items():  # a uniform model competes where it keeps the budget
        pairs = [r for r in ilp if measured[t] <= r["budget_ms"]]
        at_least[name] = {"budgets_where_it_keeps": len(pairs),
                          "ilp_metric_ge": sum(r["metric"] >= scores[t] - tol for r in pairs)}
    fronts_ = fronts(rows, budgets, uniform, scores, measured, correct)
    # the same fronts with every latency at the host's speed when the prices were made (each
    # divided by the shift its group's references showed): the plane the budget verdict reads
    priced_speed = {t: measured[t] / measuring_shift(record, t, drift) for t in measured}
    return {"ilp_keeps_measured": sum(r["keeps"] for r in ilp), "ilp_budgets": len(ilp),
            "ilp_keeps_drift_corrected": sum(r["keeps_drift"] for r in ilp),
            # budget_verdict: within the device's published noise floor, without / with the
            # host's shift since the table (what every hwnas budget check reports)
            "ilp_keeps_within_noise_floor": sum(r["keeps_floor"] for r in ilp),
            "ilp_keeps_verdict": sum(r["keeps_verdict"] for r in ilp),
            "compare": at_least, "fronts": fronts_,
            "fronts_at_pricing_speed": fronts(rows, budgets, uniform, scores, priced_speed,
                                              correct),
            "uniform": {n: {"assignment": t, "predicted_ms": pred.predict(ps.parse(t)),
                            "measured_ms": measured[t], "metric": scores[t]}
                        for n, t in uniform.items()}}


def cmd_repeat(args) -> None:
    """Each of `--assignments` realised once and compiled `--copies` times, all timed in one
    interleaved run: the spread between copies of one model is the protocol's own noise for
    these models here; the means compare the assignments head to head. With `--reps R` the
    same compiled sessions are timed in R consecutive runs: an offset that stays with a copy
    from run to run belongs to the session (its memory placement), one that does not belongs
    to the moment."""
    from hwnas.backends import compile_model
    from hwnas.latency.table import host_dir
    from hwnas.measure import measure_interleaved
    from hwnas.quant.latency import SameFeed

    cfg, device, ps, pred, target, sens, out = setup(args)
    texts = [t.strip() for t in args.assignments.split(",")]
    files, timed = realise_all(target, ps, device, texts, out / "models", cfg, progress=True)
    whole = whole_models(target, ps, out / "models", cfg.seed)
    labels = [f"{t}#{k}" for t in texts for k in range(args.copies)]
    runners = [SameFeed(compile_model(timed[lb.split("#")[0]],
                                      assignment_device(device, ps, ps.parse(lb.split("#")[0]))),
                        whole.feed) for lb in labels]
    runs = []
    for _ in tqdm(range(args.reps), desc="repeat", file=sys.stderr):
        got = measure_interleaved(runners, cfg.protocol)
        runs.append(({lb: s.best_ms for lb, s in zip(labels, got.stats)}, got.contention))
    for r in runners:
        r.close()
    res = {"latency_of": latency_of(target, ps), "reps": args.reps,
           "contention": [c.to_dict() for _, c in runs],
           "noise_file": str(host_dir(_root(cfg), device) / "noise.json"), "assignments": {}}
    for t in texts:
        v = np.array([[got[f"{t}#{k}"] for k in range(args.copies)] for got, _ in runs])
        within = 100 * np.ptp(v, axis=1) / v.mean(axis=1)  # the copies' spread in each run
        res["assignments"][t] = {
            "predicted_ms": pred.predict(ps.parse(t)), "measured_ms": v.round(4).tolist(),
            "mean_ms": float(v.mean()),
            "cv_pct": float(100 * v[0].std(ddof=1) / v[0].mean()),
            "range_pct": float(within[0]), "range_pct_per_run": within.round(2).tolist(),
            # a copy's offset from its run's mean, correlated between consecutive runs
            "copy_offset_corr": (float(np.mean([np.corrcoef(v[i] - v[i].mean(),
                                                            v[i + 1] - v[i + 1].mean())[0, 1]
                                                for i in range(len(v) - 1)]))
                                 if len(v) > 1 else None)}
    atomic_write_text(out / "repeat.json", json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


def cmd_variant(args) -> None:
    """Each of `--assignments` compiled twice, as the device says and with `--option K=V`
    added to its options, all timed in one interleaved run: does the option change *which*
    assignments the table misprices (the correlation of measured / predicted - 1 between the
    two), or only how fast they all run?"""
    import dataclasses

    from hwnas.backends import compile_model
    from hwnas.measure import measure_interleaved
    from hwnas.quant.latency import SameFeed

    cfg, device, ps, pred, target, sens, out = setup(args)
    key, _, value = args.option.partition("=")
    value = {"true": True, "false": False}.get(value.lower(), value)
    other = dataclasses.replace(device, options={**device.options, key: value})
    texts = [t.strip() for t in args.assignments.split(",")]
    files, timed = realise_all(target, ps, device, texts, out / "models", cfg, progress=True)
    whole = whole_models(target, ps, out / "models", cfg.seed)
    labels = [(t, v) for t in texts for v in ("default", args.option)]
    runners = [SameFeed(compile_model(timed[t], assignment_device(
        device if v == "default" else other, ps, ps.parse(t))), whole.feed) for t, v in labels]
    got = measure_interleaved(runners, cfg.protocol)
    for r in runners:
        r.close()
    m = {lb: s.best_ms for lb, s in zip(labels, got.stats)}
    p = np.array([pred.predict(ps.parse(t)) for t in texts])
    dev = {v: np.array([m[(t, v)] for t in texts]) / p - 1 for v in ("default", args.option)}
    within = {v: float(np.mean(np.abs(d - np.median(d)) <= 0.05)) for v, d in dev.items()}
    res = {"option": args.option, "n": len(texts), "contention": got.contention.to_dict(),
           "deviation_correlation": float(np.corrcoef(dev["default"], dev[args.option])[0, 1]),
           "within_5pct_after_median_shift": within,
           "mean_ratio_option_to_default": float(np.mean(
               np.array([m[(t, args.option)] / m[(t, "default")] for t in texts]))),
           "measured_ms": {f"{t}|{v}": m[(t, v)] for t, v in labels}}
    atomic_write_text(out / "variant.json", json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "measured_ms"}, indent=1))


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over images of KL(softmax p ‖ softmax q)."""
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


def cmd_objective(args) -> None:
    """HAWQ's Ω against a measured alternative as the ILP's objective, at equal priced budgets.
    `--against kl`: per unit, the mean KL divergence of the realised model with that unit alone
    in int8 from the fp32 model (ZeroQ's sensitivity, on real validation images and through the
    real quantiser: weights and activations both; classifiers only). `--against drop|blend`:
    the measured single-unit metric drops of the sensitivity, alone or averaged with the
    curvature's estimate (`Sensitivity.costs`, the ILP's `--objective drop|blend`). At
    `--budgets` priced budgets from the fastest assignment to all fp32 the ILP's pick under
    each objective, scored on the test split (`--test-n`) with the paired 95% interval.
    Measures no latency."""
    from dataclasses import replace

    from hwnas.quant.realise import realise
    from hwnas.quant.sensitivity import spearman
    from hwnas.quant.target import classifier_logits

    cfg, device, ps, pred, target, sens, out = setup(args)
    if args.against == "kl" and target.kind != "classifier":
        raise SystemExit("objective: the KL sensitivity is defined for classifiers (--model det20)")
    models = out / "models"
    fp32 = _fp32(target, models)
    feeds = target.calibration_feeds(cfg.calibration_images, cfg.seed)

    def realised(t: str) -> Path:
        path = models / f"q-{t}.onnx"
        if not path.is_file():
            realise(fp32, path, device, ps, ps.parse(t), feeds)
        return path

    alt = args.against
    if alt == "kl":
        x = target.split("val", args.kl_n)
        x = x.batch(np.arange(len(x)))[0].numpy()
        ref = classifier_logits(fp32)(x)
        cost = []
        for i, u in enumerate(tqdm(ps.units, desc="single-unit KL", unit="unit", leave=False)):
            if "int8" not in u.precisions:
                cost.append(0.0)
                continue
            t = ["f"] * len(ps.units)
            t[i] = "i"
            cost.append(mean_kl(ref, classifier_logits(realised("".join(t)))(x)))
        om_alt = replace(sens, omega={"int8": cost}).omega_matrix(ps)  # KL in Ω's place
        extra = {"kl_images": len(x)}
    else:
        om_alt = sens.omega_matrix(ps, alt)
        cost = [None if d is None else float(d) for d in sens.drop]
        extra = {"drop_split": sens.drop_split, "drop_images": cfg.drop_images}
    counts = ps.weight_counts()
    probs = {"hessian": Problem.build(pred, sens.omega_matrix(ps), counts),
             alt: Problem.build(pred, om_alt, counts)}
    lo, hi = pred.predict(fastest(probs["hessian"])), pred.predict(ps.canary())
    score, test_n = scorer(args, target)
    correct: dict = {}
    metric: dict[str, float] = {}
    rows = []
    for b in tqdm(np.linspace(lo, hi, args.budgets), desc="budgets", leave=False):
        pick = {k: ps.text(choose(p, "ilp", float(b), None, args.seed)) for k, p in probs.items()}
        for t in pick.values():
            if t not in correct:
                metric[t], correct[t] = score(realised(t))
        rows.append({"priced_budget_ms": float(b), **{k: {
            "assignment": t, "priced_ms": pred.predict(ps.parse(t)),
            "metric": metric[t]} for k, t in pick.items()},
            f"{alt}_minus_hessian": paired(correct, pick[alt], pick["hessian"])})
    d = [r[f"{alt}_minus_hessian"] for r in rows]
    both = [(c, o) for c, o in zip(cost, sens.omega["int8"]) if c is not None]
    summary = {
        "model": args.model, "device": device.name, "test_n": test_n,
        "test_skip": args.test_skip, "against": alt, **extra,
        "units": [u.name for u in ps.units], alt: cost, "omega_int8": sens.omega["int8"],
        f"spearman_{alt}_vs_omega": spearman(*zip(*both)),
        "budgets": len(rows), "same_pick": sum(r[alt]["assignment"] == r["hessian"]["assignment"]
                                               for r in rows),
        f"{alt}_ge": sum(p["diff"] >= 0 for p in d), f"{alt}_significantly_better":
        sum(p["significantly_better"] for p in d), f"{alt}_significantly_worse":
        sum(p["significantly_worse"] for p in d),
        "mean_diff": float(np.mean([p["diff"] for p in d]))}
    for r in rows:
        p = r[f"{alt}_minus_hessian"]
        print(f"{r['priced_budget_ms']:.3f} ms  Ω {r['hessian']['assignment']} "
              f"{r['hessian']['metric']:.5f}  {alt} {r[alt]['assignment']} {r[alt]['metric']:.5f}"
              f"  {p['diff']:+.5f} [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("units", alt, "omega_int8")}))
    atomic_write_text(out / f"objective-{alt}.json",
                      json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")


def cmd_coverage(args) -> None:
    """How often the calibration's leave-one-out margin (`guard_margin_pct`, or `--margin`)
    holds on assignments the calibration never saw: of the table's published held-out
    validation (`hwnas quantize --validate N --publish`), the share that ran within price x
    (1 + margin), as priced and with the references' drift taken out."""
    from hwnas.quant.latency import mixed_table_path

    m = MODELS[args.model]
    cfg = QuantizeConfig(device=args.device, space=args.space or m.space,
                         arch=args.arch or m.arch)
    device, ps = _precision_space(cfg)
    pred = MixedPredictor(load_mixed(_root(cfg), device, ps), ps)
    margin = guard_margin_pct(pred) if args.margin is None else args.margin
    path = mixed_table_path(_root(cfg), device, ps)
    path = path.with_name(path.stem + ".validation.csv")
    rows = list(csv.DictReader(path.open()))
    meas = np.array([float(r["measured_ms"]) for r in rows])
    res = {"validation": str(path), "n": len(rows), "margin_pct": margin,
           "target_share": MARGIN_QUANTILE}
    for name, col in (("as_priced", "predicted_ms"), ("drift_corrected", "canary_corrected_ms")):
        price = np.array([float(r[col]) for r in rows])
        res[name] = {"within_price_plus_margin": float(np.mean(meas <= price * (1 + margin / 100))),
                     "within_price": float(np.mean(meas <= price))}
    print(json.dumps(res, indent=1))


def local_fits(ps, measured: dict[str, float], folds: int = 10, lam: float = 0.01,
               seed: int = 0) -> dict:
    """How far *any* local latency model gets on whole assignments measured together: least
    squares (ridge `lam` on all but the intercept) on int8 indicators per unit, + their
    products along every edge (the pairwise model the table is), + along every path of two
    edges (triples of neighbours), scored by `folds`-fold cross-validation. No table rows:
    what the measurements themselves allow."""
    texts = list(measured)
    y = np.array([measured[t] for t in texts])
    x = np.array([[float(p == "int8") for p in ps.unit_precisions(ps.parse(t))] for t in texts])
    pairs = [(e.src, e.dst) for e in ps.edges]
    triples = [(a, b, d) for a, b in pairs for c, d in pairs if c == b]
    feats = {"units": [x],
             "units + edges": [x, np.column_stack([x[:, a] * x[:, b] for a, b in pairs])],
             "units + edges + triples": [x, np.column_stack([x[:, a] * x[:, b]
                                                              for a, b in pairs]),
                                         np.column_stack([x[:, a] * x[:, b] * x[:, c]
                                                          for a, b, c in triples])]}
    idx = np.random.default_rng(seed).permutation(len(y))
    out = {"n": len(y), "folds": folds, "ridge": lam}
    for name, parts in feats.items():
        X = np.column_stack([np.ones(len(y))] + parts)
        pen = lam * np.eye(X.shape[1])
        pen[0, 0] = 0
        err = np.zeros(len(y))
        for f in np.array_split(idx, folds):
            k = np.setdiff1d(idx, f)
            c = np.linalg.solve(X[k].T @ X[k] + pen, X[k].T @ y[k])
            err[f] = (X[f] @ c / y[f] - 1) * 100
        out[name] = {"parameters": X.shape[1], "within_5pct": float(np.mean(np.abs(err) <= 5)),
                     "mean_abs_err_pct": float(np.mean(np.abs(err)))}
    return out


def corrected_halves(ps, pred0, res: dict, seed: int = 0) -> dict:
    """The calibration's corrections (`fit_calibration`, two assignments per item) scored on
    a joint run's measurements: calibrated on the calibration assignments plus 4/5 of the
    held-out ones, scored on the other fifth, 5 folds (every held-out scored once); against
    the calibration assignments alone (no corrections). Rows as the run measured them
    (``rows_ms``)."""
    from hwnas.latency.validate import metrics
    from hwnas.quant.latency import WITH_TRIPLES, MixedTable, all_items, fit_calibration

    @dataclass
    class Measured:
        best_ms: float

    meta = {k: v for k, v in pred0.table.meta.items() if k != "items"}
    if len(res["rows_ms"]) > len(all_items(ps, False)):
        meta["items"] = WITH_TRIPLES
    table = MixedTable(pred0.table.path, meta,
                       {k: Measured(v) for k, v in res["rows_ms"].items()})
    raw = MixedPredictor(table, ps, calibrated=False)
    W = res["measured_ms"]
    cal = res["calibration_assignments"]
    held = [t for t in W if t not in set(cal)]
    folds = np.array_split(np.random.default_rng(seed).permutation(len(held)), 5)

    def priced(train, test):
        c = fit_calibration(raw, [ps.parse(t) for t in train], [W[t] for t in train])
        table.meta["calibration"] = c
        return (MixedPredictor(table, ps).predict_many([ps.parse(t) for t in test]),
                "corrections_ms" in c)

    m = np.array([W[t] for t in held])
    p0, _ = priced(cal, held)
    p1, used = np.zeros(len(held)), []
    for f in folds:
        rest = [held[j] for j in np.setdiff1d(np.arange(len(held)), f)]
        p1[f], got = priced(cal + rest, [held[j] for j in f])
        used.append(got)
    return {"rows only (the calibration assignments)": metrics(p0, m),
            "with corrections (+ 4/5 of the held-out, 5 folds)": {
                "calibration_n": len(cal) + len(held) - len(folds[0]),
                "corrections_fitted": all(used), **metrics(p1, m)}}


def cmd_transfer(args) -> None:
    """The committed table's fidelity on another run's measurements (measuring nothing): every
    whole assignment a `joint` run measured (``--joint`` its JSON) and the table did not
    calibrate on, priced by the table and scaled by the drift of the table's references that
    run measured (the uniform ones: every run times them), as `--validate` scales by the
    references timed with each group. Across two runs, on the host as it was in each."""
    from hwnas.latency.validate import metrics

    cfg, device, ps, pred, target, sens, out = setup(args)
    res = json.loads(Path(args.joint).read_text())
    W = res["measured_ms"]
    cal = set(pred.table.meta["calibration"]["assignments"])
    held = [t for t in W if t not in cal]
    refs = [t for t in pred.table.meta["calibration"]["assignments"][:5] if t in W]
    if not refs:
        raise SystemExit(f"{args.joint} measured none of the table's references")
    ratio = float(np.median([W[t] / pred.predict(ps.parse(t)) for t in refs]))
    p = pred.predict_many([ps.parse(t) for t in held]) * ratio
    m = np.array([W[t] for t in held])
    first = np.array([t[:2] for t in held])  # the stem's and block 0's precisions
    doc = {"table": str(pred.table.path), "table_profiled": pred.table.meta.get("created"),
           "joint": args.joint, "joint_contention": res.get("contention"),
           "references": refs, "drift_ratio": ratio, "n": len(held),
           "reference_corrected": metrics(p, m),
           "by_first_two_units": {g: metrics(p[first == g], m[first == g])
                                  for g in sorted(set(first))}}
    print(json.dumps(doc, indent=1))


def cmd_joint(args) -> None:
    """The latency model's fidelity with the host's drift between runs taken out: the table's
    rows, `--calibration-n` calibration assignments and `--n` held-out assignments measured in
    ONE interleaved run; calibrated on the first, validated on the second (the committed
    table is not touched). What `hwnas quantize --validate` adds on top of this is the host's
    change between the profile and the validation."""
    import tempfile

    from hwnas.latency.validate import metrics
    from hwnas.quant.latency import (WITH_TRIPLES, Builder, MixedTable, all_items, assign_label,
                                     calibration_assignments, fit_calibration, measure_runners)

    cfg, device, ps, pred0, target, sens, out = setup(args)
    if args.reuse:  # the local fits again, on the whole assignments an earlier run measured
        res = json.loads((out / "joint.json").read_text())
        res["local_fits"] = local_fits(ps, res["measured_ms"], seed=args.seed)
        if "rows_ms" in res:
            res["calibration_corrections"] = corrected_halves(ps, pred0, res, args.seed)
            print(json.dumps(res["calibration_corrections"], indent=1))
        atomic_write_text(out / "joint.json", json.dumps(res, indent=1) + "\n")
        print(json.dumps(res["local_fits"], indent=1))
        return
    cal = calibration_assignments(ps, args.calibration_n, args.seed)
    held = ps.sample_stratified(args.n, np.random.default_rng(args.seed + 1),
                                {ps.text(a) for a in cal})
    rows = all_items(ps, args.triples)
    labels = rows + [assign_label(ps, a) for a in cal + held]
    whole = whole_models(target, ps, out / "models", cfg.seed)
    with tempfile.TemporaryDirectory(prefix="hwnas-joint-") as tmp:
        got = measure_runners(labels, Builder(ps, device, Path(tmp), whole), cfg.protocol,
                              desc=f"joint: {len(rows)} rows + {len(cal)} + {len(held)}")
    m = np.array([got.stats[assign_label(ps, a)].best_ms for a in held])

    def priced(items: str | None):
        meta = {k: v for k, v in pred0.table.meta.items() if k != "items"}
        if items:
            meta["items"] = items
        table = MixedTable(pred0.table.path, meta, {k: got.stats[k] for k in rows})
        table.meta["calibration"] = fit_calibration(
            MixedPredictor(table, ps, calibrated=False), cal,
            [got.stats[assign_label(ps, a)].best_ms for a in cal])
        return table, MixedPredictor(table, ps).predict_many(held)

    table, p = priced(None)
    res = {"model": args.model, "rows": len(rows), "calibration_n": len(cal), "n": len(held),
           "contention": got.contention.to_dict(),
           "calibration": {k: v for k, v in table.meta["calibration"].items()
                           if k not in ("assignments", "measured_ms", "fitted_ms", "what")},
           "held_out": metrics(p, m), "whole_models": whole.what,
           "rows_ms": {k: got.stats[k].best_ms for k in rows},
           # every whole assignment as measured in the run, for fits other than the table's
           "measured_ms": {ps.text(a): got.stats[assign_label(ps, a)].best_ms
                           for a in cal + held},
           "calibration_assignments": [ps.text(a) for a in cal]}
    if args.triples:  # the same rows and calibration assignments, priced with triples
        t3, p3 = priced(WITH_TRIPLES)
        res["held_out_with_triples"] = metrics(p3, m)
        res["calibration_with_triples"] = {
            k: v for k, v in t3.meta["calibration"].items()
            if k not in ("assignments", "measured_ms", "fitted_ms", "what")}
        print(json.dumps({"held_out": res["held_out"],
                          "held_out_with_triples": res["held_out_with_triples"]}, indent=1))
    res["local_fits"] = local_fits(ps, res["measured_ms"], seed=args.seed)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["assignment", "predicted_ms", "measured_ms", "error_pct"])
    for a, pp, mm in zip(held, p, m):
        w.writerow([ps.text(a), f"{pp:.4f}", f"{mm:.4f}", f"{(pp / mm - 1) * 100:+.2f}"])
    atomic_write_text(out / "joint.csv", buf.getvalue())
    atomic_write_text(out / "joint.json", json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["sweep", "sensitivity", "picture", "repeat", "joint",
                                    "transfer", "variant", "coverage", "objective"])
    ap.add_argument("--joint", default=None,
                    help="transfer: a joint run's JSON to price with the committed table")
    ap.add_argument("--n", type=int, default=100, help="joint: held-out assignments")
    ap.add_argument("--calibration-n", type=int, default=40, help="joint: calibration ones")
    ap.add_argument("--assignments", default="", help="repeat: comma-separated assignments")
    ap.add_argument("--copies", type=int, default=4, help="repeat: compiled copies of each")
    ap.add_argument("--option", default="memory_pattern=false",
                    help="variant: the device option K=V the second compile adds")
    ap.add_argument("--reuse", action="store_true",
                    help="joint: refit the local models on <out>/joint.json, measuring nothing")
    ap.add_argument("--triples", action="store_true",
                    help="joint: also time every neighbour triple (a → b → c) at every "
                    "precision and price with each triple's surplus over its pairs")
    ap.add_argument("--reps", type=int, default=1,
                    help="repeat: consecutive runs over the same compiled sessions")
    ap.add_argument("--model", choices=sorted(MODELS), default="det20")
    ap.add_argument("--device", default="cpu-ort-int8")
    ap.add_argument("--space", default=None)
    ap.add_argument("--arch", default=None)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--budgets", type=int, default=20)
    ap.add_argument("--against", choices=["kl"] + [o for o in OBJECTIVES if o != "hessian"],
                    default="kl",
                    help="objective: the sensitivity compared with HAWQ's Ω")
    ap.add_argument("--kl-n", type=int, default=4000,
                    help="objective: validation images the single-unit KL is averaged over")
    ap.add_argument("--group", type=int, default=60,
                    help="assignments timed together (one group: one host state for all)")
    ap.add_argument("--span-s", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop-images", type=int, default=None,
                    help="measure the single-unit drops on so many generated validation images "
                    "(hwnas quantize --drop-images)")
    ap.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                    help="sweep: what every method minimises (hwnas quantize --objective; "
                    "default %(default)s; the sweeps before 2026-11-24 07:00 UTC ran hessian)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--margin", type=float, default=None,
                    help="sweep: the methods choose under budget / (1 + PCT/100) (default: the "
                    "table's own margin, as hwnas quantize)")
    ap.add_argument("--canary", choices=["off", "correct"], default="correct",
                    help="sweep: time the table's references first and scale every price by "
                    "their drift, as hwnas quantize does (default correct)")
    ap.add_argument("--repair", type=int, default=2,
                    help="sweep: choose again where a pick measures over its budget, at most "
                    "this many times, as hwnas quantize --repair (default 2; 0: the first picks)"
                    "; the final picks are then timed afresh together")
    ap.add_argument("--verify", type=int, default=QuantizeConfig.verify,
                    help="sweep: time each method's K best answers near its budget and take the "
                    "least perturbation that ran within it, as hwnas quantize --verify K "
                    "(default %(default)s: off)")
    ap.add_argument("--rescore", action="store_true",
                    help="sweep: score the files of the sweep in --out again and recompute its "
                    "summary, re-using its choices and timing (measures nothing)")
    ap.add_argument("--final-runs", type=int, default=1,
                    help="sweep: time the final picks this many times over and take each one's "
                    "median (a single timing swings 1-2%% run to run here)")
    ap.add_argument("--test-n", type=int, default=0,
                    help="sweep: score on a generated test split of this many images (default: "
                    "the model's own test split)")
    ap.add_argument("--test-skip", type=int, default=0,
                    help="sweep, objective: score on the --test-n draw's images after the "
                    f"first K only (the classifier's: K a multiple of {CHUNK}): images no smaller "
                    "draw contains, e.g. --test-n 120480 --test-skip 20480 re-reads a sweep "
                    "scored on 20,000 on 100,000 new ones (with --rescore)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    {"sweep": cmd_sweep, "sensitivity": cmd_sensitivity, "picture": cmd_picture,
     "repeat": cmd_repeat, "joint": cmd_joint, "transfer": cmd_transfer,
     "variant": cmd_variant,
     "coverage": cmd_coverage, "objective": cmd_objective}[args.cmd](args)


if __name__ == "__main__":
    main()
