"""Deployable ONNX of a detector: backbone, neck, head, decode and NMS in one file.

**Contract of the file** (input ``input`` float32 [1, 3, S, S], pre-processed as data.py says:
letterbox to S×S, pad grey, ``(pixel / 255 − 0.5) / 0.25``):

- ``boxes``    float32 [1, max_det, 4]  xyxy in network-input pixels (divide by the letterbox
  scale for original pixels)
- ``scores``   float32 [1, max_det]     descending
- ``labels``   int64   [1, max_det]     contiguous class index (the checkpoint's ``cat_ids``
  map it to COCO category ids)
- ``num_dets`` int64   [1]              rows 0..num_dets−1 are detections; the rest are padding
  (box 0, score 0, label −1)

**Why the post-processing is written again here, and how it stays static.** Tracing torchvision's
`FCOS.postprocess_detections` specialises its data-dependent parts to the example input
(``scores > thresh`` masks, ``topk(min(k, n_kept))``, and `batched_nms`'s early return when no box
is left — an untrained detector traced on zeros exports no NMS at all). `DeployableDetector`
computes the same detections with shapes fixed by the model alone: a per-level top-k over all
(location, class) scores (the kept set equals torchvision's, whose top-k runs over the scores
above the threshold: no score below it can displace one above), the torchvision box coder and
clip, then ``torchvision.ops.nms`` — which torchvision's own ONNX symbolic exports as
``NonMaxSuppression`` — on boxes offset per class (torchvision's `batched_nms` coordinate trick,
with the constant offset S + 1 since boxes are clipped to the image). The score threshold is
applied after NMS, which is equivalent (a box below it can only suppress boxes scoring lower
still), and NMS's output is padded to `max_det` by gathering from an appended dummy row.
`export_detector` checks that the written graph holds a ``NonMaxSuppression`` node.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torchvision.ops import boxes as box_ops

from hwnas.detection.model import Detector
from hwnas.export import export_onnx

OUTPUTS = ["boxes", "scores", "labels", "num_dets"]


class StaticPost(nn.Module):
    """The deployable post-processing alone: the head's raw outputs
    (cls_logits [1, HWA, C], bbox_regression [1, HWA, 4], bbox_ctrness [1, HWA, 1]) →
    boxes [1, D, 4], scores [1, D], labels [1, D] int64, num_dets [1] int64, D = max_det.
    A module of its own so a latency table can price it as one op (decode + NMS at the
    exported pre-NMS top-k)."""

    def __init__(self, det: Detector, score_thresh: float, iou: float, max_det: int):
        super().__init__()
        self.score_thresh, self.iou, self.max_det = float(score_thresh), float(iou), int(max_det)
        self.topk, self.box_coder = det.topk_candidates, det.box_coder
        self.image_hw = (det.cfg.image_size, det.cfg.image_size)
        anchors, self.per_level = det.anchors()
        self.register_buffer("anchors", anchors, persistent=False)  # [HWA, 4] xyxy

    def forward(self, cls_logits: torch.Tensor, bbox_regression: torch.Tensor,
                bbox_ctrness: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cls, reg, ctr = cls_logits[0], bbox_regression[0], bbox_ctrness[0]
        num_classes = cls.shape[1]
        scores_all = torch.sqrt(torch.sigmoid(cls) * torch.sigmoid(ctr))  # [HWA, C]
        boxes, scores, labels = [], [], []
        start = 0
        for n in self.per_level:  # python ints: the loop unrolls into the graph
            flat = scores_all[start:start + n].reshape(-1)  # [n·C]
            v, idx = flat.topk(min(self.topk, n * num_classes))
            anchor = torch.div(idx, num_classes, rounding_mode="floor") + start
            b = self.box_coder.decode(reg[anchor], self.anchors[anchor])  # [k, 4] xyxy
            boxes.append(box_ops.clip_boxes_to_image(b, self.image_hw))
            scores.append(v)
            labels.append(idx % num_classes)
            start += n
        boxes_k, scores_k, labels_k = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        offset = (labels_k.to(boxes_k.dtype) * float(max(self.image_hw) + 1))[:, None]
        keep = torch.ops.torchvision.nms(boxes_k + offset, scores_k, self.iou)  # [M] by score
        # pad to max_det with the index of a dummy row (score −1, never valid)
        k = boxes_k.shape[0]
        keep = torch.cat([keep, torch.full((self.max_det,), k, dtype=torch.int64)])[:self.max_det]
        boxes_x = torch.cat([boxes_k, boxes_k.new_zeros(1, 4)])[keep]
        scores_x = torch.cat([scores_k, scores_k.new_full((1,), -1.0)])[keep]
        labels_x = torch.cat([labels_k, labels_k.new_zeros(1)])[keep]
        valid = scores_x > self.score_thresh
        num = valid.sum().reshape(1)
        return (torch.where(valid[:, None], boxes_x, torch.zeros_like(boxes_x))[None],
                torch.where(valid, scores_x, torch.zeros_like(scores_x))[None],
                torch.where(valid, labels_x, torch.full_like(labels_x, -1))[None],
                num.to(torch.int64))


def worst_case_reg(det: Detector) -> float:
    """Box-coder deltas (each side, in anchor widths a) for the worst-case head: boxes of width
    W = 2·d·a around every location's centre, so each box overlaps its neighbours (IoU with the
    next location, a stride s away, (W − s)/(W + s)) but stays below the NMS threshold t: d is
    3/4 of the bound s (1 + t) / (2 a (1 − t)) (3.0 for FCOS anchors of half a stride at 0.6,
    neighbour IoU 0.5)."""
    anchors, _ = det.anchors()
    a = float(anchors[0, 2] - anchors[0, 0])
    s, t = det.backbone.info[0].stride, det.cfg.nms_thresh
    return 0.75 * s * (1 + t) / (2 * a * max(1 - t, 1e-6))


def worst_case_nms(det: Detector) -> Detector:
    """`det` with its box regression fixed (the last convolution's weights zeroed, its bias set
    by `worst_case_reg`; in place, returned): every box overlaps its neighbours and none
    suppresses another, so NMS keeps every top-k candidate and computes a real IoU against the
    boxes kept before it, while scores stay the model's own (sorting distinct scores costs more
    than sorting equal ones). NMS then does the same work for every weight and image; only the
    order of the scores is left to the data. With random weights, one det20-fcos-w0.5 candidate
    moved 7% between weight seeds (as much as the backbone choices move a detector), and this
    head measured 4.8–5.1 ms where random weights gave 3.6–3.7 ms
    (`tools/bench_det_post.py`). So latency candidates (`DetectorSpace.build`) carry this head
    and the table prices it: an upper bound of the post-processing for any image. Every other
    op costs what it costs with any weights."""
    conv = det.head.regression_head.bbox_reg
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.fill_(worst_case_reg(det))
    return det


class WorstCasePost(nn.Module):
    """`StaticPost` with the box regression `worst_case_nms`'s head emits (the input × 0 +
    that constant, so no optimiser folds it away); the scores are its inputs' own: the latency
    table's post-processing op, at the workload whole latency candidates run."""

    def __init__(self, det: Detector, score_thresh: float, iou: float, max_det: int):
        super().__init__()
        self.post = StaticPost(det, score_thresh, iou, max_det)
        self.reg = worst_case_reg(det)

    def forward(self, cls_logits: torch.Tensor, bbox_regression: torch.Tensor,
                bbox_ctrness: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.post(cls_logits, bbox_regression * 0 + self.reg, bbox_ctrness)


class DeployableDetector(nn.Module):
    """[1, 3, S, S] → boxes [1, D, 4], scores [1, D], labels [1, D] int64, num_dets [1] int64
    with D = max_det (see the module docstring); a static graph for export: the detector, then
    `StaticPost`."""

    def __init__(self, det: Detector, score_thresh: float, iou: float, max_det: int):
        super().__init__()
        self.det = det.eval()
        self.post = StaticPost(det, score_thresh, iou, max_det)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.shape[-2:] != self.post.image_hw:
            raise ValueError(f"detector built for {self.post.image_hw}, got {tuple(x.shape)}")
        out = self.det(x)
        return self.post(out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"])


def nms_nodes(path: str | Path) -> int:
    """How many ``NonMaxSuppression`` nodes the ONNX graph at `path` holds."""
    return sum(n.op_type == "NonMaxSuppression" for n in onnx.load(str(path)).graph.node)


def deploy_thresholds(det: Detector, score_thresh: float | None, iou: float | None,
                      max_det: int | None) -> tuple[float, float, int]:
    """The post-processing settings of a deployment: each given one, else the model's; a
    `UserError` (exit 2) for values out of range."""
    from hwnas.errors import UserError

    score_thresh = det.cfg.score_thresh if score_thresh is None else score_thresh
    iou = det.cfg.nms_thresh if iou is None else iou
    max_det = det.cfg.max_det if max_det is None else max_det
    if not (0 <= score_thresh < 1 and 0 < iou <= 1 and max_det > 0):
        raise UserError(f"need 0 ≤ --score-thresh < 1, 0 < --iou ≤ 1 and --max-det > 0 (got "
                        f"{score_thresh}, {iou}, {max_det})")
    return float(score_thresh), float(iou), int(max_det)


THRESHOLD_KEYS = ("score_thresh", "iou", "max_det")  # in the ONNX file's metadata_props, as
# hwnas.<key>: the post-processing settings baked into the deployable ONNX, so a comparison with
# torch can use the same ones


def read_thresholds(path: str | Path) -> dict | None:
    """The settings `export_detector` recorded in the file (None for a file without them)."""
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False)
             .metadata_props}
    if not all(f"hwnas.{k}" in props for k in THRESHOLD_KEYS):
        return None
    return {"score_thresh": float(props["hwnas.score_thresh"]),
            "iou": float(props["hwnas.iou"]), "max_det": int(props["hwnas.max_det"])}


