"""Deployed detectors: the detector compiled by TVM or built into a TensorRT engine, as a folder
that `DeployedDetectorRunner` runs with the deployable ONNX's contract.

`hwnas detect export --to tvm|trt` writes the folder; the runner returns what the deployable
ONNX returns (export.py: ``boxes`` float32 [1, D, 4] xyxy network-input pixels, ``scores``
float32 [1, D] descending, ``labels`` int64 [1, D], ``num_dets`` int64 [1]; rows past num_dets
are padding: box 0, score 0, label −1), so `hwnas detect eval --deployed`, parity against torch
(`export.parity`) and the timing protocol (`measure.py`) treat every target alike.

**TVM** (``--to tvm``; devices ``cpu-tvm-untuned``, ``cpu-tvm-tuned``), two stages::

    dense.onnx     input [1, 3, S, S] → cls_logits [1, HWA, C], bbox_regression [1, HWA, 4],
                   bbox_ctrness [1, HWA, 1] (`Detector.forward`): what TVM compiled
    dense.so       that graph through the project's TVM backend (`hwnas.backends.tvm.build`:
                   the import, lowering and tuning database the latency tables use), written by
                   Relax's ``Executable.export_library``, loaded by `tvm.runtime.load_module`
                   into a Relax VM (weights inside, nothing compiled at load)
    post.onnx      `StaticPost` (decode, per-level top-k, clip, NMS, max-det) on onnxruntime
    manifest.json

**Why NMS is a stage of its own on TVM** (measured with TVM 0.27.0.post1's Relax ONNX frontend,
tiny detectors at 64 px): the deployable ONNX does not import (the per-level TopK's K is
computed from a Shape inside the whole graph, and the frontend fails on it: "Reshape requires
the input data to be Tensor, given ir.PrimType"). `StaticPost` alone does not import either:
torchvision's NMS symbolic passes max_output_boxes_per_class = INT64_MAX, which the frontend's
NonMaxSuppression converter makes an int32 literal ("Literal value 9223372036854775807 exceeds
range of int32"). With that constant rewritten to 1000 the post-processing imports, and then
needs ``relax.backend.DispatchSortScan`` for its TopK, a pass the backend's lowering (shared
with the latency tables, whose kernels it must not change) does not run; with both changes,
Relax's NMS gave onnxruntime's detections exactly on four inputs (40 and 320 rows, none or all
over the threshold). So Relax can run this NMS, but only on a rewritten graph through another
pipeline. The split ships the exported graphs unchanged: TVM compiles (and MetaSchedule tunes)
the dense part, and the post-processing is the same `StaticPost` graph the deployable ONNX
carries, run by onnxruntime on the same CPU right after it.

**TensorRT** (``--to trt``; devices ``gpu-trt-fp16``, ``gpu-trt-int8``), one stage::

    detector.onnx    the deployable ONNX (NMS inside) the engine was built from
    detector.engine  the engine (`hwnas.backends.trt.cached_engine`: the backend's builder and
                     engine cache)
    manifest.json

TensorRT's ONNX parser maps ``NonMaxSuppression`` to its own ``INMSLayer`` (native since
TensorRT 8.5, onnx-tensorrt's changelog; supported fp32/fp16). It differs from ONNX's operator:
its ``SelectedIndices`` are int32 [NumOutputBoxes, 3] beside a 0-D ``NumOutputBoxes`` (a
data-dependent shape; ONNX's are int64 [M, 3]), the parser's experimental importer before 8.5
padded them to a fixed [max_output_boxes_per_class, 3] instead, ties come in an unspecified
order, and the layer considers at most its TopK box limit of candidates (5000; 2000 on SM 5.3
and 6.2). How that is handled: the deployable graph consumes the indices inside (gathers, then
pads to max_det from an appended dummy row), so the engine's outputs have static shapes and need
no output allocator; the `trt` extra requires TensorRT ≥ 10, never the padding importer;
torchvision's INT64_MAX bound is cast down to INT32_MAX by the parser, still no bound; the
pre-NMS candidate count is in the manifest (``nms_candidates``) and an export above this GPU's
limit is refused (`trt_nms_limit`); ties are matched by `compare_detections`, never element-wise;
outputs are read by name (an engine's I/O order is its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hwnas.backends.base import Runner, TensorSpec, package_version
from hwnas.detection.export import (OUTPUTS, StaticPost, deploy_thresholds, export_detector,
                                    nms_nodes)
from hwnas.detection.model import Detector
from hwnas.devices import Device, load_device
from hwnas.errors import UserError
from hwnas.export import INPUT_NAME, export_onnx
from hwnas.fileio import atomic_write_bytes, atomic_write_text, sha256_file

FORMAT = "hwnas-deployed-detector/1"
MANIFEST = "manifest.json"
DENSE_OUTPUTS = ["cls_logits", "bbox_regression", "bbox_ctrness"]
TARGETS = {"tvm": "tvm", "trt": "tensorrt"}  # --to → the backend its devices name
DEFAULT_DEVICES = {"tvm": "cpu-tvm-untuned", "trt": "gpu-trt-fp16"}
TRT_INSTALL = ("pip install --extra-index-url https://pypi.nvidia.com tensorrt "
               "(needs an NVIDIA GPU)")
PREPROCESSING = {
    "color": "RGB",
    "resize": "letterbox to S×S: scale r = S / max(w, h) (PIL bilinear), image at the top-left",
    "pad_value": 128,
    "normalize": "(pixel / 255 - 0.5) / 0.25 per channel",
    "layout": "NCHW float32, batch 1",
    "boxes_out": "xyxy in network-input pixels: divide by r for original pixels",
}
_DTYPES = {"boxes": "float32", "scores": "float32", "labels": "int64", "num_dets": "int64"}


class DenseDetector(nn.Module):
    """The detector without its post-processing: [1, 3, S, S] → (cls_logits [1, HWA, C],
    bbox_regression [1, HWA, 4], bbox_ctrness [1, HWA, 1]), `Detector.forward` as a tuple."""

    def __init__(self, det: Detector):
        super().__init__()
        self.det = det.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.det(x)
        return tuple(out[k] for k in DENSE_OUTPUTS)


def nms_candidates(det: Detector) -> int:
    """Boxes that enter NMS: the per-level top-k of every (location, class) score, summed."""
    _, per_level = det.anchors()
    return sum(min(det.topk_candidates, n * det.cfg.num_classes) for n in per_level)


def trt_nms_limit(compute_cap: str | None) -> int:
    """INMSLayer's largest TopK box limit on a GPU of this compute capability (NVIDIA's NMS
    operator documentation: 2000 on SM 5.3 and 6.2, 5000 otherwise)."""
    return 2000 if str(compute_cap) in ("5.3", "6.2") else 5000


# ---- refusals before any work -------------------------------------------------------------------
def resolve_device(to: str, name: str | None) -> Device:
    """The device for ``--to``: its default, or `name` if its backend is the target's."""
    if to not in TARGETS:
        raise UserError(f"--to {to!r}: deployed folders are written for {', '.join(TARGETS)}")
    device = load_device(name or DEFAULT_DEVICES[to])
    if device.backend != TARGETS[to]:
        raise UserError(f"device {device.name} runs on {device.backend}, not {TARGETS[to]}; "
                        f"--to {to} takes a {TARGETS[to]} device (default "
                        f"{DEFAULT_DEVICES[to]})")
    return device


