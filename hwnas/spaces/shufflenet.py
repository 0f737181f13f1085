"""DetNAS / SPOS single-path ShuffleNetV2 spaces.

Each choice layer is one of four blocks (SPOS, Guo et al. 2020; DetNAS, Chen et al. 2019):
ShuffleNetV2 blocks with a 3×3, 5×5 or 7×7 depthwise kernel, and the Xception-style block
(three depthwise 3×3 + pointwise pairs). A stage's first block has stride 2 and a projection
branch; the others split the channels in two (the SPOS channel shuffle) and transform one half.

Model: stem (3×3 conv s2 + BN + ReLU, 3×3 max-pool s2) → stages → head (global average pool +
linear). `forward_features` returns every stage's output for a detector's FPN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hwnas.spaces.base import Arch, FeatureInfo, OpKey, SearchSpace, Shape

CHOICES = ("shuffle3", "shuffle5", "shuffle7", "xception")
_KERNEL = {"shuffle3": 3, "shuffle5": 5, "shuffle7": 7, "xception": 3}


def _conv_bn(inp: int, out: int, k: int, stride: int, groups: int, relu: bool,
             affine: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(inp, out, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(out, affine=affine)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


def split_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SPOS's channel shuffle + split: even channels pass through, odd ones are transformed.

    Equal to the reference reshape/permute form, written as two strided slices so the ONNX
    graph stays free of shape arithmetic.
    """
    return x[:, 0::2], x[:, 1::2]


class ChoiceBlock(nn.Module):
    """One ShuffleNetV2 (`kind` shuffle3/5/7) or Xception-style block.

    Input [N, in_channels, H, W] → output [N, out_channels, H/stride, W/stride].
    With stride 1, in_channels == out_channels and half of the channels pass through.
    """

    def __init__(self, kind: str, in_channels: int, out_channels: int, stride: int,
                 affine: bool = True):
        super().__init__()
        if kind not in _KERNEL:
            raise ValueError(f"unknown block kind {kind!r}")
        self.kind, self.stride = kind, stride
        inp = in_channels if stride == 2 else in_channels // 2
        mid, outputs = out_channels // 2, out_channels - inp
        k = _KERNEL[kind]
        if kind == "xception":
            main = (_conv_bn(inp, inp, 3, stride, inp, False, affine)
                    + _conv_bn(inp, mid, 1, 1, 1, True, affine)
                    + _conv_bn(mid, mid, 3, 1, mid, False, affine)
                    + _conv_bn(mid, mid, 1, 1, 1, True, affine)
                    + _conv_bn(mid, mid, 3, 1, mid, False, affine)
                    + _conv_bn(mid, outputs, 1, 1, 1, True, affine))
        else:
            main = (_conv_bn(inp, mid, 1, 1, 1, True, affine)
                    + _conv_bn(mid, mid, k, stride, mid, False, affine)
                    + _conv_bn(mid, outputs, 1, 1, 1, True, affine))
        self.branch_main = nn.Sequential(*main)
        self.branch_proj = (nn.Sequential(*(_conv_bn(inp, inp, k, 2, inp, False, affine)
                                            + _conv_bn(inp, inp, 1, 1, 1, True, affine)))
                            if stride == 2 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch_proj is None:
            x_proj, x_main = split_shuffle(x)
            return torch.cat((x_proj, self.branch_main(x_main)), 1)
        return torch.cat((self.branch_proj(x), self.branch_main(x)), 1)


class Stem(nn.Module):
    """[N, 3, H, W] → [N, C, H/4, W/4]: 3×3 conv s2 + BN + ReLU, then 3×3 max-pool s2."""

    def __init__(self, in_channels: int, out_channels: int, affine: bool = True):
        super().__init__()
        self.conv = nn.Sequential(*_conv_bn(in_channels, out_channels, 3, 2, 1, True, affine))
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x))


