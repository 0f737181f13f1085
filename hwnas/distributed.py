"""Where work runs. In-process by default; on a Ray cluster when asked (`--cluster`, or
``$HWNAS_CLUSTER``), through the same interface, so the searches, the profiler and validation
never change when the work moves.

An executor does two things:

- `evaluate(model, archs)`: an accuracy model's scores (a Ray executor scores on actors that each
  hold one copy of the model, loaded once per actor);
- `map(fn, items, placement=, on_result=)`: `fn(item)` for every item, results in item order;
  `placement(item)` says where an item must run on a cluster (Ray resources: the timing slot of a
  device on one host), and is ignored in-process; `on_result(i, result)` is called as each
  result arrives (in order in-process; as they complete on a cluster), so a caller can journal
  them.

Ray is imported only when a cluster is asked for (`get_executor`); it comes from the ``ray``
extra.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol, Sequence, TypeVar

import numpy as np

from hwnas.errors import UserError
from hwnas.spaces.base import Arch

CLUSTER_ENV = "HWNAS_CLUSTER"
LOCAL = "local"

T = TypeVar("T")
R = TypeVar("R")


class AccuracyModel(Protocol):
    def predict(self, archs: Sequence[Arch]) -> np.ndarray:
        """Scores of `archs` (higher is better), float array [len(archs)]."""


class Executor(Protocol):
    def evaluate(self, model: AccuracyModel, archs: Sequence[Arch]) -> np.ndarray:
        """`model.predict(archs)`, run wherever this executor runs work; same order."""

    def map(self, fn: Callable[[T], R], items: Sequence[T],
            placement: Callable[[T], dict] | None = None,
            on_result: Callable[[int, R], None] | None = None) -> list[R]:
        """`[fn(item) for item in items]`, run wherever this executor runs work."""

    def reload(self, model: AccuracyModel) -> None:
        """`model` changed (e.g. trained further): copies held elsewhere are stale."""


class InProcessExecutor:
    """Evaluates in the calling process, in order (the default)."""

    def evaluate(self, model: AccuracyModel, archs: Sequence[Arch]) -> np.ndarray:
        if not archs:
            return np.zeros(0)
        return np.asarray(model.predict(list(archs)), dtype=np.float64)

    def map(self, fn: Callable[[T], R], items: Sequence[T],
            placement: Callable[[T], dict] | None = None,
            on_result: Callable[[int, R], None] | None = None) -> list[R]:
        out = []
        for i, item in enumerate(items):
            out.append(fn(item))
            if on_result is not None:
                on_result(i, out[-1])
        return out

    def reload(self, model: AccuracyModel) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"cluster": LOCAL}


def cluster_address(arg: str | None) -> str | None:
    """The cluster asked for: `arg` (``--cluster``), else ``$HWNAS_CLUSTER``; None for in-process
    (unset, empty or ``local``). ``auto`` joins the Ray cluster this machine is part of (`ray
    start` ran here), ``ray://HOST:PORT`` a remote one through Ray Client, ``HOST:PORT`` a head's
    GCS address."""
    text = arg if arg is not None else os.environ.get(CLUSTER_ENV, "")
    text = text.strip()
    if not text or text == LOCAL:
        return None
    if text != "auto" and not text.startswith("ray://") and ":" not in text:
        raise UserError(f"--cluster {text!r} is not a cluster: give local, auto, ray://HOST:PORT "
                        "or HOST:PORT (a head's address)")
    return text


def get_executor(cluster: str | None = None, actors: int | None = None) -> Executor:
    """The executor for `cluster` (see `cluster_address`): in-process without one (no Ray
    import), else a `hwnas.fleet.RayExecutor` connected to it with `actors` evaluation actors
    (default: one per CPU of the cluster)."""
    address = cluster_address(cluster)
    if address is None:
        return InProcessExecutor()
    from hwnas import fleet  # imports ray lazily, with a one-line error when it is missing

    fleet.connect(address)
    return fleet.RayExecutor(actors=actors)


__all__ = ["AccuracyModel", "CLUSTER_ENV", "Executor", "InProcessExecutor", "cluster_address",
           "get_executor"]
