"""Detection search (issue 10): the DetNAS detection supernet (real training steps on
shapes-det), its AP scorer (real pycocotools), searches priced by a real detector LUT (real
onnxruntime timing, FAST protocol), CRNAS on a toy CRNAS space, resume and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import profiled
from hwnas.errors import UserError
from hwnas.spaces import get_space


@pytest.fixture(scope="module")
def crnas_tables(tmp_path_factory, device):
    return profiled(tmp_path_factory, device, "tiny-crnas-fcos", 4)


def cli(*args, capsys):
    """`hwnas ARGS` in this process (the import is paid once): (exit code, stdout, stderr)."""
    from hwnas.cli import main

    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _train(space, out, steps=6, **kw):
    from hwnas.detection.supernet import DetSupernetConfig, DetSupernetTrainer

    cfg = DetSupernetConfig(space=space, image_size=64, steps=steps, batch_size=4,
                            ckpt_every=3, **kw)
    return DetSupernetTrainer(cfg, out, progress=False)


@pytest.fixture(scope="module")
def supernet(tmp_path_factory):
    out = tmp_path_factory.mktemp("dsn") / "tiny.pt"
    _train("tiny", out, steps=8, ref_steps=2).run()
    return out


@pytest.fixture(scope="module")
def crnas_supernet(tmp_path_factory):
    out = tmp_path_factory.mktemp("dsn") / "tiny-crnas.pt"
    _train("tiny-crnas", out, steps=6).run()
    return out


def test_supernet_paths_are_seeded_and_resume_bit_identical(tmp_path):
    """A run stopped after 3 steps and resumed ends with the weights of an unbroken run: the
    path of step k comes from the step's own generator, not from the process's history."""
    whole = _train("tiny", tmp_path / "a.pt")
    whole.run()
    half = _train("tiny", tmp_path / "b.pt")
    half.run(stop=3)
    resumed = _train("tiny", tmp_path / "b.pt")
    assert resumed.step == 3
    resumed.run()
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the paths really vary after the reference steps
    t = _train("tiny", tmp_path / "c.pt", ref_steps=2)
    paths = set()
    for step in range(8):
        t.step = step
        t.before_step(np.random.default_rng([0, step, 1]))
        paths.add(t.model.backbone.choices)
    assert (0, 0, 0, 0) in paths and len(paths) > 2


def test_init_from_classification_supernet(tmp_path):
    """DetNAS step 1 → 2: a classification supernet's backbone weights load as they are."""
    from hwnas.train.trainer import SupernetTrainer, TrainConfig

    cls = tmp_path / "cls.pt"
    SupernetTrainer(TrainConfig(space="tiny", data="shapes", image_size=32, steps=3,
                                batch_size=8, warmup_steps=1, match_steps=1),
                    cls, progress=False).run()
    t = _train("tiny", tmp_path / "det.pt", init=str(cls))
    ck = torch.load(cls, weights_only=True)
    own = t.model.backbone.state_dict()
    assert torch.equal(own["layers.1.2.branch_main.0.weight"],
                       ck["model"]["layers.1.2.branch_main.0.weight"])
    t.save()  # a detection supernet checkpoint is not a classification one
    with pytest.raises(UserError, match="not a classification supernet"):
        _train("tiny", tmp_path / "det2.pt", init=str(tmp_path / "det.pt"))
    with pytest.raises(UserError, match="space 'tiny'"):
        _train("tiny-crnas", tmp_path / "det3.pt", init=str(cls))


def test_scorer_recalibrates_each_path(supernet):
    """Scores are COCO APs in [0, 1], repeatable, and a path's BN statistics are its own."""
    from hwnas.detection.data import load_coco, resolve_data
    from hwnas.detection.supernet import DetSupernetScorer, load_det_supernet

    det, _ = load_det_supernet(supernet)
    root = resolve_data("shapes-det")
    sc = DetSupernetScorer(det, load_coco(root, "train", 64), load_coco(root, "val", 64),
                           bn_batches=2, bn_batch_size=8, val_n=12)
    space = get_space("tiny-fcos")
    archs = [space.parse("tiny-fcos:0123"), space.parse("tiny-fcos:3300")]
    first = sc.predict(archs)
    assert ((0 <= first) & (first <= 1)).all()
    assert np.array_equal(first, sc.predict(archs[::-1])[::-1])  # order does not matter
    # the search's COCOeval (faster-coco-eval) gives pycocotools' numbers
    from hwnas.detection.evaluate import coco_metrics
    sc.det.backbone.choices = archs[0].choices
    sc.det.eval()
    with torch.no_grad():
        dets = [{k: v.numpy() for k, v in d.items()} for x in sc.val_x
                for d in sc.det.postprocess(sc.det(x))]
    assert coco_metrics(sc.val, dets, fast=True) == coco_metrics(sc.val, dets)
    bn = det.backbone.layers[0][1].branch_main[1]
    sc.score(space.parse("tiny-fcos:1000"))
    mean_1 = bn.running_mean.clone()
    sc.score(space.parse("tiny-fcos:0000"))  # another path leaves layer 0 choice 1 alone
    assert torch.equal(bn.running_mean, mean_1)


