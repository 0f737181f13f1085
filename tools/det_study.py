"""Stand-alone detector ground truth: train archs with several seeds, COCO AP on test and val.

The ground truth a detection search is judged against (issue 10): each (arch, seed) is trained
from scratch with `hwnas detect train`'s trainer on shapes-det and evaluated with pycocotools.
Rows go to ``<out>/results.jsonl`` as each run finishes; a rerun skips the (arch, seed, steps)
rows already there and resumes a half-trained checkpoint, so the study survives a kill.

  python tools/det_study.py train --archs det20:00000000000000000000 --seeds 0 1 2 \
      --steps 1500 --out /work/det-study
  python tools/det_study.py summary --out /work/det-study

`summary` prints, per arch and schedule, the mean and the seed std of test AP, and the
between-arch spread (max - min of the means) for each schedule.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def done_rows(out: Path) -> list[dict]:
    f = out / "results.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] \
        if f.exists() else []


def trained(out: Path, space: str, steps: int) -> list[dict]:
    """The rows of `space` trained for `steps` steps."""
    return [r for r in done_rows(out) if r["space"] == space and r["steps"] == steps]


def coco_scores(det, data: str, image_size: int, keys=("AP", "AP50")) -> dict:
    """`keys` of the detector's COCO metrics on the test and val splits (pycocotools)."""
    from hwnas.detection.data import load_coco, resolve_data
    from hwnas.detection.evaluate import evaluate

    root = resolve_data(data)
    return {split: {k: m[k] for k in keys if k in m}
            for split in ("test", "val")
            for m in [evaluate(load_coco(root, split, image_size), det=det)]}


