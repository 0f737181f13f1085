"""PC-NAS partial-pool shrinking (Li et al., "Improving One-Shot NAS by Suppressing the
Posterior Fading", CVPR 2020), with the LUT as a hard latency filter.

A pool of partial models (prefixes of the layer sequence) grows `layers_per_stage` layers per
stage. Each stage extends every prefix in the pool by every choice of the next layer(s) and
scores each extension by its *potential*: the mean score of `samples` random completions of the
remaining layers, completions over the budget rejected and redrawn (bounded). The top `pool_size`
extensions form the next pool. Between stages, if a `trainer` is given, the supernet is trained
for `train_interval` steps on paths whose prefix is drawn from the pool and whose rest is drawn
uniformly under the same latency filter — the posterior narrows as the pool does. The final
pool's best full model is the result.

Defaults, and why: `layers_per_stage=1` follows the paper's layer-by-layer shrinking; with 4
choices it gives pool_size·4 extensions a stage. `pool_size=3` and `samples` derived from the
evaluation budget (4 for 1,000 evaluations on det20: 4 + 19·12 extensions × 4 completions = 928
evaluations) make PC-NAS spend the same number of evaluations as evolution (the paper's own
pool of 5 and many more samples assume a GPU cluster). `train_interval` defaults to 0 (score on
the given supernet) because on a 2-core CPU training dominates; the benchmark sets it to train
the PC-NAS supernet.
"""

from __future__ import annotations

import itertools
import math
import json
from dataclasses import asdict, is_dataclass
from typing import Protocol

import numpy as np

from hwnas.search.base import Search


class PathTrainer(Protocol):
    step: int

    def train_to(self, stop: int, sampler, desc: str = "") -> None:
        """Train until `step == stop`, one path per step drawn by `sampler(rng)`."""


