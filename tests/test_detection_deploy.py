"""Deployed detectors (`hwnas detect export --to tvm|trt`, `hwnas.detection.deploy`): a tiny FCOS
detector trained a few real steps, compiled for `cpu-tvm-untuned` through the CLI into a folder
(dense part on TVM, NMS stage on onnxruntime), compared with torch by matched detections and
with the deployable ONNX file output for output; its manifest; the refusals (exit 2, one line,
nothing written or overwritten); the TensorRT path up to where TensorRT is needed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from importlib.util import find_spec

import onnx
import pytest
import torch

pytest.importorskip("tvm", reason="apache-tvm not installed (pip install -e .[tvm])")

from conftest import FAST  # noqa: E402
from hwnas.cli import main  # noqa: E402
from hwnas.detection import deploy  # noqa: E402
from hwnas.detection.data import generate_shapes_det, load_coco  # noqa: E402
from hwnas.detection.evaluate import detect_runner, onnx_runner  # noqa: E402
from hwnas.detection.export import OUTPUTS, compare_detections, nms_nodes  # noqa: E402
from hwnas.detection.train import DetectorTrainer, DetTrainConfig, load_detector  # noqa: E402
from hwnas.errors import UserError  # noqa: E402
from hwnas.measure import measure_interleaved  # noqa: E402

SIZE, MAX_DET = 64, 30
SMALL = {"train": 16, "val": 6, "test": 2}
TRT_MISSING = "tensorrt is not installed here (NVIDIA's index only)"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_shapes_det(tmp_path_factory.mktemp("det") / "sd", seed=3, sizes=SMALL,
                               image_size=SIZE)


@pytest.fixture(scope="module")
def ckpt(data, tmp_path_factory):
    """A tiny detector (tiny:0123 backbone, FPN 32) after 4 real training steps."""
    path = tmp_path_factory.mktemp("ck") / "det.pt"
    DetectorTrainer(DetTrainConfig(space="tiny", arch="tiny:0123", data=str(data),
                                   image_size=SIZE, steps=4, batch_size=4, fpn_channels=32,
                                   warmup_steps=1, ckpt_every=2, lr=1e-3),
                    path, progress=False).run()
    return path


def cli(capsys, *argv) -> tuple[int, str, str]:
    """`hwnas ARGV` in this process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def deployed(ckpt, tmp_path_factory):
    """`hwnas detect export --to tvm` (cpu-tvm-untuned, the default) in a fresh process."""
    out = tmp_path_factory.mktemp("dep") / "det-tvm"
    proc = subprocess.run([sys.executable, "-m", "hwnas", "detect", "export", "--ckpt",
                           str(ckpt), "-o", str(out), "--to", "tvm", "--max-det", str(MAX_DET),
                           "--quiet", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def tree(path) -> dict:
    """{relative path: bytes} of every file under `path` (what 'nothing overwritten' compares)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


# ---- the TVM folder --------------------------------------------------------------------------
def test_tvm_folder_and_manifest(deployed, ckpt):
    out, printed = deployed
    assert sorted(p.name for p in out.iterdir()) == ["dense.onnx", "dense.so", "manifest.json",
                                                     "post.onnx"]
    assert not list(out.parent.glob(".*"))  # no temporary folder left beside it
    m = json.loads((out / "manifest.json").read_text())
    assert printed["path"] == str(out) and printed["format"] == m["format"] == deploy.FORMAT
    assert m["target"] == "tvm" and m["device"]["name"] == "cpu-tvm-untuned"
    assert m["input"] == {"name": "input", "shape": [1, 3, SIZE, SIZE], "dtype": "float32"}
    # the deployable ONNX's contract, output for output
    assert m["outputs"] == {"boxes": {"shape": [1, MAX_DET, 4], "dtype": "float32"},
                            "scores": {"shape": [1, MAX_DET], "dtype": "float32"},
                            "labels": {"shape": [1, MAX_DET], "dtype": "int64"},
                            "num_dets": {"shape": [1], "dtype": "int64"}}
    assert (m["score_thresh"], m["iou"], m["max_det"]) == (0.05, 0.6, MAX_DET)
    assert m["preprocessing"]["pad_value"] == 128 and m["preprocessing"]["size"] == SIZE
    assert m["classes"] == ["rectangle", "ellipse", "triangle", "cross"]
    assert m["cat_ids"] == [1, 2, 3, 4]
    assert m["tvm_version"] == m["versions"]["apache-tvm"] == metadata.version("apache-tvm")
    assert m["compiler"]["target"]["kind"] == "llvm" and m["compiler"]["tuning"] == "none"
    assert set(m["host"]) >= {"host_id", "cpu_model", "cpu_isa", "logical_cores", "machine"}
    assert m["checkpoint"]["path"] == str(ckpt)
    assert m["nms_candidates"] == 64 * 4 + 16 * 4  # strides 8, 16 at 64 px, 4 classes
    assert m["dense_check"]["max_rel_err"] <= m["dense_check"]["tolerance"]
    assert [s["runtime"] for s in m["stages"]] == ["tvm", "onnxruntime"]
    assert set(m["files"]) == {"dense.onnx", "dense.so", "post.onnx"}
    # NMS lives in the onnxruntime stage only; the stage's inputs are the heads' outputs
    assert nms_nodes(out / "dense.onnx") == 0 and nms_nodes(out / "post.onnx") == 1
    post = onnx.load(str(out / "post.onnx")).graph
    assert [i.name for i in post.input] == deploy.DENSE_OUTPUTS
    assert [o.name for o in post.output] == OUTPUTS


def test_parity_with_torch_through_the_cli(deployed, ckpt, data, capsys):
    out, _ = deployed
    rc, stdout, err = cli(capsys, "detect", "eval", "--ckpt", ckpt, "--deployed", out, "--json")
    assert rc == 0, err
    p = json.loads(stdout)
    assert p["images"] == SMALL["val"] and p["images_with_detections"] == p["images"]
    assert p["detections_torch"] >= 5 * SMALL["val"]  # there are detections, many of them
    assert p["ok"] and p["images_ok"] == p["images"]
    assert p["matched"] == p["detections_torch"] == p["detections_deployed"]
    assert p["max_box_rel_err"] <= 1e-3 and p["rel_tol"] == 1e-3
    assert p["exported_from_this_ckpt"] and p["target"] == "tvm"
    assert p["torch"] == p["deployed"]
    rc, stdout, err = cli(capsys, "detect", "eval", "--deployed", out, "--json")
    assert rc == 0, err
    metrics = json.loads(stdout)  # the data came from the manifest
    assert metrics["images"] == SMALL["val"] and metrics["AP"] == p["deployed"]["AP"]


def test_runner_equals_the_onnx_file_and_is_timed(deployed, ckpt, data, tmp_path, capsys):
    out, _ = deployed
    rc, _, err = cli(capsys, "detect", "export", "--ckpt", ckpt, "-o", tmp_path / "d.onnx",
                     "--max-det", MAX_DET)
    assert rc == 0, err
    split = load_coco(data, "val", SIZE)
    with deploy.DeployedDetectorRunner(out) as runner, \
            onnx_runner(tmp_path / "d.onnx") as ref:
        assert [(s.name, s.shape) for s in runner.outputs] == [
            ("boxes", (1, MAX_DET, 4)), ("scores", (1, MAX_DET)), ("labels", (1, MAX_DET)),
            ("num_dets", (1,))]
        counts = []
        for i in range(len(split)):
            feed = {"input": split.batch([i])[0].numpy()}
            a, b = runner.run(feed), ref.run(feed)
            assert [(o.dtype, o.shape) for o in a] == [(o.dtype, o.shape) for o in b]
            k = int(a[3][0])
            counts.append(k)
            assert k == int(b[3][0])
            cmp = compare_detections(*({"boxes": o[0][0, :k], "scores": o[1][0, :k],
                                        "labels": o[2][0, :k]} for o in (a, b)))
            assert cmp["ok"] and cmp["box_rel_err"] <= 1e-5, cmp
            assert (a[2][0, k:] == -1).all() and (a[1][0, k:] == 0).all()  # padding rows
        assert min(counts) > 0
        # the same detections through the evaluation loop, and the protocol can time it
        dets = detect_runner(runner, split, limit=2)
        assert [len(d["scores"]) for d in dets] == counts[:2]
        stats = measure_interleaved([runner], FAST).stats[0]
        assert stats.best_ms > 0


def test_force_replaces_only_a_deployed_folder(deployed, ckpt, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(deployed[0], out)
    before = tree(out)
    rc, _, err = cli(capsys, "detect", "export", "--ckpt", ckpt, "-o", out, "--to", "tvm",
                     "--max-det", "20", "--quiet")
    assert rc == 2 and "exists; pass --force" in err and tree(out) == before
    rc, _, err = cli(capsys, "detect", "export", "--ckpt", ckpt, "-o", out, "--to", "tvm",
                     "--max-det", "20", "--force", "--quiet")
    assert rc == 0, err
    assert json.loads((out / "manifest.json").read_text())["max_det"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no .tmp / .old left


# ---- refusals --------------------------------------------------------------------------------
def test_refusals_are_one_line_and_write_nothing(ckpt, data, tmp_path, capsys):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    not_det = tmp_path / "not_det.pt"
    torch.save({"format": "something/1", "model": {}}, not_det)
    new = tmp_path / "new"
    cases = [
        (["-o", other, "--to", "tvm", "--force"], "not a deployed detector folder"),
        (["-o", new, "--to", "tvm", "--device", "cpu-nope"], "unknown device 'cpu-nope'"),
        (["-o", new, "--to", "tvm", "--device", "cpu-ort-fp32"],
         "runs on onnxruntime, not tvm"),
        (["-o", new, "--to", "trt", "--device", "cpu-tvm-untuned"], "runs on tvm, not tensorrt"),
        (["-o", new, "--device", "cpu-tvm-untuned"], "--device is for --to tvm or --to trt"),
    ]
    for argv, msg in cases:
        rc, stdout, err = cli(capsys, "detect", "export", "--ckpt", ckpt, *argv)
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
    rc, _, err = cli(capsys, "detect", "export", "--ckpt", not_det, "-o", new, "--to", "tvm")
    assert rc == 2 and "is not an hwnas" in err
    assert not new.exists() and tree(other) == {"notes.txt": b"keep me"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "not_det.pt"]


def test_a_damaged_or_foreign_folder_is_refused(deployed, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(deployed[0], bad)
    with (bad / "post.onnx").open("ab") as f:
        f.write(b"\0")
    rc, _, err = cli(capsys, "detect", "eval", "--deployed", bad)
    assert rc == 2 and "does not match its manifest" in err
    rc, _, err = cli(capsys, "detect", "eval", "--deployed", tmp_path)
    assert rc == 2 and "not a deployed detector folder" in err
    other = tmp_path / "other"
    shutil.copytree(deployed[0], other)
    m = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(dict(m, tvm_version="0.1.0")))
    with pytest.raises(UserError, match="compiled with TVM 0.1.0"):
        deploy.DeployedDetectorRunner(other)
    m["host"]["cpu_isa"] = m["host"]["cpu_isa"] + ["amx_tile_from_the_future"]
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="amx_tile_from_the_future, which this CPU lacks"):
        deploy.DeployedDetectorRunner(other)


def test_relax_does_not_import_the_deployable_onnx(ckpt, tmp_path):
    """The measured reason NMS is a stage of its own on TVM (deploy.py's docstring): the whole
    deployable graph is refused by Relax's ONNX frontend, as a one-line UserError."""
    from hwnas.backends import tvm as tvm_backend
    from hwnas.detection.export import export_detector
    from hwnas.devices import load_device

    det, _ = load_detector(ckpt)
    export_detector(det, tmp_path / "d.onnx")
    with pytest.raises(UserError, match="cannot import") as e:
        tvm_backend.import_onnx(tmp_path / "d.onnx", load_device("cpu-tvm-untuned"))
    assert "\n" not in str(e.value)


# ---- TensorRT --------------------------------------------------------------------------------
def test_trt_device_and_nms_limits():
    assert deploy.resolve_device("trt", None).name == "gpu-trt-fp16"
    assert deploy.resolve_device("tvm", None).name == "cpu-tvm-untuned"
    assert deploy.trt_nms_limit("6.2") == deploy.trt_nms_limit("5.3") == 2000
    assert deploy.trt_nms_limit("9.0") == deploy.trt_nms_limit(None) == 5000


@pytest.mark.skipif(find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_trt_without_tensorrt_says_what_to_install(ckpt, tmp_path):
    out = tmp_path / "det-trt"
    proc = subprocess.run([sys.executable, "-m", "hwnas", "detect", "export", "--ckpt",
                           str(ckpt), "-o", str(out), "--to", "trt"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "pip install --extra-index-url https://pypi.nvidia.com tensorrt" in line
    assert "NVIDIA GPU" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(find_spec("tensorrt") is None, reason=TRT_MISSING)
def test_trt_engine_with_nms_inside(ckpt, tmp_path, capsys):
    from hwnas.backends.trt import available

    ok, why = available()
    if not ok:
        pytest.skip(f"TensorRT unusable here: {why}")
    out = tmp_path / "det-trt"
    rc, stdout, err = cli(capsys, "detect", "export", "--ckpt", ckpt, "-o", out, "--to", "trt",
                          "--max-det", MAX_DET, "--json")
    assert rc == 0, err
    m = json.loads(stdout)
    assert sorted(p.name for p in out.iterdir()) == ["detector.engine", "detector.onnx",
                                                     "manifest.json"]
    assert m["target"] == "tensorrt" and m["engine_check"]["count_b"] > 0
    rc, stdout, err = cli(capsys, "detect", "eval", "--ckpt", ckpt, "--deployed", out, "--json")
    assert rc == 0, err
    p = json.loads(stdout)  # fp16: boxes within 2e-2, a detection at a bound may flip
    assert p["detections_torch"] > 0 and p["matched"] >= 0.9 * p["detections_torch"], p
    assert p["max_box_rel_err"] <= p["rel_tol"] == 2e-2