def train(args) -> None:
    import torch

    from hwnas.detection.config import DetTrainConfig
    from hwnas.detection.train import DetectorTrainer, load_detector

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    have = {(r["arch"], r["seed"], r["steps"], r["space"]) for r in done_rows(args.out)}
    jobs = [(a, s) for a in args.archs or [] for s in args.seeds]
    jobs += [(p.rpartition("@")[0], int(p.rpartition("@")[2])) for p in args.pairs or []]
    for arch, seed in jobs:
        if (arch, seed, args.steps, args.space) in have:
            continue
        tag = f"{args.space}_{arch.split(':')[-1]}_s{seed}_{args.steps}"
        ckpt = args.out / f"{tag}.pt"
        cfg = DetTrainConfig(space=args.space, arch=arch, steps=args.steps, seed=seed,
                             image_size=args.image_size,
                             warmup_steps=min(300, args.steps // 10), init=args.init)
        summary = DetectorTrainer(cfg, ckpt, progress=not args.quiet).run()
        det, meta = load_detector(ckpt)
        row = {"space": args.space, "arch": arch, "seed": seed, "steps": args.steps,
               "image_size": args.image_size, "init": args.init,
               "train_s": summary["train_s"], "checkpoint": str(ckpt)}
        for split, m in coco_scores(det, cfg.data, args.image_size).items():
            row[f"{split}_AP"] = m["AP"]
            row[f"{split}_AP50"] = m["AP50"]
        with open(args.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def summary(args) -> None:
    rows = done_rows(args.out)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["space"], r["steps"], r["arch"]), []).append(r)
    out = {"archs": [], "schedules": {}}
    for (space, steps, arch), rs in sorted(groups.items()):
        ap = np.array([r["test_AP"] for r in rs])
        out["archs"].append({"space": space, "steps": steps, "arch": arch, "n": len(rs),
                             "test_AP_mean": round(float(ap.mean()), 4),
                             "test_AP_seed_std": round(float(ap.std(ddof=1)), 4)
                             if len(rs) > 1 else None,
                             "train_min": round(float(np.mean([r["train_s"] for r in rs])) / 60,
                                                1)})
    for space, steps in {(a["space"], a["steps"]) for a in out["archs"]}:
        a = [x for x in out["archs"] if x["space"] == space and x["steps"] == steps]
        stds = [x["test_AP_seed_std"] for x in a if x["test_AP_seed_std"] is not None]
        means = [x["test_AP_mean"] for x in a]
        out["schedules"][f"{space}@{steps}"] = {
            "archs": len(a), "spread": round(max(means) - min(means), 4),
            "seed_std_pooled": round(float(np.sqrt(np.mean(np.square(stds)))), 4)
            if stds else None}
    json.dump(out, sys.stdout, indent=1)
    print()


def searches(folder: Path) -> list[dict]:
    """The picks of the `hwnas detect search` result files in `folder` (``*.json`` with a
    best_arch), with the trained arch name they map to (det20-fcos-w0.5:C… -> det20:C…)."""
    picks = []
    for f in sorted(folder.glob("*.json")):
        doc = json.loads(f.read_text())
        if "best_arch" not in doc:
            continue
        choices = doc["best_arch"].rpartition(":")[2]
        picks.append({"file": str(f), "method": doc["method"], "budget_ms": doc["budget_ms"],
                      "seed": doc["seed"], "pick": doc["best_arch"], "score": doc["score"],
                      "predicted_ms": doc["predicted_latency_ms"], "evaluations":
                      doc["evaluations"], "arch": f"{doc['space'].split('-')[0]}:{choices}"})
    return picks


def paired(diffs: list[float]) -> dict:
    """Mean of paired differences with its two-sided 95% t interval (scipy.stats.ttest_1samp)."""
    from scipy.stats import ttest_1samp

    d = np.asarray(diffs, dtype=float)
    if len(d) < 2:
        return {"n": len(d), "mean": float(d.mean()) if len(d) else None, "ci95": None}
    ci = ttest_1samp(d, 0.0).confidence_interval(0.95)
    return {"n": len(d), "mean": round(float(d.mean()), 4),
            "ci95": [round(float(ci.low), 4), round(float(ci.high), 4)],
            "excludes_zero": bool(ci.low > 0 or ci.high < 0)}


def study(args) -> None:
    """Searched vs random vs the hand-designed baseline, stand-alone test AP, paired by seed:
    the pick of search seed s is trained with seed s, and so is the baseline it is paired with."""
    ap = {(r["arch"], r["seed"]): r["test_AP"] for r in trained(args.out, args.space, args.steps)}
    picks = searches(args.searches)
    todo = sorted({f"{p['arch']}@{p['seed']}" for p in picks if (p["arch"], p["seed"]) not in ap}
                  | {f"{args.baseline}@{p['seed']}" for p in picks
                     if (args.baseline, p["seed"]) not in ap})
    if args.todo:
        print(" ".join(todo))
        return
    measured = json.loads(args.measured.read_text()) if args.measured else {}
    out = {"space": args.space, "steps": args.steps, "baseline": args.baseline,
           "missing": todo, "budgets": {}}
    for budget in sorted({p["budget_ms"] for p in picks}):
        per = {}
        for p in picks:
            if p["budget_ms"] == budget:
                p["test_AP"] = ap.get((p["arch"], p["seed"]))
                p["measured"] = measured.get("picks", {}).get(p["pick"])
                per.setdefault(p["seed"], {})[p["method"]] = p
        rows_b, d_rand, d_base = [], [], []
        for seed, m in sorted(per.items()):
            base = ap.get((args.baseline, seed))
            row = {"seed": seed, "baseline_AP": base,
                   **{k: {x: v[x] for x in ("pick", "score", "predicted_ms", "test_AP",
                                            "measured")} for k, v in m.items()}}
            rows_b.append(row)
            evo, rnd = m.get(args.searched, {}).get("test_AP"), m.get("random", {}).get("test_AP")
            if evo is not None and rnd is not None:
                d_rand.append(100 * (evo - rnd))
            if evo is not None and base is not None:
                d_base.append(100 * (evo - base))
        out["budgets"][f"{budget:g}"] = {
            "seeds": rows_b,
            f"{args.searched}_minus_random_AP": paired(d_rand),
            f"{args.searched}_minus_baseline_AP": paired(d_base)}
    if measured:
        out["measured"] = {k: measured[k] for k in ("baseline_widths", "host_shift_pct",
                                                     "contention", "noise_floor_pct")
                           if k in measured}
    if args.plot:
        study_plot(out, measured, args.plot)
    json.dump(out, sys.stdout, indent=1)
    print()


def study_plot(out: dict, measured: dict, path: Path) -> None:
    """Stand-alone test AP vs measured latency (the host's shift since pricing taken out), one
    panel per budget: the searched and random picks by seed, the baseline at the seeds' mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = 1 + measured.get("host_shift_pct", 0.0) / 100 if measured else 1.0
    base_ms = (measured.get("baseline_widths", {}).get("0.5", {}).get("measured_ms")
               if measured else None)
    budgets = out["budgets"]
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4.2), squeeze=False)
    for ax, (budget, b) in zip(axes[0], budgets.items()):
        for method, marker in (("evolution", "o"), ("random", "s")):
            pts = [(r[method]["measured"]["measured_ms"] / ratio, 100 * r[method]["test_AP"],
                    r["seed"]) for r in b["seeds"] if r.get(method, {}).get("test_AP")
                   is not None and r[method].get("measured")]
            if pts:
                ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], marker=marker,
                           label=method, s=40)
                for x, y, seed in pts:
                    ax.annotate(f"s{seed}", (x, y), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        base = [r["baseline_AP"] for r in b["seeds"] if r["baseline_AP"] is not None]
        if base and base_ms:
            ax.errorbar([base_ms / ratio], [100 * np.mean(base)],
                        yerr=[100 * np.std(base, ddof=1)] if len(base) > 1 else None,
                        fmt="*", ms=12, color="k", label="baseline (all 3x3, w0.5), seed mean±sd")
        ax.axvline(float(budget), color="r", ls="--", lw=1, label=f"budget {budget} ms")
        ax.set_xlabel("measured latency / host shift (ms)")
        ax.set_ylabel("stand-alone test AP (x100)")
        ax.set_title(f"budget {budget} ms")
        ax.legend(fontsize=7)
    fig.suptitle(f"{out['space']} FCOS @ {out['steps']} steps: searched vs random vs baseline",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure(args) -> None:
    """Every pick and the baseline at several widths, exported as the deployable detector (NMS
    inside, priced at its worst case) and measured interleaved, with the table's reference
    candidates for the host's shift since pricing; each pick judged against its budget."""
    from hwnas.backends import compile_model, compiled
    from hwnas.devices import load_device
    from hwnas.latency.lookup import drift_from, open_predictor, references
    from hwnas.latency.profile import candidate_builder, measure_opened
    from hwnas.latency.validate import budget_verdict
    from hwnas.measure import Protocol
    from hwnas.spaces import get_space

    device, space = load_device(args.device), get_space(args.det_space)
    shape = space.default_input
    lut, _ = open_predictor(device, space, shape, None, None, False, "off", Protocol())
    picks = searches(args.searches)
    choices = args.baseline.rpartition(":")[2]
    widths = [f"{get_space(args.det_space.rpartition('-w')[0] + f'-w{w:g}').name}:{choices}"
              for w in args.widths]
    refs = list(references(lut.table))
    labels = list(dict.fromkeys([*(p["pick"] for p in picks), *widths, *refs]))

    files = dict(f.rpartition("@")[::2] for f in args.files or [])  # path -> budget
    labels += [f"file:{f}" for f in files]

    def open_runner(label: str):
        if label.startswith("file:"):
            return compile_model(label[5:], device)
        return compiled(*candidate_builder(get_space(label.partition(":")[0]), shape)(label),
                        device)

    got = measure_opened(labels, open_runner, Protocol(span_s=args.span_s), args.journal)
    shift = drift_from(lut.table, {r: got.stats[r].best_ms for r in refs}).ratio
    noise = lut.table.path.parent / "noise.json"
    out = {"device": device.name, "table": str(lut.table.path), "host_shift_pct":
           round(100 * (shift - 1), 2), "contention": got.contention.to_dict(), "picks": {},
           "baseline_widths": {}}
    for p in picks:
        ms = got.stats[p["pick"]].best_ms
        out["picks"][p["pick"]] = {"measured_ms": round(ms, 4), **{
            f"{k}@{p['budget_ms']:g}": v for k, v in budget_verdict(
                ms, p["budget_ms"], noise, shift).items() if k.startswith("keeps")}}
    for w, label in zip(args.widths, widths):
        s = get_space(label.partition(":")[0])
        priced = lut.predict(s.parse(label)) if s.name == space.name else None
        out["baseline_widths"][f"{w:g}"] = {"arch": label, "measured_ms":
                                            round(got.stats[label].best_ms, 4),
                                            "priced_ms": priced and round(priced, 4)}
    for f, budget in files.items():
        ms = got.stats[f"file:{f}"].best_ms
        out.setdefault("files", {})[f] = {"measured_ms": round(ms, 4), **budget_verdict(
            ms, float(budget), noise, shift)}
    out["noise_floor_pct"] = budget_verdict(1.0, 1.0, noise)["tolerance_pct"]
    text = json.dumps(out, indent=1)
    if args.o:
        args.o.write_text(text + "\n")
    print(text)


def rank(args) -> None:
    """Kendall tau of supernet AP vs stand-alone test AP (mean over seeds) over every arch
    trained at `--steps`, with a paired bootstrap 95% CI over archs (scipy.stats.bootstrap)."""
    from scipy.stats import bootstrap, kendalltau

    from hwnas.detection.search import DetSearchConfig, open_scorer
    from hwnas.spaces import get_space

    means: dict[str, list[float]] = {}
    for r in trained(args.out, args.space, args.steps):
        means.setdefault(r["arch"], []).append(r["test_AP"])
    space = get_space(args.det_space)
    scorer, _ = open_scorer(args.supernet, space, DetSearchConfig(
        device="cpu-ort-fp32", space=args.det_space, budget_ms=0.0, method="random",
        supernet=args.supernet, val_n=args.val_n))
    archs = sorted(means)
    sup = np.array([100 * scorer.score(space.parse(f"{space.name}:{a.rpartition(':')[2]}"))
                    for a in archs])
    alone = np.array([100 * float(np.mean(means[a])) for a in archs])
    tau = kendalltau(sup, alone).statistic

    def tau_of(x, y):  # a resample with one distinct value ranks nothing: tau 0, not NaN
        t = kendalltau(x, y).statistic
        return 0.0 if np.isnan(t) else t

    ci = bootstrap((sup, alone), tau_of, paired=True,
                   vectorized=False, n_resamples=2000, confidence_level=0.95,
                   method="percentile", random_state=0).confidence_interval
    json.dump({"archs": len(archs), "kendall_tau": round(float(tau), 3),
               "ci95": [round(float(ci.low), 3), round(float(ci.high), 3)],
               "rows": [{"arch": a, "supernet_AP": round(float(x), 2),
                         "standalone_test_AP": round(float(y), 2), "seeds": len(means[a])}
                        for a, x, y in zip(archs, sup, alone)]}, sys.stdout, indent=1)
    print()


def ship(args) -> None:
    """The study's best searched detector as a small committed checkpoint: the trained weights
    in fp16 (no optimizer state), re-scored from that file, so the shipped numbers are its own.
    The best is the pick with the highest stand-alone *val* AP (test AP stays for reporting)."""
    import torch

    from hwnas.detection.train import load_detector, read_detector_checkpoint

    picks = [p for p in searches(args.searches) if p["method"] == args.searched]
    rows = {(r["arch"], r["seed"]): r for r in trained(args.out, args.space, args.steps)}
    done = [(rows[(p["arch"], p["seed"])], p) for p in picks if (p["arch"], p["seed"]) in rows]
    if not done:
        sys.exit("no searched pick is trained yet: run `study --todo` and `train --pairs`")
    row, pick = max(done, key=lambda rp: rp[0]["val_AP"])
    ck = read_detector_checkpoint(row["checkpoint"])
    slim = {"format": ck["format"], "meta": {**ck["meta"], "shipped_from": {
        "search": pick["file"], "budget_ms": pick["budget_ms"], "search_seed": pick["seed"],
        "trained": row["checkpoint"], "note": "fp16 weights of the trained detector"}},
        "model": {k: v.half() if v.is_floating_point() else v for k, v in ck["model"].items()}}
    args.o.parent.mkdir(parents=True, exist_ok=True)
    torch.save(slim, args.o)
    det, meta = load_detector(args.o)
    got = {"checkpoint": str(args.o), "arch": row["arch"], "pick": pick["pick"],
           "budget_ms": pick["budget_ms"], "search": pick["file"], "fp32": {
               "test_AP": row["test_AP"], "val_AP": row["val_AP"]}}
    for split, m in coco_scores(det, meta["config"]["data"], meta["detector"]["image_size"],
                                ("AP", "AP50", "AP75")).items():
        got[split] = {k: round(float(v), 4) for k, v in m.items()}
    json.dump(got, sys.stdout, indent=1)
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--archs", nargs="+")
    t.add_argument("--pairs", nargs="+", metavar="ARCH@SEED",
                   help="(arch, training seed) pairs, e.g. the picks of `study --todo`")
    t.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--space", default="det20-w0.5")
    t.add_argument("--image-size", type=int, default=128)
    t.add_argument("--init", default=None)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--quiet", action="store_true")
    s = sub.add_parser("summary")
    s.add_argument("--out", type=Path, required=True)
    st = sub.add_parser("study")
    st.add_argument("--out", type=Path, required=True)
    st.add_argument("--searches", type=Path, required=True,
                    help="folder of `hwnas detect search -o` results")
    st.add_argument("--space", default="det20-w0.5")
    st.add_argument("--steps", type=int, default=1500)
    st.add_argument("--baseline", default="det20:" + "0" * 20)
    st.add_argument("--searched", default="evolution")
    st.add_argument("--measured", type=Path, help="the JSON `measure -o` wrote")
    st.add_argument("--plot", type=Path, help="write the AP vs measured latency figure here")
    st.add_argument("--todo", action="store_true",
                    help="print the ARCH@SEED pairs still to train (for `train --pairs`)")
    m = sub.add_parser("measure")
    m.add_argument("--searches", type=Path, required=True)
    m.add_argument("--device", default="cpu-ort-fp32")
    m.add_argument("--det-space", default="det20-fcos-w0.5")
    m.add_argument("--baseline", default="det20:" + "0" * 20)
    m.add_argument("--widths", nargs="+", type=float, default=[0.5, 0.625, 0.75])
    m.add_argument("--span-s", type=float, default=5.0)
    m.add_argument("--journal", type=Path)
    m.add_argument("--files", nargs="+", metavar="ONNX@BUDGET",
                   help="deployable ONNX files (e.g. the shipped pick) judged against a budget")
    m.add_argument("-o", type=Path)
    r = sub.add_parser("rank")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--supernet", type=Path, required=True)
    r.add_argument("--space", default="det20-w0.5")
    r.add_argument("--det-space", default="det20-fcos-w0.5")
    r.add_argument("--steps", type=int, default=1500)
    r.add_argument("--val-n", type=int, default=100)
    sh = sub.add_parser("ship")
    sh.add_argument("--out", type=Path, required=True)
    sh.add_argument("--searches", type=Path, required=True)
    sh.add_argument("--space", default="det20-w0.5")
    sh.add_argument("--steps", type=int, default=1500)
    sh.add_argument("--searched", default="evolution")
    sh.add_argument("-o", type=Path, required=True, help="the slim checkpoint to write")
    args = ap.parse_args()
    {"ship": ship, "train": train, "summary": summary, "study": study, "measure": measure,
     "rank": rank}[args.cmd](args)


if __name__ == "__main__":
    main()
