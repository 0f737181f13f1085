"""COCO metrics (pycocotools) of a torch detector or of a deployable ONNX file on one split.

Detections are mapped from network-input pixels back to the original image by the letterbox
scale (data.py), converted to COCO's ``[x, y, w, h]`` and category ids, and scored against the
split's own annotation file, so the figures are those `pycocotools.cocoeval.COCOeval` gives for
that file: AP (@[.5:.95]), AP50, AP75, APs, APm, APl (−1 where the split has no box of that size).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch

from hwnas.detection.data import CocoSplit
from hwnas.detection.model import Detector

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# one image's detections: boxes [D, 4] xyxy network-input pixels, scores [D], labels [D]
Detections = dict[str, np.ndarray]


def coco_metrics(split: CocoSplit, dets: list[Detections], fast: bool = False,
                 ) -> dict[str, float]:
    """COCO AP figures of `dets` (one entry per image of `split`, in order; fewer entries
    than images: the first ``len(dets)`` images alone are scored). `fast`: faster-coco-eval's
    implementation of the same protocol (checked equal to pycocotools' in the tests), for a
    search's thousands of scores; reported metrics use pycocotools."""
    if fast:  # faster-coco-eval: the same COCOeval protocol in C++ (a search scores 1000s)
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

    results = []
    for i, d in enumerate(dets):
        _, (sx, sy) = split.image(i)
        for (x0, y0, x1, y1), s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(),
                                            d["labels"].tolist()):
            x0, x1, y0, y1 = x0 / sx, x1 / sx, y0 / sy, y1 / sy
            results.append({"image_id": split.image_ids[i], "category_id": split.cat_ids[lab],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(s)})
    if not results:  # pycocotools cannot load an empty result list; nothing found scores 0
        return {m: 0.0 for m in METRICS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        gt = COCO(str(split.ann_file))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.imgIds = list(split.image_ids[:len(dets)])  # the images detected
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {m: round(float(v), 4) for m, v in zip(METRICS, ev.stats[:6])}


@torch.no_grad()
def detect_torch(det: Detector, split: CocoSplit, batch_size: int = 32,
                 limit: int | None = None) -> list[Detections]:
    """`det.postprocess` detections for the first `limit` images of `split` (all by default)."""
    det.eval()
    n = len(split) if limit is None else min(limit, len(split))
    out: list[Detections] = []
    for start in range(0, n, batch_size):
        x, _ = split.batch(range(start, min(start + batch_size, n)))
        for d in det.postprocess(det(x)):
            out.append({k: v.numpy() for k, v in d.items()})
    return out


def detect_onnx(path: str | Path, split: CocoSplit, limit: int | None = None,
                threads: int = 1) -> list[Detections]:
    """The deployable ONNX file's detections (its first `num_dets` rows) per image."""
    import onnxruntime as ort

    from hwnas.export import load_onnx, onnx_input_shape

    shape = onnx_input_shape(load_onnx(path))
    if shape[2:] != (split.image_size, split.image_size):
        from hwnas.errors import UserError
        raise UserError(f"{path} takes {shape[2]}×{shape[3]} inputs, the data are letterboxed "
                        f"to {split.image_size}; evaluate at the model's image size")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    n = len(split) if limit is None else min(limit, len(split))
    out: list[Detections] = []
    for i in range(n):
        x, _ = split.batch([i])
        boxes, scores, labels, num = sess.run(["boxes", "scores", "labels", "num_dets"],
                                              {name: x.numpy()})
        k = int(num[0])
        out.append({"boxes": boxes[0, :k], "scores": scores[0, :k], "labels": labels[0, :k]})
    return out


def evaluate(split: CocoSplit, det: Detector | None = None, onnx: str | Path | None = None,
             ) -> dict[str, float]:
    """COCO metrics of the torch detector `det` or of the ONNX file `onnx` on `split`."""
    dets = detect_torch(det, split) if det is not None else detect_onnx(onnx, split)
    metrics = coco_metrics(split, dets)
    metrics["images"] = len(split)
    metrics["detections"] = int(sum(len(d["scores"]) for d in dets))
    return metrics
