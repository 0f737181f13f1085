"""The mixed-precision latency table of one candidate: units and their conversions, measured.

**Why pairs, not Q/DQ rows alone.** The first model tried here priced each unit at each
precision and each boundary as a separately timed QuantizeLinear or DequantizeLinear of that
shape. Measured on det20 @ 320 (AMD EPYC), it breaks at the stem: with the stem in fp32 and the
first block in int8, onnxruntime's QDQ propagation moves the QuantizeLinear above the stem's
MaxPool, which then runs on uint8 in NCHW with a generic kernel (3.4 ms instead of ~0.1 ms): the
model ran 5.8 ms against 3.9 ms all-int8 and 3.3 ms all-fp32. A boundary's cost depends on the
ops on both sides of it and on what the runtime's rewrites make of them. So the table measures
each edge where it happens:

- ``unit@p``: each unit alone at each precision (`Unit.at(p)`, its `OpKey` with that precision;
  an int8 unit alone includes its own input Q and output DQ);
- ``unit_a@p>unit_b@q``: each *pair* of units joined by an edge (`units.pair_module`), at each
  precision pair; the edge's cost is ``pair − a@p − b@q``: for an int8→int8 edge that removes
  the Q/DQ the two units paid alone, for a mixed edge it is the conversion in context (Q/DQ,
  layout reorders, propagated Q/DQ), for fp32→fp32 what the units share (one run's overhead);
- ``unit_a@p>unit_b@q>unit_c@r``: each *triple* a → b → c (two edges meeting in b,
  `units.triple_module`) at each precision triple; its surplus ``triple − pair(a,b) − pair(b,c)
  + b@q`` is what the two edges cost together beyond their sum. Why: measured on det20 @ 320
  (AMD EPYC, 2026-11-23), rows, 60 calibration and 100 held-out assignments in one quiet run
  (`tools/bench_quant.py joint --triples`): 82% of the held-out priced within ±5% with pairs,
  89% with triples (mean error 3.1% → 2.6%). Tables made before triples keep pairs only
  (``meta["items"]``).

A candidate's price is ``intercept + slope · (Σ units + Σ edges + Σ triples) + Σ_{p>q}
offset[p>q] · (edges at p>q)``: linear in one-hot precision variables and in the pairwise and
three-way products that the ILP linearises (`hwnas.quant.assign`); `MixedPredictor` says
why the offsets. The calibration is fitted by least squares on whole random assignments
measured in the same interleaved run as the rows (as `hwnas profile` does, for the same reason:
on a drifting host separate phases disagree); the all-fp32 assignment is the canary.

On disk: ``<tables>/<device>/<host>/<space>_<NxCxHxW>.mixed-<arch tokens>.csv`` (one candidate
per table: the units and edges are that candidate's) with a JSON sidecar, written atomically.
"""

from __future__ import annotations

import csv
import io
import itertools
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from hwnas.backends import Runner, compile_model, compiled
from hwnas.devices import Device, fingerprint_diff, fingerprint_hash
from hwnas.errors import UserError
from hwnas.fileio import atomic_write_text, clean_orphans
from hwnas.hosts import record_host
from hwnas.latency.profile import Labelled, contention_check, measure_opened
from hwnas.latency.table import LatencyTable, host_dir, new_table, now_iso, shape_text
from hwnas.locks import output_lock
from hwnas.measure import Contention, Protocol
from hwnas.quant.realise import assignment_device, mixed_device
from hwnas.quant.units import (Edge, PrecisionSpace, pair_module, summed_terms,
                               triple_module, triple_units)
from hwnas.spaces.base import TOKENS, Arch, OpKey

ASSIGN = "assign:"


# ---- row names ---------------------------------------------------------------------------------
def single_label(ps: PrecisionSpace, u: int, p: str) -> str:
    return str(ps.units[u].at(p))


def pair_label(ps: PrecisionSpace, e: Edge, p: str, q: str) -> str:
    links = "" if e.links == ((0, 0),) else "@" + ",".join(f"{o}-{i}" for o, i in e.links)
    return f"{ps.units[e.src].at(p)}>{ps.units[e.dst].at(q)}{links}"


def assign_label(ps: PrecisionSpace, a: Arch) -> str:
    return ASSIGN + ps.text(a)


def _links(e: Edge) -> str:
    return ",".join(f"{o}-{i}" for o, i in e.links)


def triple_label(ps: PrecisionSpace, k1: int, k2: int, p: str, q: str, r: str) -> str:
    e1, e2 = ps.edges[k1], ps.edges[k2]
    links = "" if e1.links == e2.links == ((0, 0),) else f"@{_links(e1)};{_links(e2)}"
    return f"{ps.units[e1.src].at(p)}>{ps.units[e1.dst].at(q)}>{ps.units[e2.dst].at(r)}{links}"


def triple_precisions(ps: PrecisionSpace, k1: int, k2: int):
    """(p, q, r) over the precisions of the triple's three units."""
    a, b, c = ps.edges[k1].src, ps.edges[k1].dst, ps.edges[k2].dst
    return [(p, q, r) for p in ps.units[a].precisions for q in ps.units[b].precisions
            for r in ps.units[c].precisions]


WITH_TRIPLES = "units, pairs, triples"


def has_triples(meta: dict) -> bool:
    """Whether a table measures triples: tables made before them (no ``items``) do not."""
    return meta.get("items") == WITH_TRIPLES


