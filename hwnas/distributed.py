"""Where candidate evaluations run. In-process by default; a cluster executor (Ray actors each
holding a copy of the accuracy model) implements the same one-method interface, so the searches
never change when the work moves.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from hwnas.spaces.base import Arch


class AccuracyModel(Protocol):
    def predict(self, archs: Sequence[Arch]) -> np.ndarray:
        """Scores of `archs` (higher is better), float array [len(archs)]."""


class Executor(Protocol):
    def evaluate(self, model: AccuracyModel, archs: Sequence[Arch]) -> np.ndarray:
        """`model.predict(archs)`, run wherever this executor runs work; same order."""


class InProcessExecutor:
    """Evaluates in the calling process, in order (the default)."""

    def evaluate(self, model: AccuracyModel, archs: Sequence[Arch]) -> np.ndarray:
        if not archs:
            return np.zeros(0)
        return np.asarray(model.predict(list(archs)), dtype=np.float64)


__all__ = ["AccuracyModel", "Executor", "InProcessExecutor"]
