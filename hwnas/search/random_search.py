"""Random search: the baseline. Uniform candidates within the budget (rejection sampling with
the LUT), the same number of evaluations as the search it is compared with; the best one."""

from __future__ import annotations

import numpy as np

from hwnas.search.base import Search


class RandomSearch(Search):
    method = "random"
    chunk = 50  # evaluations per history entry (checkpoints are time-based: Search)

    def _search(self) -> None:
        while self.n_evals < self.evaluations:
            n = min(self.chunk, self.evaluations - self.n_evals)
            rows = self.sample_feasible(n, self.rng, exclude=set(self.evaluated))
            if not rows:
                break  # the feasible space is exhausted (tiny spaces, tight budgets)
            round_ = len(self.history)
            scores = self.evaluate(rows, round_)
            key, best, lat = self.best()
            self.history.append({"round": round_, "evaluations": self.n_evals,
                                 "chunk_best": float(np.max(scores)), "best_score": best,
                                 "best_arch": key, "best_latency_ms": lat})
            self.save_state()