def all_items(ps: PrecisionSpace, triples: bool = True) -> list[str]:
    """Every row the table of `ps`'s candidate needs, in walk order, without duplicates."""
    out: dict[str, None] = {}
    for i, u in enumerate(ps.units):
        for p in u.precisions:
            out.setdefault(single_label(ps, i, p))
    for e in ps.edges:
        for p in ps.units[e.src].precisions:
            for q in ps.units[e.dst].precisions:
                out.setdefault(pair_label(ps, e, p, q))
    for k1, k2 in ps.triples if triples else ():
        for pqr in triple_precisions(ps, k1, k2):
            out.setdefault(triple_label(ps, k1, k2, *pqr))
    return list(out)


class MixedTable(LatencyTable):
    """A `LatencyTable` whose rows are units (an `OpKey`), pairs (``key>key[@links]``) and
    triples (``key>key>key[@links;links]``)."""

    @classmethod
    def parse_key(cls, text: str) -> str:
        body, _, links = text.partition("@")
        parts = body.split(">")
        if len(parts) > 3 or (links and (len(parts) == 1
                                         or len(links.split(";")) != len(parts) - 1)):
            raise ValueError(f"row {text!r} is neither a unit key nor key>key[@links] nor "
                             "key>key>key[@links;links]")
        keys = [str(OpKey.parse(p)) for p in parts]
        if links and not all(x.isdigit() for ls in links.split(";") for lk in ls.split(",")
                             for x in lk.split("-")):
            raise ValueError(f"row {text!r}: links must read like 0-0,1-1")
        return ">".join(keys) + (f"@{links}" if links else "")


def mixed_table_path(root: Path, device: Device | str, ps: PrecisionSpace,
                     host: str | None = None) -> Path:
    digits = "".join(TOKENS[c] for c in ps.arch.choices)
    return (host_dir(root, device, host)
            / f"{ps.base.name}_{shape_text(ps.input_shape)}.mixed-{digits}.csv")


def profile_command(device: str, ps: PrecisionSpace) -> str:
    return (f"hwnas quantize --profile --device {device} --space {ps.base.name} --arch "
            f"{ps.arch} --input {shape_text(ps.input_shape)}")


# ---- measuring ---------------------------------------------------------------------------------
Measured = Labelled  # stats by label, rounds resumed from a journal, contention


class SameFeed(Runner):
    """A runner timed on a given feed: `measure_interleaved` gives every runner its own random
    input, and a detector's latency depends on its input (NonMaxSuppression's work follows the
    boxes), so models compared with each other must see the same one."""

    def __init__(self, runner: Runner, feed: dict):
        self.runner, self.feed, self.inputs = runner, feed, runner.inputs

    def random_feed(self, rng=None):
        return self.feed

    def _run(self, feed):
        return self.runner._run(feed)

    def close(self) -> None:
        self.runner.close()


def same_feeds(runners: Sequence[Runner], seed: int = 0) -> list[Runner]:
    """Every runner wrapped to run on one seeded standard-normal feed per input signature."""
    feeds: dict = {}
    out = []
    for r in runners:
        sig = tuple((s.name, s.shape, str(s.dtype)) for s in r.inputs)
        if sig not in feeds:
            feeds[sig] = r.random_feed(np.random.default_rng(seed))
        out.append(SameFeed(r, feeds[sig]))
    return out


def measure_runners(labels: Sequence[str], open_runner: Callable[[str], Runner],
                    protocol: Protocol, journal: Path | None = None, desc: str = "measuring",
                    progress: bool = True) -> Measured:
    """Compile every label's runner (`open_runner`), then time them all interleaved with the
    protocol (runners with the same inputs on the same input, `same_feeds`), saving the rounds
    to `journal` after every round (a rerun resumes them): `measure_opened`."""
    return measure_opened(labels, open_runner, protocol, journal, desc, progress,
                          wrap=same_feeds)


@dataclass(frozen=True)
class WholeModels:
    """How whole assignments are built for timing: from `onnx` (the trained checkpoint's
    export, when it is the priced model) or fresh seeded weights, and run on `feed` (a real
    training image) or a seeded random input. A detector needs the first of each: its
    post-processing's work (NonMaxSuppression) follows the boxes, and the trained
    det20-fcos-w0.5 on real images ran 10% slower than fresh weights on noise here."""

    onnx: Path | None = None
    feed: dict | None = None
    what: str = "fresh seeded weights on a seeded random input"


class Builder:
    """Opens the runner of any row or whole assignment of `ps`'s candidate on `device`
    (whole assignments share one fp32 export of the candidate, quantised per assignment).
    Fresh modules are built with seeded weights, so a rerun times the same models."""

    def __init__(self, ps: PrecisionSpace, device: Device, tmp: Path,
                 whole: WholeModels = WholeModels()):
        self.ps, self.device, self.tmp, self.whole = ps, device, Path(tmp), whole
        self._whole: Path | None = whole.onnx
        units = {single_label(ps, i, p): (i, p) for i, u in enumerate(ps.units)
                 for p in u.precisions}
        pairs = {pair_label(ps, e, p, q): (e, p, q) for e in ps.edges
                 for p in ps.units[e.src].precisions for q in ps.units[e.dst].precisions}
        self.units, self.pairs = units, pairs
        self.triples = {triple_label(ps, k1, k2, *pqr): (k1, k2, pqr) for k1, k2 in ps.triples
                        for pqr in triple_precisions(ps, k1, k2)}

    def whole_onnx(self) -> Path:
        from hwnas.export import export_onnx

        if self._whole is None:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                module = self.ps.base.build(self.ps.arch)
            self._whole = export_onnx(module, self.ps.input_shape, self.tmp / "candidate.onnx")
        return self._whole

    def __call__(self, label: str):
        ps = self.ps
        if label.startswith(ASSIGN):
            a = ps.parse(label[len(ASSIGN):])
            r = compile_model(self.whole_onnx(), assignment_device(self.device, ps, a))
            return SameFeed(r, self.whole.feed) if self.whole.feed is not None else r
        with torch.random.fork_rng():
            torch.manual_seed(1)
            if label in self.units:
                i, p = self.units[label]
                u = ps.units[i]
                module, shapes, parts = ps.base.build_op(u.key), u.key.in_shapes, [("/", p)]
            elif label in self.triples:
                k1, k2, (p, q, r) = self.triples[label]
                (module, shapes) = triple_module(ps, k1, k2)
                parts = [("/a/a/", p), ("/a/b/", q), ("/b/", r)]
            else:
                e, p, q = self.pairs[label]
                (module, shapes), parts = pair_module(ps, e), [("/a/", p), ("/b/", q)]
        return compiled(module, shapes, mixed_device(self.device, parts))


