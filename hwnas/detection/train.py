"""Detector training: AdamW or SGD, linear warm-up then cosine decay to zero, resumable.

Every step's randomness (which images, which flips) comes from
``numpy.random.default_rng([seed, step])``, so a run killed at step k and resumed from its
checkpoint takes exactly the steps an uninterrupted run takes (the test checks bit-identical
weights); the torch RNG state is saved too, though nothing in a step draws from it. Checkpoints
(``hwnas-detector/1``: model, optimizer, step, config, torch RNG state) are written atomically
every `ckpt_every` steps and at the end, and read with ``torch.load(weights_only=True)``. A
checkpoint whose configuration (space, arch, data, image size, any hyper-parameter) differs from
the one asked for is refused with the field that differs.

Threads: `threads` (default 1) intra-op threads, so a 2-core host keeps a core for others; data
are decoded once and kept in memory, batches are assembled in the main process (no workers).
"""

from __future__ import annotations

import math
import pickle
import time
import sys
import zipfile
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hwnas.detection.config import BUILTIN, DetTrainConfig
from hwnas.detection.data import CocoSplit, load_coco, resolve_data
from hwnas.detection.model import (Detector, DetectorConfig, build_detector,
                                   candidate_state_from, init_backbone)
from hwnas.errors import UserError
from hwnas.fileio import atomic_path

FORMAT = "hwnas-detector/1"