def check_available(to: str, device: Device) -> None:
    """A one-line `UserError` saying what to install when the target's backend is not here."""
    from hwnas.backends import get_backend

    ok, why = get_backend(device.backend).available(device)
    if not ok:
        raise UserError(f"--to {to} with device {device.name} cannot run here: "
                        f"{_install_hint(why)}")


def _install_hint(why: str) -> str:
    """TensorRT's 'not installed' reason with the one command that installs it."""
    if why.startswith("tensorrt is not installed"):
        return f"tensorrt is not installed; {TRT_INSTALL}"
    return why


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing `out` without `force`, and anything but a deployed folder even with
    it (so --force never deletes a folder this command did not write)."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise UserError(f"{out} exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir() or (
            not (out / MANIFEST).is_file() and any(out.iterdir())):
        raise UserError(f"{out} is not a deployed detector folder (no {MANIFEST}); refusing "
                        "to replace it even with --force: choose another output")


@contextlib.contextmanager
def _replacing(out: Path):
    """A fresh folder beside `out` to write into; on success it takes `out`'s place (an old
    deployed folder there is removed only then), on any exception it is removed and `out` is
    left as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = secrets.token_hex(4)
    tmp, old = out.parent / f".{out.name}.{tag}.tmp", out.parent / f".{out.name}.{tag}.old"
    tmp.mkdir()  # mode from the umask, as a folder the user makes
    try:
        yield tmp
        if out.exists():
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ---- export -------------------------------------------------------------------------------------
def _manifest(to: str, device: Device, det: Detector, meta: dict, thresholds, files: Path,
              stages: list[dict], extra: dict) -> dict:
    from hwnas.hosts import host_id

    s = det.cfg.image_size
    score_thresh, iou, max_det = thresholds
    fp = device.fingerprint()
    shapes = {"boxes": [1, max_det, 4], "scores": [1, max_det], "labels": [1, max_det],
              "num_dets": [1]}
    return {
        "format": FORMAT,
        "target": TARGETS[to],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": {"name": device.name, "backend": device.backend,
                   "precision": device.precision, "threads": device.threads,
                   "options": device.options},
        "input": {"name": INPUT_NAME, "shape": [1, 3, s, s], "dtype": "float32"},
        "outputs": {k: {"shape": shapes[k], "dtype": _DTYPES[k]} for k in OUTPUTS},
        "padding": "rows past num_dets: box 0, score 0, label -1",
        "preprocessing": {**PREPROCESSING, "size": s},
        "score_thresh": score_thresh, "iou": iou, "max_det": max_det,
        "nms_candidates": nms_candidates(det),
        "classes": list(meta.get("classes", [])), "cat_ids": list(meta.get("cat_ids", [])),
        "detector": meta.get("detector"),
        "checkpoint": meta.get("checkpoint"),
        "data": meta.get("config", {}).get("data"),
        "stages": stages,
        "files": {p.name: sha256_file(p) for p in sorted(files.iterdir()) if p.is_file()},
        "versions": dict(fp["packages"]),
        "compiler": fp.get("compiler"),
        "host": {"host_id": host_id(fp), **{k: fp[k] for k in (
            "cpu_model", "cpu_isa", "logical_cores", "machine", "os")},
                 **({"gpus": fp["gpus"]} if fp.get("uses_gpu") else {})},
        **extra,
    }


def export_tvm(det: Detector, meta: dict, out: Path, device: Device, thresholds,
               progress: bool = True) -> dict:
    """Write the TVM folder (module docstring) to `out` (checked by `check_output`); its
    manifest. The compiled dense part is checked against torch on a seeded input."""
    from hwnas.backends import tvm as tvm_backend

    s = det.cfg.image_size
    with _replacing(Path(out)) as tmp:
        dense = DenseDetector(det)
        export_onnx(dense, (1, 3, s, s), tmp / "dense.onnx", output_names=DENSE_OUTPUTS)
        executable, _ = tvm_backend.build(tmp / "dense.onnx", device, progress)
        executable.export_library(str(tmp / "dense.so"))
        with torch.no_grad():
            heads = dense(torch.zeros(1, 3, s, s))
        post = StaticPost(det, *thresholds)
        export_onnx(post, tuple(tuple(h.shape) for h in heads), tmp / "post.onnx",
                    output_names=OUTPUTS, input_names=DENSE_OUTPUTS)
        if nms_nodes(tmp / "post.onnx") < 1:
            raise AssertionError(f"{tmp / 'post.onnx'}: no NonMaxSuppression node")
        check = _check_dense(dense, tmp / "dense.so", device, s)
        stages = [{"name": "dense", "runtime": "tvm", "file": "dense.so",
                   "source": "dense.onnx", "inputs": [INPUT_NAME], "outputs": DENSE_OUTPUTS,
                   "shapes": {k: list(h.shape) for k, h in zip(DENSE_OUTPUTS, heads)}},
                  {"name": "post", "runtime": "onnxruntime", "file": "post.onnx",
                   "inputs": DENSE_OUTPUTS, "outputs": OUTPUTS}]
        manifest = _manifest("tvm", device, det, meta, thresholds, tmp, stages,
                             {"tvm_version": package_version("apache-tvm"), "dense_check": check})
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _check_dense(dense: DenseDetector, library: Path, device: Device, s: int) -> dict:
    """The compiled dense part vs torch on one seeded standard-normal image: the largest
    scale-relative difference (max |tvm − torch| / max |torch|, as `check_export`), which must
    be within the fp32 tolerance (`hwnas.compare.TOLERANCES`); a miss is a compiler bug."""
    from hwnas.backends.tvm import TvmRunner
    from hwnas.compare import TOLERANCES

    x = np.random.default_rng(0).standard_normal((1, 3, s, s)).astype(np.float32)
    with torch.no_grad():
        refs = [t.numpy() for t in dense(torch.from_numpy(x))]
    with TvmRunner.load(library, [TensorSpec(INPUT_NAME, (1, 3, s, s), np.dtype(np.float32))],
                        device) as r:
        outs = [np.array(o) for o in r.run({INPUT_NAME: x})]
    rel = max(float(np.abs(o - t).max()) / (float(np.abs(t).max()) or 1.0)
              for o, t in zip(outs, refs))
    if not rel <= TOLERANCES["fp32"]:
        raise AssertionError(f"{library}: TVM's dense outputs differ from torch's by {rel:.2e} "
                             "(scale-relative)")
    return {"max_rel_err": rel, "tolerance": TOLERANCES["fp32"]}


def export_trt(det: Detector, meta: dict, out: Path, device: Device, thresholds) -> dict:
    """Write the TensorRT folder (module docstring) to `out`; its manifest, which records the
    engine's detections against onnxruntime's on a seeded input (`_check_engine`)."""
    from hwnas.backends import trt as trt_backend
    from hwnas.devices import gpu_info

    cap = gpu_info()[0].get("compute_cap")
    k, limit = nms_candidates(det), trt_nms_limit(cap)
    if k > limit:
        raise UserError(f"{k} boxes enter NMS, more than TensorRT's NMS layer considers on this "
                        f"GPU (sm {cap}: {limit}); lower the detector's topk_candidates")
    with _replacing(Path(out)) as tmp:
        export_detector(det, tmp / "detector.onnx", *thresholds)
        data, opts, _, built = trt_backend.cached_engine(tmp / "detector.onnx", device)
        atomic_write_bytes(tmp / "detector.engine", data)
        check = _check_engine(tmp, device)
        stages = [{"name": "detector", "runtime": "tensorrt", "file": "detector.engine",
                   "source": "detector.onnx", "inputs": [INPUT_NAME], "outputs": OUTPUTS}]
        built = {k: v for k, v in built.items() if k != "onnx"}
        manifest = _manifest("trt", device, det, meta, thresholds, tmp, stages,
                             {"tensorrt": built, "engine_check": check})
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def _check_engine(folder: Path, device: Device) -> dict:
    """The engine's detections vs onnxruntime's on one seeded standard-normal image, matched at
    the precision's tolerance (`compare_detections`). Recorded, not enforced: at fp16 or int8 a
    score at the threshold or an IoU at the NMS bound may flip a detection without any bug;
    `hwnas detect eval --ckpt C --deployed DIR` is the parity that counts."""
    from hwnas.compare import TOLERANCES, as_detections
    from hwnas.detection.evaluate import onnx_runner
    from hwnas.detection.export import compare_detections

    with onnx_runner(folder / "detector.onnx") as ref, _TrtStage(folder, device) as eng:
        feed = ref.random_feed(np.random.default_rng(0))
        a, b = (as_detections(r.run(feed)) for r in (eng, ref))
    return compare_detections(a, b, rel_tol=TOLERANCES[device.precision])


def export_deployed(to: str, det: Detector, meta: dict, out: Path, device: Device,
                    score_thresh: float | None = None, iou: float | None = None,
                    max_det: int | None = None, checkpoint: str | Path | None = None,
                    progress: bool = True) -> dict:
    """The deployed folder for ``--to tvm|trt`` (`resolve_device`, `check_available` and
    `check_output` have passed); its manifest. `checkpoint` (the file `det` and `meta` came
    from) is recorded by path and SHA-256."""
    thresholds = deploy_thresholds(det, score_thresh, iou, max_det)
    meta = dict(meta)
    if checkpoint is not None:
        meta["checkpoint"] = {"path": str(checkpoint), "sha256": sha256_file(Path(checkpoint))}
    if to == "tvm":
        return export_tvm(det, meta, out, device, thresholds, progress)
    return export_trt(det, meta, out, device, thresholds)


# ---- running a deployed folder ------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict:
    """The folder's manifest, checked: format, and every file it lists present with its
    recorded SHA-256; a one-line `UserError` otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(f"{folder} is not a deployed detector folder (no {MANIFEST}); write one "
                        "with `hwnas detect export --to tvm|trt`")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not readable JSON; export the folder again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not an {FORMAT} manifest; export the folder again")
    for name, digest in manifest.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            raise UserError(f"{f} is missing (the manifest lists it); export the folder again")
        if sha256_file(f) != digest:
            raise UserError(f"{f} does not match its manifest (changed or truncated); export "
                            "the folder again")
    return manifest