def test_detect_search_end_to_end_and_resume(fcos_tables, supernet, tmp_path, capsys):
    from hwnas.devices import load_device
    from hwnas.latency.lookup import open_predictor

    space = get_space("tiny-fcos")
    lut, _ = open_predictor(load_device("cpu-ort-fp32"), space, space.default_input,
                            fcos_tables, None, False, "off", None)
    # the FAST protocol's calibration may have any intercept: the budget is the median price
    # of random candidates, so about half of them are over it
    budget = f"{np.median(lut.predict_many(space.sample_many(64, np.random.default_rng(0)))):.4f}"
    args = ["detect", "search", "--device", "cpu-ort-fp32", "--space", "tiny-fcos",
            "--supernet", supernet, "--tables", fcos_tables, "--evaluations", "12",
            "--val-n", "8", "--method", "evolution", "--json", "--quiet", "--budget-ms", budget,
            "-o", tmp_path / "s"]
    rc, out, err = cli(*args, capsys=capsys)
    assert rc == 0, err
    r = json.loads(out)
    assert r["predicted_latency_ms"] <= float(budget)
    assert all(lat <= float(budget) for _, _, lat, _ in
               json.loads((tmp_path / "s.json").read_text())["evaluated"])
    assert r["context"]["score_label"].startswith("supernet COCO AP")
    assert (tmp_path / "s.png").stat().st_size > 0
    # a finished search rerun resumes from its state and gives the same pick
    rc, out, _ = cli(*args, capsys=capsys)
    again = json.loads(out)
    assert rc == 0 and (again["best_arch"], again["score"]) == (r["best_arch"], r["score"])


def test_detect_search_bad_input(fcos_tables, supernet, crnas_supernet, tmp_path, capsys):
    base = ["detect", "search", "--device", "cpu-ort-fp32", "--tables", fcos_tables,
            "--evaluations", "4", "--quiet", "-o", tmp_path / "x"]
    rc, _, err = cli(*base, "--space", "tiny-fcos", "--supernet", supernet, "--budget-ms",
                     "0.0001", capsys=capsys)
    assert rc == 2 and "fastest" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli(*base, "--space", "tiny-fcos", "--supernet", crnas_supernet,
                     "--budget-ms", "100", capsys=capsys)
    assert rc == 2 and "cannot score" in err
    rc, _, err = cli(*base, "--space", "tiny-fcos", "--supernet", supernet, "--budget-ms", "100",
                     "--method", "crnas", capsys=capsys)
    assert rc == 2 and "CRNAS space" in err
    assert not (tmp_path / "x.json").exists()


def test_crnas_space_allocations():
    s = get_space("crnas20")
    allocs = s.allocations()
    assert allocs and all(sum(a) == 20 and min(a) >= 2 for a in allocs)
    a = s.allocation_arch((4, 4, 8, 4))
    assert s.depths(a) == (4, 4, 8, 4)
    # skipped layers are priced as their own op, dilated blocks carry their dilation
    keys = s.op_keys(s.allocation_arch((4, 4, 8, 4), 2))
    assert sum(k.kind == "skip" for k in keys) == 8
    assert {k.dilation for k in keys if k.kind == "shuffle3"} == {3}


def test_crnas_search_keeps_the_block_count(crnas_tables, crnas_supernet, tmp_path, capsys):
    space = get_space("tiny-crnas-fcos")
    cr = space.backbone
    rc, out, _ = cli("detect", "search", "--device", "cpu-ort-fp32", "--space",
                     "tiny-crnas-fcos", "--supernet", crnas_supernet, "--tables", crnas_tables,
                     "--method", "crnas", "--budget-ms", "1000", "--evaluations", "20",
                     "--val-n", "6", "--json", "--quiet", "-o", tmp_path / "c", capsys=capsys)
    assert rc == 0
    r = json.loads(out)
    pick = space.parse(r["best_arch"])
    assert sum(cr.depths(pick)) == cr.total_blocks
    steps = [h["step"] for h in r["history"]]
    assert steps[0] == "stages" and "dilations" in steps
    assert r["history"][0]["allocations_scored"] == len(cr.allocations())


def test_detect_demo_end_to_end(fcos_tables, supernet, tmp_path, capsys):
    """`hwnas demo`'s detection job on tiny-fcos: search, stand-alone export with NMS, parity
    with torch on val images, measured against the budget (its verdict not asserted)."""
    rc, out, err = cli("demo", "--space", "tiny-fcos", "--supernet", supernet, "--tables",
                       fcos_tables, "--evaluations", "6", "--out", tmp_path / "demo",
                       "--span-s", "0", "--json", "--quiet", capsys=capsys)
    assert rc == 0, err
    d = json.loads(out)
    p = d["pick"]
    assert p["nms_nodes"] >= 1 and Path(p["onnx"]).is_file()
    assert p["parity"]["images_ok"] == p["parity"]["images"] == 20
    assert d["search"]["evaluations"] == 6 and isinstance(p["keeps_budget"], bool)
    assert d["profile"]["measured_ops"] == 0  # the table was there: nothing re-profiled


def test_shipped_searched_detector_exports_and_matches_torch(tmp_path, capsys):
    """The committed searched detector (issue 10's study) is the pick its metadata names, and
    the one export command gives a deployable ONNX that matches torch on real val images."""
    from hwnas.detection.data import load_coco, resolve_data
    from hwnas.detection.export import parity
    from hwnas.detection.train import load_detector

    ckpt = (Path(__file__).parents[1] / "hwnas" / "detection" / "assets"
            / "det20-w0.5_searched_fcos.pt")
    det, meta = load_detector(ckpt)
    shipped = meta["shipped_from"]
    assert meta["config"]["arch"] == "det20:10031202020001210332"
    assert shipped["budget_ms"] == 5.095 and shipped["search_seed"] == 1
    onnx = tmp_path / "searched.onnx"
    rc, out, err = cli("detect", "export", "--ckpt", ckpt, "-o", onnx, "--json", capsys=capsys)
    assert rc == 0, err
    assert json.loads(out)["nms_nodes"] == 1
    split = load_coco(resolve_data(meta["config"]["data"]), "val", meta["detector"]["image_size"])
    got = parity(det, onnx, split, limit=8)
    assert got["ok"] and got["images"] == 8 and got["matched"] == got["detections_torch"] > 0
