"""Search-evaluation throughput: in-process vs Ray actors (issue 12's figure).

Scores the same seeded candidates with a `SupernetScorer` (BatchNorm recalibration + held-out
accuracy, as `hwnas search` does), in the chunks a search sends (16), in-process and on a local
Ray (loopback, dashboard off) with 1 and 2 actors that each hold the supernet; checks that every
score equals the in-process one bit for bit. Actor start-up (process, imports, the model from the
object store) is reported apart from the throughput.

The supernet is freshly initialised (seeded): scoring costs the same whatever the weights.

    python tools/bench_fleet.py --space det20-w0.25 --image-size 64 --archs 48 --json

Wall time of scoring, not a device latency: timing *devices* is `hwnas/measure.py`'s job; on a
shared host every figure here moves with what else runs (a quiet slot matters).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from hwnas import fleet
from hwnas.data import load_data
from hwnas.distributed import InProcessExecutor
from hwnas.spaces import get_space
from hwnas.train import SupernetScorer
from hwnas.train.supernet import Supernet

CHUNK = 16  # what `Search.evaluate` sends per call (`Search.checkpoint_chunk`)


def throughput(executor, scorer, archs) -> tuple[float, np.ndarray]:
    """(archs per second, scores), in chunks of `CHUNK`."""
    t0 = time.perf_counter()  # wall time of scoring, not a device latency
    scores = np.concatenate([executor.evaluate(scorer, archs[i:i + CHUNK])
                             for i in range(0, len(archs), CHUNK)])
    return len(archs) / (time.perf_counter() - t0), scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="det20-w0.25")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--archs", type=int, default=48)
    ap.add_argument("--val-n", type=int, default=200, help="held-out images per score")
    ap.add_argument("--bn-batches", type=int, default=4)
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    space = get_space(args.space)
    splits = load_data("shapes", args.image_size, {"train": 1024, "val": args.val_n, "test": 8})
    torch.manual_seed(args.seed)
    net = Supernet(space, args.image_size, splits.num_classes)
    scorer = SupernetScorer(net, splits, bn_batches=args.bn_batches, val_n=args.val_n,
                            seed=args.seed)
    archs = space.sample_distinct(args.archs, np.random.default_rng(args.seed), set())
    rows, ref = [], None
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        torch.set_num_threads(threads)
        InProcessExecutor().evaluate(scorer, archs[:2])  # warm: kernels made for the shapes
        rate, scores = throughput(InProcessExecutor(), scorer, archs)
        ref = scores if ref is None else ref
        rows.append({"where": f"in-process, {threads} torch thread(s)", "archs_per_s": rate,
                     "startup_s": 0.0, "equal": bool(np.array_equal(scores, ref))})
    fleet.start_local(num_cpus=os.cpu_count() or 2)
    try:
        for n in [int(x) for x in args.actors.split(",")]:
            ex = fleet.RayExecutor(actors=n)
            t0 = time.perf_counter()
            ex.evaluate(scorer, archs[:2 * n])  # start the actors, load the model, warm up
            startup = time.perf_counter() - t0
            rate, scores = throughput(ex, scorer, archs)
            rows.append({"where": f"Ray, {n} actor(s), 1 torch thread each",
                         "archs_per_s": rate, "startup_s": startup,
                         "equal": bool(np.array_equal(scores, ref))})
            ex.close()
    finally:
        fleet.shutdown()
    out = {"space": space.name, "image_size": args.image_size, "archs": len(archs),
           "val_n": args.val_n, "bn_batches": args.bn_batches, "chunk": CHUNK,
           "cpus": os.cpu_count(), "rows": rows}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{space.name} @ {args.image_size}px, {len(archs)} candidates in chunks of {CHUNK}, "
          f"val_n {args.val_n}, {args.bn_batches} BN batches, {os.cpu_count()} CPUs")
    for r in rows:
        print(f"  {r['where']:<40} {r['archs_per_s']:6.2f} archs/s  (start-up "
              f"{r['startup_s']:.1f} s; scores equal to in-process: {r['equal']})")


if __name__ == "__main__":
    sys.exit(main())
