"""Core types of a search space: `Arch`, `OpKey` and the `SearchSpace` base class.

A space is a fixed sequence of choice layers. An `Arch` is one choice per layer; its canonical
text form is ``<space name>:<one digit per layer>`` (``det20:03120…``), and `SearchSpace.parse`
is the only decoder of it.

`SearchSpace.op_keys(arch, input_shape)` is the single shape-walk: the profiler measures what
it returns, the predictor prices what it returns, and `build` assembles the model from the
modules `build_op` makes for those same keys, so the three can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from hwnas.errors import UserError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class FeatureInfo:
    """One output level a candidate offers a detector's neck: `channels` and `stride` (input
    size / level size), and `index`, its position in `forward_features`' list."""

    index: int
    channels: int
    stride: int


@dataclass(frozen=True, order=True)
class Arch:
    """One candidate: the space's name and one choice index per layer. Immutable and hashable."""

    space: str
    choices: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.space}:{''.join(str(c) for c in self.choices)}"


@dataclass(frozen=True, order=True)
class OpKey:
    """One measurable unit of a model at its real shapes; `str(key)` is the LUT's primary key.

    `in_shape` is NCHW including the batch; `out_channels`, `kernel`, `stride`, `dilation` are
    what the op's own module needs; `precision` names the numeric format it runs in.
    """

    kind: str
    in_shape: Shape
    out_channels: int
    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    precision: str = "fp32"

    def __str__(self) -> str:
        shape = "x".join(str(d) for d in self.in_shape)
        return (f"{self.kind}:{shape}:o{self.out_channels}:k{self.kernel}:s{self.stride}"
                f":d{self.dilation}:{self.precision}")

    @classmethod
    def parse(cls, text: str) -> "OpKey":
        """Inverse of `str()`; raises `ValueError` on malformed text."""
        parts = text.strip().split(":")
        if len(parts) != 7:
            raise ValueError(f"op key {text!r} does not have 7 ':'-separated fields")
        kind, shape, out, k, s, d, prec = parts
        for field, prefix in ((out, "o"), (k, "k"), (s, "s"), (d, "d")):
            if not field.startswith(prefix) or not field[1:].isdigit():
                raise ValueError(f"op key {text!r}: field {field!r} should be {prefix}<int>")
        dims = shape.split("x")
        if not kind or not all(x.isdigit() for x in dims):
            raise ValueError(f"op key {text!r}: bad kind or shape")
        return cls(kind, tuple(int(x) for x in dims), int(out[1:]), int(k[1:]), int(s[1:]),
                   int(d[1:]), prec)


def parse_shape(text: str) -> Shape:
    """``1x3x320x320`` → ``(1, 3, 320, 320)``; a `UserError` for anything else."""
    try:
        dims = tuple(int(x) for x in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) <= 0:
        raise UserError(f"input shape {text!r} is not NxCxHxW with positive integers; "
                        "write it like 1x3x320x320")
    return dims


