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

from hwnas.errors import UserError
from hwnas.spaces.base import Arch, FeatureInfo, Gene, OpKey, SearchSpace, Shape
from hwnas.spaces.layers import KERNEL, ChoiceBlock, Head, Stem

CHOICES = ("shuffle3", "shuffle5", "shuffle7", "xception")
GENES = tuple(Gene(kind, KERNEL[kind]) for kind in CHOICES)


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
    # per-layer choice lists (default: the four SPOS blocks at every layer)
    layer_choices: tuple[tuple[Gene, ...], ...] | None = None


class ShuffleNetSpace(SearchSpace):
    def __init__(self, cfg: ShuffleNetConfig):
        self.cfg = cfg
        self.name = (cfg.base_name if cfg.width_mult == 1.0
                     else f"{cfg.base_name}-w{cfg.width_mult:g}")
        self.layer_choices = cfg.layer_choices or (GENES,) * sum(cfg.stage_repeats)
        if len(self.layer_choices) != sum(cfg.stage_repeats):
            raise ValueError(f"{cfg.base_name}: {len(self.layer_choices)} choice lists for "
                             f"{sum(cfg.stage_repeats)} layers")
        self.default_input = cfg.default_input
        w = cfg.width_mult
        self.stem_channels = _round_channels(cfg.stem_channels * w)
        self.stage_channels = tuple(_round_channels(c * w) for c in cfg.stage_channels)
        self.stage_ends = tuple(sum(cfg.stage_repeats[:i + 1])
                                for i in range(len(cfg.stage_repeats)))
        first = [sum(cfg.stage_repeats[:i]) for i in range(len(cfg.stage_repeats))]
        if any(g.skip for i in first for g in self.layer_choices[i]):
            raise ValueError(f"{cfg.base_name}: a stage's first (stride-2) layer cannot be skipped")
        prev = self.stem_channels
        for c in self.stage_channels:  # a stage's first block concatenates its input with
            if c <= prev:  # (c - input) new channels: a width so small that c ≤ input has none
                raise UserError(f"space {self.name}: width {cfg.width_mult:g} is too small (stage "
                                f"channels {list(self.stage_channels)} after a stem of "
                                f"{self.stem_channels} must grow); use a larger multiplier")
            prev = c

    def op_keys(self, arch: Arch, input_shape: Shape | None = None,
                precision: str = "fp32") -> list[OpKey]:
        """stem, one key per choice layer at its real input shape, head — in execution order."""
        n, c, h, w = input_shape or self.default_input
        keys = [OpKey("stem", (n, c, h, w), self.stem_channels, 3, 2, precision=precision)]
        # conv s2 pad 1 then max-pool s2 pad 1 (both k3): ceil-halving twice
        c, h, w = self.stem_channels, (h + 1) // 2, (w + 1) // 2
        h, w = (h + 1) // 2, (w + 1) // 2
        layer = 0
        genes = self.genes(arch)
        for repeats, out in zip(self.cfg.stage_repeats, self.stage_channels):
            for r in range(repeats):
                g = genes[layer]
                stride = 2 if r == 0 else 1
                if g.skip:  # an identity layer (a depth choice): priced as the op "skip"
                    keys.append(OpKey("skip", (n, c, h, w), out, 1, 1, 1,
                                      g.precision or precision))
                    c, layer = out, layer + 1
                    continue
                keys.append(OpKey(g.kind, (n, c, h, w), out, g.kernel, stride, g.dilation,
                                  g.precision or precision))
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
        elif key.kind == "skip":
            module = nn.Identity()
        elif key.kind == "head":
            module = Head(in_channels, key.out_channels)
        else:
            module = ChoiceBlock(key.kind, in_channels, key.out_channels, key.stride, affine,
                                 key.dilation)
        return module.eval()

    def build(self, arch: Arch) -> Candidate:
        """The standalone eval-mode network for `arch`, assembled from `build_op(op_keys(arch))`."""
        keys = self.op_keys(arch)
        ops = [self.build_op(k) for k in keys]
        return Candidate(ops[0], ops[1:-1], ops[-1], self.stage_ends).eval()
