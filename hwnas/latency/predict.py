"""Pricing candidates from a LUT: a sum of op latencies, corrected by a calibration.

Ops are timed alone, so each carries one inference's fixed cost (the `run` call, binding the
input, allocating the output) and runs with its weights and input hot in cache; inside a whole
model the fixed cost is paid once, but every block starts from the cache state its neighbour
left. Measured here on det20 @ 320: ops cost ~1.4× more inside a model than alone, and not the
same for every kind (all-xception 2.97 → 3.98 ms, all-shuffle3 2.44 → 2.93 ms). So the
calibration is ``latency ≈ intercept_ms + Σ_kind slope[kind] × Σ(ops of that kind)``, fitted by
least squares on whole models measured with the same protocol (`fit_calibration`), with the
space's uniform candidates (every layer the same choice) in the fit for leverage, and stored in
the table's sidecar (or, where kinds barely move a model's latency, the simpler fit that predicts
held-out candidates better: see `fit_calibration`). Kinds present in every candidate alike (stem, head) have no slope of their
own: they are constant and the intercept carries them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from hwnas.errors import UserError
from hwnas.latency.table import LatencyTable, shape_text
from hwnas.spaces.base import Arch, OpKey, SearchSpace, Shape

CALIBRATION_WHAT = ("latency_ms = intercept_ms + sum over op kinds of slope[kind] * (sum of that "
                    "kind's op latency_ms); kinds without a slope count with slope 1 (fixed ops "
                    "such as stem and head, whose constant part the intercept absorbs). Least "
                    "squares on whole candidates measured with the same protocol, slopes bounded "
                    "to [0.25, 4]; `model` is the nested fit (offset: slopes 1; common: one "
                    "slope; per-kind) with the lowest leave-one-out error, given as loo_*.")


@dataclass(frozen=True)
class Calibration:
    intercept_ms: float = 0.0
    slopes: dict[str, float] = field(default_factory=dict)
    archs: tuple[str, ...] = ()
    measured_ms: tuple[float, ...] = ()
    fitted_ms: tuple[float, ...] = ()
    model: str = "per-kind"  # which of `calibration_models` the fit chose
    loo_within_5pct: float | None = None  # leave-one-out on the calibration candidates
    loo_mean_abs_err_pct: float | None = None

    def slope(self, kind: str) -> float:
        return self.slopes.get(kind, 1.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["what"] = CALIBRATION_WHAT
        f, m = np.asarray(self.fitted_ms), np.asarray(self.measured_ms)
        d["fit_max_abs_err_pct"] = float(np.max(np.abs(f / m - 1)) * 100) if len(m) else None
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "Calibration":
        if not d:
            return cls()
        return cls(float(d["intercept_ms"]), {k: float(v) for k, v in d["slopes"].items()},
                   tuple(d["archs"]), tuple(d["measured_ms"]), tuple(d["fitted_ms"]),
                   d.get("model", "per-kind"), d.get("loo_within_5pct"),
                   d.get("loo_mean_abs_err_pct"))


def kind_sums(space: SearchSpace, table: LatencyTable, arch: Arch, input_shape: Shape,
              kinds: Sequence[str]) -> np.ndarray:
    """Σ op latency per kind in `kinds` (the regressors), and everything else in the last slot."""
    out = np.zeros(len(kinds) + 1)
    for key in space.op_keys(arch, input_shape, table.precision):
        v = table.latency_ms(key)
        out[kinds.index(key.kind) if key.kind in kinds else -1] += v
    return out


SLOPE_BOUNDS = (0.25, 4.0)  # an op costs between a quarter and 4x inside a model what it costs alone


def _fit(A: np.ndarray, y: np.ndarray, free: int) -> np.ndarray:
    """Least squares with the first `free` coefficients unbounded and the rest in SLOPE_BOUNDS."""
    from scipy.optimize import lsq_linear

    lo = np.r_[np.full(free, -np.inf), np.full(A.shape[1] - free, SLOPE_BOUNDS[0])]
    hi = np.r_[np.full(free, np.inf), np.full(A.shape[1] - free, SLOPE_BOUNDS[1])]
    return lsq_linear(A, y, bounds=(lo, hi)).x


def calibration_models(X: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, Callable]]:
    """The nested calibrations of per-kind op sums `X` (fixed ops last), each a design matrix
    (intercept first), the part of the time it takes as given, and a map from its coefficients
    to per-kind slopes: `offset` (ops as timed, plus a constant), `common` (one slope for every
    choice op) and `per-kind` (a slope per kind)."""
    k = X.shape[1] - 1
    ones, zero = np.ones((len(X), 1)), np.zeros(len(X))
    return {"offset": (ones, X[:, :-1].sum(1), lambda c: np.ones(k)),
            "common": (np.c_[ones, X[:, :-1].sum(1)], zero, lambda c: np.full(k, c[1])),
            "per-kind": (np.c_[ones, X[:, :-1]], zero, lambda c: np.asarray(c[1:]))}


def fit_calibration(space: SearchSpace, table: LatencyTable, input_shape: Shape,
                    archs: Sequence[Arch], measured_ms: Sequence[float]) -> Calibration:
    """An intercept and per-kind slopes, by the nested model that predicts held-out candidates
    best.

    Per-kind slopes are what det20 @ 320 needs (kinds cost differently more inside a model), but
    where the choices move a model's latency little next to its fixed part (a detector, whose
    neck and head dominate) they are nearly collinear with the intercept: least squares gave a
    det20-fcos table slopes of +7 on one profile and -2.6 on the next. So three nested models
    (`calibration_models`) are fitted with slopes bounded to SLOPE_BOUNDS, and the one with the
    lowest leave-one-out error is kept (the simpler one on a tie); its leave-one-out errors are
    stored beside it."""
    kinds = space.choice_kinds()
    X = np.array([kind_sums(space, table, a, input_shape, kinds) for a in archs])
    y = np.asarray(measured_ms, float)
    if len(y) < len(kinds) + 2:
        raise ValueError(f"calibration needs at least {len(kinds) + 2} candidates")
    # fixed ops (last column) enter with slope 1; their constant rest is in the intercept
    best = None
    for name, (A, given, to_slopes) in calibration_models(X).items():
        target = y - X[:, -1] - given
        loo = np.empty(len(y))
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            loo[i] = A[i] @ _fit(A[keep], target[keep], 1) + X[i, -1] + given[i]
        err = np.abs(loo / y - 1) * 100
        score = float(np.sqrt(np.mean(err ** 2)))
        if best is None or score < best[1] * 0.99:  # the simpler model unless 1% better
            best = (name, score, A, given, target, to_slopes, err)
    name, score, A, given, target, to_slopes, err = best
    coef = _fit(A, target, 1)
    fitted = A @ coef + X[:, -1] + given
    return Calibration(float(coef[0]), {k: float(c) for k, c in zip(kinds, to_slopes(coef))},
                       tuple(str(a) for a in archs), tuple(map(float, y)),
                       tuple(map(float, fitted)), name,
                       float(np.mean(err <= 5)), float(np.mean(err)))


def infeasible_error(budget_ms: float, fastest_ms: float, space: str) -> UserError:
    """The one message for a budget below the fastest candidate (exit 2, naming it)."""
    return UserError(f"budget {budget_ms:g} ms is infeasible: below the fastest {space} "
                     f"candidate the latency table can price ({fastest_ms:.3f} ms); raise "
                     f"--budget-ms to at least {fastest_ms:.3f}")


class LutPredictor:
    """Prices candidates of `space` at `input_shape` from `table`.

    `predict` walks `space.op_keys` (the single source of truth); `predict_many` gathers from a
    [layers, choices] matrix derived from the same walk (`SearchSpace.key_grid`) for speed.
    """

    def __init__(self, table: LatencyTable, space: SearchSpace, input_shape: Shape | None = None,
                 calibrated: bool = True, scale: float = 1.0):
        self.table, self.space = table, space
        self.scale = scale  # the host's drift since the table was made (canary now / then)
        self.calibrated = calibrated
        self.input_shape = tuple(input_shape or table.meta["input_shape"])
        self.calibration = (Calibration.from_dict(table.meta.get("calibration")) if calibrated
                            else Calibration())
        self.precision = table.precision
        fixed, grid = space.key_grid(self.input_shape, self.precision)
        self._fixed_keys, self._grid_keys = fixed, grid
        cal = self.calibration
        self.fixed_ms = sum(cal.slope(k.kind) * self._lookup_or_nan(k) for k in fixed)
        # [layers, choices]: each op's calibrated contribution; a single-choice layer's op is
        # among the fixed ones (0 here); padding past a layer's last choice is NaN
        self.grid_ms = np.array(
            [[(0.0 if k is None else cal.slope(k.kind) * self._lookup_or_nan(k))
              if c < n else np.nan for c, k in enumerate(row)]
             for row, n in zip(grid, space.num_choices)])

    def scaled(self, scale: float) -> "LutPredictor":
        """The same prices multiplied by `scale` (a canary's drift)."""
        return LutPredictor(self.table, self.space, self.input_shape,
                            calibrated=self.calibrated, scale=scale)

    def _lookup_or_nan(self, key: OpKey) -> float:
        v = self.table.latency_ms(key)
        return np.nan if v is None else v

    def missing_error(self, key: OpKey) -> UserError:
        return UserError(
            f"latency table {self.table.path} has no row for op {key}; measure it with "
            f"`hwnas profile --device {self.table.device} --space {self.space.name} "
            f"--input {shape_text(self.input_shape)}`")

    def predict(self, arch: Arch) -> float:
        """Predicted latency (ms) of one candidate, walking its op keys."""
        total = self.calibration.intercept_ms
        for key in self.space.op_keys(arch, self.input_shape, self.precision):
            v = self.table.latency_ms(key)
            if v is None:
                raise self.missing_error(key)
            total += self.calibration.slope(key.kind) * v
        return float(total) * self.scale

    def predict_many(self, archs: np.ndarray | Sequence[Arch]) -> np.ndarray:
        """Predicted latencies (ms) of many candidates: `archs` is [N, layers] ints or Archs."""
        a = (np.asarray([x.choices for x in archs], dtype=np.int64)
             if len(archs) and isinstance(archs[0], Arch) else np.asarray(archs, dtype=np.int64))
        total = (self.calibration.intercept_ms + self.fixed_ms
                 + self.grid_ms[np.arange(a.shape[1]), a].sum(axis=1)) * self.scale
        if np.isnan(total).any():
            row = a[int(np.flatnonzero(np.isnan(total))[0])]
            self.predict(Arch(self.space.name, tuple(int(c) for c in row)))  # raises, naming it
        return total

    def require_feasible(self, budget_ms: float) -> None:
        """A `UserError` naming the fastest latency when no candidate can keep `budget_ms`."""
        if budget_ms < self.fastest_ms():
            raise infeasible_error(budget_ms, self.fastest_ms(), self.space.name)

    def fastest_ms(self) -> float:
        """The lowest latency any candidate can have (each layer at its fastest choice)."""
        return float(self.calibration.intercept_ms + self.fixed_ms
                     + np.nanmin(self.grid_ms, 1).sum()) * self.scale
