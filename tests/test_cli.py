"""The command line as a user meets it: real processes, exit codes, one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from hwnas.latency import LatencyTable, table_path

from conftest import run_cli

DEV = ("--device", "cpu-ort-fp32")


def _csv(root):
    return table_path(root, "cpu-ort-fp32", "tiny", (1, 3, 32, 32))


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr  # one line, no traceback
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_predict_json(tiny_tables):
    p = run_cli("predict", *DEV, "--space", "tiny", "--arch", "tiny:0123", "--tables",
                tiny_tables, "--json", check_rc=0)
    d = json.loads(p.stdout)
    assert d["arch"] == "tiny:0123" and d["latency_ms"] > 0


def test_devices_json():
    d = json.loads(run_cli("devices", "--json", check_rc=0).stdout)
    ort = [x for x in d["devices"] if x["name"] == "cpu-ort-fp32"][0]
    assert ort["available"] and ort["threads"] == 1


@pytest.mark.parametrize("args,frag", [
    (("--device", "gpu-nope", "--space", "tiny", "--arch", "tiny:0000"), "unknown device"),
    (("--device", "cpu-ort-fp32", "--space", "nope", "--arch", "tiny:0000"), "unknown space"),
    (("--device", "cpu-ort-fp32", "--space", "tiny", "--arch", "tiny:012"), "exactly 4 tokens"),
    (("--device", "cpu-ort-fp32", "--space", "tiny", "--arch", "tiny:0129"), "out of range"),
    (("--device", "cpu-ort-fp32", "--space", "tiny", "--arch", "tiny:0123", "--input", "1x3x"),
     "NxCxHxW"),
    (("--device", "cpu-ort-fp32", "--space", "det20-w0.01", "--arch", "det20-w0.01:" + "0" * 20),
     "too small"),
    (("--device", "cpu-ort-fp32", "--space", "tiny", "--arch", "tiny:0123", "--input",
      "64x3x4096x4096"), "elements"),
])
def test_bad_arguments(tiny_tables, args, frag):
    assert_user_error(run_cli("predict", *args, "--tables", tiny_tables), frag)


def test_missing_table_names_the_command(tmp_path):
    assert_user_error(run_cli("predict", *DEV, "--space", "tiny", "--arch", "tiny:0000",
                              "--tables", tmp_path), "no cpu-ort-fp32 table for tiny",
                      "on this host", "`hwnas profile --device cpu-ort-fp32 --space tiny --input "
                      "1x3x32x32`")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete_row"])
def test_damaged_table(tables_copy, damage):
    path = _csv(tables_copy)
    text = path.read_text()
    if damage == "truncate":
        text = text[: len(text) // 2]
    elif damage == "garbage":
        text = text.replace("shuffle5", "shuffle5\x00,,,junk", 1)
    else:  # a row gone: the sidecar's row count says so
        lines = text.splitlines(keepends=True)
        text = "".join(ln for ln in lines if not ln.startswith("xception:1x16x4x4"))
    path.write_text(text)
    proc = run_cli("predict", *DEV, "--space", "tiny", "--arch", "tiny:0333", "--tables",
                   tables_copy)
    assert_user_error(proc, str(path),
                      *(["rows but its sidecar recorded"] if damage == "delete_row" else []))
    assert path.read_text() == text  # nothing repaired or overwritten behind the user's back
    # profile refuses to build over a broken table too (a deleted row is not re-measured
    # silently, replacing the calibration)
    assert_user_error(run_cli("profile", *DEV, "--space", "tiny", "--tables", tables_copy,
                              "--quiet"), "move it away")
    assert path.read_text() == text


def test_fingerprint_mismatch_warns_and_strict_refuses(tables_copy):
    t = LatencyTable.load(_csv(tables_copy))
    t.meta["fingerprint"]["cpu_model"] = "Imaginary CPU 9000"
    t.save()
    args = ("predict", *DEV, "--space", "tiny", "--arch", "tiny:0000", "--tables", tables_copy)
    ok = run_cli(*args, check_rc=0)
    assert "warning" in ok.stderr and "Imaginary CPU 9000" in ok.stderr
    assert_user_error(run_cli(*args, "--strict"), "another machine", "--strict")


def test_unreadable_onnx(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("hello")
    assert_user_error(run_cli("measure", *DEV, "--onnx", bad), "not a readable ONNX")
    assert bad.read_text() == "hello"


def test_export_and_measure(tmp_path):
    out = tmp_path / "m.onnx"
    d = json.loads(run_cli("export", "--space", "tiny", "--arch", "tiny:0123", "-o", out,
                           "--json", check_rc=0).stdout)
    assert d["max_rel_err_vs_torch"] <= 1e-4 and out.exists()
    before = out.read_bytes()
    assert_user_error(run_cli("export", "--space", "tiny", "--arch", "tiny:0000", "-o", out),
                      "--force")
    assert out.read_bytes() == before
    m = json.loads(run_cli("measure", *DEV, "--onnx", out, "--span-s", "0", "--json",
                           check_rc=0).stdout)
    assert m["latency_ms"] > 0 and m["method"] == "protocol"


def test_validate_writes_csv_and_plot(tables_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run folders go to ./hwnas-runs
    d = json.loads(run_cli("validate", *DEV, "--space", "tiny", "--tables", tables_copy,
                           "--n", "4", "--span-s", "0", "--json", "--quiet", check_rc=0).stdout)
    assert d["n"] == 4 and 0 <= d["within_10pct"] <= 1
    # evidence goes to a new run folder, never over the table's published evidence
    assert Path(d["csv"]).resolve().is_relative_to(tmp_path / "hwnas-runs")
    assert not list(_csv(tables_copy).parent.glob("*.validation.*"))
    rows = open(d["csv"]).read().splitlines()
    assert rows[0] == ("arch,predicted_ms,measured_ms,error_pct,canary_corrected_ms,"
                       "canary_corrected_error_pct") and len(rows) == 5
    assert open(d["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # the canary was timed with the candidates: drift and corrected figures beside the raw
    assert d["drift"]["canary"] == "tiny:0000" and d["drift"]["now_ms"] > 0
    # ...with the next calibration candidates: the drift is their median ratio
    refs = d["drift"]["refs"]
    assert list(refs)[0] == "tiny:0000" and len(refs) == 5
    assert d["drift"]["ratio"] == pytest.approx(np.median([now / then for then, now
                                                           in refs.values()]))
    assert set(d["canary_corrected"]) >= {"within_5pct", "bias_pct"}
    assert 0 <= d["contention"]["quiet_fraction"] <= 1
    again = json.loads(run_cli("validate", *DEV, "--space", "tiny", "--tables", tables_copy,
                               "--n", "4", "--span-s", "0", "--json", "--quiet",
                               check_rc=0).stdout)
    assert Path(again["csv"]).parent != Path(d["csv"]).parent and Path(d["csv"]).is_file()
    pub = json.loads(run_cli("validate", *DEV, "--space", "tiny", "--tables", tables_copy,
                             "--n", "4", "--span-s", "0", "--json", "--quiet", "--publish",
                             check_rc=0).stdout)
    assert Path(pub["csv"]).parent == _csv(tables_copy).parent
    # calibration candidates are held out
    cal = set(LatencyTable.load(_csv(tables_copy)).meta["calibration"]["archs"])
    assert not cal & {r.split(",")[0] for r in rows[1:]}


def test_bad_numbers():
    assert_user_error(run_cli("validate", *DEV, "--space", "tiny", "--n", "0"), "--n")
    assert_user_error(run_cli("measure", *DEV, "--onnx", "x.onnx", "--span-s", "-1"), "--span-s")


def test_demo_end_to_end_on_tiny(tables_copy, tmp_path):
    d = json.loads(run_cli("demo", "--job", "classify", "--space", "tiny", "--input", "1x3x32x32", "--tables",
                           tables_copy, "--out", tmp_path / "demo", "--span-s", "0", "--json",
                           "--quiet", check_rc=0).stdout)
    pick = d["pick"]
    assert pick["predicted_ms"] <= pick["budget_ms"]
    assert pick["onnx_max_rel_err_vs_torch"] <= 1e-4
    assert (tmp_path / "demo").is_dir() and d["profile"]["measured_ops"] == 0


def test_infeasible_budget(tables_copy, tmp_path):
    assert_user_error(run_cli("demo", "--job", "classify", "--space", "tiny", "--input", "1x3x32x32", "--tables",
                              tables_copy, "--out", tmp_path / "d", "--span-s", "0", "--quiet",
                              "--budget-ms", "0.0001"), "infeasible", "fastest")


def test_noise_report(tmp_path):
    out = tmp_path / "noise.json"
    d = json.loads(run_cli("noise", *DEV, "--arch", "tiny:0000", "--processes", "2", "--span-s",
                           "0", "--out", out, "--json", "--quiet", check_rc=0).stdout)
    assert set(d) >= {"protocol", "median_of_rounds", "naive_loop", "noise_floor_pct"}
    assert len(d["protocol"]["medians_ms"]) == 2
    assert json.loads(out.read_text())["noise_floor_pct"] == d["noise_floor_pct"]


def test_default_budget_fits_tiny_spaces(tiny_tables, tiny):
    """The default budget (the sample's median rounded up) always admits candidates."""
    from hwnas.demo import pick_most_macs
    from hwnas.latency import LatencyTable, LutPredictor

    pred = LutPredictor(LatencyTable.load(_csv(tiny_tables)), tiny)
    for seed in range(5):
        arch, predicted, _, budget = pick_most_macs(pred, None, 500, seed)
        assert predicted <= budget and budget >= pred.fastest_ms()


def test_unwritable_outputs_are_refused_before_measuring(tables_copy, tmp_path):
    blocker = tmp_path / "a-file"  # a file where the output's folder should be (works as root,
    blocker.write_text("x")  # which a read-only mode would not stop)
    proc = run_cli("validate", *DEV, "--space", "tiny", "--tables", tables_copy, "--n", "2",
                   "--out", blocker / "v")
    assert_user_error(proc, "cannot write")
    assert blocker.read_text() == "x"
    # a folder where a file should go: refused before measuring too
    (tmp_path / "dir.json").mkdir()
    assert_user_error(run_cli("noise", *DEV, "--arch", "tiny:0000", "--processes", "2",
                              "--out", tmp_path / "dir.json"), "is a folder")


def test_onnx_with_symbolic_dims_is_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])
    g = helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "sym.onnx")
    assert_user_error(run_cli("measure", *DEV, "--onnx", tmp_path / "sym.onnx"),
                      "symbolic or unknown dimensions")
