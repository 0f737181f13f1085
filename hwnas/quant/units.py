"""The quantisable units of one candidate, the edges between them, and precision as a gene.

A *unit* is one op of the space's walk (`SearchSpace.op_keys`): the stem, each choice block,
the classifier head; for a detector space also the FPN, the FCOS head and the post-processing
(decode + NMS, fp32 only: nothing in it is worth quantising). An *edge* joins the unit that
produces an activation to a unit that consumes it (`links`: which output feeds which input);
a ShuffleNet classifier is a chain, a detector adds its stage outputs → FPN, FPN → head and
head → post-processing edges.

Precision is a gene: `PrecisionSpace` is a `SearchSpace` whose layers are the units and whose
choices are `Gene(kind, kernel, precision=p)` for the device's precisions, so an assignment is
an `Arch` of it (sampled, mutated and crossed like any other). Its text form is one letter
per unit, ``f`` fp32, ``h`` fp16, ``i`` int8 (``ffiiii…``), decoded only by
`PrecisionSpace.parse`. A *triple* is a path of two edges a → b → c: the neighbourhood whose
joint cost the latency table also measures.

Every unit also names the ONNX node-name prefix its nodes carry in the exported candidate
(``/blocks.3/``; ``/det/backbone/blocks.3/`` in the deployable detector): what the quantiser
excludes to keep a unit in fp32 (`hwnas.quant.realise`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from hwnas.errors import UserError
from hwnas.spaces.base import TOKENS, Arch, Gene, OpKey, SearchSpace, Shape

PRECISION_CODES = {"fp32": "f", "fp16": "h", "int8": "i"}
CODE_PRECISIONS = {v: k for k, v in PRECISION_CODES.items()}
BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclass(frozen=True)
class Unit:
    """One quantisable part of a candidate: its op key (at fp32), the ONNX node-name prefix of
    its nodes in the exported candidate, how many outputs it has, the precisions it may take."""

    name: str
    key: OpKey
    prefix: str
    n_outputs: int
    precisions: tuple[str, ...]

    def at(self, precision: str) -> OpKey:
        """Its op key at `precision` (the table's row name)."""
        k = self.key
        return OpKey(k.kind, k.in_shape, k.out_channels, k.kernel, k.stride, k.dilation,
                     precision, k.extra_inputs)


@dataclass(frozen=True)
class Edge:
    """Unit `src`'s outputs feed unit `dst`'s inputs: `links` = ((src output, dst input), …)."""

    src: int
    dst: int
    links: tuple[tuple[int, int], ...] = ((0, 0),)


def device_precisions(device) -> tuple[str, ...]:
    """The precisions a unit may take on `device`: its backend's, when the device runs int8
    (fp32 first); a `UserError` for a device without int8."""
    from hwnas.backends import get_backend

    if device.precision != "int8":
        raise UserError(f"device {device.name} runs {device.precision} only: mixed precision "
                        "needs a device with int8 (e.g. cpu-ort-int8; `hwnas devices` lists them)")
    have = get_backend(device.backend).precisions
    return ("fp32",) + tuple(p for p in ("fp16", "int8") if p in have)


def _shufflenet_graph(space, arch: Arch, shape: Shape, precisions):
    keys = space.op_keys(arch, shape)
    names = ["stem"] + [f"blocks.{i}" for i in range(len(keys) - 2)] + ["head"]
    units = [Unit(n, k, f"/{n}/", 1, precisions) for n, k in zip(names, keys)]
    edges = [Edge(i, i + 1) for i in range(len(units) - 1)]
    return units, edges


def _detector_graph(space, arch: Arch, shape: Shape, precisions):
    keys = space.op_keys(arch, shape)
    nb = space.num_layers
    levels = space.levels(shape)
    stem, blocks, fpn, head, post = keys[0], keys[1:1 + nb], keys[1 + nb], keys[2 + nb], keys[3 + nb]
    units = ([Unit("stem", stem, "/det/backbone/stem/", 1, precisions)]
             + [Unit(f"blocks.{i}", k, f"/det/backbone/blocks.{i}/", 1, precisions)
                for i, k in enumerate(blocks)]
             + [Unit("fpn", fpn, "/det/neck/", len(levels), precisions),
                Unit("head", head, "/det/head/", 3, precisions),
                Unit("post", post, "/post/", 4, ("fp32",))])
    edges = [Edge(i, i + 1) for i in range(nb)]  # stem → blocks.0 → … → blocks.(nb-1)
    ends = space.backbone.stage_ends
    i_fpn, i_head, i_post = nb + 1, nb + 2, nb + 3
    for j, f in enumerate(levels):  # the last block of stage f.index feeds FPN input j
        edges.append(Edge(ends[f.index], i_fpn, ((0, j),)))
    edges.append(Edge(i_fpn, i_head, tuple((j, j) for j in range(len(levels)))))
    edges.append(Edge(i_head, i_post, ((0, 0), (1, 1), (2, 2))))
    return units, edges


class PrecisionSpace(SearchSpace):
    """Per-unit precision choices for one candidate `arch` of `space` at `input_shape`.

    Layer i is unit i; its choices are the unit's precisions (fp32 first, so the canary and
    choice 0 everywhere is all fp32). `units` and `edges` describe the candidate's structure.
    """

    def __init__(self, space: SearchSpace, arch: Arch, input_shape: Shape,
                 precisions: Sequence[str] = ("fp32", "int8")):
        from hwnas.detection.space import DetectorSpace
        from hwnas.spaces.shufflenet import ShuffleNetSpace

        self.base, self.arch, self.input_shape = space, arch, tuple(input_shape)
        self.precisions = tuple(precisions)
        bad = [p for p in self.precisions if p not in PRECISION_CODES]
        if bad:
            raise UserError(f"unknown precision {bad[0]!r}; known: {', '.join(PRECISION_CODES)}")
        if isinstance(space, DetectorSpace):
            units, edges = _detector_graph(space, arch, self.input_shape, self.precisions)
        elif isinstance(space, ShuffleNetSpace):
            units, edges = _shufflenet_graph(space, arch, self.input_shape, self.precisions)
        else:
            raise UserError(f"space {space.name} has no mixed-precision units defined "
                            "(hwnas.quant.units knows ShuffleNet and detector spaces)")
        self.units: tuple[Unit, ...] = tuple(units)
        self.edges: tuple[Edge, ...] = tuple(edges)
        # neighbour triples a → b → c: (index of edge a → b, index of edge b → c)
        self.triples: tuple[tuple[int, int], ...] = tuple(
            (k1, k2) for k1, e1 in enumerate(self.edges) for k2, e2 in enumerate(self.edges)
            if e1.dst == e2.src)
        self.name = f"{space.name}@{''.join(TOKENS[c] for c in arch.choices)}"
        self.layer_choices = tuple(tuple(Gene(u.key.kind, u.key.kernel, precision=p)
                                         for p in u.precisions) for u in self.units)
        self.default_input = self.input_shape

    # ---- the text form ---------------------------------------------------------------------------
    def text(self, a: Arch) -> str:
        """``ffiiii…``: one letter per unit (f fp32, h fp16, i int8)."""
        return "".join(PRECISION_CODES[p] for p in self.unit_precisions(a))

    def parse(self, text: str) -> Arch:
        """An assignment from its letters; a `UserError` naming what is wrong otherwise."""
        text = text.strip()
        if len(text) != len(self.units):
            raise UserError(f"precision assignment {text!r} must have one letter per unit "
                            f"({len(self.units)}: {', '.join(u.name for u in self.units)}), "
                            f"got {len(text)}")
        out = []
        for u, c in zip(self.units, text):
            p = CODE_PRECISIONS.get(c)
            if p is None:
                raise UserError(f"precision assignment {text!r}: unknown precision letter "
                                f"{c!r}; use {', '.join(f'{v} ({k})' for k, v in PRECISION_CODES.items())}")
            if p not in u.precisions:
                raise UserError(f"precision assignment {text!r}: unit {u.name} cannot run {p} "
                                f"here (it takes {', '.join(u.precisions)})")
            out.append(u.precisions.index(p))
        return Arch(self.name, tuple(out))

    def assignment(self, precisions: Sequence[str]) -> Arch:
        return self.parse("".join(PRECISION_CODES[p] for p in precisions))

    def uniform(self, precision: str) -> Arch:
        """Every unit at `precision` where it can take it (else fp32)."""
        return Arch(self.name, tuple(u.precisions.index(precision) if precision in u.precisions
                                     else 0 for u in self.units))

    def unit_precisions(self, a: Arch) -> list[str]:
        return [u.precisions[c] for u, c in zip(self.units, a.choices)]

    def canary(self) -> Arch:
        return self.uniform("fp32")

    # ---- walks -------------------------------------------------------------------------------------
    def op_keys(self, arch: Arch, input_shape: Shape | None = None,
                precision: str = "fp32") -> list[OpKey]:
        """The units' op keys, each at its assigned precision."""
        return [u.at(p) for u, p in zip(self.units, self.unit_precisions(arch))]

    def sample_stratified(self, n: int, rng: np.random.Generator,
                          exclude: "set[str] | frozenset[str]" = frozenset()) -> list[Arch]:
        """Up to `n` distinct assignments whose text is not in `exclude`: each draws a fraction
        f ~ U(0, 1) and puts every unit at a non-fp32 precision with probability f (so near-
        uniform assignments and long runs appear, not only the ~50/50 mixes a uniform draw
        gives)."""
        out: dict[Arch, None] = {}
        for _ in range(100 * n):
            if len(out) >= n:
                break
            f = rng.random()
            choice = []
            for u in self.units:
                k = len(u.precisions)
                choice.append(0 if k == 1 or rng.random() >= f else int(rng.integers(1, k)))
            a = Arch(self.name, tuple(choice))
            if self.text(a) not in exclude:
                out.setdefault(a)
        return list(out)

    # ---- sizes -------------------------------------------------------------------------------------
    def weight_counts(self) -> np.ndarray:
        """Weights (conv and linear weight + bias elements) of each unit of the priced model."""
        out = []
        for u in self.units:
            m = self.base.build_op(u.key)
            out.append(sum(mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
                           for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))))
        return np.array(out, dtype=np.int64)

    def size_mb(self, a: Arch, counts: np.ndarray | None = None) -> float:
        counts = self.weight_counts() if counts is None else counts
        return float(sum(int(n) * BYTES[p] for n, p in zip(counts, self.unit_precisions(a))) / 1e6)


