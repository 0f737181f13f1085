"""How reproducible is a latency read from interleaved rounds, by statistic: the lowest round
median of each item against the local estimate (`hwnas.measure.local_levels`), both read from
the *same* rounds.

    python tools/bench_estimate.py                       # the searched detector, AVX2 table
    python tools/bench_estimate.py --space det20 --arch det20:01230123012301230123 \\
        --ckpt /work/quant-out/det20-w0.25-cls.pt --runs 4 --json out.json

`--n` seeded stratified whole assignments plus the uniform ones (the mixed table's kind of
items: real QDQ models of the checkpoint on a real training image, `Builder`) are timed in
`--runs` consecutive interleaved protocol runs. Between every two runs, with the common scale
removed (the host's speed moved), the standard deviation of each statistic's log ratio is its
run-to-run noise on these items; the share of items more than 5% apart says what it does to a
±5% criterion. With this host's mixed table for the candidate, each statistic's errors against
the table's prices are reported too, each run scaled by its own median ratio (the group
ceiling of `hwnas quantize --validate`). Timing: set ``HWNAS_MEASURING_FLAG`` and run nothing
else heavy meanwhile.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np

from hwnas.errors import UserError
from hwnas.measure import Protocol, local_levels, measure_interleaved, round_medians
from hwnas.quant.latency import ASSIGN, Builder, MixedPredictor, load_mixed
from hwnas.quant.run import QuantizeConfig, _precision_space, _root, _whole_for

DET = "hwnas/detection/assets/det20-w0.5_searched_fcos.pt"


def statistics(medians: np.ndarray, window: int) -> dict[str, np.ndarray]:
    """Both readings of one run's round medians [items, rounds]."""
    return {"lowest": medians.min(axis=1), "local": local_levels(medians, window)}


def between_runs(values: list[np.ndarray]) -> dict:
    """Run-to-run noise of one statistic: per pair of runs, the std (%) of the log ratio with
    its median removed, and the share of items more than 5% apart."""
    std, apart = [], []
    for a, b in combinations(values, 2):
        x = np.log(a / b)
        x -= np.median(x)
        std.append(100 * float(np.std(x)))
        apart.append(float(np.mean(np.abs(x) > np.log(1.05))))
    return {"std_pct_mean": float(np.mean(std)), "std_pct_max": float(np.max(std)),
            "apart_5pct_mean": float(np.mean(apart)), "pairs": len(std)}


def against_table(values: list[np.ndarray], priced: np.ndarray) -> dict:
    """Errors against the table's prices, each run scaled by its own median ratio."""
    within, mean = [], []
    for v in values:
        e = np.log(priced / v)
        e -= np.median(e)
        within.append(float(np.mean(np.abs(e) <= np.log(1.05))))
        mean.append(100 * float(np.mean(np.abs(np.expm1(e)))))
    return {"within_5pct": within, "mean_abs_err_pct": mean}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu-ort-int8-noprop")
    ap.add_argument("--space", default="det20-fcos-w0.5")
    ap.add_argument("--arch", default="det20:10031202020001210332")
    ap.add_argument("--ckpt", default=DET)
    ap.add_argument("--n", type=int, default=28, help="stratified assignments (plus uniform)")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--span-s", type=float, default=Protocol.span_s)
    ap.add_argument("--window", type=int, default=Protocol.local_window)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None, help="write the rounds and the summary")
    args = ap.parse_args(argv)
    if args.runs < 2:
        print("error: --runs must be at least 2 (noise is read between runs)", file=sys.stderr)
        return 2
    try:
        cfg = QuantizeConfig(device=args.device, space=args.space, arch=args.arch,
                             ckpt=Path(args.ckpt))
        device, ps = _precision_space(cfg)
        assigns = list(dict.fromkeys(ps.uniform(p) for p in ps.precisions))
        assigns += ps.sample_stratified(args.n, np.random.default_rng(args.seed),
                                        {ps.text(a) for a in assigns})
        try:
            pred = MixedPredictor(load_mixed(_root(cfg), device, ps), ps)
        except UserError:
            pred = None
        protocol = Protocol(span_s=args.span_s, estimate="lowest")  # raw rounds
        runs = []
        with tempfile.TemporaryDirectory(prefix="hwnas-estimate-") as tmp:
            builder = Builder(ps, device, Path(tmp), _whole_for(cfg, ps, Path(tmp)))
            runners = [builder(ASSIGN + ps.text(a)) for a in assigns]
            for k in range(args.runs):
                seen: dict = {}
                t0 = time.time()
                m = measure_interleaved(runners, protocol,
                                        on_round=lambda d, t, r: seen.update(r=r))
                medians = round_medians(seen["r"])
                runs.append({"started": t0, "seconds": time.time() - t0,
                             "contention": m.contention.to_dict(),
                             "round_medians_ms": medians.round(5).tolist()})
                print(f"run {k + 1}/{args.runs}: {medians.shape[1]} rounds, "
                      f"{m.contention.line()}", file=sys.stderr)
            for r in runners:
                r.close()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    read = [statistics(np.array(r["round_medians_ms"]), args.window) for r in runs]
    summary = {"items": len(assigns), "runs": len(runs), "window": args.window}
    for name in ("lowest", "local"):
        vals = [r[name] for r in read]
        summary[name] = between_runs(vals)
        level = [100 * float(np.median(np.log(r[name] / r["lowest"]))) for r in read]
        summary[name]["level_vs_lowest_pct"] = level
        if pred is not None:
            summary[name]["table"] = against_table(vals, pred.predict_many(assigns))
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "assignments": [ps.text(a) for a in assigns],
                                         "summary": summary, "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
