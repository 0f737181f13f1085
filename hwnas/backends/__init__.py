"""Backends by name. Each is a module with `available()` and `compile(onnx_path, device)`.

Modules are imported on first use, so a backend whose package is missing costs nothing until
a device asks for it, and then says plainly what to install.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from hwnas.backends.base import Runner, TensorSpec
from hwnas.devices import Device
from hwnas.errors import UserError

BACKENDS = {"onnxruntime": "hwnas.backends.ort"}


def get_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def backend_available(device: Device) -> tuple[bool, str]:
    try:
        return get_backend(device.backend).available()
    except UserError as e:
        return False, str(e)


def compile_model(onnx_path: str | Path, device: Device) -> Runner:
    """Compile `onnx_path` for `device` with its backend; the Runner is a context manager."""
    return get_backend(device.backend).compile(onnx_path, device)


__all__ = ["BACKENDS", "Runner", "TensorSpec", "get_backend", "backend_available",
           "compile_model"]
