"""What every search shares: the estimator protocols, the evaluation ledger, latency-filtered
sampling with bounded retries, and checkpoint/resume of the search state (JSON, atomic).

A search is handed a latency model (`predict`/`predict_many`, e.g. `hwnas.latency.LutPredictor`)
and an accuracy model (`predict(archs)`, e.g. `hwnas.train.SupernetScorer`); it never reaches into
backends or training code. Evaluations go through an `hwnas.distributed.Executor`.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from tqdm import tqdm

from hwnas import locks
from hwnas.distributed import AccuracyModel, Executor, InProcessExecutor
from hwnas.errors import UserError
from hwnas.fileio import atomic_write_text, clean_orphans
from hwnas.latency.predict import infeasible_error
from hwnas.search.result import SearchResult
from hwnas.spaces.base import Arch, SearchSpace


class LatencyModel(Protocol):
    def predict(self, arch: Arch) -> float: ...

    def predict_many(self, archs: np.ndarray) -> np.ndarray:
        """Latency (ms) of each row of an int array [N, layers]."""


class Search:
    """Base of the three searches: the ledger of evaluated candidates and checkpointing.

    `evaluated` maps arch text → (score, latency_ms, round); `history` has one entry per
    generation (evolution), stage (PC-NAS) or chunk (random).
    """

    method = "search"

    def __init__(self, space: SearchSpace, latency: LatencyModel, accuracy: AccuracyModel,
                 budget_ms: float, evaluations: int = 1000, seed: int = 0,
                 executor: Executor | None = None, state_path: Path | None = None,
                 progress: bool = False, identity: dict | None = None,
                 checkpoint_s: float = 10.0):
        if isinstance(evaluations, bool) or not isinstance(evaluations, (int, np.integer)) \
                or evaluations <= 0:
            raise UserError(f"--evaluations must be a positive integer, got {evaluations!r}")
        if not (isinstance(budget_ms, (int, float)) and math.isfinite(budget_ms)
                and budget_ms > 0):
            raise UserError(f"--budget-ms must be a positive finite number, got {budget_ms!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"--seed must be an integer ≥ 0, got {seed!r}")
        self.space, self.latency, self.accuracy = space, latency, accuracy
        self.budget_ms, self.evaluations, self.seed = float(budget_ms), int(evaluations), seed
        self.executor = executor or InProcessExecutor()
        self.state_path = Path(state_path) if state_path else None
        # what the results depend on beyond `params()` (file hashes, device, data...), from
        # the caller; see `identity()`
        self.extra_identity = dict(identity or {})
        self.checkpoint_s = float(checkpoint_s)
        self.rng = np.random.default_rng(seed)
        self.evaluated: dict[str, tuple[float, float, int]] = {}
        self.history: list[dict] = []
        self.n_evals = 0
        self.progress = progress
        self._bar = None
        # mid-round checkpoints: the state at the last round boundary, the scores computed
        # since, and (after a resume) the saved scores the replayed round reuses
        self._boundary: dict | None = None
        self._round_scores: dict[str, float] = {}
        self._pending: dict[str, float] = {}
        self._last_save = time.monotonic()
        fastest = self.fastest_ms()
        if fastest > self.budget_ms:
            raise infeasible_error(self.budget_ms, fastest, space.name)

    # ---- latency ------------------------------------------------------------------------------
    def fastest_ms(self) -> float:
        if hasattr(self.latency, "fastest_ms"):
            return float(self.latency.fastest_ms())
        return float(self.latency.predict_many(self.fastest_choices()[None])[0])

    def one_layer_trials(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows that vary one layer at a time from all-zeros through each of its choices, and
        each row's layer (layers may have different numbers of choices)."""
        counts = self.space.num_choices
        trial = np.zeros((sum(counts), self.space.num_layers), np.int64)
        layer = np.repeat(np.arange(self.space.num_layers), counts)
        trial[np.arange(len(layer)), layer] = np.concatenate([np.arange(c) for c in counts])
        return trial, layer

    def fastest_choices(self) -> np.ndarray:
        """Each layer's fastest choice, found by varying one layer at a time from all-zeros
        (exact for an additive model such as the LUT)."""
        trial, layer = self.one_layer_trials()
        lat = self.latency.predict_many(trial)
        return np.array([trial[layer == i][np.argmin(lat[layer == i]), i]
                         for i in range(self.space.num_layers)], np.int64)

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
    checkpoint_chunk = 16  # evaluations per accuracy-model call between checkpoint checks

    def evaluate(self, rows: Sequence[np.ndarray], round_: int, cache: bool = True) -> np.ndarray:
        """Scores of `rows`; each call to the accuracy model counts as one evaluation.

        Evaluated in chunks; when `checkpoint_s` has passed since the last save, the state of
        the last round boundary is saved with the scores computed since (`_save_partial`), so
        a kill loses seconds, not a round. A resumed run replays the round from that boundary
        and takes those scores instead of recomputing them (the replay asks for the same archs:
        the RNG and everything before are restored)."""
        archs = [self.arch_of(r) for r in rows]
        todo = [a for a in archs if not (cache and str(a) in self.evaluated)]
        todo = list(dict.fromkeys(todo))
        fresh: dict[str, float] = {}
        for i in range(0, len(todo), self.checkpoint_chunk):
            part = todo[i:i + self.checkpoint_chunk]
            new = [a for a in part if str(a) not in self._pending]
            scores = dict(zip(map(str, new), self.executor.evaluate(self.accuracy, new)))
            for a in part:
                k = str(a)
                s = self._pending.pop(k) if k in self._pending else float(scores[k])
                if not math.isfinite(s):
                    raise UserError(f"the accuracy model scored {k} as {s}: it is broken (e.g. "
                                    "a supernet with diverged weights); retrain it")
                fresh[k] = s
                self._round_scores[k] = s
            lats = self.lat(np.array([a.choices for a in part]))
            for a, l in zip(part, lats):
                self.evaluated[str(a)] = (fresh[str(a)], float(l), round_)
            self.n_evals += len(part)
            if self._bar is not None:
                self._bar.update(len(part))
            if time.monotonic() - self._last_save >= self.checkpoint_s:
                self._save_partial()
        if not cache:
            return np.array([fresh.get(str(a), self.evaluated[str(a)][0]) for a in archs])
        return np.array([self.evaluated[str(a)][0] for a in archs])

    def best(self) -> tuple[str, float, float]:
        feasible = [(s, -l, k) for k, (s, l, _) in self.evaluated.items()
                    if l <= self.budget_ms]
        s, negl, k = max(feasible)
        return k, s, -negl

    # ---- checkpoint ---------------------------------------------------------------------------
    STATE_FORMAT = "hwnas-search-state/2"

    def params(self) -> dict:
        return {"method": self.method, "space": self.space.name, "budget_ms": self.budget_ms,
                "evaluations": self.evaluations, "seed": self.seed}

    def identity(self) -> dict:
        """What the scores and prices depend on, beyond `params()`: a digest of the latency
        model's prices (every layer's every choice), the accuracy model's own `identity()` when
        it has one (`SupernetScorer`: weights, data, val_n, ...), and the caller's `identity`
        (supernet and table file hashes, device, ...). A state saved under another identity is
        refused on resume: its scores would be another model's."""
        prices = np.ascontiguousarray(self.lat(self.one_layer_trials()[0]), dtype="<f8")
        ident = {"latency_prices_sha256": hashlib.sha256(prices.tobytes()).hexdigest()}
        acc = getattr(self.accuracy, "identity", None)
        if callable(acc):
            ident["accuracy_model"] = acc()
        ident.update(self.extra_identity)
        return json.loads(json.dumps(ident, default=str))  # as it reads back from the file

    def state(self) -> dict:
        return {}

    def restore(self, state: dict) -> None:
        pass

    def _snapshot(self) -> dict:
        return {"format": self.STATE_FORMAT, "params": self.params(),
                "identity": self._identity, "rng": self.rng.bit_generator.state,
                "evaluated": self.evaluated, "history": self.history, "n_evals": self.n_evals,
                "state": self.state()}

    def _write(self, doc: dict) -> None:
        atomic_write_text(self.state_path, json.dumps(doc, allow_nan=False) + "\n")
        self._last_save = time.monotonic()

    def save_state(self) -> None:
        """Checkpoint at a round boundary (after a generation, stage or chunk)."""
        self._round_scores, self._pending = {}, {}
        if self.state_path is None:
            return
        # a JSON round trip: the boundary must not share lists the next round appends to
        self._boundary = json.loads(json.dumps(self._snapshot()))
        self._write(self._boundary)

    def _save_partial(self) -> None:
        """Checkpoint mid-round: the last boundary plus the scores computed since."""
        if self.state_path is None or self._boundary is None:
            return
        pending = {**self._pending, **self._round_scores}
        self._write({**self._boundary, "pending": pending})

    def load_state(self) -> bool:
        """Resume from `state_path` if it holds this search's state; False if there is none."""
        if self.state_path is None or not self.state_path.exists():
            return False
        where = f"search state {str(self.state_path)!r}"
        if not self.state_path.is_file():
            raise UserError(f"{where} is not a file; use another --out")
        try:
            doc = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{where} is unreadable ({type(e).__name__}); delete it to start "
                            "over") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("params"), dict):
            raise UserError(f"{where} is not an hwnas search state (a JSON object with "
                            "'params'); use another --out or delete it")
        if doc.get("params") != self.params():
            diff = _differences(doc["params"], self.params())
            raise UserError(f"{where} belongs to another search ({diff}); use another --out or "
                            "delete it")
        if doc.get("format") != self.STATE_FORMAT or not isinstance(doc.get("identity"), dict):
            raise UserError(f"{where} was written by an older hwnas that did not record which "
                            "supernet, table and data it used, so resuming it cannot be checked; "
                            "delete it to start over")
        if doc["identity"] != self._identity:
            diff = _differences(doc["identity"], self._identity)
            raise UserError(f"{where} was made with other inputs ({diff}); its scores would not "
                            "be this run's: use another --out, or delete it to start over")
        try:
            evaluated = {str(k): (float(v[0]), float(v[1]), int(v[2]))
                         for k, v in doc["evaluated"].items()}
            for k in evaluated:
                self.space.parse(k)
            history, n_evals = list(doc["history"]), int(doc["n_evals"])
            pending = {str(k): float(v) for k, v in doc.get("pending", {}).items()}
            if not isinstance(doc["state"], dict) or not 0 <= n_evals <= self.evaluations:
                raise ValueError("state")
            self.rng.bit_generator.state = doc["rng"]
            self.restore(doc["state"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, UserError) as e:
            raise UserError(f"{where} is malformed ({type(e).__name__}: {str(e)[:80]}); delete "
                            "it to start over") from None
        self.evaluated, self.history, self.n_evals = evaluated, history, n_evals
        self._pending = pending
        return True

    # ---- running ------------------------------------------------------------------------------
    def _search(self) -> None:
        raise NotImplementedError

    def run(self) -> SearchResult:
        """Run (or resume from `state_path`) to the end; holds `output_lock(state_path)`."""
        if self.state_path is None:
            self._identity = self.identity()
            self._run()
        else:
            if self.state_path.is_dir():
                raise UserError(f"search state {str(self.state_path)!r} is a folder; use "
                                "another --out")
            with locks.output_lock(self.state_path):
                clean_orphans(self.state_path)
                self._identity = self.identity()
                self._run()
        return self.result()

    def _run(self) -> None:
        self.load_state()
        self._boundary = json.loads(json.dumps(self._snapshot()))
        self._round_scores, self._last_save = {}, time.monotonic()
        with tqdm(total=self.evaluations, initial=self.n_evals, desc=f"search {self.method}",
                  unit="eval", file=sys.stderr, disable=not self.progress,
                  dynamic_ncols=True) as bar:
            self._bar = bar
            try:
                self._search()
            except BaseException:  # KeyboardInterrupt too: keep what was computed
                if self._round_scores:
                    self._save_partial()
                raise
            finally:
                self._bar = None

    def result(self) -> SearchResult:
        if not self.evaluated:
            raise UserError("the search evaluated no candidate; raise --evaluations")
        key, score, lat = self.best()
        return SearchResult(method=self.method, space=self.space.name, budget_ms=self.budget_ms,
                            seed=self.seed, best_arch=key, predicted_latency_ms=lat,
                            score=score, evaluations=self.n_evals, params=self.params(),
                            history=self.history,
                            evaluated=[[k, s, l, r] for k, (s, l, r) in self.evaluated.items()])


def _differences(old: dict, new: dict, prefix: str = "") -> str:
    """``"val_n: 500 (saved) vs 100 (now); ..."`` for the keys whose values differ."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out.append(_differences(a, b, f"{prefix}{k}."))
        else:
            out.append(f"{prefix}{k}: {_short(a)} (saved) vs {_short(b)} (now)")
    return "; ".join(out)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
