"""Tables per host: lookup, refusal, a forced foreign table, migration of old tables, and the
host id itself. Real tables (the session's tiny LUT), real CLI processes."""

import json
import shutil

import pytest

from conftest import run_cli
from hwnas.devices import load_device
from hwnas.errors import UserError
from hwnas.hosts import host_id, host_key
from hwnas.latency import LatencyTable, table_path
from hwnas.latency.profile import contention_check
from hwnas.measure import Contention

DEV = ("--device", "cpu-ort-fp32")
OTHER = "imaginary-cpu-avx2-8c-0badc0de"


def _one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def _move_to_other_host(root):
    """This host's tiny table becomes another host's (its sidecar says so too)."""
    here = table_path(root, "cpu-ort-fp32", "tiny", (1, 3, 32, 32))
    dest = here.parent.parent / OTHER
    shutil.move(str(here.parent), str(dest))
    meta = json.loads((dest / here.with_suffix(".json").name).read_text())
    meta["host"] = OTHER
    meta["fingerprint"]["cpu_model"] = "Imaginary CPU"
    (dest / here.with_suffix(".json").name).write_text(json.dumps(meta))
    return dest / here.name


def test_this_hosts_table_is_found_under_its_host_id(tiny_tables, device):
    path = table_path(tiny_tables, device, "tiny", (1, 3, 32, 32))
    assert path.parent.name == host_id(device.fingerprint()) == LatencyTable.load(path).host
    d = json.loads(run_cli("predict", *DEV, "--space", "tiny", "--arch", "tiny:0123",
                           "--tables", tiny_tables, "--json", check_rc=0).stdout)
    assert d["host"] == path.parent.name and d["latency_ms"] > 0
    index = json.loads((tiny_tables / "hosts.json").read_text())
    assert index[path.parent.name]["cpu_model"] == device.fingerprint()["cpu_model"]


def test_no_table_for_this_host_is_refused_naming_the_command_and_the_others(tables_copy):
    foreign = _move_to_other_host(tables_copy)
    text = foreign.read_text()
    proc = run_cli("predict", *DEV, "--space", "tiny", "--arch", "tiny:0123", "--tables",
                   tables_copy)
    _one_line_error(proc, "on this host", "hwnas profile --device cpu-ort-fp32 --space tiny "
                    "--input 1x3x32x32", OTHER)
    for cmd in (("validate", "--n", "2"), ("search", "--budget-ms", "1", "--supernet", "x.pt")):
        _one_line_error(run_cli(cmd[0], *DEV, "--space", "tiny", "--tables", tables_copy,
                                *cmd[1:]), "hwnas profile --device cpu-ort-fp32")
    # forced: a warning, then the foreign table's price
    ok = run_cli("predict", *DEV, "--space", "tiny", "--arch", "tiny:0123", "--tables",
                 tables_copy, "--host", OTHER, "--json", check_rc=0)
    assert f"pricing with host {OTHER}'s table" in ok.stderr
    assert json.loads(ok.stdout)["host"] == OTHER
    _one_line_error(run_cli("predict", *DEV, "--space", "tiny", "--arch", "tiny:0123",
                            "--tables", tables_copy, "--host", "nosuch-host-1"),
                    "unknown host id 'nosuch-host-1'", OTHER)
    _one_line_error(run_cli("predict", *DEV, "--space", "tiny", "--arch", "tiny:0123",
                            "--tables", tables_copy, "--host", "../../etc"), "not a host id")
    assert foreign.read_text() == text  # nothing touched


def test_sidecar_without_host_is_refused(tables_copy):
    path = table_path(tables_copy, "cpu-ort-fp32", "tiny", (1, 3, 32, 32))
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["host"]
    path.with_suffix(".json").write_text(json.dumps(meta))
    before = path.with_suffix(".json").read_text()
    _one_line_error(run_cli("predict", *DEV, "--space", "tiny", "--arch", "tiny:0123",
                            "--tables", tables_copy), "names no host", "hwnas tables migrate")
    assert path.with_suffix(".json").read_text() == before