# ---- the table's model -------------------------------------------------------------------------
CALIBRATION_WHAT = ("latency_ms = intercept_ms + slope * (sum of the units' rows + sum over edges "
                    "of (pair row - its two unit rows) + sum over triples a>b>c, where measured, "
                    "of (triple row - its two pair rows + b's row)) + sum over precision pairs "
                    "(p>q, not fp32>fp32) of offset_ms[p>q] * (edges at p>q) [+ the "
                    "corrections_ms of the units, edges and triples off fp32 the assignment has, "
                    "when the calibration has 2 assignments per item]; least squares (the "
                    "corrections: ridge, corrections_ridge) on whole assignments measured in the "
                    "same interleaved run as the rows")


def _pair_names(precisions: Sequence[str]) -> list[str]:
    """The precision pairs of an edge that get an offset of their own (fp32>fp32 is the base)."""
    return [f"{p}>{q}" for p in precisions for q in precisions if (p, q) != ("fp32", "fp32")]


class MixedPredictor:
    """Prices assignments of `ps` from `table`: `predict(a)`, vectorised `predict_many`, and
    the linear terms (`terms`) the ILP needs.

    Why a per-boundary offset in the calibration: on det20 @ 320 the rows alone (units, plus
    each edge as its pair measured it) under-priced whole models by 10-16% when mostly fp32 and
    by 25-37% when mostly int8; a common slope could not fit both (fit errors to 9%). The
    surplus grew with the number of int8→int8 boundaries (~50 µs each inside a model, as a
    regression over the calibration assignments found; leave-one-out error 2.8% against 4.2%
    without), so each precision pair of an edge gets a fitted offset. It stays linear in the
    ILP's pair variables.
    """

    def __init__(self, table: MixedTable, ps: PrecisionSpace, calibrated: bool = True,
                 scale: float = 1.0):
        self.table, self.ps, self.scale, self.calibrated = table, ps, scale, calibrated
        P = max(len(u.precisions) for u in ps.units)
        self.unit_ms = np.full((len(ps.units), P), np.nan)  # [U, P] row of unit u at choice c
        self.edge_ms = np.full((len(ps.edges), P, P), np.nan)  # [E, P, P] pair − its units
        for i, u in enumerate(ps.units):
            for c, p in enumerate(u.precisions):
                self.unit_ms[i, c] = self._row(single_label(ps, i, p))
        for k, e in enumerate(ps.edges):
            for c, p in enumerate(ps.units[e.src].precisions):
                for d, q in enumerate(ps.units[e.dst].precisions):
                    self.edge_ms[k, c, d] = (self._row(pair_label(ps, e, p, q))
                                             - self.unit_ms[e.src, c] - self.unit_ms[e.dst, d])
        self.pairs = _pair_names(ps.precisions)
        # [E, P, P]: which offset (index into self.pairs, -1 for none) edge k takes at (c, d)
        self._pair_ids = np.full((len(ps.edges), P, P), -1)
        for k, e in enumerate(ps.edges):
            for c, p in enumerate(ps.units[e.src].precisions):
                for d, q in enumerate(ps.units[e.dst].precisions):
                    if f"{p}>{q}" in self.pairs:
                        self._pair_ids[k, c, d] = self.pairs.index(f"{p}>{q}")
        # [T, P, P, P]: triple t = (edge a → b, edge b → c) at choices (c, d, f), beyond pairs
        self.triples = list(ps.triples) if has_triples(table.meta) else []
        self.triple_ms = np.full((len(self.triples), P, P, P), np.nan)
        for t, (k1, k2) in enumerate(self.triples):
            a, b, c3 = ps.edges[k1].src, ps.edges[k1].dst, ps.edges[k2].dst
            for p, q, r in triple_precisions(ps, k1, k2):
                i, j, k = (ps.units[a].precisions.index(p), ps.units[b].precisions.index(q),
                           ps.units[c3].precisions.index(r))
                # triple − pair(a, b) − pair(b, c) + b, with pair = edge + its two units
                self.triple_ms[t, i, j, k] = (self._row(triple_label(ps, k1, k2, p, q, r))
                                              - self.edge_ms[k1, i, j] - self.edge_ms[k2, j, k]
                                              - self.unit_ms[a, i] - self.unit_ms[b, j]
                                              - self.unit_ms[c3, k])
        cal = table.meta.get("calibration") if calibrated else None
        self.intercept_ms = float(cal["intercept_ms"]) if cal else 0.0
        self.slope = float(cal["slope"]) if cal else 1.0
        offsets = cal.get("edge_offsets_ms", {}) if cal else {}
        self.offsets = np.array([float(offsets.get(n, 0.0)) for n in self.pairs])
        # fitted corrections (ms, after the slope) of units, edges and triples off fp32
        self.unit_corr = np.zeros_like(self.unit_ms)
        self.edge_corr = np.zeros_like(self.edge_ms)
        self.triple_corr = np.zeros_like(self.triple_ms)
        for item, v in (cal or {}).get("corrections_ms", []):
            self._corr_array(item)[tuple(item[1:])] += v

    def _corr_array(self, item) -> np.ndarray:
        return {"unit": self.unit_corr, "edge": self.edge_corr,
                "triple": self.triple_corr}[item[0]]

    def _item_units(self) -> dict[str, list[tuple[int, ...]]]:
        """The units each correctable item spans, by kind: a unit itself, an edge's two, a
        triple's three (`triple_units`)."""
        ps = self.ps
        return {"unit": [(u,) for u in range(len(ps.units))],
                "edge": [(e.src, e.dst) for e in ps.edges],
                "triple": list(zip(*(a.tolist() for a in triple_units(ps, self.triples))))}

    def correction_items(self) -> list[tuple]:
        """What a calibration may correct: every unit at each non-fp32 choice, every edge and
        (in a table with triples) every triple with all its units off fp32, as
        ``(kind, index, choices…)``."""
        units = self.ps.units
        return [(kind, i, *cs) for kind, spans in self._item_units().items()
                for i, span in enumerate(spans)
                for cs in itertools.product(*(range(1, len(units[u].precisions))
                                              for u in span))]

    def indicators(self, assigns, items: Sequence[tuple]) -> np.ndarray:
        """[N, len(items)]: 1 where an assignment has the item (`correction_items`)."""
        ch = self._choices(assigns)
        spans = self._item_units()
        cols = [np.all(ch[:, list(spans[kind][i])] == cs, axis=1) for kind, i, *cs in items]
        return np.column_stack(cols).astype(float) if cols else np.zeros((len(ch), 0))

    def _row(self, label: str) -> float:
        v = self.table.latency_ms(label)
        if v is None:
            raise UserError(f"mixed table {self.table.path} has no row {label}; measure it with "
                            f"`{profile_command(self.table.device, self.ps)}`")
        return v

    def scaled(self, scale: float) -> "MixedPredictor":
        return MixedPredictor(self.table, self.ps, self.calibrated, scale)

    def _choices(self, assigns) -> np.ndarray:
        if len(assigns) and isinstance(assigns[0], Arch):
            return np.asarray([a.choices for a in assigns], dtype=np.int64)
        return np.asarray(assigns, dtype=np.int64).reshape(-1, len(self.ps.units))

    def features(self, assigns) -> np.ndarray:
        """[N, 1 + pairs]: the rows' sum (units and edges), then the edge count per precision
        pair in `self.pairs`."""
        ch = self._choices(assigns)
        total = summed_terms(self.ps, ch, self.unit_ms, self.edge_ms, self.triple_ms,
                             self.triples)
        if len(self.ps.edges):
            src = np.array([e.src for e in self.ps.edges], dtype=np.int64)
            dst = np.array([e.dst for e in self.ps.edges], dtype=np.int64)
            ids = self._pair_ids[np.arange(len(self.ps.edges)), ch[:, src], ch[:, dst]]  # [N, E]
            cols = [(ids == j).sum(1) for j in range(len(self.pairs))]
        else:
            cols = [np.zeros(len(ch)) for _ in self.pairs]
        return np.column_stack([total] + cols).astype(float)

    def predict_many(self, assigns) -> np.ndarray:
        f = self.features(assigns)
        w = np.r_[self.slope, self.offsets]
        corr = summed_terms(self.ps, self._choices(assigns), self.unit_corr, self.edge_corr,
                            self.triple_corr, self.triples)
        return (self.intercept_ms + f @ w + corr) * self.scale

    def predict(self, a: Arch) -> float:
        return float(self.predict_many([a])[0])

    def terms(self) -> "Terms":
        """The price as linear terms, calibration and scale applied: latency = const + Σ unit
        terms + Σ edge terms + Σ triple terms."""
        off = np.where(self._pair_ids >= 0, self.offsets[np.maximum(self._pair_ids, 0)], 0.0)
        return Terms(self.intercept_ms * self.scale,
                     (self.unit_ms * self.slope + self.unit_corr) * self.scale,
                     (self.edge_ms * self.slope + off + self.edge_corr) * self.scale,
                     (self.triple_ms * self.slope + self.triple_corr) * self.scale,
                     tuple(self.triples))


