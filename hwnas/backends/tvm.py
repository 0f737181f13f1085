"""TVM backend: ONNX → Relax → (MetaSchedule-tuned) host-CPU kernels → a Relax VM runner.

Device options (all optional):
  ``tuning``           "metaschedule" (tune, via `tvm_tuning`) or "none" (TVM's default lowering)
  ``trials_per_task``  MetaSchedule trials per tunable task (default 64)
  ``database``         tuning-database folder; a relative path is taken from the latency-tables
                       folder (``latency_tables/`` or $HWNAS_TABLES; default
                       ``<device>/<host id>/tuning_db``, i.e. beside this host's tables)
  ``mcpu``             LLVM CPU name (default "host": LLVM's name for this CPU; ``-mcpu=native``
                       is not used because TVM silently falls back to a generic CPU with it)
  ``seed``             the tuner's seed (default 0)
  ``profile_nodes``    time every VM call through the VM's instrument hook, for `node_profile`
                       (Python timing around each call: for attribution, not for latency)

Both tuned and untuned devices lower through the same passes (legalise, fold, fuse), so their
kernels are the same fused tasks; the tuned device then applies the database's schedules, and the
build pipeline is the default one minus its legalise/fuse stage, which would fuse the scheduled
kernels again into new, unscheduled ones.
"""

from __future__ import annotations

import os
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from hwnas.backends.base import Backend, Runner, TensorSpec
from hwnas.devices import Device, repo_dir
from hwnas.errors import UserError

TUNINGS = ("metaschedule", "none")
DEFAULT_TRIALS = 64
# the tvm-ffi releases whose JSON serialisation of tuning records segfaults (tested here)
_BAD_FFI = ("0.1.15",)
_ALIGN = 64  # bytes: TVM's allocation alignment; inputs so aligned are passed without a copy


OPTIONS = {
    "tuning": "metaschedule (tune) or none (TVM's default lowering)",
    "trials_per_task": f"MetaSchedule trials per tunable task (default {DEFAULT_TRIALS})",
    "database": "tuning-database folder (default <tables>/<device>/<host>/tuning_db)",
    "mcpu": "LLVM CPU name (default host: LLVM's name for this CPU)",
    "seed": "the tuner's seed (default 0)",
    "profile_nodes": "time every VM call, for --explain",
}


class TvmBackend(Backend):
    name = "tvm"
    title = "TVM"
    packages = ("apache-tvm",)
    precisions = ("fp32",)
    options = OPTIONS
    # the database's id changes as it is filled; the host's build is the target and versions
    volatile_compiler_keys = ("tuning_database_id",)

    def _available(self, device: Device | None) -> tuple[bool, str]:
        return available(device)

    def _compile(self, onnx_path, device: Device, module) -> "TvmRunner":
        return TvmRunner(onnx_path, device)

    def compiler(self, device: Device, volatile: bool = True) -> dict[str, Any]:
        return fingerprint(device, volatile)


def available(device: Device | None = None) -> tuple[bool, str]:
    """Whether TVM (and, for a tuned device, MetaSchedule's needs and a usable tuning database)
    is here."""
    try:
        tvm_version = metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        return False, "apache-tvm is not installed (pip install -e .[tvm])"
    try:
        ffi = metadata.version("apache-tvm-ffi")
    except metadata.PackageNotFoundError:
        ffi = ""
    tuned = device is None or device.options.get("tuning", "metaschedule") == "metaschedule"
    if not tuned:
        return True, ""
    if ffi.startswith(_BAD_FFI):
        return False, (f"apache-tvm-ffi {ffi} crashes MetaSchedule when it saves tuning records; "
                       "pip install 'apache-tvm-ffi==0.1.14.post0'")
    missing = [m for m in ("xgboost", "cloudpickle", "psutil") if find_spec(m) is None]
    if missing:
        return False, (f"apache-tvm {tvm_version} is here but MetaSchedule needs "
                       f"{', '.join(missing)} (pip install -e .[tvm])")
    if device is not None:
        from hwnas.backends import tvm_tuning

        try:  # a database for another target or TVM is refused when compiling: say so here
            tvm_tuning.check_database(database_path(device), target_dict(device))
        except UserError as e:
            return False, str(e)
    return True, ""


