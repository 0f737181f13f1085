import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from hwnas.errors import UserError
from hwnas.latency import LatencyTable, LutPredictor, table_path
from hwnas.latency.profile import profile

from conftest import FAST


def _table(root, tiny):
    return LatencyTable.load(table_path(root, "cpu-ort-fp32", tiny.name, tiny.default_input))


def test_profile_measures_every_unique_key_with_provenance(tiny_tables, tiny):
    t = _table(tiny_tables, tiny)
    assert set(t.rows) == {str(k) for k in tiny.unique_op_keys()}
    m = t.meta
    assert m["device"] == "cpu-ort-fp32" and m["space"] == "tiny"
    assert {"cpu_model", "logical_cores", "packages"} <= set(m["fingerprint"])
    assert "onnxruntime" in m["fingerprint"]["packages"]
    cal = m["calibration"]
    assert set(cal["slopes"]) == set(tiny.choice_names) and "what" in cal
    # the uniform candidates anchor the fit
    assert {f"tiny:{c}{c}{c}{c}" for c in "0123"} <= set(cal["archs"])


def test_profile_rerun_reuses_everything(tiny_tables, tiny, device):
    before = _table(tiny_tables, tiny).path.read_text()
    rep = profile(device, tiny, tiny.default_input, tiny_tables, FAST, progress=False)
    assert rep.measured_ops == 0 and not rep.calibrated
    assert _table(tiny_tables, tiny).path.read_text() == before


def test_predict_walk_and_vectorised_path_agree(tiny_tables, tiny):
    pred = LutPredictor(_table(tiny_tables, tiny), tiny)
    archs = tiny.sample_many(50, np.random.default_rng(0))
    many = pred.predict_many(archs)
    one = [pred.predict(tiny.arch(a)) for a in archs]
    assert np.allclose(many, one)
    assert pred.fastest_ms() <= many.min() + 1e-9


def test_missing_op_names_the_op_and_the_command(tables_copy, tiny):
    t = _table(tables_copy, tiny)
    victim = str(tiny.op_keys(tiny.arch([2] * 4))[1])
    del t.rows[victim]
    pred = LutPredictor(t, tiny)
    pred.predict(tiny.arch([0] * 4))  # does not need the missing op
    with pytest.raises(UserError, match=f"no row for op {victim}.*hwnas profile --device"):
        pred.predict(tiny.arch([2] * 4))
    with pytest.raises(UserError, match="no row for op"):
        pred.predict_many(np.array([[0, 0, 0, 0], [2, 2, 2, 2]]))


def test_table_for_another_space_is_not_overwritten(tables_copy, tiny, device):
    t = _table(tables_copy, tiny)
    t.meta["space"] = "det20"
    t.save()
    before = t.path.read_text()
    with pytest.raises(UserError, match="move it away"):
        profile(device, tiny, tiny.default_input, tables_copy, FAST, progress=False)
    assert t.path.read_text() == before


def test_adding_rows_measured_elsewhere_is_refused(tables_copy, tiny, device):
    t = _table(tables_copy, tiny)
    t.rows.pop(next(iter(t.rows)))
    t.meta["fingerprint"]["cpu_model"] = "Another CPU"
    t.save()
    with pytest.raises(UserError, match="would mix them"):
        profile(device, tiny, tiny.default_input, tables_copy, FAST, progress=False)


def test_killed_profile_resumes_without_losing_or_duplicating(tmp_path, tiny):
    cmd = [sys.executable, "-m", "hwnas", "profile", "--device", "cpu-ort-fp32", "--space",
           "tiny", "--tables", str(tmp_path), "--span-s", "6", "--calibration-n", "0",
           "--quiet", "--json"]
    csv_path = table_path(tmp_path, "cpu-ort-fp32", "tiny", tiny.default_input)
    journal = csv_path.with_suffix(".partial.json")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(json.loads(journal.read_text())["rounds"][0]) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "profile finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    recorded = len(json.loads(journal.read_text())["rounds"][0])
    assert recorded >= 3 and not csv_path.exists()  # no half rows: only the journal
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["resumed_rounds"] >= recorded  # continued, not restarted
    assert rep["rows"] == len(tiny.unique_op_keys())
    lines = csv_path.read_text().splitlines()[1:]
    assert len(lines) == len({ln.split(",")[0] for ln in lines}) == rep["rows"]
    assert not journal.exists()


def test_calibration_picks_the_nested_model_the_data_support(tiny_tables, tiny):
    """Whole-model times built from the real table's op rows with known slopes: per-kind
    slopes are recovered where kinds differ; where the ops cost what they cost alone (plus
    noise) the offset model is kept; slopes stay bounded where the data cannot pin them."""
    from hwnas.latency.predict import SLOPE_BOUNDS, fit_calibration, kind_sums

    t = _table(tiny_tables, tiny)
    rng = np.random.default_rng(0)
    archs = tiny.sample_distinct(20, rng)
    kinds = tiny.choice_kinds()
    X = np.array([kind_sums(tiny, t, a, tiny.default_input, kinds) for a in archs])
    true = np.array([1.0, 1.5, 2.5, 3.0])[:len(kinds)]
    cal = fit_calibration(tiny, t, tiny.default_input, archs, 0.01 + X[:, :-1] @ true + X[:, -1])
    assert cal.model == "per-kind" and cal.loo_within_5pct == 1.0
    assert np.allclose([cal.slopes[k] for k in kinds], true, rtol=1e-3)
    plain = (0.01 + X.sum(1)) * (1 + rng.normal(0, 0.002, len(X)))
    cal = fit_calibration(tiny, t, tiny.default_input, archs, plain)
    assert cal.model == "offset" and set(cal.slopes.values()) == {1.0}
    # times that do not follow the ops at all: whatever is chosen, slopes stay in bounds
    cal = fit_calibration(tiny, t, tiny.default_input, archs,
                          X.sum(1).mean() * rng.uniform(0.5, 1.5, len(X)))
    assert all(SLOPE_BOUNDS[0] - 1e-9 <= s <= SLOPE_BOUNDS[1] + 1e-9 for s in cal.slopes.values())