@dataclass(frozen=True)
class Terms:
    """A `MixedPredictor`'s price as linear terms: `const_ms`; `unit_ms` [U, P], unit u at
    choice c; `edge_ms` [E, P, P], edge k at choices (c, d); `triple_ms` [T, P, P, P], triple t
    (edges `triples[t]` = (a → b, b → c)) at choices (c, d, f); empty for a table of
    pairs."""

    const_ms: float
    unit_ms: np.ndarray
    edge_ms: np.ndarray
    triple_ms: np.ndarray
    triples: tuple[tuple[int, int], ...]


MARGIN_QUANTILE = 0.9


def under_quantile_pct(measured_ms, priced_ms, quantile: float = MARGIN_QUANTILE) -> float:
    """The `quantile` of measured / priced - 1 (in %, 0 at least): how much slower than its
    price an assignment runs, that share of the time."""
    under = (np.asarray(measured_ms, float) / np.asarray(priced_ms, float) - 1) * 100
    return max(0.0, float(np.quantile(under, quantile))) if len(under) else 0.0


def guard_margin_pct(pred: MixedPredictor, quantile: float = MARGIN_QUANTILE) -> float:
    """How much slower than priced an assignment may run, by the table's own evidence: the
    `quantile` of the calibration's leave-one-out under-prediction (`under_quantile_pct` of
    the assignments its sidecar records, each priced by the fit made without it). Choosing
    under ``budget / (1 + margin)`` keeps the budget for that share of assignments the model
    did not see.

    Why: the ILP's pick sits on the budget by construction, so an unbiased price misses it half
    the time. Measured on det20 @ 320 (AMD EPYC, 2026-11-22 sweep): without a margin 4 of 20
    ILP picks ran 1.2-2.6% over their budgets; the table's leave-one-out 90th percentile of
    under-prediction is 5.2% (det20) and 2.3% (the detector)."""
    measured, priced = _loo_prices(pred)
    return under_quantile_pct(measured, priced, quantile)


