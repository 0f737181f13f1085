"""CRNAS's two-step search (Liang et al. 2020), latency-budgeted: stage reallocation, then
spatial reallocation, on a `hwnas.spaces.crnas.CrnasSpace` (or a detector space over one).

1. **Stages.** Every allocation of the space's fixed number of blocks over the stages (each
   stage between its minimum and maximum depth), at dilation 1, priced by the latency model;
   those within the budget are scored by the accuracy model (all of them, or a seeded random
   subset when they outnumber half the evaluations). The best one is kept.
2. **Dilations.** Greedy, PC-NAS-style layer by layer: for each active block in turn, the
   candidates that differ from the incumbent only in that block's dilation (1, 2, 3) and keep
   the budget are scored, and the best replaces the incumbent. Passes over the blocks repeat
   while evaluations remain and a pass improved the score.

The number of blocks never changes in step 2, so the result has the allocation's total. State
is saved after every allocation chunk and every block (resumable like every search).
"""

from __future__ import annotations

import numpy as np

from hwnas.errors import UserError
from hwnas.search.base import Search


def crnas_backbone(space):
    """The `CrnasSpace` that `space` is or is a detector over; a `UserError` otherwise."""
    from hwnas.spaces.crnas import CrnasSpace

    inner = getattr(space, "backbone", space)
    if not isinstance(inner, CrnasSpace):
        raise UserError(f"--method crnas needs a CRNAS space (crnas20, crnas20-fcos...), not "
                        f"{space.name}")
    return inner


class CRNASSearch(Search):
    method = "crnas"
    chunk = 16  # allocations scored between checkpoints in step 1

    def __init__(self, *args, **kwargs):
        self.cr = None
        super().__init__(*args, **kwargs)
        self.cr = crnas_backbone(self.space)
        self.step, self.incumbent, self.position, self.passes = 1, None, 0, 0
        self.improved = False
        self.alloc_order: list[int] | None = None

    def params(self) -> dict:
        cr = self.cr or crnas_backbone(self.space)
        return {**super().params(), "total_blocks": cr.total_blocks, "min_depth": cr.min_depth}

    def state(self) -> dict:
        return {"step": self.step, "position": self.position, "passes": self.passes,
                "improved": self.improved,
                "incumbent": None if self.incumbent is None else list(self.incumbent),
                "alloc_order": self.alloc_order}

    def restore(self, state: dict) -> None:
        self.step, self.position = int(state["step"]), int(state["position"])
        self.passes, self.improved = int(state["passes"]), bool(state["improved"])
        inc = state["incumbent"]
        self.incumbent = None if inc is None else tuple(int(c) for c in inc)
        self.alloc_order = state["alloc_order"]

    def _feasible_allocations(self) -> list[np.ndarray]:
        rows = [np.array(self.cr.allocation_arch(a).choices, np.int64)
                for a in self.cr.allocations()]
        if not rows:
            raise UserError(f"{self.cr.name} has no allocation of {self.cr.total_blocks} blocks")
        lat = self.lat(np.stack(rows))
        ok = [r for r, l in zip(rows, lat) if l <= self.budget_ms]
        if not ok:
            raise UserError(f"no stage allocation of {self.cr.name} at dilation 1 keeps "
                            f"{self.budget_ms:g} ms (the fastest is {lat.min():.3f} ms); raise "
                            "--budget-ms")
        return ok

    def _stage_step(self) -> None:
        rows = self._feasible_allocations()
        if self.alloc_order is None:
            cap = max(1, self.evaluations // 2)
            order = (self.rng.permutation(len(rows))[:cap] if len(rows) > cap
                     else np.arange(len(rows)))
            self.alloc_order = [int(i) for i in order]
        todo = [rows[i] for i in self.alloc_order]
        done = sum(1 for r in todo if str(self.arch_of(r)) in self.evaluated)
        for start in range(done - done % self.chunk, len(todo), self.chunk):
            self.evaluate(todo[start:start + self.chunk], 0)
            self.save_state()
        scores = [self.evaluated[str(self.arch_of(r))][0] for r in todo]
        best = todo[int(np.argmax(scores))]
        self.incumbent = tuple(int(c) for c in best)
        self.history.append({"round": 0, "step": "stages", "evaluations": self.n_evals,
                             "allocations_feasible": len(rows), "allocations_scored": len(todo),
                             "best_allocation": list(self.cr.depths(self.arch_of(best))),
                             "best_score": float(max(scores)), "best_arch": str(self.arch_of(best))})
        self.step, self.position = 2, 0
        self.save_state()

    def _active_layers(self) -> list[int]:
        from hwnas.spaces.crnas import SKIP

        return [i for i, c in enumerate(self.incumbent) if not (c == SKIP and
                self.cr.num_choices[i] > SKIP)]

    def _dilation_step(self) -> None:
        from hwnas.spaces.crnas import DILATIONS

        while self.n_evals < self.evaluations:
            layers = self._active_layers()
            if self.position >= len(layers):
                if not self.improved:
                    break
                self.passes, self.position, self.improved = self.passes + 1, 0, False
                continue
            i = layers[self.position]
            inc = np.array(self.incumbent, np.int64)
            rows = []
            for d in range(len(DILATIONS)):
                r = inc.copy()
                r[i] = d
                rows.append(r)
            rows = [r for r in rows if self.lat(r[None])[0] <= self.budget_ms]
            left = self.evaluations - self.n_evals
            new = [r for r in rows if str(self.arch_of(r)) not in self.evaluated]
            if len(new) > left:
                break
            scores = self.evaluate(rows, 1 + self.passes)
            best = rows[int(np.argmax(scores))]
            if str(self.arch_of(best)) != str(self.arch_of(inc)) and float(np.max(scores)) > \
                    self.evaluated[str(self.arch_of(inc))][0]:
                self.incumbent, self.improved = tuple(int(c) for c in best), True
            self.history.append({"round": 1 + self.passes, "step": "dilations", "layer": i,
                                 "evaluations": self.n_evals,
                                 "best_score": self.evaluated[str(self.arch_of(
                                     np.array(self.incumbent)))][0],
                                 "best_arch": str(self.arch_of(np.array(self.incumbent)))})
            self.position += 1
            self.save_state()

    def _search(self) -> None:
        if self.step == 1:
            self._stage_step()
        self._dilation_step()

    def best(self) -> tuple[str, float, float]:
        """The incumbent (the two steps' result), not the best of every scored candidate: a
        step-1 allocation at dilation 1 is also a valid pick, and is the incumbent until a
        dilation beats it."""
        if self.incumbent is None:
            return super().best()
        k = str(self.arch_of(np.array(self.incumbent)))
        s, lat, _ = self.evaluated[k]
        return k, s, lat
