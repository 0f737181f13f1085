#!/usr/bin/env python
"""Why the protocol takes the lowest round median: watch this host's speed change over time.

    python tools/host_regimes.py [--seconds 30] [--arch det20:00000000000000000000]

Runs one candidate back to back for `--seconds` and prints, per 200 ms window, the median run
time relative to the fastest window, then the fraction of windows within 3% of the fastest.
On the 2-core development host this showed windows at +0%, ~+20% and ~+35% lasting 0.2–2 s,
with no steal time reported: a single window, or a short measurement, can land in any of them.
This is a diagnostic of the host, not a measurement of the model, so it times with a plain loop
through hwnas.measure's helper and reports ratios only.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from hwnas.backends import compile_model
from hwnas.devices import load_device
from hwnas.export import export_onnx
from hwnas.measure import _time_runs, announce_measuring
from hwnas.spaces import get_space


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu-ort-fp32")
    ap.add_argument("--arch", default="det20:00000000000000000000")
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    space = get_space(args.arch.split(":")[0])
    arch = space.parse(args.arch)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(space.build(arch), space.default_input, Path(tmp) / "m.onnx")
        with compile_model(path, load_device(args.device)) as runner, announce_measuring():
            feed = runner.random_feed()
            _time_runs(runner, feed, 50)
            windows = []
            end = time.perf_counter() + args.seconds
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                runs = []
                while time.perf_counter() - t0 < 0.2:
                    runs += _time_runs(runner, feed, 5)
                windows.append(float(np.median(runs)))
    w = np.array(windows)
    rel = w / w.min() - 1
    print(" ".join(f"{100 * r:+.0f}" for r in rel))
    print(json.dumps({"arch": str(arch), "windows": len(w), "fastest_ms": round(float(w.min()), 4),
                      "slowest_rel_pct": round(float(100 * rel.max()), 1),
                      "within_3pct_of_fastest": round(float((rel <= 0.03).mean()), 3),
                      "median_rel_pct": round(float(100 * np.median(rel)), 1)}))


if __name__ == "__main__":
    main()