def _loo_prices(pred: MixedPredictor) -> tuple[np.ndarray, np.ndarray]:
    """The calibration assignments as its sidecar records them measured, and each one priced
    by the fit made without it (leave-one-out); empty without a calibration."""
    cal = pred.table.meta.get("calibration") or {}
    if not cal.get("assignments"):
        return np.zeros(0), np.zeros(0)
    assigns = [pred.ps.parse(t) for t in cal["assignments"]]
    y = np.asarray(cal["measured_ms"], float)
    A = np.c_[np.ones(len(assigns)), pred.features(assigns)]
    G = pred.indicators(assigns, pred.correction_items())
    loo = _cv_errors_pct(A, G, y, cal.get("corrections_ridge"))
    return y, y * (1 + loo / 100)


def margin_evidence(pred: MixedPredictor) -> tuple[float, str]:
    """The table's own margin and where it comes from: its published validation when it has
    one (held-out assignments timed in a later run, prices corrected by the references'
    drift, as `hwnas quantize --canary correct` prices), else its calibration's leave-one-out
    (`guard_margin_pct`).

    Why the validation first: the leave-one-out sees only the profile's own run. Scored on the
    held-out validations published on 2026-11-22 and again on 2026-11-23 (`tools/bench_quant.py
    coverage`), the leave-one-out margins (5.2% det20, 2.3% detector) covered 86% then 81%
    (det20) and 77% then 61% (detector) of the drift-corrected assignments, not 90%."""
    v = pred.table.meta.get("validation") or {}
    if v.get("corrected_under_pct") is not None:
        return float(v["corrected_under_pct"]), (
            f"the table's published validation: {100 * v['quantile']:.0f}th percentile of the "
            f"drift-corrected under-prediction of its {v['n']} held-out assignments")
    return guard_margin_pct(pred), (f"the table's calibration: {100 * MARGIN_QUANTILE:.0f}th "
                                    "percentile of its leave-one-out under-prediction")


def band_evidence(pred: MixedPredictor) -> tuple[float, str]:
    """How much faster than its price an assignment may run, by the table's own evidence (the
    other side of `margin_evidence`): the `MARGIN_QUANTILE` of priced / measured - 1, in %, over
    its published validation's held-out assignments, drift-corrected (the validation CSV beside
    the table), else over its calibration's leave-one-out. The verified choice
    (`hwnas.quant.run.verify_picks`) looks this far above the price it chooses under: an
    assignment the table over-prices by that much may in fact keep the budget."""
    v = pred.table.meta.get("validation") or {}
    path = Path(pred.table.path).parent / v["csv"] if v.get("csv") else None
    if path is not None and path.is_file():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and "canary_corrected_ms" in rows[0]:
            return under_quantile_pct([float(r["canary_corrected_ms"]) for r in rows],
                                      [float(r["measured_ms"]) for r in rows]), (
                f"the table's published validation: {100 * MARGIN_QUANTILE:.0f}th percentile "
                f"of the drift-corrected over-prediction of its {len(rows)} held-out "
                "assignments")
    measured, priced = _loo_prices(pred)
    return under_quantile_pct(priced, measured), (
        f"the table's calibration: {100 * MARGIN_QUANTILE:.0f}th percentile of its "
        "leave-one-out over-prediction")


RIDGES = (0.1, 0.3, 1.0, 3.0, 10.0)
CORRECT_PER_ITEM = 2  # corrections are fitted from this many calibration assignments per item


def _corrected_fit(A: np.ndarray, G: np.ndarray, y: np.ndarray, lam: float | None):
    """Least squares of ``A @ coef = y``; with `lam`, of ``A @ coef + G @ g = y`` jointly, with
    a ridge on the corrections ``g`` only: (coef, g). Joint, not corrections fitted to the
    first fit's residuals: ``G``'s columns overlap ``A``'s (an item's count moves the sum of
    rows and the boundary counts too), so a first fit takes part of what the items cost into
    the slope and offsets, and corrections fitted to what it leaves describe that remainder,
    not the items (`test_calibration_corrects_items_when_the_wholes_show_them` on the AVX2
    host's rows: held-out 8.8% off so, against 11.5% without corrections)."""
    if lam is None:
        coef, *_ = np.linalg.lstsq(A, y, rcond=None)
        return coef, np.zeros(G.shape[1])
    k, m = A.shape[1], G.shape[1]
    M = np.r_[np.c_[A, G], np.c_[np.zeros((m, k)), np.sqrt(lam) * np.eye(m)]]
    sol, *_ = np.linalg.lstsq(M, np.r_[y, np.zeros(m)], rcond=None)
    return sol[:k], sol[k:]


