"""Choosing a precision per unit under a latency budget: an ILP, and the greedy and random
baselines it is compared with at equal budget.

The ILP (HAWQ-V3's, with the conversions priced): one-hot binaries x[u, c] (unit u at choice c)
and, per edge k = (a → b), pair variables y[k, c, d] ∈ [0, 1] with Σ_d y[k, c, d] = x[a, c] and
Σ_c y[k, c, d] = x[b, d]; for binary x these force y[k, c, d] = x[a, c]·x[b, d] exactly (the
standard linearisation of products of one-hot variables), so the edge costs the table measured
(`hwnas.quant.latency`) enter linearly. A table with triples (edges k1 = a → b, k2 = b → c)
adds z[t, c, d, f] ∈ [0, 1] with Σ_f z[t, c, d, f] = y[k1, c, d] and Σ_c z[t, c, d, f] =
y[k2, d, f]: for exact one-hot products y these leave z one choice, the product of all three.

    minimise   Σ Ω[u, c]·x[u, c]                     (sensitivity-weighted perturbation)
    subject to const + Σ T[u, c]·x[u, c] + Σ C[k, c, d]·y[k, c, d]
                     + Σ D[t, c, d, f]·z[t, c, d, f] ≤ budget_ms
               Σ bytes[u, c]·x[u, c] ≤ size          (optional)

solved by `scipy.optimize.milp` (HiGHS). A tiny multiple of the latency is added to the
objective so that, among assignments of equal perturbation, the faster one is chosen (all fp32
when int8 gains nothing). `fastest` is the same program with latency as the objective: the
lower end of the feasible budgets.

Greedy: from all fp32, repeatedly take the single-unit change with the most latency saved per
perturbation added, until the prediction keeps the budget (stuck when no single change saves
time, as a lone int8 block between fp32 neighbours often cannot: its conversions cost more
than it saves). Random: the lowest-perturbation assignment among `n` seeded stratified random
draws that keep the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hwnas.quant.units import PrecisionSpace, summed_terms
from hwnas.spaces.base import Arch


@dataclass
class Problem:
    """What the methods see: the linear latency terms of a `MixedPredictor`, the perturbation
    Ω[u, c] (0 at fp32) and the weight bytes of every unit at every choice."""

    ps: PrecisionSpace
    const_ms: float
    unit_ms: np.ndarray  # [U, P]; NaN past a unit's choices
    edge_ms: np.ndarray  # [E, P, P]
    omega: np.ndarray  # [U, P]
    size_bytes: np.ndarray  # [U, P]
    triple_ms: np.ndarray | None = None  # [T, P, P, P] of `triples` (none: a table of pairs)
    triples: tuple[tuple[int, int], ...] = ()

    @classmethod
    def build(cls, pred, omega: np.ndarray, weight_counts: np.ndarray) -> "Problem":
        from hwnas.quant.units import BYTES

        ps = pred.ps
        t = pred.terms()
        size = np.array([[weight_counts[i] * BYTES[u.precisions[c]] if c < len(u.precisions)
                          else np.nan for c in range(t.unit_ms.shape[1])]
                         for i, u in enumerate(ps.units)], dtype=float)
        return cls(ps, t.const_ms, t.unit_ms, t.edge_ms, np.asarray(omega, float), size,
                   t.triple_ms, t.triples)

    # ---- evaluation of given assignments -------------------------------------------------------
    def latency_ms(self, choices: np.ndarray) -> np.ndarray:
        ch = np.atleast_2d(np.asarray(choices, np.int64))
        return self.const_ms + summed_terms(self.ps, ch, self.unit_ms, self.edge_ms,
                                            self.triple_ms, self.triples)

    def perturbation(self, choices: np.ndarray) -> np.ndarray:
        ch = np.atleast_2d(np.asarray(choices, np.int64))
        return self.omega[np.arange(ch.shape[1]), ch].sum(1)

    def size_mb(self, choices: np.ndarray) -> np.ndarray:
        ch = np.atleast_2d(np.asarray(choices, np.int64))
        return self.size_bytes[np.arange(ch.shape[1]), ch].sum(1) / 1e6

    def arch(self, choices) -> Arch:
        return Arch(self.ps.name, tuple(int(c) for c in choices))


def _layout(prob: Problem):
    """Variable indices: x[u][c], then y[k][c][d], then z[t][c][d][f]."""
    idx = 0
    x = []
    units = prob.ps.units
    for u in units:
        x.append(list(range(idx, idx + len(u.precisions))))
        idx += len(u.precisions)
    y = []
    for e in prob.ps.edges:
        na, nb = len(units[e.src].precisions), len(units[e.dst].precisions)
        y.append([[idx + c * nb + d for d in range(nb)] for c in range(na)])
        idx += na * nb
    z = []
    for k1, k2 in prob.triples:
        e1, e2 = prob.ps.edges[k1], prob.ps.edges[k2]
        na, nb, nc = (len(units[i].precisions) for i in (e1.src, e1.dst, e2.dst))
        z.append([[[idx + (c * nb + d) * nc + f for f in range(nc)] for d in range(nb)]
                  for c in range(na)])
        idx += na * nb * nc
    return x, y, z, idx


def solve(prob: Problem, budget_ms: float | None = None, size_mb: float | None = None,
          objective: str = "perturbation", time_limit_s: float = 60.0,
          exclude: tuple[Arch, ...] = ()) -> Arch | None:
    """The ILP's assignment, or None when no assignment keeps the constraints; never one of
    `exclude` (a no-good cut each: at least one unit differs)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    x, y, z, n = _layout(prob)
    lat = np.zeros(n)
    pert = np.zeros(n)
    size = np.zeros(n)
    for u, xs in enumerate(x):
        for c, j in enumerate(xs):
            lat[j], pert[j], size[j] = prob.unit_ms[u, c], prob.omega[u, c], prob.size_bytes[u, c]
    for k, ys in enumerate(y):
        for c, row in enumerate(ys):
            for d, j in enumerate(row):
                lat[j] = prob.edge_ms[k, c, d]
    for t, zs in enumerate(z):
        for c, plane in enumerate(zs):
            for d, row in enumerate(plane):
                for f, j in enumerate(row):
                    lat[j] = prob.triple_ms[t, c, d, f]
    rows, lo, hi = [], [], []

    def add(coef: dict[int, float], lb: float, ub: float) -> None:
        r = np.zeros(n)
        for j, v in coef.items():
            r[j] += v
        rows.append(r)
        lo.append(lb)
        hi.append(ub)

    for xs in x:  # one precision per unit
        add({j: 1.0 for j in xs}, 1.0, 1.0)
    for e, ys in zip(prob.ps.edges, y):  # y is the product of its units' one-hots
        for c, row in enumerate(ys):
            add({**{j: 1.0 for j in row}, x[e.src][c]: -1.0}, 0.0, 0.0)
        for d in range(len(ys[0])):
            add({**{ys[c][d]: 1.0 for c in range(len(ys))}, x[e.dst][d]: -1.0}, 0.0, 0.0)
    for (k1, k2), zs in zip(prob.triples, z):  # z is the product of its two edges' y
        for c, plane in enumerate(zs):
            for d, row in enumerate(plane):
                add({**{j: 1.0 for j in row}, y[k1][c][d]: -1.0}, 0.0, 0.0)
        for d in range(len(zs[0])):
            for f in range(len(zs[0][0])):
                add({**{zs[c][d][f]: 1.0 for c in range(len(zs))}, y[k2][d][f]: -1.0}, 0.0, 0.0)
    for a in exclude:
        add({x[u][c]: 1.0 for u, c in enumerate(a.choices)}, -np.inf, len(x) - 1.0)
    if budget_ms is not None:
        add(dict(enumerate(lat)), -np.inf, budget_ms - prob.const_ms)
    if size_mb is not None:
        add(dict(enumerate(size)), -np.inf, size_mb * 1e6)
    if objective == "latency":
        c = lat
    else:  # perturbation, ties broken towards the faster assignment
        scale = max(float(np.abs(pert).max()), 1e-12)
        c = pert / scale + 1e-6 * lat / max(float(np.abs(lat).sum()), 1e-12)
    integrality = np.zeros(n)
    for xs in x:
        integrality[xs] = 1
    res = milp(c, integrality=integrality, bounds=Bounds(0, 1),
               constraints=LinearConstraint(np.array(rows), lo, hi),
               options={"time_limit": time_limit_s})
    if res.x is None or res.status not in (0, 1):
        return None
    return prob.arch([int(np.argmax([res.x[j] for j in xs])) for xs in x])