class PairModule(nn.Module):
    """Two units joined by one edge, for timing the edge: inputs are `a`'s inputs, then `b`'s
    inputs that `a` does not feed; outputs are `b`'s, then `a`'s that `b` does not take.
    Exported node names start with ``/a/`` and ``/b/`` (what the quantiser excludes)."""

    def __init__(self, a: nn.Module, b: nn.Module, links: tuple[tuple[int, int], ...],
                 a_inputs: int, b_inputs: int, a_outputs: int):
        super().__init__()
        self.a, self.b = a, b
        self.links, self.a_inputs, self.b_inputs, self.a_outputs = links, a_inputs, b_inputs, a_outputs

    def forward(self, *xs: torch.Tensor):
        ya = self.a(*xs[:self.a_inputs])
        ya = tuple(ya) if isinstance(ya, (tuple, list)) else (ya,)
        fed = {i: o for o, i in self.links}
        rest = iter(xs[self.a_inputs:])
        yb = self.b(*[ya[fed[i]] if i in fed else next(rest) for i in range(self.b_inputs)])
        yb = tuple(yb) if isinstance(yb, (tuple, list)) else (yb,)
        used = {o for o, _ in self.links}
        out = yb + tuple(y for o, y in enumerate(ya) if o not in used)
        return out if len(out) > 1 else out[0]