class SearchSpace:
    """A single-path space: `num_layers` choice layers, each with `choice_names`.

    Subclasses define the per-layer choices, `op_keys`, and `build_op`. Every random operation
    takes an explicit `numpy.random.Generator`; nothing here reads global RNG state.
    """

    name: str
    choice_names: tuple[str, ...]
    num_layers: int
    default_input: Shape

    # ---- the canonical text form -------------------------------------------------------------
    def parse(self, text: str) -> Arch:
        """Decode ``<name>:<digits>``; a `UserError` naming what is wrong otherwise."""
        text = text.strip()
        prefix, sep, digits = text.rpartition(":")
        if not sep:
            prefix, digits = self.name, text
        if prefix != self.name:
            raise UserError(f"arch {text!r} belongs to space {prefix!r}, not {self.name!r}; "
                            f"pass --space {prefix} or an arch that starts with '{self.name}:'")
        if len(digits) != self.num_layers or not digits.isdigit():
            raise UserError(f"arch {text!r} must have exactly {self.num_layers} digits after "
                            f"'{self.name}:' (one choice per layer), got {len(digits)} characters")
        choices = tuple(int(c) for c in digits)
        bad = [i for i, c in enumerate(choices) if c >= len(self.choice_names)]
        if bad:
            raise UserError(f"arch {text!r}: choice {choices[bad[0]]} at layer {bad[0]} is out of "
                            f"range; each layer takes 0..{len(self.choice_names) - 1} "
                            f"({', '.join(self.choice_names)})")
        return Arch(self.name, choices)

    def canary(self) -> Arch:
        """The reference candidate a table is re-timed by: choice 0 at every layer."""
        return Arch(self.name, (0,) * self.num_layers)

    def uniform_archs(self) -> list[Arch]:
        """One candidate per choice with that choice at every layer (the extremes of the
        space); the first is the canary."""
        return [Arch(self.name, (c,) * self.num_layers) for c in range(len(self.choice_names))]

    def num_kinds(self) -> int:
        """How many op kinds the layers choose among (one calibration slope each)."""
        return len(self.choice_names)

    def arch(self, choices: Sequence[int]) -> Arch:
        return self.parse(self.name + ":" + "".join(str(int(c)) for c in choices))

    # ---- randomness ---------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator) -> Arch:
        """Uniform over every layer's choices."""
        return Arch(self.name, tuple(int(c) for c in
                                     rng.integers(0, len(self.choice_names), self.num_layers)))

    def sample_distinct(self, n: int, rng: np.random.Generator,
                        exclude: "set[str] | frozenset[str]" = frozenset()) -> list[Arch]:
        """Up to `n` distinct uniform archs whose text is not in `exclude` (bounded tries)."""
        out: dict[Arch, None] = {}
        for _ in range(100 * n):
            if len(out) >= n:
                break
            a = self.sample(rng)
            if str(a) not in exclude:
                out.setdefault(a)
        return list(out)

    def sample_many(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` uniform archs as an int array [n, num_layers] (the vectorised form)."""
        return rng.integers(0, len(self.choice_names), (n, self.num_layers), dtype=np.int64)

    def mutate(self, arch: Arch, rng: np.random.Generator, prob: float = 0.1) -> Arch:
        """Resample each layer with probability `prob` (to a different choice)."""
        out = list(arch.choices)
        n = len(self.choice_names)
        for i in range(self.num_layers):
            if rng.random() < prob:
                out[i] = int((out[i] + rng.integers(1, n)) % n)
        return Arch(self.name, tuple(out))

    def crossover(self, a: Arch, b: Arch, rng: np.random.Generator) -> Arch:
        """Uniform crossover: each layer from `a` or `b` with equal probability."""
        take_a = rng.random(self.num_layers) < 0.5
        return Arch(self.name, tuple(int(x if t else y)
                                     for x, y, t in zip(a.choices, b.choices, take_a)))

    # ---- the shape-walk and what is built from it -----------------------------------------------
    def op_keys(self, arch: Arch, input_shape: Shape | None = None,
                precision: str = "fp32") -> list[OpKey]:
        """The ops of `arch` at `input_shape`, in execution order, each at `precision`."""
        raise NotImplementedError

    def build_op(self, key: OpKey) -> nn.Module:
        """The eval-mode module that `key` names (what the profiler measures alone)."""
        raise NotImplementedError

    def build(self, arch: Arch) -> nn.Module:
        raise NotImplementedError

    def feature_info(self, input_shape: Shape | None = None) -> list[FeatureInfo]:
        """The levels `build(arch).forward_features(x)` returns, in order (the same for every
        candidate of a single-path space)."""
        raise NotImplementedError

    def key_grid(self, input_shape: Shape | None = None, precision: str = "fp32",
                 ) -> tuple[list[OpKey], list[list[OpKey]]]:
        """(fixed keys, grid[layer][choice]) derived from `op_keys`, for vectorised pricing.

        Valid because in a single-path space each layer's shapes are fixed by its position; the
        derivation re-walks `op_keys` with every layer set to one choice, so it cannot disagree.
        """
        n = len(self.choice_names)
        walks = [self.op_keys(Arch(self.name, (c,) * self.num_layers), input_shape, precision)
                 for c in range(n)]
        # positions that do not change with the choice are fixed; the rest are layers, in order
        varying = [i for i in range(len(walks[0])) if len({str(w[i]) for w in walks}) > 1]
        if len(varying) != self.num_layers:
            raise AssertionError(f"{self.name}: expected one varying op per layer, got "
                                 f"{len(varying)}")
        fixed = [k for i, k in enumerate(walks[0]) if i not in set(varying)]
        grid = [[walks[c][i] for c in range(n)] for i in varying]
        return fixed, grid

    def unique_op_keys(self, input_shape: Shape | None = None,
                       precision: str = "fp32") -> list[OpKey]:
        """Every op key any candidate of the space can have, in walk order, without duplicates."""
        fixed, grid = self.key_grid(input_shape, precision)
        seen: dict[str, OpKey] = {}
        for k in fixed[:1] + [k for row in grid for k in row] + fixed[1:]:
            seen.setdefault(str(k), k)
        return list(seen.values())


def count_macs(module: nn.Module, input_shape: Shape) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers for one forward pass at `input_shape`.

    Counted from the module's own forward (hooks), so it cannot drift from what is built.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out):
        nonlocal total
        total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m: nn.Linear, _inp, out):
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            module(torch.zeros(input_shape))
    finally:
        for h in handles:
            h.remove()
    return total
