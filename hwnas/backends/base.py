"""The Backend / Runner shapes every backend follows (after Polygraphy).

A `Backend` owns everything hwnas knows about one runtime: its package (and version), the
precisions and device options it accepts (unknown options are refused the same way for every
backend), whether a device of it runs on a GPU, the compiler facts a latency depends on (its
fingerprint), and `compile(onnx_path, device, module=None) -> Runner` (`module` for backends that
run the torch module itself). It imports its heavy package only inside its methods, so a missing
backend is a clear `UserError`, not an ImportError at import time. Backends never time
themselves: `measure.py` times runners. Nothing outside `hwnas/backends/` branches on a
backend's name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hwnas.errors import UserError

if TYPE_CHECKING:
    from hwnas.devices import Device


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

    def node_profile_by_module(self, num_layers: int) -> list[tuple[str, float]] | None:
        """`node_profile` with names that carry the exported module paths (``/blocks.3/…``),
        which ONNX-based profiles have already; a backend whose kernels lose them maps them
        back (TVM, from the call order of a space with `num_layers` choice layers)."""
        return self.node_profile()


class Backend(ABC):
    """One runtime. Subclasses set the class attributes and implement `_available` and
    `_compile`; the public methods check the device's options first."""

    name: str
    title: str  # as people write it in prose: "TensorRT", "TVM"
    packages: tuple[str, ...]  # distributions whose version a latency depends on (first found)
    precisions: tuple[str, ...]
    options: dict[str, str]  # option name → what it means: the schema of a device's [options]
    volatile_compiler_keys: tuple[str, ...] = ()  # compiler facts that do not name a host

    # ---- the device's options -----------------------------------------------------------------
    def check_device(self, device: "Device") -> None:
        """A `UserError` for an option this backend does not know or a precision it cannot run."""
        unknown = sorted(set(device.options) - set(self.options))
        if unknown:
            raise UserError(f"device {device.name}: unknown {self.title} option(s) {unknown}; "
                            f"known: {', '.join(sorted(self.options))}")
        if device.precision not in self.precisions:
            raise UserError(f"device {device.name}: precision {device.precision!r} is not one "
                            f"the {self.title} backend runs ({', '.join(self.precisions)})")

    # ---- here or not ----------------------------------------------------------------------------
    def available(self, device: "Device | None" = None) -> tuple[bool, str]:
        """(usable here, why not): the package imports and, given a device, what that device
        needs is here (a GPU, an execution provider, a tuning database)."""
        if device is not None:
            try:
                self.check_device(device)
            except UserError as e:
                return False, str(e)
        return self._available(device)

    @abstractmethod
    def _available(self, device: "Device | None") -> tuple[bool, str]:
        ...

    def compile(self, onnx_path: str | Path, device: "Device", module=None) -> Runner:
        ok, why = self.available(device)
        if not ok:
            raise UserError(f"device {device.name} cannot use {self.title} here: {why}")
        return self._compile(onnx_path, device, module)

    @abstractmethod
    def _compile(self, onnx_path: str | Path, device: "Device", module) -> Runner:
        ...

    # ---- what a latency depends on --------------------------------------------------------------
    def uses_gpu(self, device: "Device") -> bool:
        """Whether `device` runs on a GPU (its tables then belong to that GPU too)."""
        return False

    def compiler(self, device: "Device") -> dict[str, Any] | None:
        """Compiler facts beyond the package version (a TVM target, a tuning database), or
        None; recorded in the fingerprint as ``compiler`` and compared before rows are mixed."""
        return None

    def version(self, packages: dict[str, str]) -> str | None:
        """This backend's version among a fingerprint's `packages`."""
        return next((packages[p] for p in self.packages if p in packages), None)

    def host_facts(self, fp: dict[str, Any]) -> dict[str, Any]:
        """The parts of a stored fingerprint's ``compiler`` entry that name the host's build."""
        c = fp.get("compiler")
        if not c:
            return {}
        return {"compiler": {k: v for k, v in c.items() if k not in self.volatile_compiler_keys}}


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