def manifest_device(manifest: dict) -> Device:
    d = manifest["device"]
    return Device(d["name"], d["backend"], d["precision"], d["threads"], "", d["options"])


class _TrtStage(Runner):
    """detector.engine in TensorRT (`TrtRunner`), outputs in the deployable order."""

    def __init__(self, folder: Path, device: Device):
        from hwnas.backends import trt as trt_backend

        self.engine = trt_backend.TrtRunner((folder / "detector.engine").read_bytes(),
                                            trt_backend.parse_options(device), None)
        self.inputs = self.engine.inputs
        self._order = [self.engine.output_names.index(n) for n in OUTPUTS]

    def _run(self, feed):
        outs = self.engine._run(feed)
        return [np.asarray(outs[i], dtype=_DTYPES[n]) for i, n in zip(self._order, OUTPUTS)]

    def close(self):
        self.engine.close()


class DeployedDetectorRunner(Runner):
    """A deployed folder (TVM: dense.so on a Relax VM, then post.onnx on onnxruntime; TensorRT:
    detector.engine) as one `Runner`: input ``input`` float32 [1, 3, S, S], outputs boxes,
    scores, labels, num_dets as the deployable ONNX gives them (module docstring), so
    `measure.py` times the whole deployed pipeline and `detect_runner` evaluates it.

    Refused with a `UserError` (nothing loaded): a folder that is not one, files that do not
    match the manifest, a TVM other than the one that compiled it, a CPU lacking an ISA
    extension the kernels were compiled for, a missing TensorRT or another GPU."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.target = self.manifest["target"]
        self.device = manifest_device(self.manifest)
        shape = tuple(self.manifest["input"]["shape"])
        self.inputs = [TensorSpec(INPUT_NAME, shape, np.dtype(np.float32))]
        self.outputs = [TensorSpec(n, tuple(o["shape"]), np.dtype(o["dtype"]))
                        for n, o in self.manifest["outputs"].items()]
        self.stages: list[Runner] = []
        if self.target == "tvm":
            self._open_tvm()
        elif self.target == "tensorrt":
            self._open_trt()
        else:
            raise UserError(f"{self.folder}: unknown target {self.target!r} in its manifest")

    def _open_tvm(self) -> None:
        from hwnas.backends.ort import OrtRunner
        from hwnas.backends.tvm import TvmRunner
        from hwnas.devices import cpu_isa

        have, built = package_version("apache-tvm"), self.manifest.get("tvm_version")
        if have is None:
            raise UserError(f"{self.folder} runs on TVM; apache-tvm is not installed here "
                            "(pip install -e .[tvm])")
        if have != built:
            raise UserError(f"{self.folder} was compiled with TVM {built}, this is TVM {have}; "
                            "export it again here")
        missing = sorted(set(self.manifest["host"]["cpu_isa"]) - set(cpu_isa()))
        if missing:
            raise UserError(f"{self.folder}'s kernels use {', '.join(missing)}, which this CPU "
                            "lacks; export it again on this host")
        post = Device("post-onnxruntime", "onnxruntime", "fp32", self.device.threads,
                      "the deployed detector's post-processing stage",
                      {"graph_optimization": "all", "providers": ["CPUExecutionProvider"]})
        self.stages = [TvmRunner.load(self.folder / "dense.so", self.inputs, self.device)]
        self.stages.append(OrtRunner(self.folder / "post.onnx", post))

    def _open_trt(self) -> None:
        from hwnas.backends import get_backend
        from hwnas.devices import gpu_info

        ok, why = get_backend("tensorrt").available(self.device)
        if not ok:
            raise UserError(f"{self.folder} is a TensorRT engine: {_install_hint(why)}")
        built = self.manifest["tensorrt"]
        gpu = gpu_info()[0]
        here = f"{gpu['name']} (sm {gpu.get('compute_cap', '?')})"
        if here != built["gpu_name"]:
            raise UserError(f"{self.folder}'s engine was built for {built['gpu_name']}, this GPU "
                            f"is {here}; export it again here")
        self.stages = [_TrtStage(self.folder, self.device)]

    def random_feed(self, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        # the first stage's: TVM's is 64-byte aligned, which its kernels take without a copy
        return self.stages[0].random_feed(rng)

    def _run(self, feed):
        out = self.stages[0]._run(feed)
        if len(self.stages) == 2:  # TVM: the heads' outputs, then onnxruntime's post stage
            out = self.stages[1]._run(dict(zip(DENSE_OUTPUTS, out)))
        return out

    def close(self) -> None:
        for s in self.stages:
            s.close()
        self.stages = []


def with_thresholds(det: Detector, manifest: dict) -> Detector:
    """`det` (in place, returned) post-processing at the folder's score threshold, NMS IoU and
    max-det (an export may override the checkpoint's), so torch's detections are comparable."""
    det.score_thresh, det.nms_thresh = manifest["score_thresh"], manifest["iou"]
    det.detections_per_img = manifest["max_det"]
    return det


def parity_tolerance(manifest: dict) -> float:
    """Relative box tolerance for parity with torch: 1e-3 (the deployable ONNX's), or the
    precision's (`hwnas.compare.TOLERANCES`) where that is wider (fp16, int8)."""
    from hwnas.compare import TOLERANCES

    return max(1e-3, TOLERANCES.get(manifest["device"]["precision"], 1e-3))