def _cv_errors_pct(A, G, y, lam, folds: int | None = None) -> np.ndarray:
    """(predicted / measured − 1) in % of each assignment fitted without it (leave-one-out,
    or `folds`-fold in a fixed order)."""
    n = len(y)
    parts = np.array_split(np.arange(n), folds) if folds else [[j] for j in range(n)]
    out = np.zeros(n)
    for f in parts:
        keep = np.setdiff1d(np.arange(n), f)
        coef, g = _corrected_fit(A[keep], G[keep], y[keep], lam)
        out[f] = ((A[f] @ coef + G[f] @ g) / y[f] - 1) * 100
    return out


def fit_calibration(pred: MixedPredictor, assigns: Sequence[Arch], measured_ms: Sequence[float]
                    ) -> dict:
    """The calibration's least squares; with at least `CORRECT_PER_ITEM` assignments per
    correction item (`MixedPredictor.correction_items`), also a ridge correction of every
    unit, edge and triple off fp32, fitted jointly with the intercept, slope and offsets
    (`_corrected_fit`; its ridge chosen from `RIDGES` by 10-fold cross-validation on the
    calibration). Why: on det20 @ 320, rows and 160 whole assignments measured in one quiet
    run (AMD EPYC, 2026-11-23), the rows priced
    85% of the 100 held-out within ±5%, and the same rows with corrections fitted on 140 of
    the wholes 99% (5 folds; `tools/bench_quant.py joint --reuse`): what a unit or boundary
    costs in the whole model differs from what its row measured alone, by an amount the whole
    models show. Across runs the host's state dominates: a table profiled with 160
    assignments (leave-one-out 97.5%) validated 71% in a later busy run, as without."""
    X = pred.features(assigns)
    y = np.asarray(measured_ms, float)
    if len(y) < X.shape[1] + 2:
        raise ValueError(f"calibration needs at least {X.shape[1] + 2} assignments")
    A = np.c_[np.ones(len(y)), X]
    items = pred.correction_items()
    G = pred.indicators(assigns, items)
    lam = None
    if items and len(y) >= CORRECT_PER_ITEM * len(items):
        cv = {r: float(np.mean(np.abs(_cv_errors_pct(A, G, y, r, 10)))) for r in RIDGES}
        lam = min(cv, key=cv.get)
    coef, g = _corrected_fit(A, G, y, lam)
    fitted = A @ coef + G @ g
    loo = _cv_errors_pct(A, G, y, lam)
    out = {"intercept_ms": float(coef[0]), "slope": float(coef[1]),
           "edge_offsets_ms": dict(zip(pred.pairs, map(float, coef[2:]))),
           "assignments": [pred.ps.text(a) for a in assigns],
           "measured_ms": [float(v) for v in y], "fitted_ms": [float(v) for v in fitted],
           "fit_max_abs_err_pct": float(np.max(np.abs(fitted / y - 1)) * 100),
           "loo_within_5pct": float(np.mean(np.abs(loo) <= 5)),
           "loo_mean_abs_err_pct": float(np.mean(np.abs(loo))),
           "what": CALIBRATION_WHAT}
    if lam is not None:
        out["corrections_ridge"] = lam
        out["corrections_ms"] = [[list(it), float(v)] for it, v in zip(items, g)]
    return out


# ---- profiling -----------------------------------------------------------------------------------
@dataclass
class MixedProfileReport:
    table: MixedTable
    measured_rows: int
    reused_rows: int
    calibrated: bool
    resumed_rounds: int = 0

    def to_dict(self) -> dict:
        cal = self.table.meta.get("calibration") or {}
        return {"table": str(self.table.path), "host": self.table.host,
                "rows": len(self.table.rows), "measured_rows": self.measured_rows,
                "items": self.table.meta.get("items", "units, pairs"),
                "reused_rows": self.reused_rows, "calibrated_now": self.calibrated,
                "resumed_rounds": self.resumed_rounds,
                "calibration": {k: cal.get(k) for k in (
                    "intercept_ms", "slope", "edge_offsets_ms", "fit_max_abs_err_pct",
                    "loo_within_5pct", "loo_mean_abs_err_pct")},
                "canary": self.table.meta.get("canary"),
                "contention": self.table.meta.get("contention")}


def table_protocol(table, protocol: Protocol) -> Protocol:
    """`protocol` reading latencies with the statistic `table` was measured with (its
    ``estimate``; "lowest" for tables from before there was a choice): what is timed to be
    compared with a table's prices must be read as the table was."""
    own = (table.meta.get("protocol") or {})
    return replace(protocol, estimate=own.get("estimate", "lowest"),
                   local_window=own.get("local_window", protocol.local_window))


def open_mixed_table(root: Path, device: Device, ps: PrecisionSpace,
                     protocol: Protocol) -> MixedTable:
    path = mixed_table_path(root, device, ps)
    if not path.exists():
        t = new_table(path, device, ps.base.name, ps.input_shape, protocol.to_dict())
        t.meta.update({"arch": str(ps.arch), "precisions": list(ps.precisions),
                       "units": [u.name for u in ps.units], "items": WITH_TRIPLES,
                       "what": "mixed-precision rows of one candidate (hwnas.quant.latency)"})
        return MixedTable(t.path, t.meta, t.rows)
    table = MixedTable.load(path)
    want = {"device": device.name, "space": ps.base.name, "input_shape": list(ps.input_shape),
            "arch": str(ps.arch)}
    got = {k: table.meta.get(k) for k in want}
    if got != want:
        raise UserError(f"mixed table {path} is for {got}, not {want}; move it away or pass "
                        "--tables DIR")
    return table


