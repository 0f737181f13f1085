"""torch → ONNX: the one function that writes ONNX (`export_onnx`), and its validation.

`hwnas export`, the profiler and the deployable export all go through `export_onnx`, so what is
measured is what is shipped.

We use torch's TorchScript exporter (``dynamo=False``) on purpose: on a det20 candidate it is
~13× faster than the dynamo exporter (0.45 s vs 6 s here), which matters when a validation run
exports a hundred models, and it writes each node's module path into its name
(``/blocks.7/branch_main/branch_main.3/Conv``), which is how a per-node profile is tied back to
the block it came from (`layer_of_node`). The dynamo exporter is the fallback where the legacy
one is gone.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from hwnas.errors import UserError
from hwnas.fileio import atomic_path
from hwnas.spaces.base import Shape

OPSET = 17
INPUT_NAME = "input"


def input_names(n: int) -> list[str]:
    """``input`` for a one-input model; ``input``, ``input1``, … for an op with several inputs
    (an `OpKey` with `extra_inputs`, such as an FPN merge)."""
    return [INPUT_NAME] + [f"{INPUT_NAME}{i}" for i in range(1, n)]


default_input_names = input_names  # for `export_onnx`, whose argument of that name shadows it


def export_onnx(module: nn.Module, input_shape: Shape | tuple[Shape, ...], path: str | Path,
                output_names: list[str] | None = None,
                input_names: list[str] | None = None,
                metadata: dict[str, str] | None = None) -> Path:
    """Write `module` (eval mode, fixed `input_shape`, or a tuple of shapes for a module of
    several inputs) to `path` atomically and check it. Inputs are named ``input``,
    ``input1``, … (`default_input_names`) unless `input_names` names them (a deployment stage
    whose inputs are another stage's outputs). `metadata` goes into the file's
    ``metadata_props``.

    The file appears only once complete and valid (`onnx.checker`); an existing file at `path`
    is replaced only then.
    """
    path = Path(path)
    module = module.eval()
    shapes = (tuple(input_shape) if isinstance(input_shape[0], (tuple, list))
              else (tuple(input_shape),))
    xs = tuple(torch.zeros(s) for s in shapes)
    with atomic_path(path, ".onnx") as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            kwargs = dict(input_names=input_names or default_input_names(len(xs)),
                          output_names=output_names,
                          opset_version=OPSET, do_constant_folding=True)
            try:
                torch.onnx.export(module, xs, str(tmp), dynamo=False, **kwargs)
            except TypeError:  # a torch without the legacy path
                torch.onnx.export(module, xs, str(tmp), **kwargs)
        if metadata:
            model = onnx.load(str(tmp))
            for k, v in metadata.items():
                model.metadata_props.add(key=k, value=str(v))
            onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
    return path


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read and check an ONNX file; a `UserError` that names the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ONNX file {str(path)!r} does not exist; export one with "
                        "`hwnas export --space S --arch A -o F.onnx`")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # protobuf decode errors have no common base class
        raise UserError(f"{str(path)!r} is not a readable ONNX model ({type(e).__name__}); "
                        "re-export it with `hwnas export`") from None
    return model


def onnx_input_shape(model: onnx.ModelProto) -> Shape:
    """The static shape of the model's first graph input."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value for d in dims)
    if not shape or min(shape) <= 0:
        raise UserError(f"ONNX input {model.graph.input[0].name!r} has a dynamic shape {shape}; "
                        "hwnas measures static shapes, re-export with a fixed input")
    return shape


@dataclass(frozen=True)
class ExportCheck:
    max_abs_err: float
    rel_err: float  # max |ort - torch| / max |torch|
    ok: bool


def check_export(module: nn.Module, path: str | Path, input_shape: Shape,
                 tol: float = 1e-4, seed: int = 0) -> ExportCheck:
    """Run the ONNX file in onnxruntime (fp32 CPU) and torch on one random input; compare.

    The tolerance is relative to the output's scale (max |torch output|), so it means the same
    for logits of any magnitude.
    """
    import onnxruntime as ort

    x = np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)
    with torch.no_grad():
        ref = module.eval()(torch.from_numpy(x))
    refs = [t.numpy() for t in (ref if isinstance(ref, (list, tuple)) else [ref])]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    max_abs = max(float(np.abs(o - r).max()) for o, r in zip(outs, refs))
    scale = max(float(np.abs(r).max()) for r in refs) or 1.0
    return ExportCheck(max_abs, max_abs / scale, max_abs / scale <= tol)


_LAYER = re.compile(r"^/(stem|head|blocks\.(\d+))/")


def layer_of_node(node_name: str) -> str | None:
    """Which part of a candidate an exported node belongs to: 'stem', 'head', 'layer<i>'.

    None for nodes outside any module (graph-level glue).
    """
    m = _LAYER.match(node_name)
    if not m:
        return None
    return f"layer{m.group(2)}" if m.group(2) is not None else m.group(1)
