"""Which layers carry a prediction's error: per-node profiles mapped back to the LUT's ops.

A LUT prices each op measured alone; inside a whole model the backend fuses across op
boundaries, reorders layouts and shares one run's fixed cost, so an op's share of a candidate
can differ from its share of the prediction. `explain` reads the backend's own per-node
profiler (`Runner.node_profile()`: onnxruntime's trace, TVM's instrument, TensorRT's
IProfiler) on a whole candidate, maps every node to its layer with `layer_of_node` (stem,
layer<i>, head; nodes outside any module, such as layout reorders and Q/DQ at the graph input,
are "glue"), and sets each layer's in-model time beside its LUT price.

Per-node times are taken with the profiler on, which adds its own cost per node, so they are
rescaled to sum to the candidate's measured latency (from validation, or timed here if not
given): what is compared is each layer's *share* of the real latency against its calibrated
LUT price. The calibration's intercept is its own row ("fixed"), against the glue nodes.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hwnas.backends import compile_model
from hwnas.devices import Device
from hwnas.errors import UserError
from hwnas.export import export_onnx, layer_of_node
from hwnas.latency.predict import LutPredictor
from hwnas.spaces.base import Arch


@dataclass(frozen=True)
class LayerRow:
    layer: str  # stem, layer<i>, head, or fixed (intercept vs glue nodes)
    op: str  # the LUT key (empty for "fixed")
    lut_ms: float  # the op's table latency, measured alone
    predicted_ms: float  # its calibrated contribution to the prediction
    in_model_ms: float  # its profiled time inside the whole model, rescaled (see module doc)
    error_ms: float  # predicted − in-model: where the candidate's error comes from


@dataclass(frozen=True)
class CandidateExplanation:
    arch: str
    predicted_ms: float
    measured_ms: float
    error_pct: float
    profiled_ms: float  # Σ per-node times per run, before rescaling (profiler overhead incl.)
    rows: list[LayerRow]

    def to_dict(self) -> dict:
        return asdict(self)

    def worst(self, k: int = 3) -> list[LayerRow]:
        return sorted(self.rows, key=lambda r: -abs(r.error_ms))[:k]


def per_layer_ms(node_times: list[tuple[str, float]]) -> dict[str, float]:
    """ms per run for each layer from (node name, ms) events of many runs: each node's median
    over its runs (robust to the first runs' allocation and cache misses), summed per layer."""
    by_node: dict[str, list[float]] = defaultdict(list)
    for name, ms in node_times:
        by_node[name].append(ms)
    out: dict[str, float] = defaultdict(float)
    for name, times in by_node.items():
        out[layer_of_node(name) or "glue"] += float(np.median(times))
    return dict(out)


def profiling_device(device: Device) -> Device:
    return dataclasses.replace(device, options={**device.options, "profile_nodes": True})


def explain_arch(predictor: LutPredictor, device: Device, arch: Arch,
                 measured_ms: float | None = None, runs: int = 30) -> CandidateExplanation:
    """Profile `arch` whole on `device` and set each layer's in-model time beside its price."""
    space, shape = predictor.space, predictor.input_shape
    cal = predictor.calibration
    keys = space.op_keys(arch, shape, predictor.precision)
    layer_names = ["stem"] + [f"layer{i}" for i in range(space.num_layers)] + ["head"]
    if len(keys) != len(layer_names):
        raise AssertionError(f"{space.name}: op_keys gave {len(keys)} ops for "
                             f"{len(layer_names)} layers")
    with tempfile.TemporaryDirectory(prefix="hwnas-explain-") as tmp:
        module = space.build(arch)
        path = export_onnx(module, shape, Path(tmp) / "cand.onnx")
        with compile_model(path, profiling_device(device), module=module) as runner:
            feed = runner.random_feed(np.random.default_rng(0))
            for _ in range(runs):
                runner.run(feed)
            # every run so far (onnxruntime: once only), named by module path
            events = runner.node_profile_by_module(space.num_layers)
    if events is None:
        raise UserError(f"backend {device.backend} of device {device.name} has no per-node "
                        "profiler; --explain needs one")
    in_model = per_layer_ms(events)
    profiled = sum(in_model.values())
    if profiled <= 0:
        raise UserError(f"device {device.name}: the per-node profile is empty")
    predicted_total = predictor.predict(arch)
    if measured_ms is None:
        measured_ms = profiled  # no protocol measurement given: the profile is the measure
    scale = measured_ms / profiled
    rows = []
    for name, key in zip(layer_names, keys):
        lut = predictor.table.latency_ms(key)
        if lut is None:
            raise predictor.missing_error(key)
        pred = cal.slope(key.kind) * lut
        got = in_model.get(name, 0.0) * scale
        rows.append(LayerRow(name, str(key), lut, pred, got, pred - got))
    glue = in_model.get("glue", 0.0) * scale
    rows.append(LayerRow("fixed", "", 0.0, cal.intercept_ms, glue, cal.intercept_ms - glue))
    return CandidateExplanation(str(arch), predicted_total, measured_ms,
                                (predicted_total / measured_ms - 1) * 100, profiled, rows)


def explain_worst(predictor: LutPredictor, device: Device, validation_csv: str | Path,
                  top: int = 3, runs: int = 30) -> list[CandidateExplanation]:
    """Explain the `top` candidates of a validation CSV with the largest |error|."""
    import csv

    with open(validation_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    rows.sort(key=lambda r: -abs(float(r["error_pct"])))
    return [explain_arch(predictor, device, predictor.space.parse(r["arch"]),
                         float(r["measured_ms"]), runs) for r in rows[:top]]


def lines(explanations: list[CandidateExplanation], k: int = 4) -> list[str]:
    out = []
    for e in explanations:
        out.append(f"  {e.arch}: predicted {e.predicted_ms:.3f} ms, measured "
                   f"{e.measured_ms:.3f} ms ({e.error_pct:+.1f}%); layers that carry it:")
        for r in e.worst(k):
            out.append(f"    {r.layer:<8} {r.op or '(intercept vs glue nodes)':<42} LUT "
                       f"{r.lut_ms:7.4f}  predicted {r.predicted_ms:7.4f}  in model "
                       f"{r.in_model_ms:7.4f}  error {r.error_ms:+.4f} ms")
    return out
