"""Layers shared by the spaces: conv+BN(+ReLU), the SPOS channel split, the ShuffleNetV2 and
Xception-style choice blocks (with an optional dilation, for CRNAS-style spatial reallocation),
the stem and the classification head. A space assembles candidates and supernets from these;
nothing here knows about a space.
"""

from __future__ import annotations

import torch
from torch import nn

KERNEL = {"shuffle3": 3, "shuffle5": 5, "shuffle7": 7, "xception": 3}


def conv_bn(inp: int, out: int, k: int, stride: int, groups: int, relu: bool,
            affine: bool, dilation: int = 1) -> list[nn.Module]:
    """Conv (no bias, 'same' padding) + BatchNorm (+ ReLU), as a list to splice."""
    layers: list[nn.Module] = [nn.Conv2d(inp, out, k, stride, dilation * (k // 2),
                                         dilation=dilation, groups=groups, bias=False),
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
                 affine: bool = True, dilation: int = 1):
        super().__init__()
        if kind not in KERNEL:
            raise ValueError(f"unknown block kind {kind!r}")
        self.kind, self.stride = kind, stride
        inp = in_channels if stride == 2 else in_channels // 2
        mid, outputs = out_channels // 2, out_channels - inp
        k, d = KERNEL[kind], dilation  # the dilation widens the depthwise convs only
        if kind == "xception":
            main = (conv_bn(inp, inp, 3, stride, inp, False, affine, d)
                    + conv_bn(inp, mid, 1, 1, 1, True, affine)
                    + conv_bn(mid, mid, 3, 1, mid, False, affine, d)
                    + conv_bn(mid, mid, 1, 1, 1, True, affine)
                    + conv_bn(mid, mid, 3, 1, mid, False, affine, d)
                    + conv_bn(mid, outputs, 1, 1, 1, True, affine))
        else:
            main = (conv_bn(inp, mid, 1, 1, 1, True, affine)
                    + conv_bn(mid, mid, k, stride, mid, False, affine, d)
                    + conv_bn(mid, outputs, 1, 1, 1, True, affine))
        self.branch_main = nn.Sequential(*main)
        self.branch_proj = (nn.Sequential(*(conv_bn(inp, inp, k, 2, inp, False, affine)
                                            + conv_bn(inp, inp, 1, 1, 1, True, affine)))
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
        self.conv = nn.Sequential(*conv_bn(in_channels, out_channels, 3, 2, 1, True, affine))
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


