"""torch backend: a torch module run eagerly or through `torch.compile`, on CPU or CUDA.

This backend runs the *torch module*, not the ONNX file: turning ONNX back into torch (e.g.
onnx2torch) would time a different program from the one the user trains and ships. So its
`compile` takes the module beside the ONNX path — ``compile(onnx_path, device, module=m)``,
reached through ``hwnas.backends.compile_model(onnx_path, device, module=m)`` — and uses the
ONNX file only as the shape contract (its static input shape and name, which `export_onnx`
wrote from the same module). Without a module it refuses with a `UserError` that says so.
Callers that build the model themselves (`hwnas compare --space S --arch A`) pass it; an ONNX
file alone (`--onnx F`) cannot be run here.

Device options: ``device`` ("cpu" | "cuda", default "cpu"), ``mode`` ("eager" | "compile",
default "eager"), ``compile_mode`` (torch.compile's mode, default "default"),
``profile_nodes`` (accepted, but this runner has no per-node profile: `node_profile` is None).
Precision: fp32 (TF32 off, so fp32 means fp32) or fp16 (weights and activations half; inputs
arrive fp32, as from an application, and are cast on the device; outputs come back fp32).

Timing: `_run` moves the input to the device, runs under `torch.inference_mode`, and on CUDA
synchronises before returning, so `measure.py`'s clock sees finished work. Threads: the device's
`threads` sets `torch.set_num_threads` (process-wide: torch has no per-model pool).
"""

from __future__ import annotations

import numpy as np

from hwnas.backends.base import Backend, Runner, TensorSpec
from hwnas.devices import Device, gpu_info
from hwnas.errors import UserError

PRECISIONS = ("fp32", "fp16")
_OPTIONS = {"device": ("cpu", "cuda"), "mode": ("eager", "compile")}


class TorchBackend(Backend):
    name = "torch"
    title = "torch"
    packages = ("torch",)
    precisions = PRECISIONS
    # profile_nodes is accepted for the common device vocabulary; this runner has no per-node
    # profiler wired in (node_profile() is None), which `--explain` reports as such
    options = {"device": "cpu or cuda", "mode": "eager or compile",
               "compile_mode": "torch.compile's mode (default 'default')",
               "profile_nodes": "accepted; this runner has no per-node profiler"}

    def _available(self, device: Device | None) -> tuple[bool, str]:
        return available(device)

    def uses_gpu(self, device: Device) -> bool:
        return device.options.get("device") == "cuda"

    def _compile(self, onnx_path, device: Device, module) -> "TorchRunner":
        """A runner for `module` on `device`; `onnx_path` gives the input name and shape."""
        if module is None:
            raise UserError(f"device {device.name} runs torch modules, not ONNX files: give the "
                            "model as --space S --arch A (or pass module= to compile_model)")
        from hwnas.export import load_onnx, onnx_input_shape

        model = load_onnx(onnx_path)
        return TorchRunner(module, model.graph.input[0].name, onnx_input_shape(model), device)


def _options(device: Device) -> tuple[str, str, str]:
    o = device.options
    TorchBackend().check_device(device)
    for k, allowed in _OPTIONS.items():
        if o.get(k, allowed[0]) not in allowed:
            raise UserError(f"device {device.name}: {k} {o.get(k)!r} is not one of "
                            f"{', '.join(allowed)}")
    return o.get("device", "cpu"), o.get("mode", "eager"), o.get("compile_mode", "default")


def available(device: Device | None = None) -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if device is None:
        return True, ""
    try:
        where, mode, _ = _options(device)
    except UserError as e:
        return False, str(e)
    if where == "cuda" and not torch.cuda.is_available():
        why = ("no NVIDIA GPU found" if not gpu_info() else
               f"torch {torch.__version__} has no CUDA support (install a CUDA build of torch)")
        return False, why
    if where == "cpu" and device.precision == "fp16":
        return False, "fp16 on CPU is not a deployment target here; use fp32 or a CUDA device"
    if mode == "compile":
        import shutil

        if where == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
            return False, "torch.compile on CPU needs a C++ compiler (g++), none on PATH"
    return True, ""


class TorchRunner(Runner):
    def __init__(self, module, input_name: str, input_shape: tuple[int, ...], device: Device):
        import torch

        where, mode, compile_mode = _options(device)
        self._dev = torch.device(where)
        self._dtype = torch.float16 if device.precision == "fp16" else torch.float32
        if where == "cuda":
            # fp32 means fp32: TF32 convs/matmuls would change both speed and results
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        torch.set_num_threads(device.threads)
        self.module = module.eval().to(self._dev, self._dtype)
        self._fn = (torch.compile(self.module, mode=compile_mode) if mode == "compile"
                    else self.module)
        self._name = input_name
        self.inputs = [TensorSpec(input_name, tuple(input_shape), np.dtype(np.float32))]

    def _run(self, feed):
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(feed[self._name]).to(self._dev).to(self._dtype)
            out = self._fn(x)
            if self._dev.type == "cuda":
                torch.cuda.synchronize(self._dev)
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [o.float().cpu().numpy() for o in outs]

    def close(self):
        self.module = self._fn = None
