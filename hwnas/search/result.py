"""`SearchResult`: what a search found, saved as JSON, and its Pareto plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hwnas.errors import UserError
from hwnas.fileio import atomic_path, atomic_write_text


@dataclass
class SearchResult:
    """The pick (`best_arch`, its `predicted_latency_ms` and supernet `score`), the `budget_ms`,
    the `seed`, the `params` the search ran with, its per-generation/per-stage `history`, and
    every evaluated candidate as [arch, score, predicted_latency_ms, generation or stage]."""

    method: str
    space: str
    budget_ms: float
    seed: int
    best_arch: str
    predicted_latency_ms: float
    score: float
    evaluations: int
    params: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    evaluated: list[list] = field(default_factory=list)
    context: dict = field(default_factory=dict)  # device, table, supernet, proxy mapping
    verify: dict | None = None  # measured vs predicted vs budget, when --verify ran

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> Path:
        # allow_nan=False: a NaN would be written as the non-JSON token NaN
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1, allow_nan=False)
                          + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "SearchResult":
        try:
            doc = json.loads(Path(path).read_text())
            return cls(**doc)
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"search result {str(path)!r} cannot be read ({type(e).__name__}: "
                            f"{str(e)[:100]}); give a .json file `hwnas search` wrote") from None

    def pareto_front(self) -> list[list]:
        """Evaluated candidates no other beats in both score and latency, fastest first."""
        pts = sorted(self.evaluated, key=lambda r: (r[2], -r[1]))
        front, best = [], -np.inf
        for r in pts:
            if r[1] > best:
                front.append(r)
                best = r[1]
        return front

    def plot(self, path: Path) -> Path:
        """Score vs predicted latency of everything evaluated, the front, the budget, the pick."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ev = np.array([[r[2], r[1], r[3]] for r in self.evaluated], dtype=np.float64)
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        sc = ax.scatter(ev[:, 0], 100 * ev[:, 1], c=ev[:, 2], s=9, cmap="viridis", alpha=0.7)
        fig.colorbar(sc, ax=ax, label="generation / stage")
        front = np.array([[r[2], r[1]] for r in self.pareto_front()])
        ax.step(front[:, 0], 100 * front[:, 1], where="post", color="k", lw=1, label="Pareto front")
        ax.axvline(self.budget_ms, color="r", ls="--", lw=1, label=f"budget {self.budget_ms:g} ms")
        ax.scatter([self.predicted_latency_ms], [100 * self.score], marker="*", s=160, c="r",
                   label="pick", zorder=5)
        ax.set_xlabel("predicted latency (ms, LUT)")
        ax.set_ylabel(self.context.get("score_label", "supernet score (held-out accuracy, %)"))
        ax.set_title(f"{self.method} on {self.space}, seed {self.seed}: {len(ev)} evaluated")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = Path(path)
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=110, format="png")
        finally:
            plt.close(fig)
        return path
