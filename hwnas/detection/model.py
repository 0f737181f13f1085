"""`Detector(backbone, neck, head)`: a space's candidate + torchvision's FPN + torchvision's FCOS
head, assembled as torchvision assembles FCOS, with `forward` (raw outputs), `loss` and
`postprocess` kept apart.

Parts, all torchvision's except the backbone:
- backbone: `LevelBackbone`, any `Candidate` of a space (its `forward_features`) narrowed to the
  levels the neck uses; channels and strides come from `space.feature_info`.
- neck: `torchvision.ops.FeaturePyramidNetwork` over those levels (no extra P6/P7 block: the
  det spaces' own fourth stage already gives stride 64, see `build_detector`).
- head: `torchvision.models.detection.fcos.FCOSHead` (classification, box regression and
  centre-ness branches, its `BoxLinearCoder` and its focal / GIoU / BCE losses).
- anchors: `torchvision.models.detection.anchor_utils.AnchorGenerator`, one square anchor per
  location, as FCOS uses them (an anchor is a point plus the size that normalises the regression
  and sets the level's object-size range).

FCOS's matching of locations to boxes (`FCOS.compute_loss`) and its decode → score threshold →
per-level top-k → class-wise NMS → max-det (`FCOS.postprocess_detections`) are torchvision's own
code, called on this module (it carries the attributes they read), so nothing here re-implements
them.

**Scale ranges.** FCOS assigns a box to the level whose range holds the box's largest
centre-to-side distance; torchvision derives the ranges from the anchor size a: (4a, 8a], the
first level from 0 and the last to ∞. With torchvision's anchor size = stride, a 128-px image
would put every object on P3/P4 (all distances < 128). `anchor_scale` = 0.5 (anchor size =
stride / 2) halves the ranges to P3 ≤ 32 px, P4 32–64, P5 64–128, P6 > 128, so each level
gets the object sizes its receptive field suits at this image size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork

from hwnas.errors import UserError
from hwnas.spaces import get_space
from hwnas.spaces.base import Arch, FeatureInfo, SearchSpace
from hwnas.train.supernet import proxy_arch


class LevelBackbone(nn.Module):
    """A candidate's `forward_features`, keeping the levels `levels` (indices into it).

    [N, 3, S, S] → OrderedDict {"p<i>": [N, C_i, ⌈S/stride_i⌉, ⌈S/stride_i⌉]}, i the level's
    index in the candidate's features (not log2(stride): at an image size that is not a multiple
    of 64 the last stride is not a power of two, e.g. 48 at 96 px, and two levels would share
    a name).
    """

    def __init__(self, candidate: nn.Module, info: list[FeatureInfo]):
        super().__init__()
        self.body = candidate
        self.body.head = nn.Identity()  # the classifier is not part of a detector
        self.info = info

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body.forward_features(x)
        return OrderedDict((f"p{f.index}", feats[f.index]) for f in self.info)


@dataclass(frozen=True)
class DetectorConfig:
    """What builds a detector (stored in checkpoints, so a checkpoint rebuilds its model)."""

    space: str
    arch: str
    num_classes: int
    image_size: int = 128
    fpn_channels: int = 64  # a multiple of 32 (FCOS head uses GroupNorm(32, C))
    head_convs: int = 2  # torchvision's default 4 doubles the cost of the head at 128 px
    max_stride: int = 64  # the levels used: backbone strides 8 .. max_stride
    anchor_scale: float = 0.5  # anchor size / stride (sets FCOS's scale ranges, module doc)
    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    topk_candidates: int = 1000
    max_det: int = 100


class Detector(nn.Module):
    """backbone → neck (FPN) → head (FCOS); anchors for a fixed square `image_size`.

    `forward(x)` always returns the raw head outputs (train and eval alike); `loss` and
    `postprocess` turn them into losses or detections.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, head: FCOSHead,
                 anchor_generator: AnchorGenerator, cfg: DetectorConfig):
        super().__init__()
        self.backbone, self.neck, self.head = backbone, neck, head
        self.anchor_generator, self.cfg = anchor_generator, cfg
        # the attribute names torchvision's FCOS methods read (see module docstring)
        self.box_coder = head.box_coder
        self.center_sampling_radius = 1.5
        self.score_thresh, self.nms_thresh = cfg.score_thresh, cfg.nms_thresh
        self.topk_candidates, self.detections_per_img = cfg.topk_candidates, cfg.max_det
        self._anchors: tuple[torch.Tensor, list[int]] | None = None

    def anchors(self) -> tuple[torch.Tensor, list[int]]:
        """anchors [HWA, 4] xyxy input pixels (every image alike) and the count per level."""
        if self._anchors is None:
            s = self.cfg.image_size
            # level sizes without running the net: the spaces halve with ceil at every stride 2
            sizes = [-(-s // f.stride) for f in self.backbone.info]
            feats = [torch.empty(1, 1, h, h) for h in sizes]
            images = ImageList(torch.empty(1, 3, s, s), [(s, s)])
            self._anchors = (self.anchor_generator(images, feats)[0], [h * h for h in sizes])
        return self._anchors

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x [N, 3, S, S] normalised (see data.py) → raw outputs, levels concatenated:
        cls_logits [N, HWA, C], bbox_regression [N, HWA, 4] (box-coder deltas),
        bbox_ctrness [N, HWA, 1]."""
        if x.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"detector built for {self.cfg.image_size} px, got {tuple(x.shape)}")
        feats = list(self.neck(self.backbone(x)).values())
        return self.head(feats)

    def loss(self, outputs: dict[str, torch.Tensor],
             targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """FCOS losses (classification: focal, bbox_regression: GIoU, bbox_ctrness: BCE),
        each averaged over foreground locations; targets: boxes [K, 4] xyxy input pixels,
        labels [K] int64 contiguous."""
        anchors, per_level = self.anchors()
        return FCOS.compute_loss(self, targets, outputs, [anchors] * len(targets), per_level)

    def postprocess(self, outputs: dict[str, torch.Tensor],
                    image_sizes: list[tuple[int, int]] | None = None,
                    ) -> list[dict[str, torch.Tensor]]:
        """Per image {boxes [D, 4] xyxy input pixels, scores [D], labels [D] int64}, D ≤ max_det:
        decode, score = sqrt(sigmoid(cls) · sigmoid(ctrness)) > score_thresh, per-level top-k,
        clip to `image_sizes` (default the full input), class-wise NMS, the best max_det."""
        anchors, per_level = self.anchors()
        n = outputs["cls_logits"].shape[0]
        split = {k: list(v.split(per_level, dim=1)) for k, v in outputs.items()}
        sizes = image_sizes or [(self.cfg.image_size, self.cfg.image_size)] * n
        return FCOS.postprocess_detections(self, split, [list(anchors.split(per_level))] * n,
                                           sizes)

    @torch.no_grad()
    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Eval-mode forward + postprocess."""
        was = self.training
        self.eval()
        try:
            return self.postprocess(self(x))
        finally:
            self.train(was)


def parse_arch(space: SearchSpace, text: str) -> Arch:
    """`text` in `space`; an arch of the same space at another width (``det20:…`` for
    ``det20-w0.5``) means the same choices (`hwnas.train.supernet.proxy_arch`)."""
    prefix = text.strip().rpartition(":")[0]
    if prefix and prefix != space.name:
        return proxy_arch(get_space(prefix).parse(text), space)
    return space.parse(text)


def build_detector(cfg: DetectorConfig) -> Detector:
    """The detector `cfg` names, freshly initialised (backbone as the space builds it)."""
    space = get_space(cfg.space)
    arch = parse_arch(space, cfg.arch)
    if cfg.fpn_channels <= 0 or cfg.fpn_channels % 32:
        raise UserError(f"FPN channels must be a positive multiple of 32, got {cfg.fpn_channels}")
    info = [f for f in space.feature_info((1, 3, cfg.image_size, cfg.image_size))
            if 8 <= f.stride <= cfg.max_stride and cfg.image_size // f.stride >= 1]
    if not info:
        raise UserError(f"space {space.name} has no level with stride 8..{cfg.max_stride}")
    backbone = LevelBackbone(space.build(arch).train(), info)
    neck = FeaturePyramidNetwork([f.channels for f in info], cfg.fpn_channels)
    head = FCOSHead(cfg.fpn_channels, 1, cfg.num_classes, cfg.head_convs)
    sizes = tuple((cfg.anchor_scale * f.stride,) for f in info)
    anchor_gen = AnchorGenerator(sizes, ((1.0,),) * len(info))
    return Detector(backbone, neck, head, anchor_gen, cfg).train()


# ---- backbone initialisation --------------------------------------------------------------------
def candidate_state_from(ck: object, cfg: DetectorConfig) -> dict[str, torch.Tensor]:
    """The `Candidate` state dict (keys ``stem.*``, ``blocks.<i>.*``) in a loaded checkpoint:
    a plain candidate state dict, a detector checkpoint's backbone, or a supernet checkpoint's
    path `cfg.arch` (layer i's block of choice c_i becomes ``blocks.<i>``, SPOS mapping)."""
    if isinstance(ck, dict) and ck.get("format") == "hwnas-supernet/1":
        meta = ck["meta"]
        if meta.get("space") != cfg.space:
            raise UserError(f"supernet checkpoint is for space {meta.get('space')!r}, the "
                            f"detector's is {cfg.space!r}; build the detector in that space")
        choices = parse_arch(get_space(cfg.space), cfg.arch).choices
        out = {}
        for k, v in ck["model"].items():
            if k.startswith("stem."):
                out[k] = v
            elif k.startswith("layers."):
                _, layer, choice, rest = k.split(".", 3)
                if int(choice) == choices[int(layer)]:
                    out[f"blocks.{layer}.{rest}"] = v
        return out
    if isinstance(ck, dict) and ck.get("format") == "hwnas-detector/1":
        prefix = "backbone.body."
        return {k[len(prefix):]: v for k, v in ck["model"].items() if k.startswith(prefix)}
    if isinstance(ck, dict) and all(isinstance(v, torch.Tensor) for v in ck.values()):
        return {k: v for k, v in ck.items() if not k.startswith("head.")}
    raise UserError("init checkpoint is neither a candidate state dict nor an hwnas supernet "
                    "or detector checkpoint")


def init_backbone(det: Detector, state: dict[str, torch.Tensor], source: str) -> int:
    """Load `state` (a candidate state dict) into the backbone; the number of tensors loaded.

    Supernet blocks have non-affine BatchNorm, so their BN weight/bias are absent and stay at
    their initial 1/0; any other missing or mismatched tensor is an error naming `source`.
    """
    body = det.backbone.body
    own = body.state_dict()
    def bn_affine(k: str) -> bool:  # the weight/bias of a BatchNorm whose statistics are given
        return k.endswith((".weight", ".bias")) and k.rsplit(".", 1)[0] + ".running_mean" in state

    missing = [k for k in own if k not in state and not bn_affine(k)]
    extra = [k for k in state if k not in own]
    shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or extra or shape:
        bad = (missing or extra or shape)[0]
        raise UserError(f"init checkpoint {source!r} does not fit backbone {det.cfg.arch} "
                        f"({len(missing)} missing, {len(extra)} unexpected, {len(shape)} "
                        f"mis-shaped tensors, e.g. {bad!r}); use a checkpoint of the same "
                        "space, width and arch")
    body.load_state_dict(state, strict=False)
    return len(state)


def config_dict(cfg: DetectorConfig) -> dict:
    return asdict(cfg)