class Head(nn.Module):
    """[N, C, H, W] → logits [N, num_classes]: global average pool + linear."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


class Candidate(nn.Module):
    """A standalone network of the space: `stem`, `blocks` (one per choice layer), `head`.

    Exported node names carry these module paths (``/blocks.7/branch_main/...``), which is how a
    per-node profile is tied back to the layer it came from.
    """

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module,
                 stage_ends: tuple[int, ...]):
        super().__init__()
        self.stem, self.blocks, self.head = stem, nn.ModuleList(blocks), head
        self.stage_ends = stage_ends

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output, strides 8, 16, 32, 64 relative to the input for det spaces."""
        feats, x = [], self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i + 1 in self.stage_ends:
                feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[-1])


def _round_channels(c: float, divisor: int = 8) -> int:
    return max(divisor, int(c + divisor / 2) // divisor * divisor)


@dataclass(frozen=True)
class ShuffleNetConfig:
    """Everything that defines a ShuffleNetV2 single-path space."""

    base_name: str
    stage_repeats: tuple[int, ...]
    stem_channels: int
    stage_channels: tuple[int, ...]
    default_input: Shape
    num_classes: int = 1000
    width_mult: float = 1.0


class ShuffleNetSpace(SearchSpace):
    choice_names = CHOICES

    def __init__(self, cfg: ShuffleNetConfig):
        self.cfg = cfg
        self.name = (cfg.base_name if cfg.width_mult == 1.0
                     else f"{cfg.base_name}-w{cfg.width_mult:g}")
        self.num_layers = sum(cfg.stage_repeats)
        self.default_input = cfg.default_input
        w = cfg.width_mult
        self.stem_channels = _round_channels(cfg.stem_channels * w)
        self.stage_channels = tuple(_round_channels(c * w) for c in cfg.stage_channels)
        self.stage_ends = tuple(sum(cfg.stage_repeats[:i + 1])
                                for i in range(len(cfg.stage_repeats)))

    def op_keys(self, arch: Arch, input_shape: Shape | None = None,
                precision: str = "fp32") -> list[OpKey]:
        """stem, one key per choice layer at its real input shape, head — in execution order."""
        n, c, h, w = input_shape or self.default_input
        keys = [OpKey("stem", (n, c, h, w), self.stem_channels, 3, 2, precision=precision)]
        # conv s2 pad 1 then max-pool s2 pad 1 (both k3): ceil-halving twice
        c, h, w = self.stem_channels, (h + 1) // 2, (w + 1) // 2
        h, w = (h + 1) // 2, (w + 1) // 2
        layer = 0
        for repeats, out in zip(self.cfg.stage_repeats, self.stage_channels):
            for r in range(repeats):
                kind = self.choice_names[arch.choices[layer]]
                stride = 2 if r == 0 else 1
                keys.append(OpKey(kind, (n, c, h, w), out, _KERNEL[kind], stride,
                                  precision=precision))
                if stride == 2:
                    h, w = (h + 1) // 2, (w + 1) // 2
                c, layer = out, layer + 1
        keys.append(OpKey("head", (n, c, h, w), self.cfg.num_classes, precision=precision))
        return keys

    def feature_info(self, input_shape: Shape | None = None) -> list[FeatureInfo]:
        """Every stage's output, read off the key walk: the op after a stage's last block takes
        that stage's output as its input."""
        shape = input_shape or self.default_input
        keys = self.op_keys(Arch(self.name, (0,) * self.num_layers), shape)
        return [FeatureInfo(i, keys[end + 1].in_shape[1], shape[2] // keys[end + 1].in_shape[2])
                for i, end in enumerate(self.stage_ends)]

    def build_op(self, key: OpKey, affine: bool = True) -> nn.Module:
        in_channels = key.in_shape[1]
        if key.kind == "stem":
            module: nn.Module = Stem(in_channels, key.out_channels, affine)
        elif key.kind == "head":
            module = Head(in_channels, key.out_channels)
        else:
            module = ChoiceBlock(key.kind, in_channels, key.out_channels, key.stride, affine)
        return module.eval()

    def build(self, arch: Arch) -> Candidate:
        """The standalone eval-mode network for `arch`, assembled from `build_op(op_keys(arch))`."""
        keys = self.op_keys(arch)
        ops = [self.build_op(k) for k in keys]
        return Candidate(ops[0], ops[1:-1], ops[-1], self.stage_ends).eval()
