"""Evolutionary search with SPOS/DetNAS settings.

Population 50, top-10 parents, each generation 25 mutations (every gene resampled with
p = 0.1) + 25 uniform crossovers of random parents; a child over the budget or already seen is
rejected and redrawn, at most `max_tries` draws per child (never `while True`); a shortfall is
filled with random feasible candidates, as the SPOS reference does. The parents are the top 10
of everything evaluated so far. 1,000 evaluations = 20 generations of 50.
"""

from __future__ import annotations

import numpy as np

from hwnas.search.base import Search


class EvolutionSearch(Search):
    method = "evolution"

    def __init__(self, *args, population: int = 50, parents: int = 10, mutations: int = 25,
                 crossovers: int = 25, mutate_prob: float = 0.1, max_tries: int = 10, **kw):
        self.population, self.parents = population, parents
        self.mutations, self.crossovers = mutations, crossovers
        self.mutate_prob, self.max_tries = mutate_prob, max_tries
        super().__init__(*args, **kw)

    def params(self) -> dict:
        return {**super().params(), "population": self.population, "parents": self.parents,
                "mutations": self.mutations, "crossovers": self.crossovers,
                "mutate_prob": self.mutate_prob, "max_tries": self.max_tries}

    def _children(self, parents: list[str], n: int, kind: str, taken: set[str]) -> list:
        out = []
        pa = [self.space.parse(p) for p in parents]
        for _ in range(n * self.max_tries):
            if len(out) == n:
                break
            if kind == "mutation":
                child = self.space.mutate(pa[self.rng.integers(len(pa))], self.rng,
                                          self.mutate_prob)
            else:
                i, j = self.rng.choice(len(pa), 2, replace=len(pa) < 2)
                child = self.space.crossover(pa[i], pa[j], self.rng)
            key = str(child)
            row = np.array(child.choices, np.int64)
            if key in taken or self.lat(row[None])[0] > self.budget_ms:
                continue
            taken.add(key)
            out.append(row)
        return out

    def _search(self) -> None:
        while self.n_evals < self.evaluations:
            gen = len(self.history)
            n = min(self.population, self.evaluations - self.n_evals)
            taken = set(self.evaluated)
            if gen == 0:
                rows = []
            else:
                ranked = sorted(self.evaluated.items(), key=lambda kv: -kv[1][0])
                parents = [k for k, _ in ranked[:self.parents]]
                m = round(n * self.mutations / (self.mutations + self.crossovers))
                rows = self._children(parents, m, "mutation", taken)
                rows += self._children(parents, n - m, "crossover", taken)
            if len(rows) < n:
                rows += self.sample_feasible(n - len(rows), self.rng, exclude=taken)
            if not rows:
                break  # nothing new is feasible: the space is exhausted
            scores = self.evaluate(rows, gen)
            key, best, lat = self.best()
            top = sorted((s for s, _, _ in self.evaluated.values()), reverse=True)[:self.parents]
            self.history.append({"generation": gen, "evaluations": self.n_evals,
                                 "generation_best": float(np.max(scores)),
                                 "generation_mean": float(np.mean(scores)),
                                 "top_mean": float(np.mean(top)), "best_score": best,
                                 "best_arch": key, "best_latency_ms": lat})
            self.save_state()