def calibration_assignments(ps: PrecisionSpace, n: int, seed: int) -> list[Arch]:
    """The uniform assignments (fp32 first: the canary), then stratified random ones up to n."""
    uniform = list(dict.fromkeys(ps.uniform(p) for p in ps.precisions))
    rest = ps.sample_stratified(n - len(uniform), np.random.default_rng(seed),
                                exclude={ps.text(a) for a in uniform})
    return uniform + rest


def profile_mixed(device: Device, ps: PrecisionSpace, root: Path,
                  protocol: Protocol = Protocol(), calibration_n: int = 24, seed: int = 0,
                  progress: bool = True, require_quiet: bool = False,
                  whole: WholeModels = WholeModels()) -> MixedProfileReport:
    """Measure every row `ps`'s candidate needs that this host's mixed table lacks, with
    `calibration_n` whole assignments and the canary in the same interleaved run; fit the
    calibration; save. Resumes an interrupted run from its journal; one run per table."""
    need = len(_pair_names(ps.precisions)) + 4
    if calibration_n < need:
        raise UserError(f"--calibration-n must be at least {need} (an intercept, a slope and an "
                        "offset per precision pair of an edge, and two more)")
    path = mixed_table_path(root, device, ps)
    with output_lock(path):
        for p in (path, path.with_suffix(".json"), path.with_suffix(".partial.json"),
                  Path(root) / "hosts.json"):
            clean_orphans(p)
        table = open_mixed_table(root, device, ps, protocol)
        protocol = table_protocol(table, protocol)  # rows added to a table are read as its own
        items = all_items(ps, has_triples(table.meta))
        todo = [k for k in items if k not in table.rows]
        if todo and table.rows:
            diffs = fingerprint_diff(table.meta["fingerprint"], device.fingerprint())
            if diffs:
                raise UserError(f"mixed table {table.path} was measured with another setup "
                                f"({'; '.join(diffs)}); pass --tables DIR for a separate table")
        calibrate = bool(todo) or table.meta.get("calibration") is None
        assigns = calibration_assignments(ps, calibration_n, seed) if calibrate else []
        labels = todo + [assign_label(ps, a) for a in assigns]
        journal = table.path.with_suffix(".partial.json")
        resumed = 0
        if labels:
            with tempfile.TemporaryDirectory(prefix="hwnas-mixed-") as tmp:
                got = measure_runners(labels, Builder(ps, device, Path(tmp), whole), protocol,
                                      journal,
                                      desc=f"profiling {len(todo)} rows + {len(assigns)} "
                                      "assignments", progress=progress)
            contention_check(got.contention, table.path.name, require_quiet, journal)
            resumed = got.resumed_rounds
            table.rows.update({k: got.stats[k] for k in todo})
            if todo:
                table.meta["contention"] = {"profile": got.contention.to_dict()}
                table.meta["fingerprint"] = device.fingerprint()
                table.meta["fingerprint_hash"] = fingerprint_hash(table.meta["fingerprint"])
            else:
                table.meta.setdefault("contention", {})["calibration"] = got.contention.to_dict()
            pred = MixedPredictor(table, ps, calibrated=False)
            table.meta.pop("validation", None)  # it validated the calibration replaced here
            table.meta["calibration"] = fit_calibration(
                pred, assigns, [got.stats[assign_label(ps, a)].best_ms for a in assigns])
            table.meta["calibration_seed"] = seed
            table.meta["whole_models"] = whole.what
            canary = assign_label(ps, ps.canary())
            table.meta["canary"] = {"arch": canary, "latency_ms": got.stats[canary].best_ms,
                                    "measured": now_iso(),
                                    "source": "measured interleaved with the rows",
                                    "what": "the all-fp32 assignment, re-timed to measure drift"}
            table.save()
        journal.unlink(missing_ok=True)
        record_host(root, table.meta["fingerprint"], device.name, table.meta["created"])
        return MixedProfileReport(table, len(todo), len(items) - len(todo), bool(assigns),
                                  resumed)


def load_mixed(root: Path, device: Device, ps: PrecisionSpace, host: str | None = None,
               strict: bool = False) -> MixedTable:
    """This host's mixed table for `ps` (or `host`'s, with a warning); a `UserError` naming
    the profile command when there is none."""
    from hwnas.hosts import check_host_id, host_id

    here = host_id(device.fingerprint())
    if host is not None:
        check_host_id(host)
        if host != here:
            print(f"warning: pricing with host {host}'s mixed table, not this host's ({here})",
                  file=sys.stderr)
    path = mixed_table_path(root, device, ps, host)
    if not path.is_file():
        raise UserError(f"no mixed-precision table for {ps.base.name} {ps.arch} @ "
                        f"{shape_text(ps.input_shape)} on {device.name} on host {host or here}; "
                        f"build it with `{profile_command(device.name, ps)}`")
    table = MixedTable.load(path)
    table.check_fingerprint(device, strict=strict)
    return table


# references that settled in what looks like a slow spell are timed again after this many
# protocol spans (45 s at the default 5 s; never with span 0): the spells seen here ended
# within a minute or two
SPELL_SPANS = 9


