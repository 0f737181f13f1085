"""onnxruntime backend: an `InferenceSession` per model, configured from the device.

Device options: ``graph_optimization`` (disable/basic/extended/all), ``providers`` (a list),
``profile_nodes`` (bool: keep onnxruntime's per-node trace for `Runner.node_profile`).
A device with ``precision = "int8"`` is quantised at compile time (static QDQ; its options are
described in `hwnas.backends.ort_quant`); a model that is already a QDQ model (a mixed-precision
assignment realised by `hwnas quantize`) runs as it is, never quantised twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from hwnas.backends.base import Backend, Runner, TensorSpec
from hwnas.backends.ort_quant import INT8_OPTIONS
from hwnas.devices import Device, gpu_info
from hwnas.errors import UserError, first_line

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
           "tensor(int8)": np.int8}


GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


class OrtBackend(Backend):
    name = "onnxruntime"
    title = "onnxruntime"
    packages = ("onnxruntime", "onnxruntime-gpu")
    precisions = ("fp32", "int8")
    options = {
        "graph_optimization": "disable, basic, extended or all (default all)",
        "providers": "execution providers in order (default [CPUExecutionProvider])",
        "profile_nodes": "keep onnxruntime's per-node trace for --explain",
        "memory_pattern": "false turns off onnxruntime's memory-pattern planner (default on)",
        "disabled_optimizers": "graph transformers to leave out, by name, comma-separated "
                               "(e.g. QDQPropagationTransformer; default none)",
        **INT8_OPTIONS,
    }

    def _available(self, device: Device | None) -> tuple[bool, str]:
        try:
            import onnxruntime as ort
        except ImportError:
            return False, "onnxruntime is not installed (pip install onnxruntime)"
        if device is None:
            return True, ""
        have = ort.get_available_providers()
        missing = [p for p in device.options.get("providers", ["CPUExecutionProvider"])
                   if p not in have]
        if missing:
            return False, (f"onnxruntime here lacks {', '.join(missing)} (has {', '.join(have)});"
                           " install onnxruntime-gpu on a machine with an NVIDIA GPU")
        if self.uses_gpu(device) and not gpu_info():
            return False, "no NVIDIA GPU found (nvidia-smi lists none)"
        return True, ""

    def uses_gpu(self, device: Device) -> bool:
        return bool(set(GPU_PROVIDERS) & set(device.options.get("providers", [])))

    def _compile(self, onnx_path: str | Path, device: Device, module) -> "OrtRunner":
        if device.precision == "int8" and not _already_quantized(onnx_path):
            # static QDQ quantisation at compile time (hwnas/backends/ort_quant.py); onnxruntime
            # reads the file when the session is made, so the temporary copy can go right after
            from hwnas.backends.ort_quant import quantize_file

            with tempfile.TemporaryDirectory(prefix="hwnas-int8-") as tmp:
                try:
                    qpath = quantize_file(onnx_path, Path(tmp) / "int8.onnx", device)
                except UserError:
                    # the quantiser's own message is vague ("incomplete shape inference"); when
                    # onnxruntime cannot run the fp32 model at all, its error names the op
                    OrtRunner(onnx_path, device).close()
                    raise
                return OrtRunner(qpath, device)
        return OrtRunner(onnx_path, device)


def _already_quantized(onnx_path: str | Path) -> bool:
    import onnx

    from hwnas.backends.ort_quant import is_quantized

    try:
        return is_quantized(onnx.load(str(onnx_path), load_external_data=False))
    except Exception:  # not readable as ONNX: let onnxruntime's own error name the problem
        return False


def session_options(device: Device):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = device.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # spinning threads burn the other core of a 2-core host and disturb what they measure
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    level = device.options.get("graph_optimization", "all")
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in levels:
        raise UserError(f"device {device.name}: graph_optimization {level!r} is not one of "
                        f"{', '.join(levels)}")
    so.graph_optimization_level = levels[level]
    if "memory_pattern" in device.options:
        so.enable_mem_pattern = bool(device.options["memory_pattern"])
    so.log_severity_level = 3
    return so


def disabled_optimizers(device: Device) -> list[str]:
    """The device's `disabled_optimizers` option as a list (a TOML list, or a comma-separated
    string as `--option K=V` gives it)."""
    off = device.options.get("disabled_optimizers") or []
    return [x.strip() for x in off.split(",") if x.strip()] if isinstance(off, str) else list(off)


class OrtRunner(Runner):
    def __init__(self, onnx_path: str | Path, device: Device):
        import onnxruntime as ort

        so = session_options(device)
        self._trace_dir = None
        if device.options.get("profile_nodes"):
            self._trace_dir = tempfile.mkdtemp(prefix="hwnas-ort-trace-")
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(self._trace_dir, "trace")
        # `compile` has checked the providers with `available(device)`
        providers = list(device.options.get("providers", ["CPUExecutionProvider"]))
        off = disabled_optimizers(device)
        try:
            self.session = ort.InferenceSession(str(onnx_path), so, providers=providers,
                                                **({"disabled_optimizers": off} if off else {}))
        except Exception as e:  # onnxruntime raises its own non-exported exception types
            raise UserError(f"onnxruntime cannot load {onnx_path}: {first_line(e)}") from None
        symbolic = [(i.name, i.shape) for i in self.session.get_inputs()
                    if not all(isinstance(d, int) and d > 0 for d in i.shape)]
        if symbolic:
            name, shape = symbolic[0]
            raise UserError(f"{onnx_path}: input {name!r} has symbolic or unknown dimensions "
                            f"{shape}; hwnas times fixed shapes: export the model with a fixed "
                            "input shape (as `hwnas export` does)")
        self.inputs = [TensorSpec(i.name, tuple(i.shape), np.dtype(_DTYPES.get(i.type, np.float32)))
                       for i in self.session.get_inputs()]
        self._outputs = [o.name for o in self.session.get_outputs()]

    def _run(self, feed):
        return self.session.run(self._outputs, feed)

    def node_profile(self):
        """Per-node kernel times (ms) from onnxruntime's trace of every run so far."""
        if self._trace_dir is None:
            return None
        trace = self.session.end_profiling()
        events = json.loads(Path(trace).read_text())
        return [(e["name"].removesuffix("_kernel_time"), e["dur"] / 1000.0) for e in events
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]

    def close(self):
        self.session = None