def fastest(prob: Problem, size_mb: float | None = None) -> Arch | None:
    return solve(prob, None, size_mb, objective="latency")


def solve_k(prob: Problem, k: int, budget_ms: float | None = None,
            size_mb: float | None = None, objective: str = "perturbation") -> list[Arch]:
    """The ILP's `k` best answers, best first: each one cut off from the next (`exclude`)."""
    out: list[Arch] = []
    while len(out) < k:
        a = solve(prob, budget_ms, size_mb, objective=objective, exclude=tuple(out))
        if a is None:
            break
        out.append(a)
    return out


def fastest_k(prob: Problem, k: int, size_mb: float | None = None) -> list[Arch]:
    """The `k` fastest assignments as priced, fastest first."""
    return solve_k(prob, k, None, size_mb, objective="latency")


def greedy(prob: Problem, budget_ms: float, size_mb: float | None = None) -> Arch | None:
    """See the module docstring; None when it gets stuck above the budget (or size)."""
    U = len(prob.ps.units)
    cur = np.zeros(U, np.int64)
    for _ in range(sum(len(u.precisions) for u in prob.ps.units) + 1):
        lat, size = float(prob.latency_ms(cur)[0]), float(prob.size_mb(cur)[0])
        if lat <= budget_ms and (size_mb is None or size <= size_mb):
            return prob.arch(cur)
        moves = [(u, c) for u in range(U) for c in range(len(prob.ps.units[u].precisions))
                 if c != cur[u]]
        cands = np.repeat(cur[None], len(moves), 0)
        for i, (u, c) in enumerate(moves):
            cands[i, u] = c
        gain = lat - prob.latency_ms(cands)  # ms saved
        if size_mb is not None and size > size_mb:
            gain = gain / max(lat, 1e-9) + (size - prob.size_mb(cands)) / max(size, 1e-9)
        cost = np.maximum(prob.perturbation(cands) - prob.perturbation(cur)[0], 1e-12)
        score = np.where(gain > 1e-9, gain / cost, -np.inf)
        if not np.isfinite(score).any():
            return None
        u, c = moves[int(np.argmax(score))]
        cur[u] = c
    return None


