"""onnxruntime int8 (`cpu-ort-int8`): real quantisation and real sessions on the tiny space."""

import dataclasses

import numpy as np
import onnx
import pytest

from hwnas.backends import compile_model
from hwnas.backends.ort_quant import MAX_IR_VERSION, quantize_file, skipped_nodes
from hwnas.compare import TOLERANCES, output_diff
from hwnas.devices import load_device
from hwnas.errors import UserError
from hwnas.export import export_onnx
from hwnas.latency import LatencyTable, LutPredictor, table_path
from hwnas.latency.profile import profile

from conftest import FAST


@pytest.fixture(scope="module")
def int8():
    return load_device("cpu-ort-int8")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, tiny):
    return export_onnx(tiny.build(tiny.parse("tiny:0123")), tiny.default_input,
                       tmp_path_factory.mktemp("m") / "m.onnx")


def test_quantised_model_is_qdq_and_loadable(int8, tiny_onnx, tmp_path):
    q = onnx.load(str(quantize_file(tiny_onnx, tmp_path / "q.onnx", int8)))
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert q.ir_version <= MAX_IR_VERSION  # what onnxruntime 1.31 accepts
    # per-channel: the weight scales of a conv have one entry per output channel
    scales = [i for i in q.graph.initializer if i.name.endswith("_scale") and len(i.dims) == 1
              and i.dims[0] > 1]
    assert scales


def test_int8_output_close_to_fp32(int8, device, tiny_onnx):
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with compile_model(tiny_onnx, device) as r:
        ref = r.run({"input": x})
    with compile_model(tiny_onnx, int8) as r:
        got = r.run({"input": x})
    _, rel = output_diff(got, ref)
    assert 0 < rel <= TOLERANCES["int8"]  # quantised (not fp32 in disguise), and still right


def test_skip_list_keeps_depthwise_and_stem_convs_fp32(int8, tiny_onnx, tmp_path):
    model = onnx.load(str(tiny_onnx))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    skip = set(skipped_nodes(model, ["depthwise", "stem"]))
    assert skip and len(skip) < len(convs)
    assert any(n.startswith("/stem/") for n in skip)
    dev = dataclasses.replace(int8, options={**int8.options, "int8_skip": ["depthwise", "stem"]})
    q = onnx.load(str(quantize_file(tiny_onnx, tmp_path / "q.onnx", dev)))
    # a skipped conv keeps its fp32 weight initializer, a quantised one gets an int8 one
    fp32_weights = {i.name for i in q.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                    and len(i.dims) == 4}
    assert len(fp32_weights) == len(skip)
    with pytest.raises(UserError, match="int8_skip"):
        skipped_nodes(model, ["pointwise"])


def test_bad_activation_option_is_a_user_error(int8, tiny_onnx, tmp_path):
    dev = dataclasses.replace(int8, options={**int8.options, "int8_activation": "int4"})
    with pytest.raises(UserError, match="int8_activation"):
        quantize_file(tiny_onnx, tmp_path / "q.onnx", dev)


def test_unknown_op_names_the_op_and_the_backend(int8, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # onnxruntime's shape inference drops a file in the cwd
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["input"], ["out"], domain="hwnas.test")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, [1, 3, 4, 4])], [helper.make_tensor_value_info(
            "out", TensorProto.FLOAT, [1, 3, 4, 4])])
    # helper.make_model writes the newest IR version, which onnxruntime 1.31 refuses: pin it
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                            helper.make_opsetid("hwnas.test", 1)],
                          ir_version=MAX_IR_VERSION)
    path = tmp_path / "bad.onnx"
    onnx.save(m, str(path))
    for dev in (load_device("cpu-ort-fp32"), int8):
        with pytest.raises(UserError, match="onnxruntime.*NoSuchOp"):
            compile_model(path, dev)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]  # nothing left behind


def test_profile_int8_keys_carry_the_precision(int8, tiny, tmp_path):
    rep = profile(int8, tiny, tiny.default_input, tmp_path, FAST, calibration_n=0,
                  progress=False)
    t = LatencyTable.load(table_path(tmp_path, "cpu-ort-int8", "tiny", tiny.default_input))
    assert rep.measured_ops == len(t.rows) > 0
    assert all(k.endswith(":int8") for k in t.rows)
    assert set(t.rows) == {str(k) for k in tiny.unique_op_keys(precision="int8")}
    assert LutPredictor(t, tiny, calibrated=False).predict(tiny.parse("tiny:0123")) > 0