def _options(device: Device) -> dict[str, Any]:
    o = dict(device.options)
    tuning = o.get("tuning", "metaschedule")
    if tuning not in TUNINGS:
        raise UserError(f"device {device.name}: tuning {tuning!r} is not one of "
                        f"{', '.join(TUNINGS)}")
    trials = o.get("trials_per_task", DEFAULT_TRIALS)
    if not isinstance(trials, int) or trials <= 0:
        raise UserError(f"device {device.name}: trials_per_task must be a positive integer, "
                        f"got {trials!r}")
    TvmBackend().check_device(device)
    return {"tuning": tuning, "trials_per_task": trials, "database": o.get("database"),
            "mcpu": o.get("mcpu", "host"), "seed": int(o.get("seed", 0))}


def host_cpu() -> str:
    """LLVM's name for this CPU (what ``-mcpu=native`` should have meant)."""
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


def target_dict(device: Device) -> dict[str, Any]:
    o = _options(device)
    mcpu = host_cpu() if o["mcpu"] == "host" else o["mcpu"]
    return {"kind": "llvm", "mcpu": mcpu, "num-cores": device.threads}


def database_path(device: Device) -> Path:
    """The tuning database: a device option, or beside this host's tables (kernels tuned on one
    CPU are not the best for another)."""
    from hwnas.hosts import host_id

    db = _options(device)["database"]
    if db is None:
        db = f"{device.name}/{host_id(device.fingerprint(volatile=False))}/tuning_db"
    db = Path(db)
    return db if db.is_absolute() else repo_dir("latency_tables", "HWNAS_TABLES") / db


def fingerprint(device: Device, volatile: bool = True) -> dict[str, Any]:
    """What a TVM latency depends on beyond the host: the LLVM target (with the CPU name LLVM
    sees), TVM's versions and, for a tuned device, the budget and the database's identity, so a
    table measured with other kernels never passes for this one."""
    ok, why = available()
    if not ok:
        return {"unavailable": why}
    from hwnas.backends import tvm_tuning

    o = _options(device)
    out: dict[str, Any] = {"target": target_dict(device), **tvm_tuning.versions(),
                           "tuning": o["tuning"]}
    if o["tuning"] == "metaschedule":
        out["trials_per_task"] = o["trials_per_task"]
        if not volatile:
            return out
        meta = database_path(device) / "meta.json"
        try:
            import json

            out["tuning_database_id"] = json.loads(meta.read_text())["id"]
        except (OSError, ValueError, KeyError):
            out["tuning_database_id"] = None  # none yet: the first compile creates it
    return out


def _set_threads(n: int) -> None:
    """TVM's thread pool reads TVM_NUM_THREADS when first used (and MetaSchedule's runner
    process inherits it); an existing pool is reconfigured."""
    import tvm

    os.environ["TVM_NUM_THREADS"] = str(n)
    tvm.get_global_func("runtime.config_threadpool")(0, n)


def import_onnx(onnx_path: str | Path, device: Device):
    """ONNX file → Relax IRModule with weights bound; an op TVM lacks is a `UserError`."""
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    from hwnas.export import load_onnx

    model = load_onnx(onnx_path)
    try:
        return from_onnx(model, keep_params_in_input=False)
    except tvm.error.OpNotImplemented as e:
        msg = str(e).strip().splitlines()[-1]
        raise UserError(f"TVM {tvm.__version__} (backend tvm, device {device.name}) cannot "
                        f"import {onnx_path}: {msg}; export without it or use an onnxruntime "
                        "device") from None
    except (NotImplementedError, ValueError, TypeError, tvm.error.InternalError) as e:
        # TVM 0.27 has no tvm.error.TVMError: its FFI raises Python's own exception types
        # (a type-inference failure in the frontend is a TypeError) or an InternalError
        msg = str(e).strip().splitlines()[-1][:300]
        raise UserError(f"TVM {tvm.__version__} (backend tvm, device {device.name}) cannot "
                        f"import {onnx_path}: {msg}") from None


