"""Detection: shapes-det and the COCO loader (bad data included), the FCOS detector on the tiny
space, exact resume, pycocotools metrics, the deployable ONNX (NonMaxSuppression inside, parity
with torch on inputs with many detections) and the `detect` CLI. Real parts throughout, tiny
inputs: 64-px images, a handful of them."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from hwnas.detection.cli import COMMANDS, add_parsers
from hwnas.detection.data import generate_shapes_det, letterbox, load_coco
from hwnas.detection.evaluate import (PerImageAP, coco_metrics, detect_onnx, detect_torch,
                                      paired_ap)
from conftest import FAST
from hwnas.detection.export import compare_detections, export_detector, nms_nodes
from hwnas.detection.model import (DetectorConfig, build_detector, candidate_state_from,
                                   init_backbone)
from hwnas.detection.train import DetectorTrainer, DetTrainConfig, load_detector
from hwnas.errors import UserError

SIZE = 64
SMALL = {"train": 16, "val": 6, "test": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_shapes_det(tmp_path_factory.mktemp("det") / "sd", seed=3, sizes=SMALL,
                               image_size=SIZE)


def tiny_cfg(**kw) -> DetectorConfig:
    base = dict(space="tiny", arch="tiny:0123", num_classes=4, image_size=SIZE,
                fpn_channels=32)
    base.update(kw)
    return DetectorConfig(**base)


def train_cfg(data, **kw) -> DetTrainConfig:
    base = dict(space="tiny", arch="tiny:0123", data=str(data), image_size=SIZE, steps=4,
                batch_size=4, fpn_channels=32, warmup_steps=1, ckpt_every=2, lr=1e-3)
    base.update(kw)
    return DetTrainConfig(**base)


def forced(det, bias: float):
    """`det` with every class logit biased by `bias`: +4 gives a full max_det of detections."""
    with torch.no_grad():
        det.head.classification_head.cls_logits.bias.fill_(bias)
    return det.eval()


# ---- data ------------------------------------------------------------------------------------
def test_shapes_det_is_seeded_cached_and_coco(data, tmp_path):
    ann = json.loads((data / "annotations" / "instances_val.json").read_text())
    assert len(ann["images"]) == SMALL["val"] and len(ann["categories"]) == 4
    assert all(2 <= sum(a["image_id"] == im["id"] for a in ann["annotations"]) <= 5
               for im in ann["images"])
    stamp = (data / "shapes-det.json").stat().st_mtime_ns
    assert generate_shapes_det(data, seed=3, sizes=SMALL, image_size=SIZE) == data
    assert (data / "shapes-det.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    again = generate_shapes_det(tmp_path / "again", seed=3, sizes=SMALL, image_size=SIZE)
    assert (again / "annotations" / "instances_val.json").read_text() == json.dumps(ann)
    assert (again / "val" / "000001.png").read_bytes() == (data / "val" / "000001.png").read_bytes()
    with pytest.raises(UserError, match="not this shapes-det generation"):
        generate_shapes_det(data, seed=4, sizes=SMALL, image_size=SIZE)


def test_loader_targets_and_flips(data):
    split = load_coco(data, "train", SIZE)
    assert split.classes == ["rectangle", "ellipse", "triangle", "cross"]
    x, t = split.batch([0, 1], hflip=np.array([True, False]), vflip=np.array([True, False]))
    assert x.shape == (2, 3, SIZE, SIZE) and x.dtype == torch.float32
    raw = split.target(0)["boxes"]
    expect = torch.stack([SIZE - raw[:, 2], SIZE - raw[:, 3], SIZE - raw[:, 0],
                          SIZE - raw[:, 1]], 1)
    assert torch.equal(t[0]["boxes"], expect)
    assert torch.equal(t[1]["boxes"], split.target(1)["boxes"])
    for i in range(len(split)):
        b = split.target(i)["boxes"]
        assert (b[:, 2:] > b[:, :2]).all() and b.min() >= 0 and b.max() <= SIZE


def _coco(tmp_path, images=None, anns=None, cats=None, size=(100, 50)):
    """A one-image COCO dataset (100×50 by default) in `tmp_path`; returns its folder."""
    (tmp_path / "annotations").mkdir(exist_ok=True)
    (tmp_path / "val").mkdir(exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(tmp_path / "val" / "a.png")
    data = {"images": images if images is not None else
            [{"id": 7, "file_name": "a.png", "width": size[0], "height": size[1]}],
            "annotations": anns if anns is not None else
            [{"id": 1, "image_id": 7, "category_id": 12, "bbox": [10, 5, 40, 20],
              "iscrowd": 0}],
            "categories": cats if cats is not None else [{"id": 12, "name": "thing"}]}
    (tmp_path / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return tmp_path


def test_letterbox_scales_boxes_and_pads_grey(tmp_path):
    split = load_coco(_coco(tmp_path), "val", 64)
    img, (sx, sy) = split.image(0)
    assert (sx, sy) == (0.64, 0.64)
    assert img.shape == (3, 64, 64) and (img[:, 40:, :] == 128).all()  # padded bottom
    assert tuple(img[:, 0, 0].tolist()) == (200, 10, 10)
    assert torch.allclose(split.target(0)["boxes"], torch.tensor([[6.4, 3.2, 32.0, 16.0]]))
    assert split.cat_ids == [12] and split.target(0)["labels"].tolist() == [0]
    u8, _ = letterbox(Image.new("RGB", (64, 64)), 64)
    assert u8.shape == (3, 64, 64)


BAD = {
    "missing image": (dict(images=[{"id": 7, "file_name": "nope.png", "width": 100,
                                    "height": 50}]), "nope.png.*missing"),
    "box outside": (dict(anns=[{"id": 3, "image_id": 7, "category_id": 12,
                                "bbox": [80, 5, 40, 20]}]), "annotation id 3.*outside"),
    "degenerate box": (dict(anns=[{"id": 4, "image_id": 7, "category_id": 12,
                                   "bbox": [10, 5, 0, 20]}]), "annotation id 4.*degenerate"),
    "unknown category": (dict(anns=[{"id": 5, "image_id": 7, "category_id": 99,
                                     "bbox": [10, 5, 4, 4]}]), "annotation id 5.*category_id 99"),
    "unknown image": (dict(anns=[{"id": 6, "image_id": 8, "category_id": 12,
                                  "bbox": [10, 5, 4, 4]}]), "annotation id 6.*image_id 8"),
    "no images": (dict(images=[]), "no images"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_is_one_user_error_naming_file_and_entry(tmp_path, case):
    kw, pattern = BAD[case]
    root = _coco(tmp_path, **kw)
    with pytest.raises(UserError, match=pattern) as e:
        load_coco(root, "val", 64).check_images()
    assert "\n" not in str(e.value) and ("instances_val.json" in str(e.value))


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]", b"\xff\xfe\x00"])
def test_empty_or_garbled_annotation_file(tmp_path, content):
    root = _coco(tmp_path)
    (root / "annotations" / "instances_val.json").write_bytes(content)
    with pytest.raises(UserError, match="instances_val.json"):
        load_coco(root, "val", 64)


def test_corrupt_image(tmp_path):
    root = _coco(tmp_path)
    (root / "val" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UserError, match="image id 7.*a.png.*not a readable image"):
        load_coco(root, "val", 64).check_images()


# ---- model and training ----------------------------------------------------------------------
def test_forward_loss_postprocess_shapes(data):
    det = build_detector(tiny_cfg())
    x, t = load_coco(data, "train", SIZE).batch([0, 1])
    out = det(x)
    anchors, per_level = det.anchors()
    assert per_level == [64, 16]  # tiny: strides 8, 16 at 64 px
    assert out["cls_logits"].shape == (2, 80, 4) and out["bbox_regression"].shape == (2, 80, 4)
    assert anchors.shape == (80, 4)
    losses = det.loss(out, t)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    sum(losses.values()).backward()
    assert det.head.regression_head.bbox_reg.weight.grad.abs().sum() > 0
    dets = forced(det, 4.0).postprocess(det(x))
    assert len(dets) == 2 and dets[0]["boxes"].shape == (det.cfg.max_det, 4)


def test_resume_takes_the_same_steps_and_refuses_other_configs(data, tmp_path):
    straight = DetectorTrainer(train_cfg(data), tmp_path / "a.pt", progress=False)
    res = straight.run()
    assert res["step"] == 4 and np.isfinite(res["loss_ema"])
    half = DetectorTrainer(train_cfg(data), tmp_path / "b.pt", progress=False)
    half.run(stop=2)
    resumed = DetectorTrainer(train_cfg(data), tmp_path / "b.pt", progress=False)
    assert resumed.step == 2
    resumed.run()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="lr=0.001, not 0.002"):
        DetectorTrainer(train_cfg(data, lr=2e-3), tmp_path / "b.pt", progress=False)
    with pytest.raises(UserError, match="arch="):
        DetectorTrainer(train_cfg(data, arch="tiny:0000"), tmp_path / "b.pt", progress=False)
    (tmp_path / "c.pt").write_bytes((tmp_path / "b.pt").read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt or truncated"):
        DetectorTrainer(train_cfg(data), tmp_path / "c.pt", progress=False)
    det, meta = load_detector(tmp_path / "a.pt")
    assert meta["step"] == 4 and not det.training


def test_backbone_init_from_candidate_and_supernet_path(tmp_path):
    from hwnas.spaces import get_space
    from hwnas.train.supernet import FORMAT, Supernet

    cfg = tiny_cfg()
    torch.manual_seed(1)
    cand = get_space("tiny").build(get_space("tiny").parse("tiny:0123"))
    det = build_detector(cfg)
    init_backbone(det, candidate_state_from(cand.state_dict(), cfg), "cand")
    assert torch.equal(det.backbone.body.blocks[3].branch_main[0].weight,
                       cand.blocks[3].branch_main[0].weight)
    sn = Supernet(get_space("tiny"), SIZE, 10)
    ck = {"format": FORMAT, "meta": {"space": "tiny"}, "model": sn.state_dict()}
    init_backbone(det, candidate_state_from(ck, cfg), "supernet")
    for layer, choice in enumerate((0, 1, 2, 3)):
        assert torch.equal(det.backbone.body.blocks[layer].branch_main[0].weight,
                           sn.layers[layer][choice].branch_main[0].weight)
    other = build_detector(tiny_cfg(arch="tiny:3333"))
    with pytest.raises(UserError, match="does not fit backbone"):
        init_backbone(other, candidate_state_from(cand.state_dict(), cfg), "cand")


# ---- evaluation ------------------------------------------------------------------------------
def test_coco_metrics_of_ground_truth_and_of_shifted_boxes(data):
    split = load_coco(data, "val", SIZE)
    gt = [{"boxes": split.target(i)["boxes"].numpy(),
           "scores": np.ones(len(split.labels[i]), np.float32),
           "labels": split.labels[i]} for i in range(len(split))]
    m = coco_metrics(split, gt)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    shifted = [dict(d, boxes=d["boxes"] + np.array([3, 3, 3, 3], np.float32)) for d in gt]
    worse = coco_metrics(split, shifted)
    assert worse["AP"] < 0.9 and worse["AP50"] > worse["AP75"]
    wrong = [dict(d, labels=(d["labels"] + 1) % 4) for d in gt]
    assert coco_metrics(split, wrong)["AP"] == 0.0
    assert coco_metrics(split, [dict(d, boxes=d["boxes"][:0], scores=d["scores"][:0],
                                     labels=d["labels"][:0]) for d in gt])["AP"] == 0.0


def noisy(split, rng, jitter: float, fp: int):
    """Ground truth with boxes jittered by up to `jitter` px, random scores and `fp` false
    boxes per image: detections with a COCO AP well inside (0, 1)."""
    out = []
    for i in range(len(split)):
        b = split.target(i)["boxes"].numpy()
        b = b + rng.uniform(-jitter, jitter, b.shape).astype(np.float32)
        extra = rng.uniform(0, SIZE / 2, (fp, 2)).astype(np.float32)
        extra = np.concatenate([extra, extra + rng.uniform(4, SIZE / 2, (fp, 2))], 1)
        out.append({"boxes": np.concatenate([b, extra.astype(np.float32)]),
                    "scores": rng.uniform(0, 1, len(b) + fp).astype(np.float32).round(2),
                    "labels": np.concatenate([split.labels[i], rng.integers(0, 4, fp)])})
    return out


def test_per_image_ap_is_pycocotools_ap_on_any_subset_and_pairs_by_bootstrap(tmp_path):
    data = generate_shapes_det(tmp_path / "sd", seed=5, sizes={"train": 1, "val": 40, "test": 1},
                               image_size=SIZE)
    split = load_coco(data, "val", SIZE)
    rng = np.random.default_rng(0)
    good, bad = noisy(split, rng, 2.0, 2), noisy(split, rng, 6.0, 4)
    for dets in (good, bad):
        p = PerImageAP(split, dets)
        assert 0.05 < p.ap() < 0.95  # not a trivial AP: every branch of the curve is used
        # the scores round to 2 decimals, so ties across images are broken as pycocotools does
        assert p.ap() == pytest.approx(coco_metrics(split, dets)["AP"], abs=5e-5)
        assert p.ap(np.arange(17)) == pytest.approx(coco_metrics(split, dets[:17])["AP"],
                                                    abs=5e-5)
        # the split without its first 23 images is those images alone, to pycocotools too
        tail = split.images_from(23)
        assert len(tail) == 17 and torch.equal(tail.image(0)[0], split.image(23)[0])
        assert coco_metrics(tail, dets[23:])["AP"] == pytest.approx(p.ap(np.arange(23, 40)),
                                                                    abs=5e-5)
    g, b = PerImageAP(split, good), PerImageAP(split, bad)
    same = paired_ap(g, g, resamples=200)
    assert same["diff"] == 0 and same["ci95"] == [0, 0] and not same["significantly_worse"]
    worse = paired_ap(b, g, resamples=200)
    assert worse["diff"] < 0 and worse["significantly_worse"] and worse["ci95"][1] < 0
    assert paired_ap(g, b, resamples=200)["significantly_better"]
    nothing = [dict(d, boxes=d["boxes"][:0], scores=d["scores"][:0], labels=d["labels"][:0])
               for d in good]
    assert PerImageAP(split, nothing).ap() == 0.0


# ---- export ----------------------------------------------------------------------------------
def test_export_has_nms_and_matches_torch_with_many_detections(data, tmp_path):
    torch.manual_seed(0)
    det = forced(build_detector(tiny_cfg(max_det=40)), 4.0)
    info = export_detector(det, tmp_path / "d.onnx")
    assert info["nms_nodes"] == 1 and info["outputs"]["boxes"] == [1, 40, 4]
    sess = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["boxes", "scores", "labels", "num_dets"]
    split = load_coco(data, "val", SIZE)
    onnx_dets, torch_dets = detect_onnx(tmp_path / "d.onnx", split), detect_torch(det, split)
    for a, b in zip(onnx_dets, torch_dets):
        assert len(b["scores"]) == 40  # saturated: NMS and max_det both bite
        cmp = compare_detections(a, b)
        assert cmp["ok"], cmp
    # padding rows: score 0, label -1
    x, _ = split.batch([0])
    boxes, scores, labels, num = sess.run(None, {"input": x.numpy()})
    assert num.dtype == np.int64 and labels.dtype == np.int64 and int(num[0]) == 40
    # the same graph on a detector with (almost) no detections: still NMS, padded output
    quiet = forced(build_detector(tiny_cfg(max_det=40)), -12.0)
    export_detector(quiet, tmp_path / "q.onnx")
    assert nms_nodes(tmp_path / "q.onnx") == 1
    q = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    _, s, lab, n = q.run(None, {"input": x.numpy()})
    assert int(n[0]) == len(quiet.postprocess(quiet(x))[0]["scores"]) == 0
    assert (s == 0).all() and (lab == -1).all()


def test_onnx_and_torch_coco_ap_agree(data, tmp_path):
    torch.manual_seed(0)
    det = forced(build_detector(tiny_cfg()), 1.0)
    export_detector(det, tmp_path / "d.onnx")
    split = load_coco(data, "val", SIZE)
    a = coco_metrics(split, detect_torch(det, split))
    b = coco_metrics(split, detect_onnx(tmp_path / "d.onnx", split))
    assert abs(a["AP"] - b["AP"]) <= 0.001 and abs(a["AP50"] - b["AP50"]) <= 0.001


def test_compare_detections_matches_not_elementwise():
    a = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32),
         "scores": np.array([0.9, 0.8], np.float32), "labels": np.array([1, 2])}
    b = {k: v[::-1].copy() for k, v in a.items()}
    assert compare_detections(a, b)["ok"]
    b["boxes"][0, 0] += 0.5  # one coordinate of the box at 20 px now 20.5
    r = compare_detections(a, b)
    assert not r["ok"] and r["matched"] == 2 and r["box_rel_err"] == pytest.approx(0.5 / 20.5)
    c = dict(a, labels=np.array([1, 3]))
    assert compare_detections(a, c)["matched"] == 1
    assert not compare_detections(a, {k: v[:1] for k, v in a.items()})["ok"]


# ---- CLI -------------------------------------------------------------------------------------
def run_cli(*argv: str) -> None:
    ap = argparse.ArgumentParser(prog="hwnas")
    add_parsers(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(list(argv))
    COMMANDS[args.cmd](args)


def test_cli_train_eval_export(data, tmp_path, capsys):
    ck, onnx = tmp_path / "d.pt", tmp_path / "d.onnx"
    run_cli("detect", "train", "--space", "tiny", "--arch", "tiny:0123", "--data", str(data),
            "--steps", "2", "--image-size", str(SIZE), "--batch-size", "4",
            "--fpn-channels", "32", "-o", str(ck), "--json", "--quiet")
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 2 and res["images_per_s"] > 0
    run_cli("detect", "eval", "--ckpt", str(ck), "--split", "val", "--json")
    m = json.loads(capsys.readouterr().out)
    assert set(m) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"} and m["images"] == 6
    run_cli("detect", "export", "--ckpt", str(ck), "-o", str(onnx), "--max-det", "20", "--json")
    e = json.loads(capsys.readouterr().out)
    assert e["nms_nodes"] == 1 and e["max_det"] == 20 and e["cat_ids"] == [1, 2, 3, 4]
    with pytest.raises(UserError, match="exists; pass --force"):
        run_cli("detect", "export", "--ckpt", str(ck), "-o", str(onnx))
    run_cli("detect", "export", "--ckpt", str(ck), "-o", str(onnx), "--force")
    run_cli("detect", "eval", "--onnx", str(onnx), "--data", str(data), "--json")
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["images"] == 6
    run_cli("detect", "eval", "--ckpt", str(ck), "--onnx", str(onnx), "--json")
    p = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert p["images"] == 6 and p["ok"], p
    # a file exported with its own max-det is compared at it (the file records its settings)
    run_cli("detect", "export", "--ckpt", str(ck), "-o", str(onnx), "--max-det", "3", "--force")
    capsys.readouterr()
    from hwnas.detection.export import read_thresholds
    assert read_thresholds(onnx)["max_det"] == 3
    run_cli("detect", "eval", "--ckpt", str(ck), "--onnx", str(onnx), "--json")
    q = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert q["ok"] and 0 < q["detections_torch"] <= 3 * 6, q
    assert abs(p["torch"]["AP"] - p["onnx"]["AP"]) <= 0.001
    with pytest.raises(UserError, match="give --ckpt FILE, --onnx FILE, or both"):
        run_cli("detect", "eval")
    with pytest.raises(UserError, match="neither 'shapes-det' nor a folder"):
        run_cli("detect", "train", "--data", str(tmp_path / "nowhere"), "-o", str(ck))
    with pytest.raises(UserError, match="does not exist"):
        run_cli("detect", "eval", "--ckpt", str(tmp_path / "none.pt"))


def test_cli_data_writes_a_coco_folder(tmp_path, monkeypatch, capsys):
    import hwnas.detection.data as d

    monkeypatch.setattr(d, "SIZES", {"train": 2, "val": 1, "test": 1})
    run_cli("detect", "data", "-o", str(tmp_path / "sd"), "--json")
    root = json.loads(capsys.readouterr().out)["path"]
    assert len(load_coco(root, "test", 64)) == 1
    shutil.rmtree(root)


def test_compare_matches_detections_not_elements(tmp_path):
    """`hwnas compare` on a deployable detector: matched detections against onnxruntime fp32,
    on an input with a full max_det of detections (a forced class bias)."""
    from hwnas.compare import as_detections, compare
    from hwnas.devices import load_device

    det = forced(build_detector(tiny_cfg()), 4.0)
    export_detector(det, tmp_path / "d.onnx", max_det=20)
    (r,) = compare(tmp_path / "d.onnx", [load_device("cpu-ort-fp32")], FAST)
    assert r.detections is not None and r.detections["count_b"] == 20
    assert r.detections["matched"] == 20 and r.within_tolerance
    # a classifier's outputs are not detections: compared element-wise as before
    assert as_detections([np.zeros((1, 10), np.float32)]) is None