def lr_at(cfg: DetTrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (0.001 + 0.999 * step / cfg.warmup_steps)
    t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def read_detector_checkpoint(path: str | Path) -> dict:
    """Load with ``weights_only=True``; a `UserError` for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"detector checkpoint {str(path)!r} does not exist; train one with "
                        "`hwnas detect train --data shapes-det -o FILE`")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:
        raise UserError(f"checkpoint {str(path)!r} is corrupt or truncated ({type(e).__name__});"
                        " restore it or train into a new file") from None
    return ck


def load_detector(path: str | Path, fmt: str = FORMAT, build=build_detector,
                  command: str = "hwnas detect train") -> tuple[Detector, dict]:
    """The eval-mode detector in a checkpoint of format `fmt` (rebuilt by `build` from its
    `DetectorConfig`), and its metadata; a one-line `UserError` for another file."""
    ck = read_detector_checkpoint(path)
    if not isinstance(ck, dict) or ck.get("format") != fmt:
        raise UserError(f"{str(path)!r} is not an hwnas {fmt} checkpoint; train one with "
                        f"`{command}`")
    meta = ck["meta"]
    det = build(DetectorConfig(**meta["detector"]))
    det.load_state_dict(ck["model"])
    return det.eval(), meta


class DetectorTrainer:
    """Trains (or resumes) the detector into checkpoint `out`; `run()` trains to `cfg.steps`."""

    def __init__(self, cfg: DetTrainConfig, out: str | Path, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        for name in ("steps", "batch_size", "image_size", "ckpt_every", "threads"):
            if getattr(cfg, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got "
                                f"{getattr(cfg, name)}")
        if not 32 <= cfg.image_size <= 1024:
            raise UserError(f"--image-size must be in 32..1024, got {cfg.image_size}")
        if cfg.optimizer not in ("adamw", "sgd"):
            raise UserError(f"--optimizer must be adamw or sgd, got {cfg.optimizer!r}")
        if not (cfg.lr > 0 and cfg.warmup_steps >= 0):
            raise UserError("--lr must be positive and --warmup-steps ≥ 0")
        torch.set_num_threads(cfg.threads)
        self.data_root = resolve_data(cfg.data)  # the fixed shapes-det splits, whatever the seed
        self.train_split: CocoSplit = load_coco(self.data_root, "train", cfg.image_size)
        self.det_cfg = DetectorConfig(cfg.space, cfg.arch, self.train_split.num_classes,
                                      cfg.image_size, cfg.fpn_channels, cfg.head_convs)
        with torch.random.fork_rng():  # seeded initial weights, global RNG left alone
            torch.manual_seed(cfg.seed)
            self.model = self.build_model()
        if cfg.init:
            self.init_from(cfg.init)
        if cfg.optimizer == "adamw":
            self.opt: torch.optim.Optimizer = torch.optim.AdamW(
                self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=0.9,
                                       nesterov=True, weight_decay=cfg.weight_decay)
        self.step, self.loss_ema, self.train_s = 0, None, 0.0
        if self.out.exists():
            self._resume()

    format = FORMAT  # of the checkpoints this trainer writes

    def build_model(self) -> Detector:
        return build_detector(self.det_cfg)

    def init_from(self, path: str) -> None:
        state = candidate_state_from(read_detector_checkpoint(path), self.det_cfg)
        init_backbone(self.model, state, path)

    def before_step(self, rng: np.random.Generator) -> None:
        """Called before every step with that step's generator (a supernet picks its path)."""

    def config(self) -> dict:
        c = {f.name: getattr(self.cfg, f.name) for f in fields(self.cfg)}
        c["data"] = BUILTIN if self.cfg.data == BUILTIN else str(self.data_root.resolve())
        return c

    def meta(self) -> dict:
        return {"config": self.config(), "detector": asdict(self.det_cfg), "step": self.step,
                "loss_ema": self.loss_ema, "train_s": self.train_s,
                "classes": list(self.train_split.classes),
                "cat_ids": list(self.train_split.cat_ids),
                "torch_rng": torch.get_rng_state()}

    def _resume(self) -> None:
        ck = read_detector_checkpoint(self.out)
        if not isinstance(ck, dict) or ck.get("format") != self.format:
            raise UserError(f"{str(self.out)!r} exists and is not a {self.format} checkpoint; "
                            "choose another output file")
        meta, mine = ck["meta"], self.config()
        for k, v in mine.items():
            if k not in DetTrainConfig.RESUMABLE and meta["config"].get(k) != v:
                raise UserError(f"checkpoint {str(self.out)!r} was trained with {k}="
                                f"{meta['config'].get(k)!r}, not {v!r}; pass the same settings "
                                "to resume it, or train into another file")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.step, self.loss_ema = int(meta["step"]), meta["loss_ema"]
        self.train_s = float(meta.get("train_s", 0.0))
        torch.set_rng_state(meta["torch_rng"])

    def save(self) -> None:
        _atomic_torch_save({"format": self.format, "meta": self.meta(),
                            "model": self.model.state_dict(),
                            "optimizer": self.opt.state_dict()}, self.out)

    def _one_step(self) -> dict[str, float]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.step])
        n = len(self.train_split)
        idx = rng.choice(n, size=min(cfg.batch_size, n), replace=False)
        flips = rng.random((2, len(idx))) < 0.5  # horizontal, vertical: every class survives
        x, targets = self.train_split.batch(idx, flips[0], flips[1] if cfg.vflip else None)
        self.before_step(np.random.default_rng([cfg.seed, self.step, 1]))
        self.model.train()
        losses = self.model.loss(self.model(x), targets)
        loss = sum(losses.values())
        for g in self.opt.param_groups:
            g["lr"] = lr_at(cfg, self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.step += 1
        v = float(loss.detach())
        if not math.isfinite(v):
            raise FloatingPointError(f"loss is {v} at step {self.step}; lower --lr")
        self.loss_ema = v if self.loss_ema is None else 0.98 * self.loss_ema + 0.02 * v
        return {k: float(t.detach()) for k, t in losses.items()}

    def run(self, stop: int | None = None) -> dict:
        """Train to `cfg.steps` (or to step `stop`, earlier), resuming if `out` exists, with a
        checkpoint at the end; a summary dict (images/s, loss)."""
        start = self.step
        stop = self.cfg.steps if stop is None else min(stop, self.cfg.steps)
        with tqdm(total=self.cfg.steps, initial=self.step, desc="detect train", unit="step",
                  file=sys.stderr, disable=not self.progress, dynamic_ncols=True) as bar:
            t0 = time.monotonic()  # wall time for the images/s figure (not a latency)
            while self.step < stop:
                self._one_step()
                bar.update(1)
                bar.set_postfix(loss=f"{self.loss_ema:.3f}",
                                lr=f"{lr_at(self.cfg, self.step):.2e}", refresh=False)
                if self.step % self.cfg.ckpt_every == 0 or self.step == stop:
                    now = time.monotonic()
                    self.train_s, t0 = self.train_s + now - t0, now
                    self.save()
        if self.step == start and not self.out.exists():
            self.save()
        steps_run = self.step - start
        return {"checkpoint": str(self.out), "space": self.cfg.space, "arch": self.cfg.arch,
                "step": self.step, "resumed_from": start, "loss_ema": self.loss_ema,
                "train_s": round(self.train_s, 1),
                "images_per_s": (round(self.step * self.cfg.batch_size / self.train_s, 1)
                                 if self.train_s > 0 and steps_run else None),
                "threads": self.cfg.threads, "data": str(self.data_root)}


def _atomic_torch_save(obj: dict, path: Path) -> None:
    """The previous good checkpoint stays until the new one is complete (`hwnas.fileio`: the
    one atomic write, which also gives the file the umask's mode)."""
    with atomic_path(Path(path)) as tmp:
        torch.save(obj, tmp)
