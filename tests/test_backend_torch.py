"""torch backend: the torch module itself, eager on the CPU here (no GPU in this environment;
CUDA tests skip with the reason)."""

import shutil

import numpy as np
import pytest

from hwnas.backends import backend_available, compile_model
from hwnas.devices import Device, load_device
from hwnas.errors import UserError
from hwnas.export import export_onnx
from hwnas.measure import measure

from conftest import FAST


@pytest.fixture(scope="module")
def model_and_onnx(tmp_path_factory, tiny):
    m = tiny.build(tiny.parse("tiny:0123"))
    return m, export_onnx(m, tiny.default_input, tmp_path_factory.mktemp("m") / "m.onnx")


def test_eager_cpu_matches_onnxruntime(model_and_onnx, device):
    m, path = model_and_onnx
    dev = load_device("cpu-torch-eager")
    assert backend_available(dev) == (True, "")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with compile_model(path, device) as r:
        ref = r.run({"input": x})[0]
    with compile_model(path, dev, module=m) as r:
        assert [s.shape for s in r.inputs] == [(1, 3, 32, 32)]
        out = r.run({"input": x})[0]
        assert measure(r, FAST).best_ms > 0
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4


def test_onnx_alone_is_refused_with_the_reason(model_and_onnx):
    _, path = model_and_onnx
    with pytest.raises(UserError, match="runs torch modules, not ONNX"):
        compile_model(path, load_device("cpu-torch-eager"))


def test_bad_options_and_missing_gpu_are_reasons():
    ok, why = backend_available(Device("t", "torch", "fp32", 1, "", {"mode": "jit"}))
    assert not ok and "mode" in why
    ok, why = backend_available(Device("t", "torch", "int8", 1, "", {}))
    assert not ok and "int8" in why
    import torch

    if not torch.cuda.is_available():
        for name in ("gpu-torch-fp16", "gpu-torch-fp32"):
            ok, why = backend_available(load_device(name))
            assert not ok and ("GPU" in why or "CUDA" in why)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs g++")
def test_torch_compile_cpu_matches_eager(model_and_onnx):
    m, path = model_and_onnx
    dev = Device("cpu-torch-compile", "torch", "fp32", 1, "", {"mode": "compile"})
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with compile_model(path, load_device("cpu-torch-eager"), module=m) as r:
        ref = r.run({"input": x})[0]
    with compile_model(path, dev, module=m) as r:
        out = r.run({"input": x})[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.skipif("not __import__('torch').cuda.is_available()",
                    reason="no CUDA GPU in this environment")
@pytest.mark.parametrize("name,tol", [("gpu-torch-fp32", 1e-4), ("gpu-torch-fp16", 2e-2)])
def test_cuda_devices_match_cpu(model_and_onnx, name, tol):
    m, path = model_and_onnx
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with compile_model(path, load_device("cpu-torch-eager"), module=m) as r:
        ref = r.run({"input": x})[0]
    with compile_model(path, load_device(name), module=m) as r:
        out = r.run({"input": x})[0]
    assert np.abs(out - ref).max() / np.abs(ref).max() < tol


def test_torch_device_through_measure_and_profile(tmp_path):
    """The pipeline hands torch devices the module it exported (not just the ONNX file)."""
    import json

    from conftest import FAST, run_cli
    from hwnas.devices import load_device
    from hwnas.latency import LatencyTable, LutPredictor
    from hwnas.latency.profile import profile
    from hwnas.spaces import get_space

    d = json.loads(run_cli("measure", "--device", "cpu-torch-eager", "--space", "tiny", "--arch",
                           "tiny:0123", "--span-s", "0", "--json", check_rc=0).stdout)
    assert d["latency_ms"] > 0
    space, device = get_space("tiny"), load_device("cpu-torch-eager")
    rep = profile(device, space, space.default_input, tmp_path, FAST, calibration_n=6,
                  progress=False)
    assert rep.measured_ops == len(space.unique_op_keys())
    pred = LutPredictor(LatencyTable.load(rep.table.path), space)
    assert pred.predict(space.arch([0, 1, 2, 3])) > 0
