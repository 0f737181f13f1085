"""TensorRT backend. The pure-Python parts (options, precision plan, cache keys and cache
validation) are tested everywhere; building and running engines needs TensorRT and an NVIDIA
GPU, and those tests skip with the reason where either is missing."""

import dataclasses
import json

import numpy as np
import pytest

from hwnas.backends import backend_available, compile_model
from hwnas.backends.trt import (EngineCache, TrtOptions, available, cache_key, parse_options,
                                precision_plan)
from hwnas.devices import Device, load_device
from hwnas.errors import UserError

from conftest import run_cli

OK, WHY = available()


def _dev(precision="fp16", **options):
    return Device("t", "tensorrt", precision, 1, "", options)


def test_parse_options_defaults_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HWNAS_TRT_CACHE", str(tmp_path))
    o = parse_options(load_device("gpu-trt-fp16"))
    assert o.precision == "fp16" and o.typing == "auto" and o.engine_cache == str(tmp_path)
    for bad, frag in [({"typing": "loose"}, "typing"), ({"workspace_mib": -1}, "workspace"),
                      ({"layer_precisions": {"/stem": "int4"}}, "layer_precisions"),
                      ({"tactic": 3}, "unknown TensorRT option")]:
        with pytest.raises(UserError, match=frag):
            parse_options(_dev(**bad))
    with pytest.raises(UserError, match="precision"):
        parse_options(_dev("bf16"))


@pytest.mark.parametrize("precision,major,typing,flags,rewrite", [
    ("fp32", 10, "weak", (), None),
    ("fp16", 10, "weak", ("FP16",), None),
    ("int8", 10, "weak", ("INT8", "FP16"), "qdq"),
    ("fp32", 11, "strong", (), None),
    ("fp16", 11, "strong", (), "fp16"),  # TRT 11: precision lives in the graph
    ("int8", 11, "strong", (), "qdq"),
])
def test_precision_plan_per_version(precision, major, typing, flags, rewrite):
    plan = precision_plan(TrtOptions(precision=precision), major)
    assert (plan.typing, plan.flags, plan.onnx_rewrite) == (typing, flags, rewrite)


def test_precision_plan_per_layer_and_strong_on_10():
    o = TrtOptions(precision="fp16", layer_precisions={"/stem": "fp32"})
    plan = precision_plan(o, 10)
    assert plan.per_layer and "OBEY_PRECISION_CONSTRAINTS" in plan.flags
    strong = precision_plan(dataclasses.replace(o, typing="strong"), 10)
    assert strong.typing == "strong" and not strong.per_layer and strong.onnx_rewrite == "fp16"
    with pytest.raises(UserError, match="no weak typing"):
        precision_plan(dataclasses.replace(o, typing="weak"), 11)


def test_cache_key_changes_with_everything_an_engine_depends_on():
    o = TrtOptions(precision="fp16")
    p = precision_plan(o, 10)
    base = cache_key(b"onnx", "10.3.0", "H100 (sm 9.0)", o, p)
    assert base == cache_key(b"onnx", "10.3.0", "H100 (sm 9.0)", o, p)
    others = {cache_key(b"onnx2", "10.3.0", "H100 (sm 9.0)", o, p),
              cache_key(b"onnx", "10.4.0", "H100 (sm 9.0)", o, p),
              cache_key(b"onnx", "10.3.0", "A100 (sm 8.0)", o, p),
              cache_key(b"onnx", "10.3.0", "H100 (sm 9.0)",
                        dataclasses.replace(o, workspace_mib=2048), p),
              cache_key(b"onnx", "10.3.0", "H100 (sm 9.0)", TrtOptions(precision="int8"),
                        precision_plan(TrtOptions(precision="int8"), 10))}
    assert base not in others and len(others) == 5
    i8 = TrtOptions(precision="int8")
    assert cache_key(b"onnx", "10.3.0", "g", i8, p) != cache_key(
        b"onnx", "10.3.0", "g", dataclasses.replace(i8, quantizer={"int8_seed": 1}), p)


def test_engine_cache_round_trip_and_refusals(tmp_path):
    cache = EngineCache(tmp_path)
    meta = {"trt_version": "10.3.0", "gpu_name": "H100 (sm 9.0)", "precision": "fp16"}
    assert cache.load("k", meta) == (None, "not cached")
    cache.store("k", b"\x00engine", meta, '{"Layers": []}')
    assert cache.load("k", meta) == (b"\x00engine", "")
    engine, meta_path, layers = cache.paths("k")
    assert json.loads(layers.read_text()) == {"Layers": []}  # inspector output beside it
    # an entry from another TensorRT or GPU is rebuilt, never reused
    data, why = cache.load("k", {**meta, "trt_version": "11.0.0"})
    assert data is None and "trt_version" in why
    data, why = cache.load("k", {**meta, "gpu_name": "A100 (sm 8.0)"})
    assert data is None and "gpu_name" in why
    engine.write_bytes(b"tampered")
    data, why = cache.load("k", meta)
    assert data is None and "hash" in why
    meta_path.write_text("{not json")
    assert cache.load("k", meta)[0] is None


@pytest.mark.skipif(OK, reason="TensorRT and a GPU are present here")
def test_unavailable_is_a_clear_one_line_error(tmp_path):
    dev = load_device("gpu-trt-fp16")
    ok, why = backend_available(dev)
    assert not ok and why
    with pytest.raises(UserError, match="cannot use TensorRT here"):
        compile_model(tmp_path / "m.onnx", dev)
    d = json.loads(run_cli("devices", "--json", check_rc=0).stdout)
    row = [r for r in d["devices"] if r["name"] == "gpu-trt-int8"][0]
    assert row["available"] is False and row["why_not"] == why


@pytest.mark.skipif(not OK, reason=f"TensorRT backend unavailable here: {WHY}")
@pytest.mark.parametrize("name", ["gpu-trt-fp16", "gpu-trt-int8"])
def test_engine_builds_caches_and_matches_fp32(name, tiny, device, tmp_path, monkeypatch):
    from hwnas.compare import TOLERANCES, output_diff
    from hwnas.export import export_onnx

    monkeypatch.setenv("HWNAS_TRT_CACHE", str(tmp_path / "cache"))
    path = export_onnx(tiny.build(tiny.parse("tiny:0123")), tiny.default_input,
                       tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal(tiny.default_input).astype(np.float32)
    with compile_model(path, device) as r:
        ref = r.run({"input": x})
    dev = load_device(name)
    dev = dataclasses.replace(dev, options={**dev.options, "profile_nodes": True})
    with compile_model(path, dev) as r:
        _, rel = output_diff(r.run({"input": x}), ref)
        assert rel <= TOLERANCES[dev.precision]
        assert r.node_profile() and r.inspector_path.is_file()
    assert len(list((tmp_path / "cache").glob("*.engine"))) == 1
    with compile_model(path, dev):  # second compile: from the cache
        pass
    assert len(list((tmp_path / "cache").glob("*.engine"))) == 1