def test_old_layout_tables_migrate_under_their_host(tables_copy, device):
    path = table_path(tables_copy, "cpu-ort-fp32", "tiny", (1, 3, 32, 32))
    meta = json.loads(path.with_suffix(".json").read_text())
    rows = path.read_text()
    for k in ("host", "canary", "contention"):
        meta.pop(k, None)
    legacy = tables_copy / "cpu-ort-fp32" / path.name
    shutil.move(str(path), str(legacy))
    legacy.with_suffix(".json").write_text(json.dumps(meta))
    path.with_suffix(".json").unlink()
    (legacy.parent / "noise.json").write_text("{}")
    _one_line_error(run_cli("predict", *DEV, "--space", "tiny", "--arch", "tiny:0123",
                            "--tables", tables_copy), "hwnas tables migrate")
    out = json.loads(run_cli("tables", "migrate", "--tables", tables_copy, "--json",
                             check_rc=0).stdout)
    assert [m["host"] for m in out["migrated"]] == [host_id(meta["fingerprint"])]
    t = LatencyTable.load(path)
    assert path.read_text() == rows  # rows unchanged
    assert t.meta["canary"]["arch"] == "tiny:0000"  # from its own calibration
    assert t.meta["canary"]["latency_ms"] == meta["calibration"]["measured_ms"][0]
    assert (path.parent / "noise.json").is_file() and not legacy.exists()
    listing = json.loads(run_cli("tables", "--tables", tables_copy, "--json",
                                 check_rc=0).stdout)
    assert listing["legacy"] == [] and any(str(path.relative_to(tables_copy)) in h["tables"]
                                           for h in listing["hosts"])


def test_host_id_names_the_machine_and_the_backend_build():
    fp = load_device("cpu-ort-fp32").fingerprint()
    hid = host_id(fp)
    assert hid == host_id(json.loads(json.dumps(fp)))  # from a stored copy: the same
    assert hid.endswith(host_id(fp)[-8:]) and f"-{fp['logical_cores']}c-" in hid
    other = {**fp, "packages": {**fp["packages"], "onnxruntime": "0.0.1"}}
    assert host_id(other) != hid  # another onnxruntime: another table
    assert host_id({**fp, "os": "Linux 0.0", "python": "3.0"}) == hid  # not latency facts
    tvm = {**fp, "backend": "tvm", "compiler": {"target": {"mcpu": "x"}, "tuning_database_id": "a"}}
    # the tuning database's id changes as it fills: not part of the host
    assert host_id(tvm) == host_id({**tvm, "compiler": {**tvm["compiler"],
                                                        "tuning_database_id": "b"}})
    assert "tuning_database_id" not in host_key(tvm)["compiler"]


def test_contended_measurements_warn_or_are_refused(tmp_path, capsys):
    busy = Contention.from_rounds([[[1.0]] * 2 + [[1.3]] * 8])
    quiet = Contention.from_rounds([[[1.0]] * 10])
    contention_check(quiet, "x", require_quiet=True)  # fine
    contention_check(busy, "the ops", require_quiet=False)
    assert "busy host" in capsys.readouterr().err
    journal = tmp_path / "j.partial.json"
    journal.write_text("{}")
    with pytest.raises(UserError, match="--require-quiet: nothing was saved"):
        contention_check(busy, "the ops", require_quiet=True, journal=journal)
    assert not journal.exists()  # a rerun measures afresh, not the busy rounds


def test_profile_records_contention_and_canary(tiny_tables):
    t = LatencyTable.load(table_path(tiny_tables, "cpu-ort-fp32", "tiny", (1, 3, 32, 32)))
    c = t.meta["contention"]["profile"]  # ops, calibration and canary: one interleaved run
    assert 0 <= c["quiet_fraction"] <= 1 and c["rounds"] >= 3
    assert t.meta["canary"]["arch"] == "tiny:0000" and t.meta["canary"]["latency_ms"] > 0
    # the canary is one of the calibration candidates, timed in the same rounds as the ops
    assert t.meta["canary"]["latency_ms"] == t.meta["calibration"]["measured_ms"][0]
