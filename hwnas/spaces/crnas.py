"""CRNAS computation reallocation (Liang et al. 2020) on the det20 block family.

CRNAS keeps a detector backbone's total computation and moves it: *stage reallocation* chooses
how many of a fixed number of blocks (20 for det20) each of the four stages gets, *spatial
reallocation* chooses a dilation (1, 2 or 3) for every block, which widens its receptive field
at the same cost in MACs but not always the same latency.

As a single-path space (`crnas20`): each stage has `max_depth` layers; a stage's first
(stride-2) layer chooses a dilation (``shuffle3``, ``shuffle3_d2``, ``shuffle3_d3``), every other
layer a dilation or ``skip`` (an identity: the stage is shallower). A stage of depth k keeps its
first k layers, so an allocation (k1, k2, k3, k4) is the arch with the later layers skipped; the
dilated and skipped layers are op keys like any other, so one table prices both reallocations.
Every layer shares its input shape with the others of its stage, so skipping changes no shape.

The search that keeps the total number of blocks fixed is `hwnas.search.crnas.CRNASSearch`;
evolution and random search on this space search depth and dilation freely.
"""

from __future__ import annotations

import itertools

import numpy as np

from hwnas.spaces.base import Arch, Gene
from hwnas.spaces.shufflenet import ShuffleNetConfig, ShuffleNetSpace

DILATIONS = (1, 2, 3)
FIRST = tuple(Gene("shuffle3", 3, dilation=d) for d in DILATIONS)  # a stage's stride-2 layer
REST = FIRST + (Gene("skip", 1, skip=True),)
SKIP = len(FIRST)  # the choice index of `skip` in a non-first layer


class CrnasSpace(ShuffleNetSpace):
    """det20's stem, channels and block family; stages of up to `max_depth` layers, of which
    `total_blocks` are active in a CRNAS allocation."""

    def __init__(self, cfg: ShuffleNetConfig, total_blocks: int, min_depth: int = 1):
        choices = tuple(FIRST if r == 0 else REST for depth in cfg.stage_repeats
                        for r in range(depth))
        super().__init__(ShuffleNetConfig(**{**cfg.__dict__, "layer_choices": choices}))
        self.total_blocks, self.min_depth = total_blocks, min_depth
        starts = [sum(cfg.stage_repeats[:i]) for i in range(len(cfg.stage_repeats))]
        self.stage_layers = [range(s, s + d) for s, d in zip(starts, cfg.stage_repeats)]

    def allocations(self) -> list[tuple[int, ...]]:
        """Every (depth per stage) with `min_depth` ≤ depth ≤ max depth summing to
        `total_blocks`, in lexicographic order."""
        ranges = [range(self.min_depth, len(r) + 1) for r in self.stage_layers]
        return [a for a in itertools.product(*ranges) if sum(a) == self.total_blocks]

    def allocation_arch(self, depths, dilation_choice: int = 0) -> Arch:
        """The arch of allocation `depths`: the first `depths[s]` layers of stage s at
        `dilation_choice` (0: dilation 1), the others skipped."""
        row = np.full(self.num_layers, SKIP, np.int64)
        for layers, d in zip(self.stage_layers, depths):
            row[layers.start:layers.start + d] = dilation_choice
        return Arch(self.name, tuple(int(c) for c in row))

    def depths(self, arch: Arch) -> tuple[int, ...]:
        """Active (non-skipped) layers per stage."""
        return tuple(sum(arch.choices[i] != SKIP for i in layers) for layers in self.stage_layers)


def crnas20(width: float = 1.0) -> CrnasSpace:
    """det20's 20 blocks reallocated over stages of up to [6, 6, 10, 6] layers (each at least 2),
    with a dilation of 1, 2 or 3 per block."""
    return CrnasSpace(ShuffleNetConfig("crnas20", (6, 6, 10, 6), 16, (64, 160, 320, 640),
                                       (1, 3, 320, 320), width_mult=width),
                      total_blocks=20, min_depth=2)


def tiny_crnas(width: float = 1.0) -> CrnasSpace:
    """For tests: tiny's stem and channels, stages of up to 3 layers, 4 active blocks."""
    return CrnasSpace(ShuffleNetConfig("tiny-crnas", (3, 3), 8, (16, 32), (1, 3, 32, 32),
                                       num_classes=10, width_mult=width),
                      total_blocks=4, min_depth=1)
