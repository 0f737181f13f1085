"""Backends by name. Each is a module with `available()` and `compile(onnx_path, device)`.

Modules are imported on first use, so a backend whose package is missing costs nothing until
a device asks for it, and then says plainly what to install.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from types import ModuleType

from hwnas.backends.base import Runner, TensorSpec
from hwnas.devices import Device
from hwnas.errors import UserError

BACKENDS = {"onnxruntime": "hwnas.backends.ort", "tensorrt": "hwnas.backends.trt",
            "torch": "hwnas.backends.torch_backend",
            "tvm": "hwnas.backends.tvm"}


def get_backend(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def backend_available(device: Device) -> tuple[bool, str]:
    """(usable here, why not). A backend's `available(device)` also checks what that device
    needs (a GPU, an execution provider, a tuning database); one whose `available()` takes no
    device only reports whether its package imports."""
    try:
        fn = get_backend(device.backend).available
        if inspect.signature(fn).parameters:
            return fn(device)
        return fn()
    except UserError as e:
        return False, str(e)


def compile_model(onnx_path: str | Path, device: Device, module=None) -> Runner:
    """Compile `onnx_path` for `device` with its backend; the Runner is a context manager.

    `module` (the torch module the ONNX file was exported from) is passed to backends that run
    torch modules rather than ONNX (the torch backend); the others ignore it.
    """
    backend = get_backend(device.backend)
    if "module" in inspect.signature(backend.compile).parameters:
        return backend.compile(onnx_path, device, module=module)
    return backend.compile(onnx_path, device)


__all__ = ["BACKENDS", "Runner", "TensorSpec", "get_backend", "backend_available",
           "compile_model"]
