"""Core types of a search space: `Gene`, `Arch`, `OpKey` and the `SearchSpace` base class.

A space is a fixed sequence of choice layers, each with its own list of choices; a choice is a
`Gene` (block kind, kernel, expansion, dilation, skip, precision). An `Arch` is one choice index
per layer; its canonical text form is ``<space name>:<one token per layer>``, a token being one
character 0-9 then a-z (so up to 36 choices a layer, and det20's ``det20:03120…`` strings are
unchanged), and `SearchSpace.parse` is the only decoder of it.

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
TOKENS = "0123456789abcdefghijklmnopqrstuvwxyz"  # one character per layer's choice index


@dataclass(frozen=True)
class Gene:
    """One choice of one layer. `kind` names the block (and is its `OpKey.kind`: one calibration
    slope per kind); the other fields are its dimensions. `precision` None means the device's."""

    kind: str
    kernel: int = 3
    expansion: float = 1.0
    dilation: int = 1
    skip: bool = False
    precision: str | None = None

    @property
    def name(self) -> str:
        """``shuffle3``, ``shuffle3_d2``, ``mb_e6``, ``skip``, ``shuffle3@int8``: readable, unique
        within a layer's choices."""
        if self.skip:
            return "skip"
        out = self.kind + (f"_e{self.expansion:g}" if self.expansion != 1 else "")
        out += f"_d{self.dilation}" if self.dilation != 1 else ""
        return out + (f"@{self.precision}" if self.precision else "")


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
        return f"{self.space}:{''.join(TOKENS[c] for c in self.choices)}"


@dataclass(frozen=True, order=True)
class OpKey:
    """One measurable unit of a model at its real shapes; `str(key)` is the LUT's primary key.

    `in_shape` is NCHW including the batch; an op with several inputs (an FPN merge) lists the
    others in `extra_inputs`, written ``1x64x40x40+1x64x20x20``; `out_channels`, `kernel`,
    `stride`, `dilation` are what the op's own module needs; `precision` names the numeric
    format this op runs in (ops of one model may differ).
    """

    kind: str
    in_shape: Shape
    out_channels: int
    kernel: int = 1
    stride: int = 1
    dilation: int = 1
    precision: str = "fp32"
    extra_inputs: tuple[Shape, ...] = ()

    @property
    def in_shapes(self) -> tuple[Shape, ...]:
        return (self.in_shape,) + self.extra_inputs

    def __str__(self) -> str:
        shape = "+".join("x".join(str(d) for d in s) for s in self.in_shapes)
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
            if not field.startswith(prefix) or not (field[1:].isascii() and field[1:].isdigit()):
                raise ValueError(f"op key {text!r}: field {field!r} should be {prefix}<int>")
        shapes = [part.split("x") for part in shape.split("+")]
        if not kind or not prec or not all(x.isascii() and x.isdigit() for dims in shapes
                                           for x in dims):
            raise ValueError(f"op key {text!r}: bad kind, shape or precision")
        shapes_t = [tuple(int(x) for x in dims) for dims in shapes]
        return cls(kind, shapes_t[0], int(out[1:]), int(k[1:]), int(s[1:]), int(d[1:]), prec,
                   tuple(shapes_t[1:]))


MAX_DIM = 16384
MAX_ELEMENTS = 1 << 28  # 1 GiB of float32 input: beyond that no candidate fits in memory here


def parse_shape(text: str) -> Shape:
    """``1x3x320x320`` → ``(1, 3, 320, 320)``; a `UserError` for anything else (only ASCII
    digits, each dimension 1..16384, at most 2^28 elements)."""
    parts = text.strip().lower().split("x")
    ok = len(parts) == 4 and all(p.isascii() and p.isdigit() and len(p) <= 5 for p in parts)
    dims = tuple(int(p) for p in parts) if ok else ()
    if not ok or not all(0 < d <= MAX_DIM for d in dims):
        raise UserError(f"input shape {text!r} is not NxCxHxW with positive integers up to "
                        f"{MAX_DIM}; write it like 1x3x320x320")
    if int(np.prod(dims)) > MAX_ELEMENTS:
        raise UserError(f"input shape {text!r} has {int(np.prod(dims)):,} elements, more than "
                        f"the {MAX_ELEMENTS:,} an input may have here; use a smaller shape")
    return dims