def random_search(prob: Problem, budget_ms: float, size_mb: float | None = None,
                  n: int = 2000, seed: int = 0) -> Arch | None:
    """The lowest-perturbation assignment among `n` stratified random draws (and all fp32)
    that keep the budget; None if none does."""
    best = random_k(prob, 1, budget_ms, size_mb, n, seed)
    return best[0] if best else None


def random_k(prob: Problem, k: int, budget_ms: float, size_mb: float | None = None,
             n: int = 2000, seed: int = 0) -> list[Arch]:
    """The `k` distinct draws of `random_search` of least perturbation that keep the budget,
    least first (a stable order: ties keep the draws' order)."""
    draws = prob.ps.sample_stratified(n, np.random.default_rng(seed))
    ch = np.array([prob.ps.canary().choices] + [a.choices for a in draws], np.int64)
    ok = prob.latency_ms(ch) <= budget_ms
    if size_mb is not None:
        ok &= prob.size_mb(ch) <= size_mb
    idx = np.flatnonzero(ok)
    out: dict[tuple, Arch] = {}
    for i in idx[np.argsort(prob.perturbation(ch[idx]), kind="stable")]:
        out.setdefault(tuple(ch[i]), prob.arch(ch[i]))
        if len(out) == k:
            break
    return list(out.values())


METHODS = ("ilp", "greedy", "random")


def choose_k(prob: Problem, method: str, k: int, budget_ms: float,
             size_mb: float | None = None, seed: int = 0) -> list[Arch]:
    """A method's `k` best answers under the budget, best first: the ILP's (`solve_k`) and
    random search's (`random_k`) by perturbation; greedy builds one assignment, so at most it."""
    if method == "greedy":
        a = greedy(prob, budget_ms, size_mb)
        return [] if a is None else [a]
    if method == "ilp":
        return solve_k(prob, k, budget_ms, size_mb)
    if method == "random":
        return random_k(prob, k, budget_ms, size_mb, seed=seed)
    raise ValueError(f"unknown method {method!r}")


def choose(prob: Problem, method: str, budget_ms: float, size_mb: float | None = None,
           seed: int = 0) -> Arch | None:
    if method == "ilp":
        return solve(prob, budget_ms, size_mb)
    if method == "greedy":
        return greedy(prob, budget_ms, size_mb)
    if method == "random":
        return random_search(prob, budget_ms, size_mb, seed=seed)
    raise ValueError(f"unknown method {method!r}")
