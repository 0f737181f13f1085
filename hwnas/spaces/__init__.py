"""Search spaces, registered by name. `get_space("det20")`, `get_space("det20-w0.5")`.

The registry is what tests loop over: every space in `SPACES` must satisfy the same contract.
A ``-w<mult>`` suffix on a registered name gives that space with a width multiplier.
"""

from __future__ import annotations

from hwnas.errors import UserError
from hwnas.spaces.base import Arch, FeatureInfo, OpKey, SearchSpace, count_macs, parse_shape
from hwnas.spaces.shufflenet import ShuffleNetConfig, ShuffleNetSpace

SPACES: dict[str, ShuffleNetConfig] = {
    # DetNAS-300M-like: stages [4,4,8,4], stem 16, channels [64,160,320,640]
    "det20": ShuffleNetConfig("det20", (4, 4, 8, 4), 16, (64, 160, 320, 640), (1, 3, 320, 320)),
    # DetNAS-1.3G-like: stages [8,8,16,8], stem 48, channels [96,240,480,960]
    "det40": ShuffleNetConfig("det40", (8, 8, 16, 8), 48, (96, 240, 480, 960), (1, 3, 320, 320)),
    # a four-layer space for fast tests: the same blocks at toy sizes
    "tiny": ShuffleNetConfig("tiny", (2, 2), 8, (16, 32), (1, 3, 32, 32), num_classes=10),
}


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
    cfg = SPACES[base]
    if mult != 1.0:
        from dataclasses import replace
        cfg = replace(cfg, width_mult=mult)
    return ShuffleNetSpace(cfg)


__all__ = ["Arch", "FeatureInfo", "OpKey", "SearchSpace", "SPACES", "get_space", "count_macs", "parse_shape"]
