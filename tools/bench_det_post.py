#!/usr/bin/env python
"""Why detector latency candidates run NMS at its worst case: the same arch with different
weights, timed interleaved with the protocol.

    python tools/bench_det_post.py [--space det20-fcos-w0.5] [--n-archs 2] [--seeds 3] [--copies 2]

For each of `--n-archs` seeded random candidates and each weight seed: the deployable detector
with random weights (`DeployableDetector` of a freshly initialised detector) and the latency
candidate (`DetectorSpace.build`: the worst-case head, `worst_case_nms`), all in one interleaved
measurement; each (kind, seed) is built `--copies` times (separate sessions of the same weights),
so the spread between copies (the host's) can be read against the spread between seeds (the
weights'). Prints one JSON object: per arch and kind, the best-round latency of every (seed,
copy), the spread over seeds (of each seed's first copy) and the largest spread between copies. Run it on a quiet host (see `tools/host_regimes.py`).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from hwnas.detection.export import DeployableDetector
from hwnas.detection.model import build_detector
from hwnas.devices import load_device
from hwnas.latency.profile import measure_labelled
from hwnas.measure import Protocol
from hwnas.spaces import get_space


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu-ort-fp32")
    ap.add_argument("--space", default="det20-fcos-w0.5")
    ap.add_argument("--n-archs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--span-s", type=float, default=5.0)
    args = ap.parse_args()
    space, device = get_space(args.space), load_device(args.device)
    archs = [str(a) for a in space.sample_distinct(args.n_archs, np.random.default_rng(7))]
    labels = [f"{i}/{kind}/{s}/{c}" for i in range(len(archs)) for kind in ("worst", "random")
              for s in range(args.seeds) for c in range(args.copies)]

    def build(label: str):
        i, kind, s, _ = label.split("/")
        torch.manual_seed(int(s))
        arch = space.parse(archs[int(i)])
        if kind == "worst":
            return space.build(arch), space.default_input
        c = space.detector_config(arch)
        return (DeployableDetector(build_detector(c), c.score_thresh, c.nms_thresh,
                                   c.max_det).eval(), space.default_input)

    got = measure_labelled(labels, build, device, Protocol(span_s=args.span_s), progress=False)
    out = {"space": space.name, "device": device.name, "archs": {},
           "contention": got.contention.to_dict()}
    for i, a in enumerate(archs):
        row = {}
        for kind in ("worst", "random"):
            ms = [[got.stats[f"{i}/{kind}/{s}/{c}"].best_ms for c in range(args.copies)]
                  for s in range(args.seeds)]
            first = [m[0] for m in ms]
            row[kind] = {"ms": [[round(x, 3) for x in m] for m in ms],
                         "seed_spread_pct": round(100 * (max(first) / min(first) - 1), 2),
                         "copy_spread_pct": round(100 * max(max(m) / min(m) - 1 for m in ms), 2)}
        out["archs"][a] = row
    print(json.dumps(out))


if __name__ == "__main__":
    main()
