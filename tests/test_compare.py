"""`hwnas compare`: one model on several devices, as a user runs it."""

import json

import numpy as np
import pytest

from hwnas.compare import TOLERANCES, output_diff
from hwnas.errors import UserError

from conftest import run_cli
from test_cli import assert_user_error


def test_output_diff_is_scale_relative():
    ref = [np.array([1.0, -4.0])]
    assert output_diff([np.array([1.0, -3.0])], ref) == (1.0, 0.25)
    with pytest.raises(UserError, match="shape"):
        output_diff([np.zeros(3)], ref)


def test_every_precision_has_a_stated_tolerance():
    assert set(TOLERANCES) == {"fp32", "fp16", "int8"}
    assert TOLERANCES["fp32"] < TOLERANCES["fp16"] < TOLERANCES["int8"]


def test_compare_json_on_three_devices():
    p = run_cli("compare", "--devices", "cpu-ort-fp32,cpu-ort-int8,cpu-torch-eager",
                "--space", "tiny", "--arch", "tiny:0123", "--span-s", "0", "--json",
                check_rc=0)
    d = json.loads(p.stdout)
    assert d["model"] == "tiny:0123" and d["tolerances"] == TOLERANCES
    rows = {r["device"]: r for r in d["devices"]}
    assert list(rows) == ["cpu-ort-fp32", "cpu-ort-int8", "cpu-torch-eager"]
    assert rows["cpu-ort-fp32"]["max_rel_diff"] <= 1e-6  # the reference's own engine
    assert rows["cpu-torch-eager"]["max_rel_diff"] <= TOLERANCES["fp32"]
    # int8 really is quantised (not zero difference) and still within its tolerance
    assert 0 < rows["cpu-ort-int8"]["max_rel_diff"] <= TOLERANCES["int8"]
    assert d["all_within_tolerance"] is True
    for r in rows.values():
        assert r["latency_ms"] > 0 and r["tolerance"] == TOLERANCES[r["precision"]]


def test_compare_onnx_file_table(tmp_path):
    onnx = tmp_path / "m.onnx"
    run_cli("export", "--space", "tiny", "--arch", "tiny:3210", "-o", onnx, check_rc=0)
    p = run_cli("compare", "--devices", "cpu-ort-int8", "--onnx", onnx, "--span-s", "0",
                check_rc=0)
    assert "cpu-ort-int8" in p.stdout and "max rel" in p.stdout


@pytest.mark.parametrize("args,frag", [
    (("--devices", "cpu-ort-fp32,nope", "--space", "tiny", "--arch", "tiny:0000"),
     "unknown device"),
    (("--devices", "gpu-ort-cuda", "--space", "tiny", "--arch", "tiny:0000"),
     "cannot use onnxruntime here"),
    (("--devices", "gpu-trt-fp16", "--space", "tiny", "--arch", "tiny:0000"),
     "cannot use TensorRT here"),
    (("--devices", "cpu-ort-fp32,cpu-ort-fp32", "--space", "tiny", "--arch", "tiny:0000"),
     "named twice"),
    (("--devices", "cpu-torch-eager", "--onnx", "missing.onnx"), "does not exist"),
    (("--devices", "cpu-ort-fp32"), "either --onnx"),
    (("--devices", ",", "--onnx", "x.onnx"), "at least one device"),
])
def test_bad_input_is_one_line_exit_2(args, frag):
    from hwnas.backends.trt import available
    if "gpu-trt-fp16" in args and available()[0]:
        pytest.skip("TensorRT is usable here")
    assert_user_error(run_cli("compare", *args), frag)


def test_torch_device_needs_the_module(tmp_path):
    onnx = tmp_path / "m.onnx"
    run_cli("export", "--space", "tiny", "--arch", "tiny:0000", "-o", onnx, check_rc=0)
    assert_user_error(run_cli("compare", "--devices", "cpu-torch-eager", "--onnx", onnx),
                      "runs torch modules, not ONNX")
