"""Detector spaces: every candidate of a backbone space as an FCOS detector, priced from a
latency table like any other space.

`DetectorSpace("det20", width)` is registered as ``det20-fcos`` (``det20-fcos-w0.5`` at half
width). Its layers and choices are the backbone's, so an arch is the backbone's arch under the
detector space's name. The one op walk (`op_keys`) is:

- the backbone's stem and choice blocks (its classification head is not part of a detector);
- ``fpn``: torchvision's FPN over the levels `feature_info` names, one op with one input per
  level (an `OpKey` with `extra_inputs`);
- ``fcos_head<convs>``: the FCOS head over the FPN levels, one op with one input per level;
- ``fcos_post_worst_k<topk>``: decode + per-level top-k + NMS + max-det (`StaticPost`), one op
  with the head's three outputs as inputs, at its worst case (`WorstCasePost`): the exported
  pre-NMS top-k, every box overlapping its neighbours and none suppressed, so NMS keeps them all.

`build(arch)` is the deployable detector (`DeployableDetector`: what `hwnas detect export`
writes, NMS inside) with the worst-case head (`worst_case_nms`), so `hwnas validate` times
what ships, with its post-processing at the workload the table prices. Only NMS's cost depends
on the weights (on how boxes overlap; random weights moved it by 8% of a candidate's latency
between seeds), so a price is an upper bound for any image: a budget kept here is kept in
deployment.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

import torch
from torch import nn

from hwnas.detection.model import DetectorConfig, build_detector
from hwnas.spaces.base import Arch, FeatureInfo, OpKey, SearchSpace, Shape

IMAGE_SIZE = 128  # the shapes-det baseline's (hwnas.detection.data)
NUM_CLASSES = 4


class _Neck(nn.Module):
    """FPN with one tensor input per level, one output per level (for export as one op)."""

    def __init__(self, fpn: nn.Module):
        super().__init__()
        self.fpn = fpn

    def forward(self, *feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats))).values())


class _Head(nn.Module):
    """The FCOS head over the FPN levels → cls_logits, bbox_regression, bbox_ctrness."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, *feats: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.head(list(feats))
        return out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]


class DetectorSpace(SearchSpace):
    """FCOS detectors on the candidates of `backbone` (a registered space name) at `width`."""

    def __init__(self, backbone: str, width: float = 1.0, image_size: int = IMAGE_SIZE,
                 num_classes: int = NUM_CLASSES):
        from hwnas.spaces import get_space

        self.backbone = get_space(backbone if width == 1.0 else f"{backbone}-w{width:g}")
        self.name = f"{backbone}-fcos" + ("" if width == 1.0 else f"-w{width:g}")
        self.layer_choices = self.backbone.layer_choices
        self.default_input = (1, 3, image_size, image_size)
        self.cfg = DetectorConfig(self.backbone.name, str(self.backbone.canary()), num_classes,
                                  image_size)

    def detector_config(self, arch: Arch) -> DetectorConfig:
        return replace(self.cfg, arch=str(Arch(self.backbone.name, arch.choices)))

    def levels(self, input_shape: Shape | None = None) -> list[FeatureInfo]:
        """The backbone levels the FPN takes (as `build_detector` chooses them)."""
        s = (input_shape or self.default_input)[2]
        return [f for f in self.backbone.feature_info((1, 3, s, s))
                if 8 <= f.stride <= self.cfg.max_stride and s // f.stride >= 1]

    def op_keys(self, arch: Arch, input_shape: Shape | None = None,
                precision: str = "fp32") -> list[OpKey]:
        shape = tuple(input_shape or self.default_input)
        if shape[2] != shape[3] or shape[2] != self.cfg.image_size:
            raise ValueError(f"{self.name} is built for {self.default_input}, not {shape}")
        keys = self.backbone.op_keys(Arch(self.backbone.name, arch.choices), shape, precision)
        keys = [k for k in keys if k.kind != "head"]  # the classifier is not in a detector
        n, s, c = shape[0], shape[2], self.cfg
        feats = [(n, f.channels, -(-s // f.stride), -(-s // f.stride)) for f in self.levels(shape)]
        fpn = [(n, c.fpn_channels, h, w) for _, _, h, w in feats]
        hwa = sum(h * w for _, _, h, w in feats)
        return keys + [
            OpKey("fpn", feats[0], c.fpn_channels, 3, 1, 1, precision, tuple(feats[1:])),
            OpKey(f"fcos_head{c.head_convs}", fpn[0], c.num_classes, 3, 1, 1, precision,
                  tuple(fpn[1:])),
            OpKey(f"fcos_post_worst_k{c.topk_candidates}", (n, hwa, c.num_classes), c.max_det, 1, 1,
                  1, precision, ((n, hwa, 4), (n, hwa, 1))),
        ]

    def build_op(self, key: OpKey) -> nn.Module:
        if key.kind == "fpn":
            return _Neck(build_detector(self.cfg).neck).eval()
        if key.kind.startswith("fcos_head"):
            return _Head(build_detector(self.cfg).head).eval()
        if key.kind.startswith("fcos_post"):
            from hwnas.detection.export import WorstCasePost

            c = self.cfg
            return WorstCasePost(build_detector(c), c.score_thresh, c.nms_thresh, c.max_det).eval()
        return self.backbone.build_op(key)

    def build(self, arch: Arch) -> nn.Module:
        """The deployable detector of `arch` (NMS inside), as `hwnas detect export` writes it,
        with the worst-case head (`worst_case_nms`): the latency candidate."""
        from hwnas.detection.export import DeployableDetector, worst_case_nms

        c = self.detector_config(arch)
        return DeployableDetector(worst_case_nms(build_detector(c)), c.score_thresh,
                                  c.nms_thresh, c.max_det)

    def feature_info(self, input_shape: Shape | None = None) -> list[FeatureInfo]:
        return self.levels(input_shape)