class SearchSpace:
    """A single-path space: `num_layers` choice layers, layer i choosing among
    `layer_choices[i]` (`Gene`s; the lists may differ between layers).

    Subclasses set `name`, `layer_choices`, `default_input` and define `op_keys` and `build_op`.
    A layer's choice may change the layer's op but never its output shape (the single-path
    property the vectorised pricing relies on). Every random operation takes an explicit
    `numpy.random.Generator`; nothing here reads global RNG state.
    """

    name: str
    layer_choices: tuple[tuple[Gene, ...], ...]
    default_input: Shape

    @property
    def num_layers(self) -> int:
        return len(self.layer_choices)

    @property
    def num_choices(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.layer_choices)

    @property
    def choice_names(self) -> tuple[str, ...]:
        """The choice names every layer shares (a space whose layers all choose alike)."""
        names = {tuple(g.name for g in c) for c in self.layer_choices}
        if len(names) != 1:
            raise ValueError(f"{self.name}: layers choose among different lists; use "
                             "layer_choices")
        return names.pop()

    def _uniform_n(self) -> int | None:
        n = set(self.num_choices)
        return n.pop() if len(n) == 1 else None

    def choice_kinds(self) -> list[str]:
        """The op kinds the layers choose among, in order of first appearance (one calibration
        slope each); kinds of layers with a single choice are fixed ops, not choices."""
        out: dict[str, None] = {}
        for choices in self.layer_choices:
            if len(choices) > 1:
                for g in choices:
                    out.setdefault(g.kind)
        return list(out)

    def num_kinds(self) -> int:
        return len(self.choice_kinds())

    # ---- the canonical text form -------------------------------------------------------------
    def parse(self, text: str) -> Arch:
        """Decode ``<name>:<one token per layer>``; a `UserError` naming what is wrong otherwise."""
        text = text.strip()
        prefix, sep, tokens = text.rpartition(":")
        if not sep:
            prefix, tokens = self.name, text
        if prefix != self.name:
            raise UserError(f"arch {text!r} belongs to space {prefix!r}, not {self.name!r}; "
                            f"pass --space {prefix} or an arch that starts with '{self.name}:'")
        if len(tokens) != self.num_layers or not all(t in TOKENS for t in tokens):
            raise UserError(f"arch {text!r} must have exactly {self.num_layers} tokens (0-9, "
                            f"a-z) after '{self.name}:', one choice per layer, got "
                            f"{len(tokens)} characters")
        choices = tuple(TOKENS.index(t) for t in tokens)
        bad = [i for i, c in enumerate(choices) if c >= len(self.layer_choices[i])]
        if bad:
            i = bad[0]
            raise UserError(f"arch {text!r}: choice {tokens[i]} at layer {i} is out of range; "
                            f"that layer takes 0..{TOKENS[len(self.layer_choices[i]) - 1]} "
                            f"({', '.join(g.name for g in self.layer_choices[i])})")
        return Arch(self.name, choices)

    def arch(self, choices: Sequence[int]) -> Arch:
        return self.parse(self.name + ":" + "".join(TOKENS[int(c)] for c in choices))

    def genes(self, arch: Arch) -> list[Gene]:
        """The chosen `Gene` of every layer."""
        return [self.layer_choices[i][c] for i, c in enumerate(arch.choices)]

    def canary(self) -> Arch:
        """The reference candidate a table is re-timed by: choice 0 at every layer."""
        return Arch(self.name, (0,) * self.num_layers)

    def uniform_archs(self) -> list[Arch]:
        """Candidate c takes choice c at every layer that has one (else its last): the extremes
        of the space, for the calibration's leverage; the first is the canary."""
        return [Arch(self.name, tuple(min(c, n - 1) for n in self.num_choices))
                for c in range(max(self.num_choices))]

    # ---- randomness ---------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator) -> Arch:
        """Uniform over every layer's choices."""
        return Arch(self.name, tuple(int(c) for c in self.sample_many(1, rng)[0]))

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
        same = self._uniform_n()
        if same is not None:  # the draw every earlier (uniform-space) result was seeded with
            return rng.integers(0, same, (n, self.num_layers), dtype=np.int64)
        return rng.integers(0, np.asarray(self.num_choices), (n, self.num_layers),
                            dtype=np.int64)

    def mutate(self, arch: Arch, rng: np.random.Generator, prob: float = 0.1) -> Arch:
        """Resample each layer with probability `prob` (to a different choice)."""
        out = list(arch.choices)
        for i, n in enumerate(self.num_choices):
            if rng.random() < prob and n > 1:
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
                 ) -> tuple[list[OpKey], list[list[OpKey | None]]]:
        """(fixed keys, grid[layer][choice]) derived from `op_keys`, for vectorised pricing.

        Valid because in a single-path space each layer's shapes are fixed by its position; the
        derivation re-walks `op_keys` over the uniform candidates, so it cannot disagree. A
        layer with a single choice has no varying op: its op is among the fixed keys and its
        grid row is ``[None]`` (priced 0). Rows are padded with None to the widest layer.
        """
        walks = [self.op_keys(a, input_shape, precision) for a in self.uniform_archs()]
        varying = [i for i in range(len(walks[0])) if len({str(w[i]) for w in walks}) > 1]
        multi = [i for i, n in enumerate(self.num_choices) if n > 1]
        if len(varying) != len(multi):
            raise AssertionError(f"{self.name}: expected one varying op per layer with choices, "
                                 f"got {len(varying)} for {len(multi)}")
        fixed = [k for i, k in enumerate(walks[0]) if i not in set(varying)]
        width = max(self.num_choices)
        grid: list[list[OpKey | None]] = [[None] * width for _ in range(self.num_layers)]
        for layer, pos in zip(multi, varying):
            for c in range(self.num_choices[layer]):
                grid[layer][c] = walks[c][pos]
        return fixed, grid

    def unique_op_keys(self, input_shape: Shape | None = None,
                       precision: str = "fp32") -> list[OpKey]:
        """Every op key any candidate of the space can have, in walk order, without duplicates."""
        fixed, grid = self.key_grid(input_shape, precision)
        seen: dict[str, OpKey] = {}
        for k in fixed[:1] + [k for row in grid for k in row if k is not None] + fixed[1:]:
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