class PCNASSearch(Search):
    method = "pcnas"

    def __init__(self, *args, pool_size: int = 3, samples: int | None = None,
                 layers_per_stage: int = 1, train_interval: int = 0,
                 trainer: PathTrainer | None = None, max_rounds: int = 20, **kw):
        self.pool_size, self.layers_per_stage = pool_size, layers_per_stage
        self.train_interval, self.trainer, self.max_rounds = train_interval, trainer, max_rounds
        self._samples = samples
        self.pool: list[tuple[int, ...]] = [()]
        self.stage = 0
        self.train_base_step = 0
        super().__init__(*args, **kw)
        if self.trainer is not None:
            self.train_base_step = int(self.trainer.step)

    @property
    def stage_ends(self) -> list[int]:
        n, g = self.space.num_layers, self.layers_per_stage
        return list(range(g, n, g)) + [n]

    @property
    def samples(self) -> int:
        """Completions per extension: given, or the most that fit the evaluation budget."""
        if self._samples is not None:
            return self._samples
        c = self.space.num_choices
        ends, starts = self.stage_ends, [0] + self.stage_ends[:-1]
        pool = 1
        per_sample = 0
        for s, e in zip(starts, ends):
            ext = pool * math.prod(c[s:e])
            per_sample += ext if e < self.space.num_layers else 0
            pool = min(self.pool_size, ext)
        last = min(self.pool_size, pool) * math.prod(c[starts[-1]:ends[-1]])
        return max(1, (self.evaluations - last) // max(per_sample, 1))

    def params(self) -> dict:
        return {**super().params(), "pool_size": self.pool_size, "samples": self.samples,
                "layers_per_stage": self.layers_per_stage,
                "train_interval": self.train_interval if self.trainer is not None else 0}

    def identity(self) -> dict:
        """As `Search.identity`, but with a trainer attached the supernet's weights change by
        design during the search, so they are not part of it; the trainer's settings are."""
        ident = super().identity()
        if self.trainer is not None:
            acc = ident.get("accuracy_model")
            if isinstance(acc, dict):
                acc.pop("weights_sha256", None)
            cfg = getattr(self.trainer, "cfg", None)
            config = asdict(cfg) if is_dataclass(cfg) else None
            if config is not None:
                config.pop("fresh", None)  # how the trainer was started, not what it trains
                config = json.loads(json.dumps(config, default=str))
            ident["trainer"] = {"config": config, "train_interval": self.train_interval}
        return ident

    def state(self) -> dict:
        return {"stage": self.stage, "pool": [list(p) for p in self.pool],
                "train_base_step": self.train_base_step}

    def restore(self, state: dict) -> None:
        self.stage, self.pool = int(state["stage"]), [tuple(p) for p in state["pool"]]
        self.train_base_step = int(state["train_base_step"])

    def completions(self, prefix: tuple[int, ...], n: int,
                    rng: np.random.Generator) -> list[np.ndarray]:
        """Up to `n` distinct feasible full rows starting with `prefix` (bounded rejection)."""
        return self.sample_feasible(n, rng, prefix, max_rounds=self.max_rounds)

    def _pool_sampler(self):
        """A path sampler for the trainer: a pool prefix, completed uniformly under the budget;
        the all-fastest completion when rejection finds none (it exists: prefixes are feasible)."""
        pool, fastest = list(self.pool), self.fastest_choices()

        def sample(rng: np.random.Generator) -> np.ndarray:
            prefix = pool[int(rng.integers(len(pool)))]
            rows = self.sample_feasible(1, rng, prefix, batch=32, max_rounds=10)
            if rows:
                return rows[0]
            return np.concatenate([np.asarray(prefix, np.int64), fastest[len(prefix):]])

        return sample

    def _search(self) -> None:
        c = self.space.num_choices
        starts = [0] + self.stage_ends[:-1]
        fresh = self.trainer is not None  # after training, old scores are stale
        while self.stage < len(self.stage_ends):
            s, e = starts[self.stage], self.stage_ends[self.stage]
            ext = [p + tail for p in self.pool
                   for tail in itertools.product(*(range(n) for n in c[s:e]))]
            potentials, counts = [], []
            for prefix in ext:
                rows = self.completions(prefix, self.samples, self.rng)
                counts.append(len(rows))
                potentials.append(float(np.mean(self.evaluate(rows, self.stage, cache=not fresh)))
                                  if rows else -np.inf)
            order = np.argsort(potentials, kind="stable")[::-1]
            keep = [i for i in order[:self.pool_size] if np.isfinite(potentials[i])]
            self.pool = [ext[i] for i in keep]
            key, best, lat = self.best()
            self.history.append({"stage": self.stage, "layers": e, "extensions": len(ext),
                                 "evaluations": self.n_evals,
                                 "pool": ["".join(map(str, p)) for p in self.pool],
                                 "pool_potentials": [potentials[i] for i in keep],
                                 "infeasible_extensions": int(sum(1 for n in counts if n == 0)),
                                 "best_score": best, "best_arch": key,
                                 "best_latency_ms": lat})
            self.stage += 1
            if self.trainer is not None and self.train_interval > 0 and self.stage < len(
                    self.stage_ends):
                stop = self.train_base_step + self.stage * self.train_interval
                self.trainer.train_to(stop, self._pool_sampler(), desc=f"pcnas stage "
                                      f"{self.stage} training")
                reload = getattr(self.executor, "reload", None)
                if reload is not None:  # copies of the supernet held by cluster actors are stale
                    reload(self.accuracy)
            self.save_state()
        # the final pool's best full model is the pick, not the best score seen on the way
        final = [str(self.arch_of(p)) for p in self.pool if len(p) == self.space.num_layers]
        self._final = final

    def best(self) -> tuple[str, float, float]:
        final = getattr(self, "_final", None)
        if final:
            k = max(final, key=lambda a: self.evaluated[a][0])
            return k, self.evaluated[k][0], self.evaluated[k][1]
        return super().best()
