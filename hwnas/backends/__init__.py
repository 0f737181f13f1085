"""Backends by name: `get_backend("onnxruntime")` is the `Backend` object for that runtime.

Backend modules are imported on first use, so a backend whose package is missing costs nothing
until a device asks for it, and then says plainly what to install.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from hwnas.backends.base import Backend, Runner, TensorSpec
from hwnas.errors import UserError

if TYPE_CHECKING:
    from hwnas.devices import Device

# name → (module, class): imported when first asked for
BACKENDS = {"onnxruntime": ("hwnas.backends.ort", "OrtBackend"),
            "tensorrt": ("hwnas.backends.trt", "TrtBackend"),
            "torch": ("hwnas.backends.torch_backend", "TorchBackend"),
            "tvm": ("hwnas.backends.tvm", "TvmBackend")}


@functools.lru_cache(maxsize=None)
def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)()


def backend_available(device: "Device") -> tuple[bool, str]:
    """(usable here, why not) for `device` with its backend."""
    try:
        return get_backend(device.backend).available(device)
    except UserError as e:
        return False, str(e)


def compile_model(onnx_path: str | Path, device: "Device", module=None) -> Runner:
    """Compile `onnx_path` for `device` with its backend; the Runner is a context manager.

    `module` (the torch module the ONNX file was exported from) is used by backends that run
    torch modules rather than ONNX (the torch backend); the others ignore it.
    """
    return get_backend(device.backend).compile(onnx_path, device, module)


@contextlib.contextmanager
def compiled(module, input_shape, device: "Device", onnx_path: str | Path | None = None
             ) -> Iterator[Runner]:
    """Build → export → compile, the one way: `module` is exported with `export_onnx` (to
    `onnx_path`, kept, or to a temporary file) and compiled for `device` (a backend that runs
    torch modules gets the module too). Yields the Runner; closes it afterwards."""
    from hwnas.export import export_onnx

    with contextlib.ExitStack() as stack:
        if onnx_path is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="hwnas-"))
            onnx_path = Path(tmp) / "model.onnx"
        path = export_onnx(module, input_shape, onnx_path)
        yield stack.enter_context(compile_model(path, device, module=module))


__all__ = ["BACKENDS", "Backend", "compiled", "Runner", "TensorSpec", "get_backend", "backend_available",
           "compile_model"]
