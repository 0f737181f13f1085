"""COCO metrics (pycocotools) of a torch detector, of a deployable ONNX file, or of any runner with
the deployable contract (a deployed TVM or TensorRT folder, `hwnas.detection.deploy`) on one split.

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

from hwnas.backends.base import Runner
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

    results = _results(split, dets)
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


def _results(split: CocoSplit, dets: list[Detections]) -> list[dict]:
    """`dets` as COCO result entries: original-image ``[x, y, w, h]`` and category ids."""
    results = []
    for i, d in enumerate(dets):
        _, (sx, sy) = split.image(i)
        for (x0, y0, x1, y1), s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(),
                                            d["labels"].tolist()):
            x0, x1, y0, y1 = x0 / sx, x1 / sx, y0 / sy, y1 / sy
            results.append({"image_id": split.image_ids[i], "category_id": split.cat_ids[lab],
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(s)})
    return results


class PerImageAP:
    """One set of detections' COCO evaluation kept per image, so that AP (@[.5:.95], all
    areas, 100 detections: COCO's first figure) can be read on any resample of the images by
    pycocotools' own `accumulate`: what a paired bootstrap of two detectors needs (`paired_ap`).
    AP does not decompose into a sum over images; its matching does, and that is kept."""

    def __init__(self, split: CocoSplit, dets: list[Detections]):
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        self.n = len(dets)
        results = _results(split, dets)
        self.cats: list[dict] = []
        self._boot: dict[tuple[int, int], np.ndarray] = {}
        if not results:  # nothing found: AP 0 on every resample
            return
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(split.ann_file))
            ev = COCOeval(gt, gt.loadRes(results), "bbox")
            ev.params.imgIds = list(split.image_ids[:self.n])
            ev.params.areaRng, ev.params.areaRngLbl = ev.params.areaRng[:1], ["all"]
            ev.params.maxDets = [100]
            ev.evaluate()
        self.iou_thrs, self.rec_thrs = np.asarray(ev.params.iouThrs), np.asarray(ev.params.recThrs)
        # per category, evaluate()'s per-image matches laid end to end (evalImgs is
        # [category][area (one)][image]), with each image's offset into them
        for k in range(len(ev._paramsEval.catIds)):
            es = ev.evalImgs[k * self.n:(k + 1) * self.n]
            none = np.array([e is None for e in es])
            es = [e or {"dtScores": [], "dtMatches": np.zeros((len(self.iou_thrs), 0)),
                        "dtIgnore": np.zeros((len(self.iou_thrs), 0), bool),
                        "gtIgnore": np.zeros(0)} for e in es]
            count = np.array([len(e["dtScores"][:100]) for e in es], np.int64)
            self.cats.append({
                "none": none, "count": count, "offset": np.concatenate([[0], np.cumsum(count)]),
                "npig": np.array([np.count_nonzero(np.asarray(e["gtIgnore"]) == 0) for e in es]),
                "scores": np.concatenate([np.asarray(e["dtScores"][:100], float) for e in es]),
                "matches": np.concatenate([e["dtMatches"][:, :100] for e in es], axis=1) != 0,
                "ignore": np.concatenate([e["dtIgnore"][:, :100] for e in es], axis=1) != 0})

    def ap(self, images: np.ndarray | None = None) -> float:
        """AP over `images` (indices into the split, repeats allowed, each repeat counted as
        an image of its own; default all of them): pycocotools' `accumulate` over the kept
        per-image matches, step for step (stable sort by score, cumulative true and false
        positives, the precision envelope, read at the 101 recall thresholds), with its Python
        loops as numpy; checked equal to `coco_metrics` in the tests."""
        if not self.cats:
            return 0.0
        idx = np.arange(self.n) if images is None else np.asarray(images, np.int64)
        rec, nt = self.rec_thrs, len(self.iou_thrs)
        prec = []
        for c in self.cats:
            if c["none"][idx].all():  # no image of the resample has this category
                continue
            npig = int(c["npig"][idx].sum())
            if npig == 0:
                continue
            # the resample's detections in its image order (as accumulate concatenates them)
            count = c["count"][idx]
            nd = int(count.sum())
            if nd == 0:
                prec.append(np.zeros((nt, len(rec))))
                continue
            start = np.repeat(c["offset"][idx] - np.concatenate([[0], np.cumsum(count)[:-1]]),
                              count)
            pos = start + np.arange(nd)
            order = np.argsort(-c["scores"][pos], kind="mergesort")
            dtm, ign = c["matches"][:, pos[order]], c["ignore"][:, pos[order]]
            tp = np.cumsum(dtm & ~ign, axis=1, dtype=np.int32)
            fp = np.cumsum(~dtm & ~ign, axis=1, dtype=np.int32)
            pr = tp / (fp + tp + np.spacing(1))
            pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]  # the envelope
            q = np.zeros((nt, len(rec)))
            for t in range(nt):
                at = np.searchsorted(tp[t] / npig, rec, side="left")
                q[t] = np.where(at < nd, pr[t, np.minimum(at, nd - 1)], 0.0)
            prec.append(q)
        return float(np.mean(prec)) if prec else -1.0

    def bootstrap(self, resamples: int = 1000, seed: int = 0) -> np.ndarray:
        """AP on each of `resamples` bootstrap resamples of the images, drawn from `seed`:
        the same resamples for every `PerImageAP` of as many images, so that two of them are
        compared image for image (`paired_ap`). Kept once computed."""
        key = (resamples, seed)
        if key not in self._boot:
            rng = np.random.default_rng(seed)
            self._boot[key] = np.array([self.ap(rng.integers(0, self.n, self.n))
                                        for _ in range(resamples)])
        return self._boot[key]


def paired_ap(a: PerImageAP, b: PerImageAP, resamples: int = 1000, seed: int = 0) -> dict:
    """AP(a) − AP(b) on the same images, with its 95% interval from a paired bootstrap over
    images (both scored on each resample's images): whether a gap in AP is more than the
    split's noise. The difference is that of the unrounded APs."""
    if a.n != b.n:
        raise ValueError(f"paired AP needs the same images: {a.n} against {b.n}")
    boots = a.bootstrap(resamples, seed) - b.bootstrap(resamples, seed)
    lo, hi = (float(x) for x in np.percentile(boots, [2.5, 97.5]))
    return {"diff": a.ap() - b.ap(), "ci95": [lo, hi], "resamples": resamples,
            "significantly_worse": hi < 0, "significantly_better": lo > 0}


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


def detect_runner(runner: Runner, split: CocoSplit, limit: int | None = None,
                  name: str = "the model") -> list[Detections]:
    """Detections (the first `num_dets` rows) per image of a runner with the deployable
    detector's contract: one input [1, 3, S, S], outputs boxes, scores, labels, num_dets in
    that order (the deployable ONNX in onnxruntime, a deployed TVM or TensorRT folder)."""
    from hwnas.compare import as_detections

    (spec,) = runner.inputs
    if spec.shape[2:] != (split.image_size, split.image_size):
        from hwnas.errors import UserError
        raise UserError(f"{name} takes {spec.shape[2]}×{spec.shape[3]} inputs, the data are "
                        f"letterboxed to {split.image_size}; evaluate at the model's image size")
    n = len(split) if limit is None else min(limit, len(split))
    out: list[Detections] = []
    for i in range(n):
        x, _ = split.batch([i])
        dets = as_detections(runner.run({spec.name: x.numpy()})[:4])
        out.append({k: v.copy() for k, v in dets.items()})
    return out


def onnx_runner(path: str | Path, threads: int = 1) -> Runner:
    """The deployable ONNX file in onnxruntime (CPU, fp32, `threads` intra-op threads), checked
    to have the deployable outputs in order."""
    from hwnas.backends.ort import OrtRunner
    from hwnas.detection.export import OUTPUTS
    from hwnas.devices import Device
    from hwnas.errors import UserError
    from hwnas.export import load_onnx

    load_onnx(path)  # a missing or unreadable file is a UserError naming it
    runner = OrtRunner(path, Device("onnxruntime-cpu", "onnxruntime", "fp32", threads))
    names = [o.name for o in runner.session.get_outputs()]
    if names[:4] != OUTPUTS:
        runner.close()
        raise UserError(f"{path} has outputs {names}, not a deployable detector's {OUTPUTS}; "
                        "export one with `hwnas detect export`")
    return runner


def detect_onnx(path: str | Path, split: CocoSplit, limit: int | None = None,
                threads: int = 1) -> list[Detections]:
    """The deployable ONNX file's detections (its first `num_dets` rows) per image."""
    with onnx_runner(path, threads) as runner:
        return detect_runner(runner, split, limit, name=str(path))


def evaluate(split: CocoSplit, det: Detector | None = None, onnx: str | Path | None = None,
             runner: Runner | None = None) -> dict[str, float]:
    """COCO metrics of the torch detector `det`, of the ONNX file `onnx` or of a `runner` with
    the deployable contract (`detect_runner`) on `split`."""
    if det is not None:
        dets = detect_torch(det, split)
    elif runner is not None:
        dets = detect_runner(runner, split)
    else:
        dets = detect_onnx(onnx, split)
    metrics = coco_metrics(split, dets)
    metrics["images"] = len(split)
    metrics["detections"] = int(sum(len(d["scores"]) for d in dets))
    return metrics
