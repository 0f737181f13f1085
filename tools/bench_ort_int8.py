"""How `cpu-ort-int8`'s quantiser options were chosen: whole det20 candidates timed in fp32 and
in int8 variants (the device's U8S8, S8S8, and U8S8 with depthwise+stem convs kept fp32),
interleaved with the protocol.

    flock /tmp/hwnas-heavy.lock python tools/bench_ort_int8.py [--span-s 5] [--archs 3]
"""

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np

from hwnas.backends import compile_model
from hwnas.devices import load_device
from hwnas.export import export_onnx
from hwnas.measure import Protocol, measure_interleaved
from hwnas.spaces import get_space


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--space", default="det20")
    ap.add_argument("--archs", type=int, default=3)
    ap.add_argument("--span-s", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    space = get_space(args.space)
    fp32, int8 = load_device("cpu-ort-fp32"), load_device("cpu-ort-int8")
    def variant(**kw):
        return dataclasses.replace(int8, options={**int8.options, **kw})

    variants = {"fp32": fp32, "int8 U8S8 (device)": int8,
                "int8 S8S8": variant(int8_activation="int8"),
                "int8 U8S8 dw+stem fp32": variant(int8_skip=["depthwise", "stem"])}
    rng = np.random.default_rng(args.seed)
    archs = [space.arch([c] * space.num_layers) for c in range(len(space.choice_names))]
    archs += [space.sample(rng) for _ in range(args.archs)]
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            path = export_onnx(space.build(arch), space.default_input, Path(tmp) / "m.onnx")
            runners = [compile_model(path, d) for d in variants.values()]
            stats = measure_interleaved(runners, Protocol(span_s=args.span_s)).stats
            print(f"{arch}: " + "  ".join(f"{name} {s.best_ms:.3f} ms"
                                          for name, s in zip(variants, stats)), flush=True)
            for r in runners:
                r.close()


if __name__ == "__main__":
    main()
