"""TensorRT backend: ONNX → engine (cached by content hash) → a CUDA-synchronised runner.

Written against the documented TensorRT Python API (10.x and 11.x); TensorRT comes only from
NVIDIA's package index, so wherever it is missing `available()` says so and `compile` refuses
with that reason. The pure-Python parts — option parsing, the precision plan, cache keys and
cache validation — need neither TensorRT nor a GPU and are tested everywhere.

Precision (`device.precision`), by TensorRT version:

- **TensorRT 10 (weak typing)**: the network is parsed as fp32 and builder flags allow
  lower-precision kernels (``BuilderFlag.FP16``; ``INT8`` with the Q/DQ nodes that
  `hwnas.backends.ort_quant` inserts, i.e. explicit quantisation). Per-layer precision:
  ``layer_precisions`` pins layers (by ONNX node-name prefix) to fp32/fp16 with
  ``OBEY_PRECISION_CONSTRAINTS``.
- **TensorRT 11 (strong typing only)**: the flags and precision constraints are gone; precision
  comes from the graph. fp16: the ONNX model is converted to fp16 first (onnxruntime's
  ``convert_float_to_float16``, fp32 I/O kept; ``layer_precisions`` entries set to fp32 are
  its node block list); int8: the Q/DQ model.
  ``typing = "strong"`` also selects this path on TensorRT 10 (``STRONGLY_TYPED`` network).

Device options: ``typing`` (auto|weak|strong; auto = weak on 10, strong on ≥ 11),
``workspace_mib`` (default 1024), ``layer_precisions`` ({node-name prefix: fp32|fp16}),
``engine_cache`` (folder; default ``$HWNAS_TRT_CACHE`` or ``~/.cache/hwnas/trt``),
``profile_nodes`` (attach an `IProfiler`: per-layer times for `node_profile`, from an engine
built with detailed profiling verbosity; do not time with it on), and the int8 quantiser's
options (TensorRT wants symmetric int8 activations: ``int8_activation = "int8"``,
``int8_symmetric_activations = true``).

Engines are cached under a key hashed from the ONNX bytes, the TensorRT version, the GPU name
and compute capability, the precision and every build option (`cache_key`). Beside each engine
the cache keeps its metadata and the engine inspector's JSON (the layers and tactics that were
chosen): `Runner.inspector_path`. An entry whose metadata names another TensorRT version or GPU
is rebuilt, never reused (`EngineCache.load`).

Timing: `_run` copies inputs to the GPU, enqueues the engine on its own CUDA stream, copies
outputs back and synchronises the stream, so `measure.py`'s clock sees the finished inference
including transfers (as an application would). CUDA memory comes from torch (already a
dependency), so no second CUDA binding is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hwnas.backends.base import Backend, Runner, TensorSpec
from hwnas.backends.ort_quant import INT8_OPTIONS
from hwnas.devices import Device, gpu_info
from hwnas.errors import UserError

PRECISIONS = ("fp32", "fp16", "int8")
_OPTIONS = {
    "typing": "auto, weak (builder flags, TensorRT 10) or strong (typed graph, TensorRT 11)",
    "workspace_mib": "builder workspace (default 1024)",
    "layer_precisions": "ONNX node-name prefix → fp32|fp16",
    "engine_cache": "engine cache folder (default ~/.cache/hwnas/trt or $HWNAS_TRT_CACHE)",
    "profile_nodes": "per-layer times through IProfiler",
    **INT8_OPTIONS,
}


@dataclass(frozen=True)
class TrtOptions:
    precision: str = "fp32"
    typing: str = "auto"
    workspace_mib: int = 1024
    layer_precisions: dict[str, str] = field(default_factory=dict)
    engine_cache: str = ""
    profile_nodes: bool = False
    quantizer: dict = field(default_factory=dict)  # the int8_* options: they shape the Q/DQ graph


def parse_options(device: Device) -> TrtOptions:
    """The device's TensorRT options, checked; a `UserError` naming the bad one."""
    o = dict(device.options)
    TrtBackend().check_device(device)
    typing = o.get("typing", "auto")
    if typing not in ("auto", "weak", "strong"):
        raise UserError(f"device {device.name}: typing {typing!r} is not auto, weak or strong")
    ws = o.get("workspace_mib", 1024)
    if not isinstance(ws, int) or ws <= 0:
        raise UserError(f"device {device.name}: workspace_mib must be a positive integer")
    lp = o.get("layer_precisions", {})
    if not isinstance(lp, dict) or not all(v in ("fp32", "fp16") for v in lp.values()):
        raise UserError(f"device {device.name}: layer_precisions maps ONNX node-name prefixes "
                        "to 'fp32' or 'fp16'")
    cache = o.get("engine_cache") or os.environ.get("HWNAS_TRT_CACHE") or str(
        Path.home() / ".cache" / "hwnas" / "trt")
    return TrtOptions(device.precision, typing, ws, dict(lp), str(cache),
                      bool(o.get("profile_nodes", False)),
                      {k: v for k, v in o.items() if k.startswith("int8_")})


