"""Train a stand-alone classifier of one candidate on the proxy data and save it as a
`hwnas quantize --ckpt` checkpoint (``hwnas-classifier/1``).

    python tools/train_classifier.py --space det20-w0.25 --arch det20:01230123012301230123 \\
        --steps 4000 -o /work/quant-out/det20-w0.25-cls.pt

Same recipe as `hwnas.train.evaluate.train_standalone` (SGD + Nesterov, cosine, label
smoothing, flips; the benchmark's stand-alone training), one thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hwnas.data import load_data
from hwnas.quant.target import save_classifier
from hwnas.spaces import get_space
from hwnas.train.evaluate import train_standalone
from hwnas.train.supernet import proxy_arch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="det20-w0.25")
    ap.add_argument("--arch", required=True)
    ap.add_argument("--data", default="shapes")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    space = get_space(args.space)
    arch = proxy_arch(get_space(args.arch.rpartition(":")[0]).parse(args.arch), space)
    splits = load_data(args.data, args.image_size)
    t0 = time.monotonic()  # wall time of the training, reported (not a latency)
    res = train_standalone(space, arch, splits, args.steps, args.batch_size, args.lr, args.seed,
                           progress=True, keep_model=True)
    model = res.pop("model")
    res["train_s"] = round(time.monotonic() - t0, 1)
    save_classifier(args.output, space, arch, args.image_size, args.data, splits.classes, model,
                    {"train": res})
    print(json.dumps({"checkpoint": str(args.output), **res}))


if __name__ == "__main__":
    main()
