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


def train(args) -> None:
    import torch

    from hwnas.detection.config import DetTrainConfig
    from hwnas.detection.data import load_coco, resolve_data
    from hwnas.detection.evaluate import evaluate
    from hwnas.detection.train import DetectorTrainer, load_detector

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    have = {(r["arch"], r["seed"], r["steps"], r["space"]) for r in done_rows(args.out)}
    for arch in args.archs:
        for seed in args.seeds:
            if (arch, seed, args.steps, args.space) in have:
                continue
            tag = f"{args.space}_{arch.split(':')[-1]}_s{seed}_{args.steps}"
            ckpt = args.out / f"{tag}.pt"
            cfg = DetTrainConfig(space=args.space, arch=arch, steps=args.steps, seed=seed,
                                 image_size=args.image_size,
                                 warmup_steps=min(300, args.steps // 10), init=args.init)
            summary = DetectorTrainer(cfg, ckpt, progress=not args.quiet).run()
            det, meta = load_detector(ckpt)
            root = resolve_data(cfg.data)
            row = {"space": args.space, "arch": arch, "seed": seed, "steps": args.steps,
                   "image_size": args.image_size, "init": args.init,
                   "train_s": summary["train_s"], "checkpoint": str(ckpt)}
            for split in ("test", "val"):
                m = evaluate(load_coco(root, split, args.image_size), det=det)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--archs", nargs="+", required=True)
    t.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--space", default="det20-w0.5")
    t.add_argument("--image-size", type=int, default=128)
    t.add_argument("--init", default=None)
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--quiet", action="store_true")
    s = sub.add_parser("summary")
    s.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    train(args) if args.cmd == "train" else summary(args)


if __name__ == "__main__":
    main()
