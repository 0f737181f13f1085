"""SPOS supernet training: one uniformly sampled path per step, resumable — after a short,
consistent start.

**Why a start phase.** Plain SPOS (uniform paths from random weights) never left chance level
here: det20-w0.25 on the shapes proxy stayed at loss 2.32–2.33 (ln 10 = 2.30) and 10% accuracy
over 2,750 steps, and likewise with lr 0.02–0.2, Adam, no momentum, batch 256, inputs of 32 or
64, tied pointwise weights, or a curriculum of growing path mixing. Any single fixed path learns
within 100–300 steps, and mixing at one layer is harmless, but independently initialised choices
at four or more layers make every layer's input a different random basis per step, so the
path-averaged gradient cancels (SPOS's own ImageNet runs spend ~150k steps of batch 1024, which a
2-core CPU cannot). The fix, measured in the same setting:

1. `warmup_steps` on the *reference path* (choice 0 in every layer) alone;
2. `match_steps` of *sibling matching*: every other choice block of each layer regresses the
   reference block's output on the reference path's features (MSE, all layers at once — the
   block-wise distillation of DNA, Li et al. CVPR 2020), so every choice starts out speaking the
   same feature basis; random paths then score ~30% before any SPOS step;
3. SPOS proper: one uniform path per step for the remaining steps (random paths 36–43% after 600
   of them, still rising).

`--warmup-steps 0 --match-steps 0` gives the reference SPOS recipe. The reference blocks get
`warmup_steps` more training than their siblings; matching hands that start to every sibling.

Every step's randomness (the path, the batch, the flips) comes from
``numpy.random.default_rng([seed, step])``, so a run killed at step k and resumed from its
checkpoint takes exactly the steps it would have taken. Checkpoints are written atomically every
`ckpt_every` steps and at the end (`hwnas.train.supernet.save_checkpoint`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hwnas import locks
from hwnas.data import Splits, load_data
from hwnas.errors import UserError, first_line
from hwnas.fileio import clean_orphans
from hwnas.spaces import get_space
from hwnas.train.supernet import (Supernet, check_compatible, check_finite, load_weights,
                                  read_checkpoint, save_checkpoint)

PathSampler = Callable[[np.random.Generator], "tuple[int, ...] | np.ndarray"]


@dataclass
class TrainConfig:
    """Defaults sized for a 2-core CPU: det20 at width 0.25 on 64×64 inputs costs ~70 ms a step
    (batch 64) here; at 32×32 the last 12 layers would see 1×1 maps and every kernel choice
    would look alike, so 64 is the smallest input where the choices still differ."""

    space: str = "det20-w0.25"
    data: str = "shapes"
    image_size: int = 64
    steps: int = 3000
    batch_size: int = 64
    lr: float = 0.1  # SGD + Nesterov momentum, cosine to lr_min over `steps`
    lr_min_frac: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 4e-5  # SPOS's value
    label_smoothing: float = 0.1
    seed: int = 0
    ckpt_every: int = 200
    warmup_steps: int = 400  # the reference path alone (see the module docstring)
    match_steps: int = 300  # sibling matching to the reference blocks
    # start over even if the output holds a checkpoint (of other settings): it is overwritten
    # at the first save; without it, an existing checkpoint is resumed or refused, never replaced
    fresh: bool = False

    def __post_init__(self) -> None:
        """Every number in range and finite (`float("nan")` passes no comparison, so each check
        is written as "in range" rather than "out of range")."""
        ints = {"steps": 1, "batch_size": 1, "ckpt_every": 1, "image_size": 1, "seed": 0,
                "warmup_steps": 0, "match_steps": 0}
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise UserError(f"--{name.replace('_', '-')} must be an integer ≥ {lo}, "
                                f"got {v!r}")
        # name: (low, low allowed, high, high allowed)
        floats = {"lr": (0, False, None, False), "lr_min_frac": (0, True, 1, True),
                  "momentum": (0, True, 1, False), "weight_decay": (0, True, None, False),
                  "label_smoothing": (0, True, 1, False)}
        for name, (lo, lo_ok, hi, hi_ok) in floats.items():
            v = getattr(self, name)
            ok = (isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)
                  and math.isfinite(v) and (v > lo or (lo_ok and v == lo))
                  and (hi is None or v < hi or (hi_ok and v == hi)))
            if not ok:
                want = f"{'≥' if lo_ok else '>'} {lo}" + (
                    "" if hi is None else f" and {'≤' if hi_ok else '<'} {hi}")
                raise UserError(f"--{name.replace('_', '-')} must be a finite number {want}, "
                                f"got {v!r}")

    @property
    def spos_start(self) -> int:
        """The first step of uniform single-path (SPOS) training."""
        return self.warmup_steps + self.match_steps

    def phase(self, step: int) -> str:
        return ("warmup" if step < self.warmup_steps else
                "match" if step < self.spos_start else "spos")


# settings whose change makes a resumed run a different run than the one checkpointed (space,
# image size and data are checked first, by `check_compatible`; ckpt_every and fresh change
# nothing the weights depend on)
RESUME_FIELDS = ("steps", "batch_size", "lr", "lr_min_frac", "momentum", "weight_decay",
                 "label_smoothing", "seed", "warmup_steps", "match_steps")


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """``"--lr 0.1 (checkpoint) vs 0.2 (now)"`` for each resume-relevant setting that differs;
    a setting the checkpoint predates counts as its default."""
    defaults = TrainConfig()
    out = []
    for name in RESUME_FIELDS:
        old, new = saved.get(name, getattr(defaults, name)), getattr(cfg, name)
        if old != new:
            out.append(f"--{name.replace('_', '-')} {old!r} (checkpoint) vs {new!r} (now)")
    return out


def lr_at(cfg: TrainConfig, step: int) -> float:
    t = min(step / max(cfg.steps, 1), 1.0)
    lo = cfg.lr * cfg.lr_min_frac
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * t))


def train_batch(splits: Splits, rng: np.random.Generator,
                batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch with random horizontal flips (every class is flip-invariant as a class)."""
    idx = rng.choice(len(splits.train), size=min(batch_size, len(splits.train)), replace=False)
    x, y = splits.train.batch(idx)
    flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
    x[flip] = x[flip].flip(3)
    return x, y


