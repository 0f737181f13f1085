"""One model on several devices: output agreement with onnxruntime fp32, and latency.

`compare` compiles the model for every device, runs all of them and an onnxruntime fp32
reference on the same seeded standard-normal input, and reports per device the largest absolute
output difference and the scale-relative one (max |out − ref| / max |ref|, the measure
`check_export` uses, so it means the same for outputs of any magnitude), whether that is within
the tolerance of the device's precision, and its latency measured with the protocol (all
devices interleaved round by round, so the host's slow regimes touch each alike). A deployable
detector (outputs boxes, scores, labels, num_dets) is compared by matched detections instead:
same count, every detection matched to one of the same label, boxes within the precision's
tolerance; `max_abs_diff` is then the largest score difference and `max_rel_diff` the largest
relative box difference.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hwnas.backends import compile_model
from hwnas.devices import Device
from hwnas.errors import UserError
from hwnas.measure import Protocol, measure_interleaved

# Scale-relative tolerances (max |out − ref| / max |ref|), per precision, with their reason.
TOLERANCES = {
    # fp32 vs fp32: the same arithmetic in another order (kernel choice, fusion, NCHWc
    # blocking). Reordering a k-term fp32 sum errs by ~k·2^-24 in the worst case; k is ≤ ~6000
    # here (3×3×640 reductions), i.e. ≤ 4e-4, and typically √k·2^-24 ≈ 5e-6. `check_export`
    # holds torch vs onnxruntime to 1e-4; GPU backends here turn TF32 off so this still holds.
    "fp32": 1e-4,
    # fp16 (10-bit mantissa, unit roundoff u = 2^-11 ≈ 4.9e-4): every layer rounds its inputs
    # and weights (≈ 2u relative with fp32 accumulation, as tensor cores do); over ~50 conv
    # layers independent errors add like a random walk, √50 · 2u ≈ 7e-3. 2e-2 leaves room for
    # the error growth through BatchNorm-folded weights without hiding a wrong kernel (which is
    # off by O(1)).
    "fp16": 2e-2,
    # int8: each quantised tensor carries up to half a step, 1/255 of its calibrated range
    # (≈ 2e-3 of range), through ~50 layers, with ranges from seeded random calibration data
    # (hwnas/backends/ort_quant.py). Measured here with `hwnas compare --devices
    # cpu-ort-fp32,cpu-ort-int8 --space S --arch A`: 0.40% on tiny:0123 and 0.39% on three
    # det20 candidates (random-init weights, random input). Trained weights and image inputs have
    # heavier-tailed activations, so the bound sits an order of magnitude above what was
    # measured, and still an order below a broken quantisation (errors of O(1)).
    "int8": 0.1,
}


def reference_device(threads: int = 1) -> Device:
    """onnxruntime fp32 on the CPU, all graph optimisations: what every device is held to."""
    return Device("reference-ort-fp32", "onnxruntime", "fp32", threads,
                  "onnxruntime CPU EP fp32 (comparison reference)",
                  {"graph_optimization": "all", "providers": ["CPUExecutionProvider"]})


@dataclass(frozen=True)
class DeviceResult:
    device: str
    backend: str
    precision: str
    max_abs_diff: float
    max_rel_diff: float  # max |out − ref| / max |ref|
    tolerance: float
    within_tolerance: bool
    latency_ms: float  # the protocol's best_ms
    median_ms: float
    spread: float
    detections: dict | None = None  # deployable detectors: matched detections vs the reference

    def to_dict(self) -> dict:
        return asdict(self)


def output_diff(outs: list[np.ndarray], refs: list[np.ndarray]) -> tuple[float, float]:
    """(max abs diff, max abs diff / max |ref|) over all outputs; shapes must agree."""
    if len(outs) != len(refs):
        raise UserError(f"the model gives {len(outs)} outputs here but {len(refs)} in the "
                        "reference")
    max_abs, scale = 0.0, 0.0
    for o, r in zip(outs, refs):
        if o.shape != r.shape:
            raise UserError(f"an output has shape {o.shape} here but {r.shape} in the reference")
        max_abs = max(max_abs, float(np.abs(o.astype(np.float64) - r).max()))
        scale = max(scale, float(np.abs(r).max()))
    return max_abs, max_abs / (scale or 1.0)


def as_detections(outs: list[np.ndarray]) -> dict[str, np.ndarray] | None:
    """The detections of a deployable detector's outputs (`boxes [1, D, 4]`, `scores [1, D]`,
    `labels [1, D]` int, `num_dets [1]` int; see hwnas.detection.export), or None for a model
    with other outputs."""
    if len(outs) != 4:
        return None
    boxes, scores, labels, num = (np.asarray(o) for o in outs)
    if not (boxes.ndim == 3 and boxes.shape[2] == 4 and scores.shape == boxes.shape[:2]
            and labels.shape == scores.shape and labels.dtype.kind == "i"
            and num.shape == (1,) and num.dtype.kind == "i"):
        return None
    n = int(num[0])
    return {"boxes": boxes[0, :n], "scores": scores[0, :n], "labels": labels[0, :n]}


def detection_diff(outs: list[np.ndarray], refs: list[np.ndarray], tol: float) -> dict | None:
    """Detectors are compared by matched detections, not element-wise (runtimes may order ties
    differently, and a padded row means nothing): same count, every detection matched to one of
    the same label, boxes within `tol` relative (hwnas.detection.export.compare_detections)."""
    a, b = as_detections(outs), as_detections(refs)
    if a is None or b is None:
        return None
    from hwnas.detection.export import compare_detections

    return compare_detections(a, b, rel_tol=tol)


def compare(onnx_path: str | Path, devices: list[Device], protocol: Protocol = Protocol(),
            module=None, seed: int = 0) -> list[DeviceResult]:
    """Run `onnx_path` (and `module`, for backends that run torch modules) on every device."""
    if not devices:
        raise UserError("give at least one device")
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise UserError(f"a device is named twice in {names}")
    with contextlib.ExitStack() as stack:
        ref = stack.enter_context(compile_model(onnx_path, reference_device()))
        rng = np.random.default_rng(seed)
        feed = ref.random_feed(rng)
        raw_refs = [np.asarray(r) for r in ref.run(feed)]
        refs = [r.astype(np.float64) for r in raw_refs]
        runners = [stack.enter_context(compile_model(onnx_path, d, module=module))
                   for d in devices]
        diffs, dets = [], []
        for d, r in zip(devices, runners):
            local = {s.name: feed[s.name].astype(s.dtype) for s in r.inputs}
            outs = [np.asarray(o) for o in r.run(local)]
            det = detection_diff(outs, raw_refs, TOLERANCES.get(d.precision, 0.0))
            dets.append(det)
            diffs.append((det["score_abs_err"], det["box_rel_err"]) if det is not None
                         else output_diff(outs, refs))
        stats = measure_interleaved(runners, protocol).stats
    out = []
    for d, (abs_d, rel_d), s in zip(devices, diffs, stats):
        tol = TOLERANCES.get(d.precision)
        if tol is None:
            raise UserError(f"device {d.name}: no stated tolerance for precision "
                            f"{d.precision!r} (known: {', '.join(TOLERANCES)})")
        ok = dets[len(out)]["ok"] if dets[len(out)] is not None else rel_d <= tol
        out.append(DeviceResult(d.name, d.backend, d.precision, abs_d, rel_d, tol, ok,
                                s.best_ms, s.median_ms, s.spread, dets[len(out)]))
    return out


def compare_arch(space, arch, input_shape, devices: list[Device],
                 protocol: Protocol = Protocol(), seed: int = 0) -> list[DeviceResult]:
    """`compare` on a candidate of a space, exported here (torch devices get the module)."""
    from hwnas.export import export_onnx

    module = space.build(arch)
    with tempfile.TemporaryDirectory(prefix="hwnas-") as tmp:
        path = export_onnx(module, input_shape, Path(tmp) / "model.onnx")
        return compare(path, devices, protocol, module=module, seed=seed)


def lines(results: list[DeviceResult], what: str) -> list[str]:
    out = [f"{what}: outputs vs onnxruntime fp32 (same seeded input), latency by the protocol",
           f"{'device':<20} {'prec':<5} {'max abs':>10} {'max rel':>10} {'tol':>7} {'ok':<3} "
           f"{'latency_ms':>10}"]
    for r in results:
        out.append(f"{r.device:<20} {r.precision:<5} {r.max_abs_diff:>10.3g} "
                   f"{r.max_rel_diff:>10.3g} {r.tolerance:>7.0e} "
                   f"{'yes' if r.within_tolerance else 'NO':<3} {r.latency_ms:>10.4f}"
                   + (f"  detections {r.detections['matched']}/{r.detections['count_b']} matched"
                      f" ({r.detections['count_a']} here)" if r.detections else ""))
    return out