def time_references(pred: MixedPredictor, device: Device, protocol: Protocol = Protocol(),
                    whole: WholeModels = WholeModels()):
    """Time the table's reference assignments now (the canary first; interleaved protocol
    measurements until two agree, `settled_times`, built as `whole` says; settled more than
    `hwnas.latency.lookup.SPELL_PCT` over the table, again after `SPELL_SPANS` protocol spans,
    each at its lowest): the host's drift since the table was made, a
    `hwnas.latency.lookup.Drift`, as `time_canary` gives it for a candidate table."""
    from hwnas.latency.lookup import drift_from, references, settled_times

    table_ms = references(pred.table)
    refs = list(table_ms)
    protocol = table_protocol(pred.table, protocol)
    with tempfile.TemporaryDirectory(prefix="hwnas-mixed-") as tmp:
        builder = Builder(pred.ps, device, Path(tmp), whole)

        def once():
            got = measure_runners(refs, builder, protocol, progress=False)
            return {r: got.stats[r].best_ms for r in refs}
        return drift_from(pred.table, settled_times(
            once, expected=table_ms, pause_s=SPELL_SPANS * protocol.span_s,
            note=lambda m: print(f"note: {m}", file=sys.stderr)))


# ---- validation ----------------------------------------------------------------------------------
def validate_mixed(pred: MixedPredictor, device: Device, n: int, seed: int, out_prefix: Path,
                   noise_file: Path | None = None, protocol: Protocol = Protocol(),
                   group: int = 25, progress: bool = True, require_quiet: bool = False,
                   whole: WholeModels = WholeModels(), quiet_retries: int = 0):
    """Measure `n` held-out random assignments (stratified, seeded, none of the calibration's),
    `group` at a time interleaved with the table's reference assignments (the canary first:
    `hwnas.latency.lookup.references`); write ``<out_prefix>.validation.{csv,png}``;
    a `hwnas.latency.validate.ValidationReport`.

    `quiet_retries`: a group the host was busy through (`Contention.contended`) is timed
    again, at most this many more times, and the attempt with the most quiet rounds is kept
    (chosen by the host's quietness, never by the errors); the attempts per group are in the
    report's contention. On a shared host a busy span slows kernels unevenly (memory-bound
    ones more), which no per-assignment table follows: this validates the table against the
    quiet host it was profiled on, and says how often it had to wait for one."""
    from hwnas.latency.lookup import drift_from, drift_over, references
    from hwnas.latency.validate import ValidationReport, metrics, noise_floor_pct, scatter_plot

    ps, table = pred.ps, pred.table
    protocol = table_protocol(table, protocol)
    cal = table.meta.get("calibration") or {}
    exclude = set(cal.get("assignments", [])) | {ps.text(ps.canary())}
    refs = list(references(table))  # the canary and the next calibration assignments
    assigns = ps.sample_stratified(n, np.random.default_rng(seed), exclude)
    predicted = pred.predict_many(assigns)
    measured, ratio = np.zeros(len(assigns)), np.ones(len(assigns))
    own = np.ones(len(assigns))  # each group's own median measured / priced (`group_ceiling`)
    parts, canary_now, attempts = [], [], []
    bar = tqdm(total=len(assigns), desc="validating", unit="assignment", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    with tempfile.TemporaryDirectory(prefix="hwnas-mixed-") as tmp:
        builder = Builder(ps, device, Path(tmp), whole)
        for start in range(0, len(assigns), group):
            chunk = [assign_label(ps, a) for a in assigns[start:start + group]]
            got = measure_runners(chunk + refs, builder, protocol, progress=False)
            tries = 1
            while got.contention.contended and tries <= quiet_retries:
                again = measure_runners(chunk + refs, builder, protocol, progress=False)
                tries += 1
                if again.contention.quiet_fraction > got.contention.quiet_fraction:
                    got = again
            attempts.append(tries)
            measured[start:start + len(chunk)] = [got.stats[lb].best_ms for lb in chunk]
            now = {r: got.stats[r].best_ms for r in refs}
            canary_now.append(now)
            ratio[start:start + len(chunk)] = drift_from(table, now).ratio
            g = slice(start, start + len(chunk))
            own[g] = np.median(measured[g] / predicted[g])
            parts.append(got.contention)
            bar.update(len(chunk))
    bar.close()
    contention = Contention.combine(parts)
    contention_check(contention, "this validation", require_quiet)
    corrected = predicted * ratio
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["assignment", "predicted_ms", "measured_ms", "error_pct", "canary_corrected_ms",
                "canary_corrected_error_pct"])
    for a, p, m, c in zip(assigns, predicted, measured, corrected):
        w.writerow([ps.text(a), f"{p:.4f}", f"{m:.4f}", f"{(p / m - 1) * 100:+.2f}",
                    f"{c:.4f}", f"{(c / m - 1) * 100:+.2f}"])
    csv_path = out_prefix.with_name(out_prefix.name + ".validation.csv")
    png_path = out_prefix.with_name(out_prefix.name + ".validation.png")
    atomic_write_text(csv_path, buf.getvalue())
    drift = drift_over(table, canary_now).to_dict()
    from hwnas.latency.validate import _age_h

    report = ValidationReport(
        device=device.name, host=table.host, table=str(table.path),
        space=f"{ps.base.name} {ps.arch} (mixed)", input_shape=list(ps.input_shape),
        n=len(assigns), seed=seed, **metrics(predicted, measured),
        noise_floor_pct=noise_floor_pct(noise_file) if noise_file else None,
        contention={**contention.to_dict(), "attempts_per_group": attempts}, drift=drift,
        canary_corrected=metrics(corrected, measured),
        table_age_h=_age_h(table.meta["canary"]["measured"]), csv=str(csv_path),
        plot=str(png_path), group_ceiling=metrics(predicted * own, measured))
    scatter_plot(predicted, measured, report, png_path, corrected)
    return report