def lower(mod, target):
    """Legalise, fold and fuse: the fused module whose kernels are the tuning tasks."""
    import tvm
    from tvm import relax

    with target:
        return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                         relax.transform.CanonicalizeBindings(),
                                         relax.get_pipeline("zero")])(mod)


def _build_pipeline(target):
    """The default CPU pipeline without its legalise/fuse stage (done already in `lower`)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    passes = cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target)

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def build(onnx_path: str | Path, device: Device, progress: bool = True):
    """Import, lower, tune what the database lacks, apply it, build. Returns (executable,
    `TuningReport` or None for an untuned device)."""
    import tvm
    from tvm import relax

    from hwnas.backends import tvm_tuning

    o = _options(device)
    target = tvm.target.Target(target_dict(device))
    _set_threads(device.threads)
    mod = lower(import_onnx(onnx_path, device), target)
    report = None
    if o["tuning"] == "metaschedule":
        db = tvm_tuning.TuningDatabase(database_path(device), target_dict(device))
        report = tvm_tuning.tune(mod, target, db, o["trials_per_task"], seed=o["seed"],
                                 progress=progress)
        with target, db.ms_database():
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    ex = tvm.compile(mod, target=target, relax_pipeline=_build_pipeline(target))
    return ex, report


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    off = (-raw.ctypes.data) % _ALIGN
    return raw[off:off + nbytes].view(dtype).reshape(shape)


class TvmRunner(Runner):
    """A Relax VM over the compiled model. Inputs that are C-contiguous and 64-byte aligned
    (as `random_feed` makes them) are handed to the kernels without a copy, like onnxruntime
    does with numpy inputs; others are copied into a preallocated tensor. Outputs are numpy
    views of the VM's output tensors."""

    def __init__(self, onnx_path: str | Path, device: Device, progress: bool = True):
        from hwnas.export import load_onnx

        executable, self.tuning = build(onnx_path, device, progress)
        graph = load_onnx(onnx_path).graph
        init = {i.name for i in graph.initializer}
        inputs = []
        for i in graph.input:
            if i.name in init:
                continue
            shape = tuple(d.dim_value for d in i.type.tensor_type.shape.dim)
            dtype = np.dtype(onnx_dtype(i.type.tensor_type.elem_type))
            inputs.append(TensorSpec(i.name, shape, dtype))
        self._open(executable, inputs, device)

    @classmethod
    def load(cls, library: str | Path, inputs: list[TensorSpec], device: Device) -> "TvmRunner":
        """A runner over a library that `build`'s executable wrote with ``export_library``
        (`tvm.runtime.load_module`); `inputs` are its inputs in order (the library does not
        record names). Nothing is compiled."""
        import tvm

        self = cls.__new__(cls)
        self.tuning = None
        self._open(tvm.runtime.load_module(str(library)), list(inputs), device)
        return self

    def _open(self, executable, inputs: list[TensorSpec], device: Device) -> None:
        import tvm
        from tvm import relax

        _set_threads(device.threads)
        self.executable = executable
        self._dev = tvm.cpu()
        self.vm = relax.VirtualMachine(self.executable, self._dev)
        self._main = self.vm["main"]
        self.inputs = inputs
        self._staging = [tvm.runtime.empty(s.shape, str(s.dtype), self._dev) for s in self.inputs]
        self._events: list[tuple[str, float]] | None = None
        if device.options.get("profile_nodes"):
            self._events, self._call, self._t0 = [], 0, 0.0
            self.vm.set_instrument(self._instrument)

    def _instrument(self, func, symbol, before_run, ret_value, *args) -> int:
        """Called by the VM before and after every call instruction (kernels and builtins);
        records ``("<call index in the run>:<symbol>", ms)``."""
        import time

        if before_run:
            self._t0 = time.perf_counter()
        else:
            self._events.append((f"{self._call:04d}:{symbol}",
                                 (time.perf_counter() - self._t0) * 1e3))
            self._call += 1
        return 0  # VMInstrumentReturnKind.NO_OP: carry on

    def node_profile(self):
        """(``"<call index>:<kernel symbol>"``, ms) for every VM call of every run so far, in
        call order. The kernels are TVM's fused functions, so fusion is what TVM did, not what
        the ONNX graph says; `tvm_layers` maps them back to layers."""
        return None if self._events is None else list(self._events)

    def node_profile_by_module(self, num_layers: int):
        events = self.node_profile()
        return None if events is None else tvm_layers(events, num_layers)

    def random_feed(self, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        feed = super().random_feed(rng)
        out = {}
        for name, arr in feed.items():
            a = _aligned_empty(arr.shape, arr.dtype)
            a[...] = arr
            out[name] = a
        return out

    def _tensor(self, i: int, arr: np.ndarray):
        import tvm

        if (arr.flags.c_contiguous and arr.ctypes.data % _ALIGN == 0
                and arr.dtype == self.inputs[i].dtype):
            return tvm.runtime.from_dlpack(arr)
        self._staging[i].copyfrom(np.ascontiguousarray(arr, dtype=self.inputs[i].dtype))
        return self._staging[i]

    def _run(self, feed):
        if self._events is not None:
            self._call = 0
        out = self._main(*[self._tensor(i, feed[s.name]) for i, s in enumerate(self.inputs)])
        # zero-copy views: each holds a reference to the VM's output tensor, which the VM
        # allocates per call (`.numpy()` would copy into fresh, page-faulting memory every run)
        outs = [out] if hasattr(out, "numpy") else list(out)
        return [np.from_dlpack(o) for o in outs]

    def close(self):
        self._main = self.vm = self.executable = None
        self._staging = []


def onnx_dtype(elem_type: int):
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem_type)


