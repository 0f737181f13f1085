"""The Backend / Runner shape every backend module follows (after Polygraphy).

A backend module exposes `available(device=None) -> (bool, reason)` (with a device it also
checks what that device needs: a GPU, an execution provider, a tuning database) and
`compile(onnx_path, device[, module]) -> Runner` (`module` for backends that run the torch
module itself), and imports its heavy package only inside them, so a missing backend is a clear
`UserError`, not an ImportError at import time. Backends never time themselves: `measure.py`
times runners.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


class Runner(ABC):
    """A compiled model ready to run. Use as a context manager; `run` checks, `_run` works."""

    inputs: list[TensorSpec]

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the compiled model; safe to call twice."""

    def random_feed(self, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        """A feed of standard-normal inputs of the right shapes and dtypes."""
        rng = rng or np.random.default_rng(0)
        return {s.name: rng.standard_normal(s.shape).astype(s.dtype) for s in self.inputs}

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        for spec in self.inputs:
            if spec.name not in feed:
                raise ValueError(f"missing input {spec.name!r}")
            if tuple(feed[spec.name].shape) != spec.shape:
                raise ValueError(f"input {spec.name!r} has shape {feed[spec.name].shape}, "
                                 f"expected {spec.shape}")
        return self._run(feed)

    @abstractmethod
    def _run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run without checks: what `measure.py` calls in its timing loop."""

    def node_profile(self) -> list[tuple[str, float]] | None:
        """(node name, ms) per executed node from the backend's own profiler, if it has one."""
        return None
