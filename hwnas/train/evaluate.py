"""Scoring candidates: with the supernet's shared weights (the search's accuracy model), and by
training a stand-alone network (the ground truth the benchmark ranks against)."""

from __future__ import annotations

import hashlib
import sys
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hwnas.data import Split, Splits
from hwnas.errors import UserError
from hwnas.spaces.base import Arch, SearchSpace
from hwnas.train.supernet import Supernet, build_standalone, proxy_arch
from hwnas.train.trainer import TrainConfig, lr_at, train_batch


@torch.no_grad()
def accuracy(forward, split: Split, n: int | None = None, chunk: int = 500) -> float:
    n = len(split) if n is None else min(n, len(split))
    correct = 0
    for i in range(0, n, chunk):
        x, y = split.batch(np.arange(i, min(i + chunk, n)))
        correct += int((forward(x).argmax(1) == y).sum())
    return correct / max(n, 1)


class SupernetScorer:
    """The accuracy model of a search: `predict(archs)` → held-out accuracy of each, in [0, 1].

    Per candidate (SPOS): reset the BatchNorm statistics of its path, recompute them over
    `bn_batches` fixed training batches of `bn_batch_size` (cumulative average), then classify
    the first `val_n` images of the search-validation split with the shared weights. Archs of
    the priced space (det20) are mapped onto the supernet's (det20-w0.25) by `proxy_arch`.
    """

    def __init__(self, supernet: Supernet, splits: Splits, bn_batches: int = 4,
                 bn_batch_size: int = 128, val_n: int | None = None, seed: int = 0):
        for name, v in (("--bn-batches", bn_batches), ("--bn-batch-size", bn_batch_size),
                        ("--val-n", 1 if val_n is None else val_n)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise UserError(f"{name} must be a positive integer, got {v!r}")
        if len(splits.val) == 0:
            raise UserError(f"data {splits.spec!r} has an empty search-validation split; give "
                            "more images per class")
        self.net, self.splits, self.val_n = supernet, splits, val_n
        self.bn_batches, self.bn_batch_size, self.seed = bn_batches, bn_batch_size, seed
        rng = np.random.default_rng([seed, 7])
        # the same batches for every candidate, so score differences are the candidates'
        self.bn_data = [splits.train.batch(rng.choice(len(splits.train), min(bn_batch_size,
                        len(splits.train)), replace=False))[0] for _ in range(bn_batches)]

    def identity(self) -> dict:
        """What every score depends on (for a search's resume check): the weights' content,
        the data's content, and the scoring settings; `val_n` as the number of images used."""
        h = hashlib.sha256()
        # parameters only: the BatchNorm statistics are recomputed for every candidate (and
        # change with each score), so they are not part of what a score depends on
        for k, t in self.net.named_parameters():
            h.update(k.encode())
            h.update(repr((t.dtype, tuple(t.shape))).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        n_val = len(self.splits.val) if self.val_n is None else min(self.val_n,
                                                                    len(self.splits.val))
        return {"supernet_space": self.net.space.name, "image_size": self.net.image_size,
                "weights_sha256": h.hexdigest(), "data_sha256": self.splits.fingerprint(),
                "val_n": n_val, "bn_batches": self.bn_batches,
                "bn_batch_size": self.bn_batch_size, "seed": int(self.seed)}

    @torch.no_grad()
    def score(self, arch: Arch) -> float:
        choices = proxy_arch(arch, self.net.space).choices
        bns = [m for mod in self.net.path_modules(choices) for m in mod.modules()
               if isinstance(m, nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative moving average over the recalibration batches
        self.net.train()
        for x in self.bn_data:
            self.net(x, choices)
        self.net.eval()
        acc = accuracy(lambda x: self.net(x, choices), self.splits.val, self.val_n)
        for bn in bns:
            bn.momentum = 0.1
        self.net.train()
        return acc

    def predict(self, archs: Sequence[Arch]) -> np.ndarray:
        return np.array([self.score(a) for a in archs], dtype=np.float64)


def train_standalone(space: SearchSpace, arch: Arch, splits: Splits, steps: int,
                     batch_size: int = 64, lr: float = 0.1, seed: int = 0,
                     progress: bool = False, keep_model: bool = False) -> dict:
    """Train `arch` of `space` from scratch for `steps` SGD steps; its test (and val) accuracy.

    Same optimiser, schedule and batches as the supernet (`TrainConfig`), affine BatchNorm.
    With `keep_model`, the trained eval-mode network is returned too (``"model"``), for a
    caller that saves it (`hwnas.quant.target.save_classifier`).
    """
    cfg = TrainConfig(space=space.name, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    arch = proxy_arch(arch, space)
    with torch.random.fork_rng():  # seeded initial weights, so the benchmark repeats
        torch.manual_seed(seed)
        model = build_standalone(space, arch, splits.image_size, splits.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    for step in tqdm(range(steps), desc=f"train {arch}", file=sys.stderr, disable=not progress,
                     leave=False):
        rng = np.random.default_rng([seed, step])
        x, y = train_batch(splits, rng, batch_size)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        model.train()
        loss = nn.functional.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    out = {"arch": str(arch), "steps": steps, "seed": seed,
           "test_acc": accuracy(model, splits.test), "val_acc": accuracy(model, splits.val)}
    if keep_model:
        out["model"] = model
    return out
