"""The DetNAS detection supernet: one weight-sharing backbone (every choice block of every
layer), one shared FPN and FCOS head, trained with a single path per step; and its scorer, the
accuracy model of `hwnas detect search` (COCO AP of a path after BatchNorm recalibration).

DetNAS (Chen et al. 2019) in three steps, each a command:
1. pretrain the supernet on classification: `hwnas supernet train` (hwnas.train.supernet);
2. fine-tune it on detection: `hwnas detect supernet --init <that checkpoint>` (this module),
   uniform single-path sampling (after `ref_steps` on the reference path, all choice 0, when
   asked: the warm-up that gives the shared FPN and head a sensible start), non-affine
   BatchNorm in the backbone as in SPOS, so a path's statistics are its own after
   recalibration;
3. search: `hwnas detect search` (hwnas.detection.search) scores paths with `DetSupernetScorer`.

The backbone's module names are the classification supernet's (``stem.*``,
``layers.<layer>.<choice>.*``), so step 2 loads step 1's weights as they are. The detector
around it is `hwnas.detection.model.Detector`, unchanged: only its backbone runs one path.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.ops import FeaturePyramidNetwork

from hwnas.detection.config import DetTrainConfig
from hwnas.detection.data import CocoSplit
from hwnas.detection.model import Detector, DetectorConfig
from hwnas.detection.train import DetectorTrainer, load_detector, read_detector_checkpoint
from hwnas.errors import UserError
from hwnas.spaces import get_space
from hwnas.spaces.base import Arch, FeatureInfo, SearchSpace
from hwnas.train.supernet import choice_modules

FORMAT = "hwnas-det-supernet/1"


class PathBackbone(nn.Module):
    """Stem → per layer {one block per choice}; runs the path `choices` (set before forward).

    [N, 3, S, S] → OrderedDict {"p<i>": level i's features} for the levels `info` names (as
    `hwnas.detection.model.LevelBackbone` returns them for a stand-alone candidate).
    """

    def __init__(self, space: SearchSpace, image_size: int, info: list[FeatureInfo]):
        super().__init__()
        self.space, self.info = space, info
        self.stem, self.layers = choice_modules(space, image_size)
        self.stage_ends = space.stage_ends
        self.choices: tuple[int, ...] = space.canary().choices
        self.train()

    def path_modules(self, choices: Sequence[int]) -> list[nn.Module]:
        return [self.stem] + [layer[int(c) if len(layer) > 1 else 0]
                              for layer, c in zip(self.layers, choices)]

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats, x = [], self.stem(x)
        for i, block in enumerate(self.path_modules(self.choices)[1:]):
            x = block(x)
            if i + 1 in self.stage_ends:
                feats.append(x)
        return OrderedDict((f"p{f.index}", feats[f.index]) for f in self.info)


def build_det_supernet(cfg: DetectorConfig) -> Detector:
    """A `Detector` whose backbone is the weight-sharing `PathBackbone` of `cfg.space`."""
    space = get_space(cfg.space)
    if not hasattr(space, "stage_ends"):
        raise UserError(f"space {space.name} is not a backbone space (det20, det40, crnas20, "
                        "tiny...); a detection supernet is built on a backbone space")
    s = cfg.image_size
    info = [f for f in space.feature_info((1, 3, s, s))
            if 8 <= f.stride <= cfg.max_stride and s // f.stride >= 1]
    backbone = PathBackbone(space, s, info)
    neck = FeaturePyramidNetwork([f.channels for f in info], cfg.fpn_channels)
    head = FCOSHead(cfg.fpn_channels, 1, cfg.num_classes, cfg.head_convs)
    anchor_gen = AnchorGenerator(tuple((cfg.anchor_scale * f.stride,) for f in info),
                                 ((1.0,),) * len(info))
    return Detector(backbone, neck, head, anchor_gen, cfg).train()


@dataclass
class DetSupernetConfig(DetTrainConfig):
    """`DetTrainConfig` (its `arch` is unused: every step samples one) plus the sampling."""

    arch: str = ""
    steps: int = 3000
    ref_steps: int = 0  # first steps on the reference path (all choice 0), then uniform


class DetSupernetTrainer(DetectorTrainer):
    """Single-path (SPOS) fine-tuning of the detection supernet, resumable like
    `DetectorTrainer`: step k's path comes from ``default_rng([seed, k, 1])``."""

    format = FORMAT

    def __init__(self, cfg: DetSupernetConfig, out: str | Path, progress: bool = True):
        space = get_space(cfg.space)
        cfg.arch = str(space.canary())
        self.space = space
        super().__init__(cfg, out, progress)

    def build_model(self) -> Detector:
        return build_det_supernet(self.det_cfg)

    def init_from(self, path: str) -> None:
        """Backbone weights from an `hwnas supernet train` checkpoint of the same space."""
        ck = read_detector_checkpoint(path)
        if not (isinstance(ck, dict) and ck.get("format") == "hwnas-supernet/1"):
            raise UserError(f"--init {path!r} is not a classification supernet checkpoint "
                            "(`hwnas supernet train`)")
        if ck["meta"].get("space") != self.cfg.space:
            raise UserError(f"--init {path!r} is a supernet of space {ck['meta'].get('space')!r}"
                            f", not {self.cfg.space!r}; pretrain one of the same space and width")
        state = {k: v for k, v in ck["model"].items() if not k.startswith("head.")}
        own = self.model.backbone.state_dict()
        bad = [k for k in state if k not in own or own[k].shape != state[k].shape]
        missing = [k for k in own if k not in state]
        if bad or missing:
            raise UserError(f"--init {path!r} does not fit this supernet ({len(bad)} unexpected "
                            f"or mis-shaped, {len(missing)} missing tensors, e.g. "
                            f"{(bad or missing)[0]!r}); pretrain with the same space")
        self.model.backbone.load_state_dict(state)

    def before_step(self, rng: np.random.Generator) -> None:
        if self.step < self.cfg.ref_steps:
            self.model.backbone.choices = self.space.canary().choices
        else:
            self.model.backbone.choices = self.space.sample(rng).choices


