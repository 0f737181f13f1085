"""Detector latency from the table: a detector space's ops (backbone blocks, FPN, FCOS head,
post-processing with NMS) profiled into a real table, priced, and checked against whole
deployable detectors measured with the protocol (numbers are not asserted, only the plumbing)."""

import numpy as np
import pytest

from conftest import FAST, run_cli
from hwnas.latency import LatencyTable, LutPredictor, table_path
from hwnas.latency.validate import validate
from hwnas.spaces import get_space


@pytest.fixture(scope="module")
def det_tables(fcos_tables):
    return fcos_tables


def test_detector_ops_are_the_backbone_blocks_fpn_head_and_post():
    space = get_space("tiny-fcos")
    keys = space.op_keys(space.canary())
    kinds = [k.kind for k in keys]
    assert kinds[0] == "stem" and "head" not in kinds  # no classifier in a detector
    assert kinds[-3:] == ["fpn", "fcos_head2", "fcos_post_worst_k1000"]
    fpn = keys[-3]
    assert [s[1] for s in fpn.in_shapes] == [f.channels for f in space.feature_info()]
    post = keys[-1]
    assert post.in_shapes[0][1] == sum(s[2] * s[3] for s in fpn.in_shapes)  # every location
    assert space.num_choices == get_space("tiny").num_choices
    # the walk matches the built (deployable) detector's own shapes, level by level
    import torch

    model = space.build(space.canary())
    with torch.no_grad():
        feats = list(model.det.backbone(torch.zeros(space.default_input)).values())
        out = model.det(torch.zeros(space.default_input))
    assert [tuple(f.shape) for f in feats] == list(fpn.in_shapes)
    assert tuple(out["cls_logits"].shape) == post.in_shapes[0]
    assert tuple(out["bbox_regression"].shape) == post.in_shapes[1]


def test_detectors_are_priced_and_validated_from_the_table(det_tables, device, tmp_path):
    space = get_space("tiny-fcos")
    t = LatencyTable.load(table_path(det_tables, device, space.name, space.default_input))
    assert len(t.rows) == len(space.unique_op_keys())
    assert any(k.startswith("fcos_post") for k in t.rows)
    pred = LutPredictor(t, space)
    archs = space.sample_distinct(8, np.random.default_rng(0))
    assert np.allclose(pred.predict_many(archs), [pred.predict(a) for a in archs])
    rep = validate(pred, device, 4, 1, tmp_path / "v", protocol=FAST, progress=False)
    assert rep.n == 4 and rep.drift is not None  # whole deployable detectors, NMS inside
    d = run_cli("predict", "--device", "cpu-ort-fp32", "--space", "tiny-fcos", "--arch",
                "tiny-fcos:0123", "--tables", det_tables, "--json", check_rc=0)
    assert '"latency_ms"' in d.stdout


def test_latency_candidates_run_nms_at_its_worst_case():
    """Every top-k box overlaps a neighbour and none is suppressed (NMS keeps them all), the
    scores stay the model's own, and the table's post op sees the same regression."""
    import torch
    from torchvision.ops import box_iou, nms

    from hwnas.detection.export import WorstCasePost, worst_case_reg
    from hwnas.detection.model import build_detector

    space = get_space("tiny-fcos")
    model = space.build(space.sample_distinct(1, np.random.default_rng(3))[0]).eval()
    det = model.det
    with torch.no_grad():
        out = det(torch.randn(space.default_input))
        anchors, _ = det.anchors()
        boxes = det.box_coder.decode(out["bbox_regression"][0], anchors)
        scores = out["cls_logits"][0].max(1).values
    assert len(nms(boxes, scores, det.cfg.nms_thresh)) == len(boxes)  # nothing suppressed
    iou = box_iou(boxes, boxes).fill_diagonal_(0)
    assert (iou.max(1).values > 0.4).all() and iou.max() < det.cfg.nms_thresh
    assert len(torch.unique(scores)) > len(scores) // 2  # distinct scores to sort
    assert worst_case_reg(det) == pytest.approx(3.0)
    c = space.detector_config(space.canary())
    post = WorstCasePost(build_detector(c), c.score_thresh, c.nms_thresh, c.max_det)
    with torch.no_grad():
        same = post(out["cls_logits"], torch.randn_like(out["bbox_regression"]),
                    out["bbox_ctrness"])
        ref = model.post(out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"])
    assert all(torch.equal(a, b) for a, b in zip(same, ref))