def pair_module(ps: PrecisionSpace, edge: Edge) -> tuple[nn.Module, tuple[Shape, ...]]:
    """The module that times `edge` and its input shapes."""
    ua, ub = ps.units[edge.src], ps.units[edge.dst]
    a, b = ps.base.build_op(ua.key), ps.base.build_op(ub.key)
    fed = {i for _, i in edge.links}
    shapes = ua.key.in_shapes + tuple(s for i, s in enumerate(ub.key.in_shapes) if i not in fed)
    m = PairModule(a, b, edge.links, len(ua.key.in_shapes), len(ub.key.in_shapes), ua.n_outputs)
    return m.eval(), shapes


def triple_units(ps: PrecisionSpace, triples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The units (a, b, c) of each triple (edge a → b, edge b → c) in `triples`, as index
    arrays."""
    e = ps.edges
    abc = [(e[k1].src, e[k1].dst, e[k2].dst) for k1, k2 in triples]
    return tuple(np.array([t[i] for t in abc], dtype=np.int64) for i in range(3))


def summed_terms(ps: PrecisionSpace, ch: np.ndarray, unit: np.ndarray, edge: np.ndarray,
                 triple: np.ndarray | None = None, triples=()) -> np.ndarray:
    """Per assignment (rows of choices `ch` [N, U]): Σ unit[u, c] + Σ edge[k, c_src, c_dst]
    (+ Σ triple[t, c_a, c_b, c_c] over `triples`), the one way any per-item array of a
    candidate ([U, P], [E, P, P], [T, P, P, P]) is summed over assignments."""
    out = unit[np.arange(ch.shape[1]), ch].sum(1)
    if len(ps.edges):
        src = np.array([e.src for e in ps.edges], dtype=np.int64)
        dst = np.array([e.dst for e in ps.edges], dtype=np.int64)
        out = out + edge[np.arange(len(ps.edges)), ch[:, src], ch[:, dst]].sum(1)
    if len(triples):
        a, b, c = triple_units(ps, triples)
        out = out + triple[np.arange(len(triples)), ch[:, a], ch[:, b], ch[:, c]].sum(1)
    return out


def triple_module(ps: PrecisionSpace, k1: int, k2: int) -> tuple[nn.Module, tuple[Shape, ...]]:
    """The module that times the triple of edges `k1` (a → b) and `k2` (b → c): the pair
    module of a → b, then c fed by b's outputs as in the candidate. Exported node names start
    with ``/a/a/``, ``/a/b/`` and ``/b/`` (a, b, c)."""
    e1, e2 = ps.edges[k1], ps.edges[k2]
    if e1.dst != e2.src:
        raise ValueError(f"edges {k1} and {k2} do not meet in a unit")
    ua, ub, uc = ps.units[e1.src], ps.units[e1.dst], ps.units[e2.dst]
    inner, shapes = pair_module(ps, e1)
    c = ps.base.build_op(uc.key)
    fed = {i for _, i in e2.links}
    inner_outputs = ub.n_outputs + ua.n_outputs - len({o for o, _ in e1.links})
    m = PairModule(inner, c, e2.links, len(shapes), len(uc.key.in_shapes), inner_outputs)
    return m.eval(), tuple(shapes) + tuple(s for i, s in enumerate(uc.key.in_shapes)
                                            if i not in fed)