def standalone_detector(supernet: Detector, arch: Arch) -> Detector:
    """Path `arch` of `supernet` as a stand-alone eval-mode `Detector` (what `hwnas detect
    export` ships): the path's stem and blocks become the candidate's (``layers.<i>.<c_i>`` →
    ``blocks.<i>``, with the BatchNorm statistics the supernet holds for that path now: score
    the path first to recalibrate them), FPN and head as they are. Supernet BatchNorm is
    non-affine: the stand-alone's affine weight and bias stay 1 and 0."""
    from hwnas.detection.model import build_detector, init_backbone

    bb = supernet.backbone
    choices = bb.space.parse(f"{bb.space.name}:{str(arch).rpartition(':')[2]}").choices
    det = build_detector(replace(supernet.cfg, arch=str(Arch(bb.space.name, choices))))
    state = {}
    for k, v in bb.state_dict().items():
        if k.startswith("stem."):
            state[k] = v
        elif k.startswith("layers."):
            _, layer, choice, rest = k.split(".", 3)
            if int(choice) == (choices[int(layer)] if len(bb.layers[int(layer)]) > 1 else 0):
                state[f"blocks.{layer}.{rest}"] = v
    init_backbone(det, state, "the detection supernet")
    det.neck.load_state_dict(supernet.neck.state_dict())
    det.head.load_state_dict(supernet.head.state_dict())
    return det.eval()


def load_det_supernet(path: str | Path) -> tuple[Detector, dict]:
    """The detection supernet in `path` and its metadata."""
    return load_detector(path, FORMAT, build_det_supernet, "hwnas detect supernet")


class DetSupernetScorer:
    """A search's accuracy model: `predict(archs)` → COCO AP (@[.5:.95]) of each path.

    Per path (SPOS/DetNAS): reset the BatchNorm statistics of its backbone blocks, recompute
    them over `bn_batches` fixed training batches (cumulative average), then detect the first
    `val_n` images of the val split with the shared weights and score them with pycocotools.
    Archs of any space with the supernet's layers and choices (``det20-fcos-w0.5`` priced,
    ``det20-w0.5`` trained) map by their choices.
    """

    def __init__(self, det: Detector, train: CocoSplit, val: CocoSplit, bn_batches: int = 4,
                 bn_batch_size: int = 32, val_n: int | None = 100, seed: int = 0):
        for name, v in (("--bn-batches", bn_batches), ("--bn-batch-size", bn_batch_size),
                        ("--val-n", 1 if val_n is None else val_n)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise UserError(f"{name} must be a positive integer, got {v!r}")
        self.det, self.val, self.seed = det, val, seed
        # faster-coco-eval when installed: the same numbers as pycocotools (tested), ~7x faster
        self.fast = importlib.util.find_spec("faster_coco_eval") is not None
        self.space: SearchSpace = det.backbone.space
        self.val_n = len(val) if val_n is None else min(val_n, len(val))
        self.bn_batches, self.bn_batch_size = bn_batches, bn_batch_size
        rng = np.random.default_rng([seed, 7])
        self.bn_data = [train.batch(rng.choice(len(train), min(bn_batch_size, len(train)),
                                               replace=False))[0] for _ in range(bn_batches)]
        self.val_x = [val.batch(range(i, min(i + 50, self.val_n)))[0]
                      for i in range(0, self.val_n, 50)]

    def identity(self) -> dict:
        h = hashlib.sha256()
        for k, t in self.det.named_parameters():
            h.update(k.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        d = hashlib.sha256()
        for x in self.bn_data + self.val_x:
            d.update(x.numpy().tobytes())
        return {"supernet_space": self.space.name, "detector": asdict(self.det.cfg),
                "weights_sha256": h.hexdigest(), "data_sha256": d.hexdigest(),
                "val_n": self.val_n, "bn_batches": self.bn_batches,
                "bn_batch_size": self.bn_batch_size, "seed": int(self.seed)}

    def choices(self, arch: Arch) -> tuple[int, ...]:
        if len(arch.choices) != self.space.num_layers or any(
                c >= n for c, n in zip(arch.choices, self.space.num_choices)):
            raise UserError(f"arch {arch} cannot be scored by a supernet of space "
                            f"{self.space.name}: the layers differ")
        return arch.choices

    @torch.no_grad()
    def score(self, arch: Arch) -> float:
        from hwnas.detection.evaluate import coco_metrics

        choices = self.choices(arch)
        bb = self.det.backbone
        bb.choices = choices
        bns = [m for mod in bb.path_modules(choices) for m in mod.modules()
               if isinstance(m, nn.BatchNorm2d)]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the recalibration batches
        self.det.train()
        for x in self.bn_data:
            self.det(x)
        self.det.eval()
        dets = []
        for x in self.val_x:
            for d in self.det.postprocess(self.det(x)):
                dets.append({k: v.numpy() for k, v in d.items()})
        for bn in bns:
            bn.momentum = 0.1
        return float(coco_metrics(self.val, dets, fast=self.fast)["AP"])

    def predict(self, archs: Sequence[Arch]) -> np.ndarray:
        return np.array([self.score(a) for a in archs], dtype=np.float64)