@dataclass(frozen=True)
class PrecisionPlan:
    """How a precision is reached with a given TensorRT: network typing, builder flags, and the
    ONNX rewrite done before parsing (None, 'fp16' conversion, or 'qdq' quantisation)."""

    typing: str  # "weak" | "strong"
    flags: tuple[str, ...]
    onnx_rewrite: str | None
    per_layer: bool  # layer_precisions applied as layer constraints (weak typing only)


def precision_plan(opts: TrtOptions, trt_major: int) -> PrecisionPlan:
    typing = opts.typing
    if typing == "auto":
        typing = "weak" if trt_major < 11 else "strong"
    if typing == "weak" and trt_major >= 11:
        raise UserError(f"TensorRT {trt_major} has no weak typing (BuilderFlag.FP16/INT8 were "
                        "removed); use typing = 'strong' or 'auto'")
    rewrite = {"fp32": None, "fp16": "fp16", "int8": "qdq"}[opts.precision]
    if typing == "weak":
        flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[opts.precision]
        if opts.layer_precisions:
            flags += ("OBEY_PRECISION_CONSTRAINTS",)
        # weak fp16 lets the builder choose per layer from the fp32 graph
        return PrecisionPlan("weak", flags, None if rewrite == "fp16" else rewrite,
                             bool(opts.layer_precisions))
    return PrecisionPlan("strong", (), rewrite, False)


def cache_key(onnx_bytes: bytes, trt_version: str, gpu_name: str, opts: TrtOptions,
              plan: PrecisionPlan) -> str:
    """sha256 over everything an engine depends on; any change gives another key."""
    h = hashlib.sha256()
    h.update(hashlib.sha256(onnx_bytes).digest())
    desc = {"trt": trt_version, "gpu": gpu_name, "precision": opts.precision,
            "workspace_mib": opts.workspace_mib, "layer_precisions": opts.layer_precisions,
            "plan": asdict(plan), "profiling_verbosity": "detailed",
            "quantizer": opts.quantizer if opts.precision == "int8" else {}}
    h.update(json.dumps(desc, sort_keys=True).encode())
    return h.hexdigest()[:32]


