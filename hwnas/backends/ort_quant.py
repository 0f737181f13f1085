"""onnxruntime int8: static QDQ quantisation of an fp32 ONNX model, done at compile time.

`ort.compile` calls `quantize_file` when `device.precision == "int8"`, so every model a device
sees — an op alone while profiling, a whole candidate while validating — goes through the same
quantiser with the same rules, and the LUT prices what the device runs.

What is quantised (device options; defaults chosen from measurements on this host, see
`tools/bench_ort_int8.py`):

- ``int8_activation`` (default ``"uint8"``): activations as uint8 with int8 weights (U8S8).
  onnxruntime's x86 int8 kernels are built around U8S8 (VPMADDUBSW / VNNI take an unsigned and
  a signed operand); S8S8 QDQ models were 1.4–1.8× slower here on whole det20 candidates.
  ``"int8"`` with ``int8_symmetric_activations = true`` is what TensorRT needs.
- ``int8_per_channel`` (default true): per-output-channel weight scales, as convs with
  BatchNorm folded in need.
- ``int8_skip`` (default ``[]``): Conv nodes kept in fp32, from ``"depthwise"`` and ``"stem"``.
  Alone, depthwise and stem convs run 2–3× slower in int8 than fp32 on this AVX512-VNNI CPU
  (dense/pointwise 2–4× faster); but inside a whole model every fp32 island costs a
  DequantizeLinear/QuantizeLinear pair on a full activation, and skipping depthwise convs made
  whole det20 candidates 2–4× *slower* than quantising everything. Per-layer mixed precision
  stays available through this option.
- ``int8_exclude`` (default ``[]``): ONNX node-name prefixes (``/blocks.3/``) whose nodes stay
  in fp32, whatever their type: how a per-unit mixed-precision assignment is realised
  (`hwnas.quant.realise`), by the same quantiser with the same rules as everything else.
- ``int8_calibration_samples`` (default 4), ``int8_seed`` (default 0): the calibration reader
  feeds standard-normal inputs from a seeded generator. That sets activation ranges that are
  wrong for real images but right in kind: kernel choice and latency do not depend on the scale
  values, so this is adequate for latency tables and for comparing int8 against fp32 outputs on
  the same random input — not for accuracy figures, which need real calibration data:
  `quantize_file(..., reader=FeedReader(feeds))` calibrates on given feeds instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from hwnas.devices import Device
from hwnas.errors import UserError, first_line

# onnxruntime 1.31 loads models of IR version ≤ 13; quantize_static writes what `onnx` makes
# by default, which can be newer than the runtime accepts
MAX_IR_VERSION = 13
SKIP_CHOICES = ("depthwise", "stem")
INT8_OPTIONS = {
    "int8_activation": "uint8 (U8S8, default) or int8 activations",
    "int8_per_channel": "per-output-channel weight scales (default true)",
    "int8_skip": "Conv nodes kept in fp32: depthwise, stem",
    "int8_exclude": "ONNX node-name prefixes whose nodes stay fp32 (mixed precision)",
    "int8_calibration_samples": "seeded random calibration inputs (default 4)",
    "int8_seed": "the calibration inputs' seed (default 0)",
    "int8_symmetric_activations": "symmetric activation ranges (TensorRT needs them)",
}


def _conv_in_channels(model, node) -> int | None:
    """Input channels of a Conv from its weight initializer [out, in/groups, k, k]."""
    inits = {i.name: i for i in model.graph.initializer}
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    if w is None or len(w.dims) != 4:
        return None
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return int(w.dims[1]) * int(group)


def skipped_nodes(model, skip: list[str], prefixes: list[str] | tuple[str, ...] = ()
                  ) -> list[str]:
    """Names of the nodes kept in fp32: the Conv nodes that `skip` (a subset of
    `SKIP_CHOICES`) names, and every node whose name starts with one of `prefixes`."""
    bad = sorted(set(skip) - set(SKIP_CHOICES))
    if bad:
        raise UserError(f"int8_skip entries {bad} are not among {list(SKIP_CHOICES)}")
    if not all(isinstance(p, str) and p for p in prefixes):
        raise UserError(f"int8_exclude must be a list of non-empty node-name prefixes, got "
                        f"{list(prefixes)!r}")
    out = [n.name for n in model.graph.node if prefixes and n.name.startswith(tuple(prefixes))]
    for node in model.graph.node:
        if node.op_type != "Conv" or (prefixes and node.name.startswith(tuple(prefixes))):
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        cin = _conv_in_channels(model, node)
        depthwise = group > 1 and cin == group
        # the image stem: ≤ 4 input channels (RGB/RGBA); no block conv is this narrow
        stem = cin is not None and cin <= 4
        if ("depthwise" in skip and depthwise) or ("stem" in skip and stem):
            out.append(node.name)
    return out


class FeedReader:
    """onnxruntime's CalibrationDataReader protocol over given feeds (input name → array):
    `get_next()` → a feed dict or None."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self._it = iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # part of the protocol in newer onnxruntime
        self._it = iter(self.feeds)


