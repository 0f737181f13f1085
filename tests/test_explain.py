"""`hwnas validate --explain`: per-node profiles mapped back to layers, on the tiny space."""

import json

import pytest

from hwnas.devices import load_device
from hwnas.errors import UserError
from hwnas.latency import LatencyTable, LutPredictor, table_path
from hwnas.backends.tvm import tvm_layers
from hwnas.latency.explain import explain_arch, per_layer_ms

from conftest import run_cli


def test_per_layer_ms_takes_each_nodes_median_and_groups_by_layer():
    events = [("/blocks.0/Conv", 1.0), ("/blocks.0/Conv", 9.0), ("/blocks.0/Conv", 1.2),
              ("/blocks.0/Relu", 0.5), ("/stem/conv/Conv", 2.0), ("Transpose", 0.1)]
    got = per_layer_ms(events)
    assert got == pytest.approx({"layer0": 1.2 + 0.5, "stem": 2.0, "glue": 0.1})


def test_explain_arch_maps_every_layer(tiny_tables, tiny, device):
    t = LatencyTable.load(table_path(tiny_tables, "cpu-ort-fp32", "tiny", tiny.default_input))
    pred = LutPredictor(t, tiny)
    arch = tiny.parse("tiny:0312")
    e = explain_arch(pred, device, arch, measured_ms=1.0, runs=5)
    assert [r.layer for r in e.rows] == ["stem", "layer0", "layer1", "layer2", "layer3", "head",
                                         "fixed"]
    assert e.rows[1].op == str(tiny.op_keys(arch)[1])
    # in-model times are rescaled to the measured latency; predictions sum to the prediction
    assert sum(r.in_model_ms for r in e.rows) == pytest.approx(1.0)
    assert sum(r.predicted_ms for r in e.rows) == pytest.approx(e.predicted_ms)
    assert all(r.in_model_ms > 0 for r in e.rows[:-1])  # every block's nodes were found
    assert len(e.worst(2)) == 2


def test_backend_without_profiler_is_a_user_error(tiny_tables, tiny):
    t = LatencyTable.load(table_path(tiny_tables, "cpu-ort-fp32", "tiny", tiny.default_input))
    with pytest.raises(UserError, match="no per-node profiler"):
        explain_arch(LutPredictor(t, tiny), load_device("cpu-torch-eager"),
                     tiny.parse("tiny:0000"), runs=2)


def test_validate_explain_cli(tables_copy):
    p = run_cli("validate", "--device", "cpu-ort-fp32", "--space", "tiny", "--n", "6",
                "--tables", tables_copy, "--span-s", "0", "--explain", "--explain-top", "2",
                "--json", "--quiet", check_rc=0)
    d = json.loads(p.stdout)
    assert len(d["explain"]) == 2
    rows = sorted(_rows(d["csv"]), key=lambda r: -abs(float(r["error_pct"])))
    assert [e["arch"] for e in d["explain"]] == [r["arch"] for r in rows[:2]]
    assert d["explain"][0]["measured_ms"] == float(rows[0]["measured_ms"])
    assert {r["layer"] for r in d["explain"][0]["rows"]} >= {"stem", "head", "layer0"}


def _rows(csv_path):
    import csv

    with open(csv_path) as f:
        return list(csv.DictReader(f))


def test_tvm_call_order_maps_to_layers():
    # the call sequence TVM 0.27 produced for tiny:0312 (builtins trimmed), two runs
    symbols = ["vm.builtin.alloc_tensor", "fused_conv2d_add_relu", "max_pool2d",
               "fused_conv2d1_add1", "concatenate", "strided_slice", "fused_conv2d4_add1",
               "fused_strided_slice1_concatenate", "fused_conv2d5_add3", "concatenate1",
               "strided_slice2", "fused_conv2d6_add3_relu4", "fused_strided_slice3_concatenate1",
               "mean", "fused_matmul_add5"]
    events = [(f"{i:04d}:{s}", 1.0) for _ in range(2) for i, s in enumerate(symbols)]
    named = tvm_layers(events, 4)
    got = per_layer_ms(named)
    assert got == pytest.approx({"glue": 1.0, "stem": 2.0, "layer0": 2.0, "layer1": 3.0,
                                 "layer2": 2.0, "layer3": 3.0, "head": 2.0})
    with pytest.raises(UserError, match="expected 5"):
        tvm_layers(events, 5)