def export_detector(det: Detector, path: str | Path, score_thresh: float | None = None,
                    iou: float | None = None, max_det: int | None = None) -> dict:
    """Write the deployable ONNX (module docstring) through `hwnas.export.export_onnx`."""
    score_thresh, iou, max_det = deploy_thresholds(det, score_thresh, iou, max_det)
    s = det.cfg.image_size
    module = DeployableDetector(det, score_thresh, iou, max_det)
    path = export_onnx(module, (1, 3, s, s), path, output_names=OUTPUTS,
                       metadata={f"hwnas.{k}": v for k, v in
                                 zip(THRESHOLD_KEYS, (score_thresh, iou, max_det))})
    count = nms_nodes(path)
    if count < 1:
        raise AssertionError(f"{path}: the exported graph has no NonMaxSuppression node")
    return {"path": str(path), "nms_nodes": count, "input_shape": [1, 3, s, s],
            "outputs": {"boxes": [1, max_det, 4], "scores": [1, max_det],
                        "labels": [1, max_det], "num_dets": [1]},
            "score_thresh": score_thresh, "iou": iou, "max_det": max_det}


# ---- detections vs detections -------------------------------------------------------------------
def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of a [N, 4] and b [M, 4] xyxy → [N, M]."""
    return box_ops.box_iou(torch.as_tensor(a, dtype=torch.float64),
                           torch.as_tensor(b, dtype=torch.float64)).numpy()


def compare_detections(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                       rel_tol: float = 1e-3, match_iou: float = 0.5) -> dict:
    """Match the detections of one image (not element-wise: two runtimes may order ties
    differently): each of `a`, best score first, takes the unmatched detection of `b` with the
    same label and the nearest box (L∞); the pair counts if its IoU ≥ `match_iou` or its boxes
    agree within `rel_tol` (degenerate boxes have no IoU).

    `box_rel_err` is the largest |Δcoordinate| / max(|coordinate|, 1 px) over matched pairs;
    `ok` means equal counts, everything matched, and box_rel_err ≤ `rel_tol`.
    """
    na, nb = len(a["scores"]), len(b["scores"])
    ba_all = np.asarray(a["boxes"], np.float64).reshape(-1, 4)
    bb_all = np.asarray(b["boxes"], np.float64).reshape(-1, 4)
    lb = np.asarray(b["labels"])
    ious = _iou(ba_all, bb_all) if na and nb else np.zeros((na, nb))
    used = np.zeros(nb, bool)
    box_err = score_err = 0.0
    matched = 0
    for i in np.argsort(-np.asarray(a["scores"]), kind="stable"):
        cand = np.where(~used & (lb == a["labels"][i]))[0]
        if not len(cand):
            continue
        rel = (np.abs(bb_all[cand] - ba_all[i]) / np.maximum(np.abs(bb_all[cand]), 1.0)).max(1)
        best = int(np.argmin(rel))
        j = cand[best]
        if ious[i, j] >= match_iou or rel[best] <= rel_tol:
            used[j] = True
            matched += 1
            box_err = max(box_err, float(rel[best]))
            score_err = max(score_err, abs(float(a["scores"][i]) - float(b["scores"][j])))
    ok = na == nb == matched and box_err <= rel_tol
    return {"count_a": na, "count_b": nb, "matched": matched, "box_rel_err": box_err,
            "score_abs_err": score_err, "ok": bool(ok)}


def parity(det: Detector, model, split, limit: int | None = None, rel_tol: float = 1e-3,
           label: str = "onnx") -> dict:
    """`model` (a deployable ONNX path, run by onnxruntime, or a `Runner` with the deployable
    contract: a deployed TVM or TensorRT folder) vs torch `postprocess` on the first `limit`
    images of `split` (all by default): per-image `compare_detections` at `rel_tol`, summed up,
    and both COCO metric dicts (`label` names the model's entries)."""
    from hwnas.backends.base import Runner
    from hwnas.detection.evaluate import coco_metrics, detect_onnx, detect_runner, detect_torch

    ours = (detect_runner(model, split, limit) if isinstance(model, Runner)
            else detect_onnx(model, split, limit))
    theirs = detect_torch(det, split, limit=limit)
    per = [compare_detections(a, b, rel_tol=rel_tol) for a, b in zip(ours, theirs)]
    full = limit is None or limit >= len(split)
    return {"images": len(per),
            "images_with_detections": sum(p["count_b"] > 0 for p in per),
            "images_ok": sum(p["ok"] for p in per),
            "detections_torch": sum(p["count_b"] for p in per),
            f"detections_{label}": sum(p["count_a"] for p in per),
            "matched": sum(p["matched"] for p in per),
            "max_box_rel_err": max((p["box_rel_err"] for p in per), default=0.0),
            "max_score_abs_err": max((p["score_abs_err"] for p in per), default=0.0),
            "rel_tol": rel_tol,
            "ok": all(p["ok"] for p in per),
            "torch": coco_metrics(split, theirs) if full else None,
            label: coco_metrics(split, ours) if full else None}