class _RandomReader(FeedReader):
    """Seeded standard-normal feeds (right for latency, not for accuracy)."""

    def __init__(self, inputs: list[tuple[str, tuple[int, ...]]], n: int, seed: int):
        rng = np.random.default_rng(seed)
        super().__init__([{name: rng.standard_normal(shape).astype(np.float32)
                           for name, shape in inputs} for _ in range(n)])


def unshare_initializers(model) -> int:
    """Give every node its own copy of each initializer that several nodes read; the number
    of copies made.

    Why: the exporter stores equal constants once (an untrained model's BN-folded zero biases
    are all one tensor), and the quantiser rewrites a tensor for *all* its readers: the bias it
    quantises for an int8 Conv reaches the fp32 Convs that share it through a
    DequantizeLinear, and onnxruntime's NCHWc transform, which needs constant weights, then
    leaves those fp32 Convs in plain NCHW. Measured on det20 @ 320 (AMD EPYC): two int8 blocks
    in an fp32 model made it 6.2 ms against 3.9 ms all fp32, with 37 of 84 Convs left
    unblocked. Only done when some nodes are kept in fp32 (uniform int8 graphs are unchanged).
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    seen: dict[str, int] = {}
    made = 0
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == 1:
                continue
            copy = numpy_helper.from_array(numpy_helper.to_array(inits[name]),
                                           f"{name}_hwnas_copy{seen[name] - 1}")
            model.graph.initializer.append(copy)
            node.input[k] = copy.name
            made += 1
    return made


def is_quantized(model) -> bool:
    """Whether an ONNX model already holds QuantizeLinear nodes (a QDQ model)."""
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def quantize_file(onnx_path: str | Path, out_path: str | Path, device: Device,
                  reader: FeedReader | None = None) -> Path:
    """Write a QDQ int8 version of `onnx_path` to `out_path`, following `device`'s options;
    calibrated on `reader`'s feeds if given (real data), else on the seeded random inputs."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    opts = device.options
    skip = list(opts.get("int8_skip", []))
    act = opts.get("int8_activation", "uint8")
    if act not in ("uint8", "int8"):
        raise UserError(f"device {device.name}: int8_activation {act!r} is not uint8 or int8")
    n = int(opts.get("int8_calibration_samples", 4))
    seed = int(opts.get("int8_seed", 0))
    out_path = Path(out_path)
    pre = out_path.with_suffix(".pre.onnx")
    # onnxruntime's symbolic shape inference saves a model that it fails on into the working
    # directory under this fixed name; remove what it leaves there (and nothing that was there)
    litter = [Path("sym_shape_infer_temp.onnx"), Path("sym_shape_infer_temp.onnx.data")]
    existed = [f.exists() for f in litter]
    try:
        # shape inference + graph optimisation first, as onnxruntime's quantisation guide asks
        quant_pre_process(str(onnx_path), str(pre), skip_optimization=False)
    except Exception as e:  # onnxruntime's optimiser raises its own non-exported types
        pre.unlink(missing_ok=True)
        for f, had in zip(litter, existed):
            if not had:
                f.unlink(missing_ok=True)
        raise UserError(f"onnxruntime (int8 pre-processing) cannot load {onnx_path}: "
                        f"{first_line(e)}") from None
    model = onnx.load(str(pre))
    inputs = []
    for i in model.graph.input:
        dims = tuple(d.dim_value for d in i.type.tensor_type.shape.dim)
        if not dims or min(dims) <= 0:
            raise UserError(f"int8 quantisation needs static input shapes; {onnx_path} input "
                            f"{i.name!r} has {dims}")
        inputs.append((i.name, dims))
    exclude = opts.get("int8_exclude", [])
    if not isinstance(exclude, (list, tuple)):
        raise UserError(f"device {device.name}: int8_exclude must be a list of node-name "
                        f"prefixes, got {exclude!r}")
    nodes_to_exclude = skipped_nodes(model, skip, list(exclude))
    if nodes_to_exclude and unshare_initializers(model):
        onnx.save(model, str(pre))
    if reader is None:
        reader = _RandomReader(inputs, n, seed)
    # the quantiser logs one root-logger warning per constant it cannot quantise per channel
    # (the FCOS head's GroupNorm scales: it falls back to per-tensor, as wanted); keep them off
    # the user's terminal
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_static(str(pre), str(out_path), reader,
                        quant_format=QuantFormat.QDQ, per_channel=bool(opts.get(
                            "int8_per_channel", True)),
                        activation_type=QuantType.QUInt8 if act == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=nodes_to_exclude,
                        extra_options={"ActivationSymmetric": bool(opts.get(
                                           "int8_symmetric_activations", False)),
                                       "WeightSymmetric": True})
    except Exception as e:  # the quantiser raises bare Exceptions/ValueErrors per op
        raise UserError(f"onnxruntime int8 quantisation cannot handle {onnx_path}: "
                        f"{first_line(e)}") from None
    finally:
        root.setLevel(level)
        pre.unlink(missing_ok=True)
    q = onnx.load(str(out_path))
    if q.ir_version > MAX_IR_VERSION:
        q.ir_version = MAX_IR_VERSION
        onnx.save(q, str(out_path))
    return out_path