def _finite_or_none(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _ema(old: float | None, v: float) -> float:
    return v if old is None else 0.98 * old + 0.02 * v


def uniform_sampler(num_layers: int, num_choices: int) -> PathSampler:
    return lambda rng: rng.integers(0, num_choices, num_layers)


class SupernetTrainer:
    """Trains (or resumes) the supernet in `out`; `train_to(step)` and `train(n, sampler)`."""

    def __init__(self, cfg: TrainConfig, out: Path, splits: Splits | None = None,
                 progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        if cfg.spos_start >= cfg.steps:
            raise UserError(f"--warmup-steps ({cfg.warmup_steps}) and --match-steps "
                            f"({cfg.match_steps}) must be ≥ 0 and together less than --steps "
                            f"({cfg.steps}); raise --steps or pass 0 for plain SPOS")
        if self.out.is_dir():
            raise UserError(f"output {str(self.out)!r} is a folder; give a checkpoint file name")
        self.space = get_space(cfg.space)
        # one training per checkpoint: held until `close()` (or the process ends)
        locks.acquire(self.out)
        self._locked = True
        try:
            clean_orphans(self.out)  # temporary files of a save that a kill interrupted
            self.splits = splits or load_data(cfg.data, cfg.image_size)
            with torch.random.fork_rng():  # seeded initial weights, global RNG left alone
                torch.manual_seed(cfg.seed)
                self.model = Supernet(self.space, cfg.image_size, self.splits.num_classes)
            self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr,
                                       momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                       weight_decay=cfg.weight_decay)
            self.step = 0
            self.loss_ema: float | None = None
            self.match_loss: float | None = None
            if self.out.exists() and not cfg.fresh:
                self._resume()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the output lock (the trainer may still be read, not saved, after)."""
        if getattr(self, "_locked", False):
            self._locked = False
            locks.release(self.out)

    def __enter__(self) -> "SupernetTrainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def meta(self) -> dict:
        return {"space": self.space.name, "image_size": self.cfg.image_size,
                "data": self.splits.spec, "num_classes": self.splits.num_classes,
                "classes": list(self.splits.classes), "step": self.step,
                "loss_ema": self.loss_ema, "match_loss": self.match_loss,
                "config": asdict(self.cfg)}

    def _resume(self) -> None:
        ck = read_checkpoint(self.out)
        meta = ck["meta"]
        check_compatible(meta, self.out, space=self.space.name, image_size=self.cfg.image_size,
                         data=self.splits.spec, num_classes=self.splits.num_classes)
        diff = config_differences(meta["config"], self.cfg)
        if diff:
            raise UserError(f"checkpoint {str(self.out)!r} was trained with other settings: "
                            f"{'; '.join(diff)}; pass the checkpoint's values to resume it, "
                            "another output file, or --fresh to start over and overwrite it")
        step = meta["step"]
        if not 0 <= step <= self.cfg.steps:
            raise UserError(f"checkpoint {str(self.out)!r} is malformed: step {step} is outside "
                            f"0..{self.cfg.steps}")
        load_weights(self.model, ck["model"], self.out)
        if ck.get("optimizer") is not None:
            try:
                self.opt.load_state_dict(ck["optimizer"])
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                raise UserError(f"checkpoint {str(self.out)!r} has an optimizer state that does "
                                f"not fit the supernet ({first_line(e)}); retrain into a new "
                                "file or pass --fresh") from None
            check_finite({f"optimizer.{i}.{k}": v for i, st in
                          enumerate(self.opt.state_dict()["state"].values())
                          for k, v in st.items()}, f"checkpoint {str(self.out)!r}")
        self.step = int(step)
        self.loss_ema = _finite_or_none(meta.get("loss_ema"))
        self.match_loss = _finite_or_none(meta.get("match_loss"))

    def save(self) -> None:
        save_checkpoint(self.out, self.meta(), self.model, self.opt)

    def _one_step(self, sampler: PathSampler) -> float:
        """One optimiser step of the phase `self.step` is in; the step's (per-block) loss."""
        rng = np.random.default_rng([self.cfg.seed, self.step])
        phase = self.cfg.phase(self.step)
        self.model.train()
        if phase == "match":
            loss, blocks = self._matching_loss(rng)
        else:
            choices = ([0] * self.space.num_layers if phase == "warmup"
                       else [int(c) for c in sampler(rng)])
            x, y = train_batch(self.splits, rng, self.cfg.batch_size)
            loss = nn.functional.cross_entropy(self.model(x, choices), y,
                                               label_smoothing=self.cfg.label_smoothing)
            blocks = 1
        if not bool(torch.isfinite(loss.detach())):
            # before the update: the weights in memory and on disk stay the last finite ones
            raise UserError(f"training diverged: the {phase} loss is {float(loss.detach())} at "
                            f"step {self.step} (lr {lr_at(self.cfg, self.step):.4g}); the "
                            f"checkpoint {str(self.out)!r} keeps the last good state; retrain "
                            "with a lower --lr (and --fresh)")
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.cfg, self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        v = float(loss.detach()) / blocks
        if phase == "match":
            self.match_loss = _ema(self.match_loss, v)
        else:
            self.loss_ema = _ema(self.loss_ema, v)
        return v

    def _matching_loss(self, rng: np.random.Generator) -> tuple[torch.Tensor, int]:
        """Every non-reference choice block regresses its layer's reference block (MSE) on the
        reference path's own input to that layer; the reference path is not changed. Returns
        the summed loss and the number of blocks in it."""
        x, _ = train_batch(self.splits, rng, self.cfg.batch_size)
        ins, outs = [], []
        with torch.no_grad():
            h = self.model.stem(x)
            for layer in self.model.layers:
                ins.append(h)
                h = layer[0](h)
                outs.append(h)
        terms = [nn.functional.mse_loss(block(i), o) for layer, i, o in
                 zip(self.model.layers, ins, outs) for block in list(layer)[1:]]
        # each block appears in one term only: the sum gives every block its own full gradient
        # (a mean would divide each block's step by the number of blocks)
        return torch.stack(terms).sum(), len(terms)

    def train(self, n: int, sampler: PathSampler | None = None, desc: str = "supernet") -> None:
        """`n` more steps, each on one path drawn by `sampler` (default: uniform, SPOS)."""
        self.train_to(self.step + n, sampler, desc)

    def train_to(self, stop: int, sampler: PathSampler | None = None,
                 desc: str = "supernet") -> None:
        """Train until `step == stop`; steps in the warm-up and matching phases ignore
        `sampler` (they are fixed by `cfg`), later ones take one path from it each."""
        sampler = sampler or uniform_sampler(self.space.num_layers, len(self.space.choice_names))
        if self.step >= stop:
            return
        with tqdm(total=stop, initial=self.step, desc=desc, unit="step", file=sys.stderr,
                  disable=not self.progress, dynamic_ncols=True) as bar:
            while self.step < stop:
                phase = self.cfg.phase(self.step)
                self._one_step(sampler)
                bar.update(1)
                loss = self.match_loss if phase == "match" else self.loss_ema
                bar.set_postfix(phase=phase, loss=f"{loss:.3f}", refresh=False)
                if self.step % self.cfg.ckpt_every == 0:
                    self.save()
        self.save()

    def run(self) -> dict:
        """Train to `cfg.steps` (resuming if the output exists); a summary dict."""
        start = self.step
        self.train_to(self.cfg.steps)
        return {"checkpoint": str(self.out), "space": self.space.name, "step": self.step,
                "resumed_from": start, "loss_ema": self.loss_ema, "match_loss": self.match_loss,
                "data": self.splits.describe()}
