"""What every search shares: the estimator protocols, the evaluation ledger, latency-filtered
sampling with bounded retries, and checkpoint/resume of the search state (JSON, atomic).

A search is handed a latency model (`predict`/`predict_many`, e.g. `hwnas.latency.LutPredictor`)
and an accuracy model (`predict(archs)`, e.g. `hwnas.train.SupernetScorer`); it never reaches into
backends or training code. Evaluations go through an `hwnas.distributed.Executor`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from tqdm import tqdm

from hwnas.distributed import AccuracyModel, Executor, InProcessExecutor
from hwnas.errors import UserError
from hwnas.latency.table import atomic_write_text
from hwnas.search.result import SearchResult
from hwnas.spaces.base import Arch, SearchSpace


class LatencyModel(Protocol):
    def predict(self, arch: Arch) -> float: ...

    def predict_many(self, archs: np.ndarray) -> np.ndarray:
        """Latency (ms) of each row of an int array [N, layers]."""


def infeasible_error(budget_ms: float, fastest_ms: float, space: str) -> UserError:
    return UserError(f"budget {budget_ms:g} ms is below the fastest {space} candidate the latency "
                     f"table can price ({fastest_ms:.3f} ms); raise --budget-ms to at least "
                     f"{fastest_ms:.3f}")


class Search:
    """Base of the three searches: the ledger of evaluated candidates and checkpointing.

    `evaluated` maps arch text → (score, latency_ms, round); `history` has one entry per
    generation (evolution), stage (PC-NAS) or chunk (random).
    """

    method = "search"

    def __init__(self, space: SearchSpace, latency: LatencyModel, accuracy: AccuracyModel,
                 budget_ms: float, evaluations: int = 1000, seed: int = 0,
                 executor: Executor | None = None, state_path: Path | None = None,
                 progress: bool = False):
        if evaluations <= 0:
            raise UserError(f"--evaluations must be positive, got {evaluations}")
        self.space, self.latency, self.accuracy = space, latency, accuracy
        self.budget_ms, self.evaluations, self.seed = float(budget_ms), int(evaluations), seed
        self.executor = executor or InProcessExecutor()
        self.state_path = Path(state_path) if state_path else None
        self.rng = np.random.default_rng(seed)
        self.evaluated: dict[str, tuple[float, float, int]] = {}
        self.history: list[dict] = []
        self.n_evals = 0
        self.progress = progress
        self._bar = None
        fastest = self.fastest_ms()
        if fastest > self.budget_ms:
            raise infeasible_error(self.budget_ms, fastest, space.name)

    # ---- latency ------------------------------------------------------------------------------
    def fastest_ms(self) -> float:
        if hasattr(self.latency, "fastest_ms"):
            return float(self.latency.fastest_ms())
        return float(self.latency.predict_many(self.fastest_choices()[None])[0])

    def fastest_choices(self) -> np.ndarray:
        """Each layer's fastest choice, found by varying one layer at a time from all-zeros
        (exact for an additive model such as the LUT)."""
        n, c = self.space.num_layers, len(self.space.choice_names)
        trial = np.zeros((n * c, n), np.int64)
        for i in range(n):
            trial[i * c:(i + 1) * c, i] = np.arange(c)
        return self.latency.predict_many(trial).reshape(n, c).argmin(1)

    def lat(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.latency.predict_many(np.asarray(rows, np.int64)), np.float64)

    def arch_of(self, row) -> Arch:
        return Arch(self.space.name, tuple(int(c) for c in row))

    def sample_feasible(self, n: int, rng: np.random.Generator, prefix: Sequence[int] = (),
                        exclude: set[str] | None = None, batch: int = 256,
                        max_rounds: int = 20) -> list[np.ndarray]:
        """Up to `n` distinct rows within the budget whose first layers are `prefix`, the rest
        uniform; rejection in vectorised batches, at most `max_rounds` batches (never forever)."""
        exclude = exclude if exclude is not None else set()
        out: list[np.ndarray] = []
        seen: set[str] = set()
        k = len(prefix)
        for _ in range(max_rounds):
            rows = self.space.sample_many(batch, rng)
            rows[:, :k] = np.asarray(prefix, np.int64)
            ok = rows[self.lat(rows) <= self.budget_ms]
            for r in ok:
                key = str(self.arch_of(r))
                if key not in seen and key not in exclude:
                    seen.add(key)
                    out.append(r)
                    if len(out) == n:
                        return out
            if k == self.space.num_layers:
                break  # nothing left to vary
        if not out:  # a tight budget: rejection may miss the few feasible rows; try the fastest
            row = np.concatenate([np.asarray(prefix, np.int64), self.fastest_choices()[k:]])
            key = str(self.arch_of(row))
            if self.lat(row[None])[0] <= self.budget_ms and key not in exclude:
                out.append(row)
        return out

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, rows: Sequence[np.ndarray], round_: int, cache: bool = True) -> np.ndarray:
        """Scores of `rows`; each call to the accuracy model counts as one evaluation."""
        archs = [self.arch_of(r) for r in rows]
        todo = [a for a in archs if not (cache and str(a) in self.evaluated)]
        todo = list(dict.fromkeys(todo))
        if todo:
            scores = self.executor.evaluate(self.accuracy, todo)
            lats = self.lat(np.array([a.choices for a in todo]))
            for a, s, l in zip(todo, scores, lats):
                self.evaluated[str(a)] = (float(s), float(l), round_)
            self.n_evals += len(todo)
            if self._bar is not None:
                self._bar.update(len(todo))
            if not cache:
                fresh = {str(a): float(s) for a, s in zip(todo, scores)}
                return np.array([fresh[str(a)] for a in archs])
        return np.array([self.evaluated[str(a)][0] for a in archs])

    def best(self) -> tuple[str, float, float]:
        feasible = [(s, -l, k) for k, (s, l, _) in self.evaluated.items()
                    if l <= self.budget_ms]
        s, negl, k = max(feasible)
        return k, s, -negl

    # ---- checkpoint ---------------------------------------------------------------------------
    def params(self) -> dict:
        return {"method": self.method, "space": self.space.name, "budget_ms": self.budget_ms,
                "evaluations": self.evaluations, "seed": self.seed}

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass

    def save_state(self) -> None:
        if self.state_path is None:
            return
        doc = {"params": self.params(), "rng": self.rng.bit_generator.state,
               "evaluated": self.evaluated, "history": self.history, "n_evals": self.n_evals,
               "state": self.state()}
        atomic_write_text(self.state_path, json.dumps(doc) + "\n")

    def load_state(self) -> bool:
        """Resume from `state_path` if it holds this search's state; False if there is none."""
        if self.state_path is None or not self.state_path.is_file():
            return False
        try:
            doc = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"search state {str(self.state_path)!r} is unreadable "
                            f"({type(e).__name__}); delete it to start over") from None
        if doc.get("params") != self.params():
            raise UserError(f"search state {str(self.state_path)!r} belongs to another search "
                            f"({doc.get('params')}); use another --out or delete it")
        self.rng.bit_generator.state = doc["rng"]
        self.evaluated = {k: tuple(v) for k, v in doc["evaluated"].items()}
        self.history, self.n_evals = doc["history"], int(doc["n_evals"])
        self.restore(doc["state"])
        return True

    # ---- running ------------------------------------------------------------------------------
    def _search(self) -> None:
        raise NotImplementedError

    def run(self) -> SearchResult:
        self.load_state()
        with tqdm(total=self.evaluations, initial=self.n_evals, desc=f"search {self.method}",
                  unit="eval", file=sys.stderr, disable=not self.progress,
                  dynamic_ncols=True) as bar:
            self._bar = bar
            self._search()
            self._bar = None
        if not self.evaluated:
            raise UserError("the search evaluated no candidate; raise --evaluations")
        key, score, lat = self.best()
        return SearchResult(method=self.method, space=self.space.name, budget_ms=self.budget_ms,
                            seed=self.seed, best_arch=key, predicted_latency_ms=lat,
                            score=score, evaluations=self.n_evals, params=self.params(),
                            history=self.history,
                            evaluated=[[k, s, l, r] for k, (s, l, r) in self.evaluated.items()])