def tvm_layers(events: list[tuple[str, float]], num_layers: int,
               ) -> list[tuple[str, float]]:
    """Rename TVM's per-call events (``"<call>:<symbol>"``, see `TvmRunner.node_profile`) to the
    module paths an ONNX profile carries (``/stem/…``, ``/blocks.<i>/…``, ``/head/…``).

    TVM's fused kernels keep no ONNX node names, so layers are read from the call order: the
    stem ends with its max-pool, every ShuffleNetV2/Xception choice block ends with the channel
    concatenation (alone or fused with the next block's split), and the head follows the last
    block. VM builtins (allocation, shape checks) stay unattributed glue. Raises `UserError` if
    the kernel sequence does not have that structure."""
    calls = sorted({name for name, _ in events}, key=lambda n: int(n.split(":", 1)[0]))
    where: dict[str, str] = {}
    part, blocks = "stem", 0
    for name in calls:
        symbol = name.split(":", 1)[1]
        if symbol.startswith("vm.builtin."):
            where[name] = name  # no module path: glue
            continue
        where[name] = f"/{part}/{symbol}"
        if part == "stem" and "max_pool" in symbol:
            part = "blocks.0"
        elif part.startswith("blocks.") and "concatenate" in symbol:
            blocks += 1
            part = f"blocks.{blocks}" if blocks < num_layers else "head"
    if part != "head":
        raise UserError(f"cannot map TVM's kernels to layers: found the stem's max-pool and "
                        f"{blocks} block-ending concatenations, expected {num_layers}; "
                        "--explain on TVM supports the ShuffleNetV2 spaces only")
    return [(where[name], ms) for name, ms in events]
