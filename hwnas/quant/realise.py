"""An assignment made real: a static QDQ model from onnxruntime's quantiser.

`mixed_device(device, parts)` is the device that compiles a model with some parts (ONNX
node-name prefixes) at given precisions: the int8 parts go through the device's own quantiser
(`hwnas.backends.ort_quant.quantize_file`, static QDQ, its U8S8/per-channel rules) and every
other part is kept out of it by the ``int8_exclude`` option (onnxruntime's
``nodes_to_exclude``). On a backend with per-layer float precisions (TensorRT's
``layer_precisions``) the fp16/fp32 parts are pinned there too (written to TensorRT's documented
API, never run here: no GPU). So the table's items, the validation's candidates and the
realised model are compiled by one path.

`realise` writes the deployable file: the trained model exported by `export_onnx`, quantised
with that device's rules and calibrated (MinMax) on real training images (`Target.
calibration_feeds`), never on random tensors.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from hwnas.devices import Device
from hwnas.errors import UserError
from hwnas.fileio import atomic_path
from hwnas.spaces.base import Arch


def mixed_device(device: Device, parts: Sequence[tuple[str, str]]) -> Device:
    """`device` set up to compile a model whose node-name prefixes `parts[i][0]` run at
    precision `parts[i][1]` (nodes under no prefix follow the highest precision present)."""
    from hwnas.backends import get_backend

    precs = {p for _, p in parts}
    base = "int8" if "int8" in precs else "fp16" if "fp16" in precs else "fp32"
    opts = dict(device.options)
    if base == "int8":
        opts["int8_exclude"] = [pre for pre, p in parts if p != "int8"]
    if "fp16" in precs and "layer_precisions" in get_backend(device.backend).options:
        opts["layer_precisions"] = {pre: p for pre, p in parts if p in ("fp32", "fp16")}
    return dataclasses.replace(device, precision=base, options=opts)


def assignment_device(device: Device, ps, a: Arch) -> Device:
    """The device that compiles `ps`'s candidate with assignment `a`."""
    return mixed_device(device, [(u.prefix, p) for u, p in zip(ps.units, ps.unit_precisions(a))])


def check_prefixes(onnx_path: str | Path, ps) -> dict[str, int]:
    """Nodes per unit in an exported candidate; an `AssertionError` if a unit has none (the
    prefixes in `hwnas.quant.units` no longer match what the exporter names)."""
    import onnx

    names = [n.name for n in onnx.load(str(onnx_path)).graph.node]
    counts = {u.name: sum(n.startswith(u.prefix) for n in names) for u in ps.units}
    empty = [k for k, v in counts.items() if v == 0]
    if empty:
        raise AssertionError(f"{onnx_path}: no node carries the prefix of unit(s) {empty}")
    return counts


def realise(fp32_onnx: str | Path, out: str | Path, device: Device, ps, a: Arch,
            feeds: list[dict[str, np.ndarray]]) -> Path:
    """Write assignment `a` of the model in `fp32_onnx` to `out` atomically: the fp32 file
    itself when no unit is int8, else the static QDQ model calibrated on `feeds` (real
    training inputs, one dict per sample)."""
    from hwnas.backends.ort_quant import FeedReader, quantize_file

    check_prefixes(fp32_onnx, ps)
    dev = assignment_device(device, ps, a)
    if not feeds:
        raise UserError("realising a quantised model needs calibration images; got none")
    with atomic_path(Path(out), ".onnx") as tmp:
        if dev.precision != "int8":
            shutil.copyfile(fp32_onnx, tmp)
        else:
            with tempfile.TemporaryDirectory(prefix="hwnas-q-") as d:
                q = quantize_file(fp32_onnx, Path(d) / "q.onnx", dev, reader=FeedReader(feeds))
                shutil.copyfile(q, tmp)
    return Path(out)


def unit_weight_precisions(q_onnx: str | Path, ps) -> list[str]:
    """Per unit, the precision its Conv/Gemm weights have in a realised model: int8 when they
    are stored quantised (a DequantizeLinear of an int8 initializer), else fp32 — the check
    that a file holds what its assignment says."""
    import onnx

    m = onnx.load(str(q_onnx))
    inits = {i.name: i.data_type for i in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    out = []
    for u in ps.units:
        kinds = set()
        for n in m.graph.node:
            if n.op_type not in ("Conv", "Gemm") or not n.name.startswith(u.prefix):
                continue
            w = n.input[1]
            dq = producer.get(w)
            if dq is not None and dq.op_type == "DequantizeLinear":
                kinds.add("int8" if inits.get(dq.input[0]) == onnx.TensorProto.INT8 else "other")
            else:
                kinds.add("fp32" if inits.get(w) == onnx.TensorProto.FLOAT else "other")
        out.append(kinds.pop() if len(kinds) == 1 else "mixed" if kinds else "none")
    return out
