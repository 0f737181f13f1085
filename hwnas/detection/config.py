"""The detection training configuration, light to import (no torch): the CLI builds its
`detect train` options from these defaults without loading torchvision."""

from __future__ import annotations

from dataclasses import dataclass

BUILTIN = "shapes-det"


@dataclass
class DetTrainConfig:
    """Defaults: the baseline of docs/detection.md (det20-w0.5, all choice 0, 128 px)."""

    space: str = "det20-w0.5"
    arch: str = "det20:00000000000000000000"
    data: str = BUILTIN
    image_size: int = 128
    steps: int = 6000
    batch_size: int = 16
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9, Nesterov)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 300  # linear from lr/1000, then cosine to 0 at `steps`
    vflip: bool = True  # vertical flips too (every shapes-det class survives them; turn off
    # for natural images, where up and down differ)
    grad_clip: float = 10.0  # max global grad norm: FCOS's GIoU/focal spikes from random init
    fpn_channels: int = 64
    head_convs: int = 2
    seed: int = 0
    init: str | None = None  # backbone initialisation checkpoint (see model.candidate_state_from)
    ckpt_every: int = 500
    threads: int = 1

    # fields that may change between a run and its resume
    RESUMABLE = ("ckpt_every", "threads")
