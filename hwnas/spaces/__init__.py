"""Search spaces, registered by name: `get_space("det20")`, `get_space("det20-w0.5")`.

A space is a registered factory `f(width_mult) -> SearchSpace`, not a config of one class: any
`SearchSpace` subclass can be registered with `@register_space(name)`. The registry is what tests
loop over: every space in `SPACES` must satisfy the same contract. A ``-w<mult>`` suffix on a
registered name gives that space with a width multiplier.
"""

from __future__ import annotations

from typing import Callable

from hwnas.errors import UserError
from hwnas.spaces.base import (Arch, FeatureInfo, Gene, OpKey, SearchSpace, count_macs,
                               parse_shape)
from hwnas.spaces.shufflenet import GENES, ShuffleNetConfig, ShuffleNetSpace

SPACES: dict[str, Callable[[float], SearchSpace]] = {}


def register_space(name: str):
    """Register `factory(width_mult) -> SearchSpace` under `name`."""
    def deco(factory: Callable[[float], SearchSpace]):
        if name in SPACES or "-w" in name:
            raise ValueError(f"space name {name!r} is taken or contains '-w'")
        SPACES[name] = factory
        return factory
    return deco


@register_space("det20")
def det20(width: float = 1.0) -> SearchSpace:
    """DetNAS-300M-like: stages [4,4,8,4], stem 16, channels [64,160,320,640]."""
    return ShuffleNetSpace(ShuffleNetConfig("det20", (4, 4, 8, 4), 16, (64, 160, 320, 640),
                                            (1, 3, 320, 320), width_mult=width))


@register_space("det40")
def det40(width: float = 1.0) -> SearchSpace:
    """DetNAS-1.3G-like: stages [8,8,16,8], stem 48, channels [96,240,480,960]."""
    return ShuffleNetSpace(ShuffleNetConfig("det40", (8, 8, 16, 8), 48, (96, 240, 480, 960),
                                            (1, 3, 320, 320), width_mult=width))


@register_space("tiny")
def tiny(width: float = 1.0) -> SearchSpace:
    """A four-layer space for fast tests: the same blocks at toy sizes."""
    return ShuffleNetSpace(ShuffleNetConfig("tiny", (2, 2), 8, (16, 32), (1, 3, 32, 32),
                                            num_classes=10, width_mult=width))


@register_space("tiny-mixed")
def tiny_mixed(width: float = 1.0) -> SearchSpace:
    """tiny with per-layer choice lists of several dimensions (kernel, dilation, a layer with
    one choice): the general-space contract in a form the tests can afford."""
    d = [g for g in GENES[:3]] + [Gene("shuffle3", 3, dilation=2), Gene("xception", 3, dilation=2)]
    return ShuffleNetSpace(ShuffleNetConfig(
        "tiny-mixed", (2, 2), 8, (16, 32), (1, 3, 32, 32), num_classes=10, width_mult=width,
        layer_choices=(GENES, tuple(d), (GENES[0],), tuple(d[:2]) + (d[4],))))


@register_space("crnas20")
def _crnas20(width: float = 1.0) -> SearchSpace:
    """CRNAS reallocation of det20's 20 blocks: depth per stage and dilation per block."""
    from hwnas.spaces.crnas import crnas20

    return crnas20(width)


@register_space("tiny-crnas")
def _tiny_crnas(width: float = 1.0) -> SearchSpace:
    """A CRNAS space at toy sizes (tests): stages of up to 3 layers, 4 active blocks."""
    from hwnas.spaces.crnas import tiny_crnas

    return tiny_crnas(width)


def _detector_space(backbone: str, image_size: int):
    def factory(width: float = 1.0) -> SearchSpace:
        from hwnas.detection.space import DetectorSpace  # torchvision: only when asked for

        return DetectorSpace(backbone, width, image_size)
    factory.__doc__ = (f"FCOS detectors on {backbone} candidates at {image_size} px (FPN, head "
                       "and post-processing priced as ops; hwnas.detection.space)")
    return factory


register_space("det20-fcos")(_detector_space("det20", 128))
register_space("tiny-fcos")(_detector_space("tiny", 64))
register_space("crnas20-fcos")(_detector_space("crnas20", 128))
register_space("tiny-crnas-fcos")(_detector_space("tiny-crnas", 64))


def get_space(name: str) -> SearchSpace:
    """The space called `name` (optionally ``<name>-w<width multiplier>``)."""
    base, _, width = name.partition("-w")
    if base not in SPACES:
        raise UserError(f"unknown space {name!r}; known spaces: {', '.join(SPACES)} "
                        "(a width multiplier is written like det20-w0.5)")
    try:
        mult = float(width) if width else 1.0
    except ValueError:
        mult = 0.0
    if not 0.0 < mult <= 4.0:
        raise UserError(f"space {name!r}: width multiplier {width!r} is not a number in (0, 4]")
    return SPACES[base](mult)


__all__ = ["Arch", "FeatureInfo", "Gene", "OpKey", "SearchSpace", "SPACES", "get_space",
           "count_macs", "parse_shape", "register_space"]
