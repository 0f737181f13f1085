#!/usr/bin/env python
"""Pricing throughput of the LUT: candidates per second through the vectorised path.

    python tools/bench_pricing.py [--device cpu-ort-fp32] [--space det20] [--n 1000000]

Times `LutPredictor.predict_many` on N seeded random candidates (best of 5 repeats) and, for
comparison, the per-candidate walk `predict`. This is the throughput of a Python function, not a
device latency, so it uses timeit rather than the device protocol of hwnas/measure.py. Prints
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import timeit

import numpy as np

from hwnas.devices import load_device
from hwnas.latency import LatencyTable, LutPredictor, table_path, tables_dir
from hwnas.spaces import get_space


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu-ort-fp32")
    ap.add_argument("--space", default="det20")
    ap.add_argument("--n", type=int, default=1_000_000)
    args = ap.parse_args()
    device, space = load_device(args.device), get_space(args.space)
    table = LatencyTable.load(table_path(tables_dir(), device.name, space.name,
                                         space.default_input))
    pred = LutPredictor(table, space)
    archs = space.sample_many(args.n, np.random.default_rng(0))
    vec_s = min(timeit.repeat(lambda: pred.predict_many(archs), number=1, repeat=5))
    few = [space.arch(a) for a in archs[:2000]]
    walk_s = min(timeit.repeat(lambda: [pred.predict(a) for a in few], number=1, repeat=3))
    print(json.dumps({"space": space.name, "device": device.name, "n": args.n,
                      "vectorised_candidates_per_s": round(args.n / vec_s),
                      "walk_candidates_per_s": round(len(few) / walk_s)}))


if __name__ == "__main__":
    main()
