import numpy as np
import onnx
import pytest

from conftest import FAST
from hwnas.errors import UserError
from hwnas.export import check_export, export_onnx, layer_of_node, load_onnx, onnx_input_shape
from hwnas.spaces import SPACES, get_space


@pytest.mark.parametrize("name", list(SPACES))
def test_candidate_export_matches_torch(name, tmp_path):
    space = get_space(name)
    arch = space.sample(np.random.default_rng(0))
    __import__("torch").manual_seed(0)  # the same weights whatever ran before
    model = space.build(arch)
    if hasattr(space, "backbone"):  # the deployable itself, not its worst-case-NMS latency twin
        # (whose equal-sized boxes leave near-ties at the max-det cut)
        from hwnas.detection.export import DeployableDetector
        from hwnas.detection.model import build_detector

        c = space.detector_config(arch)
        model = DeployableDetector(build_detector(c), c.score_thresh, c.nms_thresh, c.max_det)
    # give BN non-trivial statistics so the check means something
    g = np.random.default_rng(1)
    for m in model.modules():
        if hasattr(m, "running_var") and m.running_var is not None:
            m.running_mean.copy_(__import__("torch").tensor(g.normal(0, .1, m.num_features)))
            m.running_var.copy_(__import__("torch").tensor(g.uniform(.5, 2, m.num_features)))
    # small inputs for speed; a detector is built for its own input size
    shape = (1, 3, 64, 64) if space.default_input[2] > 128 else space.default_input
    path = export_onnx(model, shape, tmp_path / "m.onnx")
    if hasattr(space, "backbone"):  # a deployable detector: NMS output order may differ on
        _assert_same_detections(model, path, shape)  # ties, so detections are matched
    else:
        check = check_export(model, path, shape)
        assert check.ok, check
    assert onnx_input_shape(load_onnx(path)) == shape


def _assert_same_detections(model, path, shape):
    import onnxruntime as ort
    import torch

    from hwnas.detection.export import compare_detections

    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        tb, ts, tl, tn = (t.numpy() for t in model.eval()(torch.from_numpy(x)))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ob, os_, ol, on = sess.run(None, {sess.get_inputs()[0].name: x})
    n, m = int(tn[0]), int(on[0])
    cmp = compare_detections({"boxes": tb[0, :n], "scores": ts[0, :n], "labels": tl[0, :n]},
                             {"boxes": ob[0, :m], "scores": os_[0, :m], "labels": ol[0, :m]})
    assert cmp["ok"], cmp


def test_single_block_export(tmp_path):
    space = get_space("det20")
    key = space.op_keys(space.arch([3] * 20), (1, 3, 64, 64))[5]
    block = space.build_op(key)
    path = export_onnx(block, key.in_shape, tmp_path / "b.onnx")
    assert check_export(block, path, key.in_shape).ok


def test_node_names_tie_back_to_layers(tmp_path):
    space = get_space("tiny")
    arch = space.arch([0, 3, 1, 2])
    path = export_onnx(space.build(arch), space.default_input, tmp_path / "m.onnx")
    parts = {layer_of_node(n.name) for n in onnx.load(path).graph.node if n.op_type == "Conv"}
    assert parts == {"stem", "layer0", "layer1", "layer2", "layer3"}
    assert layer_of_node("/head/fc/Gemm") == "head"
    assert layer_of_node("Identity_3") is None


def test_unreadable_onnx_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a model")
    with pytest.raises(UserError, match="not a readable ONNX"):
        load_onnx(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")


def test_export_replaces_atomically(tmp_path):
    space = get_space("tiny")
    path = tmp_path / "m.onnx"
    path.write_text("old")
    export_onnx(space.build(space.arch([0] * 4)), space.default_input, path)
    assert load_onnx(path) is not None
    assert not list(tmp_path.glob("*.tmp"))


def test_ops_of_several_inputs_export_and_measure(device, tmp_path):
    """An op keyed with `extra_inputs` (an FPN-style merge: upsample the coarse level, add)
    exports with one ONNX input per shape and is measured like any other item."""
    import torch
    from torch import nn

    from hwnas.backends import compiled
    from hwnas.measure import measure
    from hwnas.spaces import OpKey

    class Merge(nn.Module):
        def forward(self, fine, coarse):
            return fine + nn.functional.interpolate(coarse, scale_factor=2.0, mode="nearest")

    key = OpKey("merge", (1, 8, 8, 8), 8, extra_inputs=((1, 8, 4, 4),))
    with compiled(Merge(), key.in_shapes, device, tmp_path / "m.onnx") as runner:
        assert [s.name for s in runner.inputs] == ["input", "input1"]
        assert [s.shape for s in runner.inputs] == list(key.in_shapes)
        feed = runner.random_feed()
        ref = Merge()(*(torch.from_numpy(feed[s.name]) for s in runner.inputs)).numpy()
        assert np.allclose(runner.run(feed)[0], ref, atol=1e-6)
        assert measure(runner, FAST).best_ms > 0