class EngineCache:
    """``<root>/<key>.engine`` + ``<key>.json`` (metadata) + ``<key>.layers.json`` (inspector).

    Writes are atomic (temp file + rename), engine last-but-one and metadata last, so an entry
    is complete once its metadata exists.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def paths(self, key: str) -> tuple[Path, Path, Path]:
        return (self.root / f"{key}.engine", self.root / f"{key}.json",
                self.root / f"{key}.layers.json")

    def load(self, key: str, expect: dict) -> tuple[bytes | None, str]:
        """(engine bytes, "") for a valid entry; (None, why) when it must be (re)built."""
        engine, meta, _ = self.paths(key)
        if not meta.is_file() or not engine.is_file():
            return None, "not cached"
        try:
            stored = json.loads(meta.read_text())
        except ValueError:
            return None, f"metadata {meta} is unreadable"
        for k in ("trt_version", "gpu_name", "precision"):
            if stored.get(k) != expect.get(k):
                return None, f"cached engine is for {k} {stored.get(k)!r}, here {expect.get(k)!r}"
        data = engine.read_bytes()
        if hashlib.sha256(data).hexdigest() != stored.get("engine_sha256"):
            return None, f"engine file {engine} does not match its recorded hash"
        return data, ""

    def store(self, key: str, data: bytes, meta: dict, inspector_json: str) -> None:
        from hwnas.fileio import atomic_write_bytes, atomic_write_text

        engine, meta_path, layers = self.paths(key)
        atomic_write_bytes(engine, data)
        atomic_write_text(layers, inspector_json)
        atomic_write_text(meta_path, json.dumps(
            {**meta, "engine_sha256": hashlib.sha256(data).hexdigest()}, indent=1) + "\n")


# ---- what needs TensorRT (and a GPU) -------------------------------------------------------------

def available(device: Device | None = None) -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, ("tensorrt is not installed (it comes from NVIDIA's index: pip install "
                       "--extra-index-url https://pypi.nvidia.com tensorrt)")
    if not gpu_info():
        return False, "no NVIDIA GPU found (nvidia-smi lists none)"
    try:
        import torch
        if not torch.cuda.is_available():
            return False, "torch has no CUDA here (the runner's GPU buffers come from torch)"
    except ImportError:
        return False, "torch is not installed"
    if device is not None:
        try:
            precision_plan(parse_options(device), int(tensorrt.__version__.split(".")[0]))
        except UserError as e:
            return False, str(e)
    return True, ""


def _rewrite_onnx(onnx_path: Path, plan: PrecisionPlan, opts: TrtOptions, device: Device,
                  tmp: Path) -> Path:
    if plan.onnx_rewrite == "qdq":
        from hwnas.backends.ort_quant import quantize_file

        return quantize_file(onnx_path, tmp / "qdq.onnx", device)
    if plan.onnx_rewrite == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(onnx_path))
        keep = [n.name for n in model.graph.node
                if any(n.name.startswith(p) for p, v in opts.layer_precisions.items()
                       if v == "fp32")]
        model = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
        out = tmp / "fp16.onnx"
        onnx.save(model, str(out))
        return out
    return onnx_path


def _parse_errors(parser) -> str:
    msgs = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        op = e.node_operator() if hasattr(e, "node_operator") else ""
        node = e.node_name() if hasattr(e, "node_name") else ""
        where = f"op {op} (node {node!r})" if op else f"node {e.node()}"
        msgs.append(f"{where}: {e.desc()}")
    return "; ".join(msgs)[:400] or "no parser detail"


def build_engine(onnx_path: Path, device: Device, opts: TrtOptions, plan: PrecisionPlan):
    """(serialized engine bytes, inspector JSON). Raises `UserError` naming the failing op."""
    import tempfile

    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.typing == "strong":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory(prefix="hwnas-trt-") as tmp:
        src = _rewrite_onnx(Path(onnx_path), plan, opts, device, Path(tmp))
        if not parser.parse(Path(src).read_bytes()):
            raise UserError(f"TensorRT cannot parse {onnx_path}: {_parse_errors(parser)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    # detailed: the inspector shows tactics and the profiler reports real layer names
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for f in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    if opts.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default and has fp16's 10-bit mantissa: fp32 must mean fp32
        config.clear_flag(trt.BuilderFlag.TF32)
    if plan.per_layer:
        dtypes = {"fp32": trt.float32, "fp16": trt.float16}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            for prefix, prec in opts.layer_precisions.items():
                if layer.name.startswith(prefix):
                    layer.precision = dtypes[prec]
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine for {onnx_path} at "
                        f"{opts.precision} (see the TensorRT log above)")
    data = bytes(serialized)
    engine = trt.Runtime(logger).deserialize_cuda_engine(data)
    inspector = engine.create_engine_inspector()
    info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    return data, info


class _LayerTimes:
    """An `IProfiler` collecting (layer name, ms) for every layer of every run."""

    def __new__(cls):
        import tensorrt as trt

        class Profiler(trt.IProfiler):
            def __init__(self):
                trt.IProfiler.__init__(self)
                self.times: list[tuple[str, float]] = []

            def report_layer_time(self, layer_name, ms):
                self.times.append((layer_name, float(ms)))

        return Profiler()


class TrtRunner(Runner):
    def __init__(self, data: bytes, opts: TrtOptions, inspector_path: Path):
        import tensorrt as trt
        import torch

        self.inspector_path = inspector_path
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(data)
        self.context = self.engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        self._in, self._out, self.inputs = {}, {}, []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            tdtype = torch.from_numpy(np.empty(0, dtype)).dtype
            buf = torch.empty(shape, dtype=tdtype, device="cuda")
            self.context.set_tensor_address(name, buf.data_ptr())
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._in[name] = buf
                self.inputs.append(TensorSpec(name, shape, dtype))
            else:  # pinned host copies so the device→host copy is asynchronous
                self._out[name] = (buf, torch.empty(shape, dtype=tdtype).pin_memory())
        self.output_names = list(self._out)  # engine I/O order, which `_run` returns
        self._profiler = None
        if opts.profile_nodes:
            self._profiler = _LayerTimes()
            self.context.profiler = self._profiler

    def _run(self, feed):
        import torch

        with torch.cuda.stream(self._stream):
            for name, buf in self._in.items():
                buf.copy_(torch.from_numpy(feed[name]), non_blocking=True)
            self.context.execute_async_v3(self._stream.cuda_stream)
            for buf, host in self._out.values():
                host.copy_(buf, non_blocking=True)
        self._stream.synchronize()  # the clock must see the finished inference
        return [host.numpy().copy() for _, host in self._out.values()]

    def node_profile(self):
        return None if self._profiler is None else list(self._profiler.times)

    def close(self):
        self.context = self.engine = None


class TrtBackend(Backend):
    name = "tensorrt"
    title = "TensorRT"
    packages = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13")
    precisions = PRECISIONS
    options = _OPTIONS

    def _available(self, device: Device | None) -> tuple[bool, str]:
        return available(device)

    def uses_gpu(self, device: Device) -> bool:
        return True

    def _compile(self, onnx_path, device: Device, module) -> "TrtRunner":
        return compile_engine(onnx_path, device)


def cached_engine(onnx_path: str | Path, device: Device) -> tuple[bytes, TrtOptions, Path, dict]:
    """The serialized engine of `onnx_path` for `device`, from the cache or built (and then
    cached): (engine bytes, the device's options, the inspector JSON's path, the metadata the
    cache keeps beside it: TensorRT version, GPU, precision, plan)."""
    import tensorrt as trt

    opts = parse_options(device)
    plan = precision_plan(opts, int(trt.__version__.split(".")[0]))
    gpu = gpu_info()[0]
    gpu_name = f"{gpu['name']} (sm {gpu.get('compute_cap', '?')})"
    key = cache_key(Path(onnx_path).read_bytes(), trt.__version__, gpu_name, opts, plan)
    cache = EngineCache(opts.engine_cache)
    meta = {"trt_version": trt.__version__, "gpu_name": gpu_name, "precision": opts.precision,
            "plan": asdict(plan), "onnx": str(onnx_path)}
    data, why = cache.load(key, meta)
    if data is None:
        if why != "not cached":
            print(f"note: rebuilding TensorRT engine {key}: {why}", file=sys.stderr)
        data, info = build_engine(Path(onnx_path), device, opts, plan)
        cache.store(key, data, meta, info)
    return data, opts, cache.paths(key)[2], meta


def compile_engine(onnx_path: str | Path, device: Device) -> TrtRunner:
    """Build (or take from the cache) the engine of `onnx_path` for `device`, ready to run."""
    data, opts, inspector, _ = cached_engine(onnx_path, device)
    return TrtRunner(data, opts, inspector)
