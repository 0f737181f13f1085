"""The TVM backend: real TVM compiles of tiny blocks, compared with onnxruntime; the tuning
database (reuse, refusal of a foreign one); unsupported ops. Tuning uses a handful of trials."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

pytest.importorskip("tvm", reason="apache-tvm not installed (pip install -e .[tvm])")

from hwnas.backends import backend_available, compile_model  # noqa: E402
from hwnas.backends import tvm as tvm_backend  # noqa: E402
from hwnas.backends import tvm_tuning  # noqa: E402
from hwnas.devices import fingerprint_diff, load_device  # noqa: E402
from hwnas.errors import UserError  # noqa: E402
from hwnas.export import export_onnx  # noqa: E402

# TVM and onnxruntime sum in different orders; relative to the output's largest magnitude the
# difference stays near fp32 rounding (≤1e-6 seen); 1e-4 is check_export's tolerance
REL_TOL = 1e-4

_ms_ok, _ms_why = tvm_backend.available(None)
tuned_only = pytest.mark.skipif(not _ms_ok, reason=f"MetaSchedule unusable here: {_ms_why}")


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics (fresh BNs are identities, and a zero branch compares nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


def rel_err(onnx_path, device) -> float:
    with compile_model(onnx_path, load_device("cpu-ort-fp32")) as ref_runner, \
            compile_model(onnx_path, device) as runner:
        feed = ref_runner.random_feed(np.random.default_rng(0))
        ref = ref_runner.run(feed)
        out = runner.run(feed)
    assert [o.shape for o in out] == [r.shape for r in ref]
    return max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(out, ref))


@pytest.fixture
def untuned():
    return load_device("cpu-tvm-untuned")


def tuned_device(db, trials=2) -> object:
    d = load_device("cpu-tvm-tuned")
    return dataclasses.replace(d, options={**d.options, "database": str(db),
                                           "trials_per_task": trials})


def test_untuned_block_matches_onnxruntime(tiny, untuned, tmp_path):
    key = tiny.unique_op_keys()[1]  # a choice block
    path = export_onnx(randomized(tiny.build_op(key)), key.in_shape, tmp_path / "op.onnx")
    assert rel_err(path, untuned) <= REL_TOL


@pytest.mark.slow
def test_untuned_whole_tiny_candidates_match_onnxruntime(tiny, untuned, tmp_path):
    for i, arch in enumerate(tiny.sample(np.random.default_rng(s)) for s in range(3)):
        path = export_onnx(randomized(tiny.build(arch), i), tiny.default_input,
                           tmp_path / f"c{i}.onnx")
        assert rel_err(path, untuned) <= REL_TOL, arch


def test_unsupported_op_is_a_user_error_naming_op_and_backend(untuned, tmp_path):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Celu", ["input"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "celu.onnx"
    onnx.save(model, path)
    with pytest.raises(UserError, match=r"(?s)backend tvm.*Celu"):
        compile_model(path, untuned)


def test_bad_options_are_user_errors(untuned):
    bad = dataclasses.replace(untuned, options={"tuning": "autotvm"})
    with pytest.raises(UserError, match="tuning"):
        tvm_backend.target_dict(bad)
    bad = dataclasses.replace(untuned, options={"tuning": "none", "trials": 3})
    with pytest.raises(UserError, match="unknown TVM option"):
        tvm_backend.target_dict(bad)


def test_target_names_the_host_cpu_not_native(untuned):
    t = tvm_backend.target_dict(untuned)
    assert t["kind"] == "llvm" and t["mcpu"] == tvm_backend.host_cpu()
    assert t["mcpu"] not in ("", "native", "generic")
    assert untuned.fingerprint()["compiler"]["target"] == t


def test_tuned_and_untuned_fingerprints_differ(tmp_path, untuned):
    tuned = tuned_device(tmp_path / "db")
    diffs = fingerprint_diff(untuned.fingerprint(), tuned.fingerprint())
    assert any(d.startswith("compiler") for d in diffs)


def test_foreign_database_is_refused_with_the_reason(tmp_path):
    db = tmp_path / "db"
    dev = tuned_device(db)
    target = tvm_backend.target_dict(dev)
    tvm_tuning.TuningDatabase(db, target)  # created for this target
    meta = json.loads((db / "meta.json").read_text())
    other = "znver4" if target["mcpu"] != "znver4" else "rocketlake"  # not this host's CPU
    meta["target"]["mcpu"] = other
    (db / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=rf"another target.*mcpu.*{other}"):
        tvm_tuning.TuningDatabase(db, target)
    ok, why = backend_available(dev)
    assert not ok and other in why
    meta["target"]["mcpu"] = target["mcpu"]
    meta["versions"]["apache-tvm"] = "0.20.0"
    (db / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"apache-tvm 0.20.0"):
        tvm_tuning.TuningDatabase(db, target)


@tuned_only
@pytest.mark.slow
def test_tuned_database_is_reused_and_outputs_match(tiny, tmp_path):
    """A block is tuned once; compiling it again, or a candidate made of tuned workloads, does
    not tune; the tuned kernels compute what onnxruntime computes."""
    db = tmp_path / "db"
    dev = tuned_device(db, trials=2)
    key = tiny.unique_op_keys()[1]
    path = export_onnx(randomized(tiny.build_op(key)), key.in_shape, tmp_path / "op.onnx")
    with compile_model(path, dev) as r1:
        first = r1.tuning
    assert first.tasks > 0 and len(first.tuned) == first.tasks and first.trials > 0
    ledger = json.loads((db / "tuned.json").read_text())
    assert len(ledger) == first.tasks and all(e["trials"] == 2 for e in ledger.values())
    with compile_model(path, dev) as r2:
        assert r2.tuning.tuned == [] and r2.tuning.reused == first.tasks
    assert rel_err(path, dev) <= REL_TOL
    # a larger budget tunes the same tasks again, up to it
    with compile_model(path, tuned_device(db, trials=3)) as r3:
        assert len(r3.tuning.tuned) == first.tasks and r3.tuning.trials == first.tasks


@tuned_only
@pytest.mark.slow
def test_candidate_of_tuned_workloads_compiles_without_tuning(tiny, tmp_path):
    db = tmp_path / "db"
    dev = tuned_device(db, trials=1)
    arch = tiny.sample(np.random.default_rng(0))
    path = export_onnx(randomized(tiny.build(arch)), tiny.default_input, tmp_path / "c.onnx")
    for i, key in enumerate(dict.fromkeys(tiny.op_keys(arch))):  # tune its ops alone
        op = export_onnx(tiny.build_op(key), key.in_shape, tmp_path / f"op{i}.onnx")
        compile_model(op, dev).close()
    with compile_model(path, dev) as r:
        assert r.tuning.tasks > 0 and r.tuning.tuned == [], r.tuning
    assert rel_err(path, dev) <= REL_TOL


def test_explain_reads_tvms_kernels_per_layer(tiny, tiny_tables, untuned):
    """`--explain` on TVM: the VM instrument's per-call times, mapped back to every layer."""
    from hwnas.latency import LatencyTable, LutPredictor, table_path
    from hwnas.latency.explain import explain_arch

    t = LatencyTable.load(table_path(tiny_tables, "cpu-ort-fp32", "tiny", tiny.default_input))
    e = explain_arch(LutPredictor(t, tiny), untuned, tiny.parse("tiny:0312"), runs=3)
    assert [r.layer for r in e.rows] == ["stem", "layer0", "layer1", "layer2", "layer3", "head",
                                         "fixed"]
    assert all(r.in_model_ms > 0 for r in e.rows[:-1])
    assert e.profiled_ms > 0
