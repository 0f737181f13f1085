"""The device fleet (issue 12): a real Ray cluster on loopback (2 CPUs, this host's cpu-ort-fp32
advertised with 2 timing slots), profiling tiny into a host table with real onnxruntime timing
while a worker is killed mid-shard or the driver is killed, search evaluation on actors against
in-process, and the default path without Ray."""

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from hwnas.devices import load_device
from hwnas.distributed import InProcessExecutor, cluster_address, get_executor
from hwnas.errors import UserError
from hwnas.hosts import host_id
from hwnas.latency import LatencyTable, table_path
from hwnas.latency.shards import SCRATCH_ENV, profile_hosts
from hwnas.spaces import get_space

from conftest import FAST, class_folders, run_cli

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install -e '.[ray]')")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray on 127.0.0.1: 2 CPUs, 2 timing slots of cpu-ort-fp32 on this host; its
    workers journal shards under a private scratch folder (they inherit the environment)."""
    if not HAS_RAY:
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    from hwnas import fleet

    scratch = tmp_path_factory.mktemp("scratch")
    old = os.environ.get(SCRATCH_ENV)
    os.environ[SCRATCH_ENV] = str(scratch)
    try:
        address = fleet.start_local(2, fleet.node_resources(["cpu-ort-fp32"], slots=2))
        yield {"address": address, "scratch": scratch}
    finally:
        fleet.shutdown()
        if old is None:
            os.environ.pop(SCRATCH_ENV, None)
        else:
            os.environ[SCRATCH_ENV] = old


def _rows(root, tiny, host=None):
    t = LatencyTable.load(table_path(root, "cpu-ort-fp32", "tiny", tiny.default_input, host))
    lines = t.path.read_text().splitlines()[1:]
    keys = [ln.split(",")[0] for ln in lines]
    assert len(keys) == len(set(keys)), "a row was written twice"
    return t, set(keys)


# ---- without Ray -------------------------------------------------------------------------------
def test_default_path_imports_no_ray():
    code = ("import sys; from hwnas.cli import build_parser; build_parser(); "
            "from hwnas.distributed import get_executor; e = get_executor(None); "
            "import hwnas.fleet, hwnas.latency.shards; "
            "assert type(e).__name__ == 'InProcessExecutor'; assert 'ray' not in sys.modules")
    env = {**os.environ, "HWNAS_CLUSTER": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_cluster_address(monkeypatch):
    monkeypatch.delenv("HWNAS_CLUSTER", raising=False)
    assert cluster_address(None) is None and cluster_address("local") is None
    assert cluster_address("auto") == "auto" and cluster_address("10.0.0.1:6379")
    assert cluster_address("ray://head:10001") == "ray://head:10001"
    monkeypatch.setenv("HWNAS_CLUSTER", "auto")
    assert cluster_address(None) == "auto" and cluster_address("local") is None
    with pytest.raises(UserError, match="not a cluster"):
        cluster_address("bogus")


def test_missing_ray_is_one_line(monkeypatch, capsys):
    from hwnas.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    with pytest.raises(UserError, match=r"pip install -e '\.\[ray\]'"):
        get_executor("auto")
    assert main(["profile", "--device", "cpu-ort-fp32", "--space", "tiny", "--cluster", "auto"]) == 2
    err = capsys.readouterr().err
    assert "install the ray extra" in err and len(err.strip().splitlines()) == 1


def test_shards_in_process_build_this_hosts_table(tmp_path, device, tiny, tiny_tables):
    """The shard machinery on the in-process executor: 2 shards, one table, every op once."""
    here = host_id(device.fingerprint())
    (rep,) = profile_hosts(InProcessExecutor(), device, tiny, tiny.default_input, tmp_path,
                           {here: 2}, FAST, calibration_n=8, progress=False)
    t, keys = _rows(tmp_path, tiny)
    assert t.host == here and rep.measured_ops == len(keys) and rep.calibrated
    assert keys == _rows(tiny_tables, tiny)[1] == {str(k) for k in tiny.unique_op_keys()}
    assert not t.path.with_suffix(".shards.partial.json").exists()


# ---- on a local Ray ----------------------------------------------------------------------------
@needs_ray
def test_profile_survives_a_worker_killed_mid_shard(cluster, tmp_path, device, tiny,
                                                    tiny_tables):
    from hwnas.fleet import RayExecutor, device_slots

    here = host_id(device.fingerprint())
    slots = device_slots("cpu-ort-fp32")
    assert slots == {here: 2}
    protocol = dataclasses.replace(FAST, rounds=80)  # long enough to be killed mid-shard
    box = {}

    def drive():
        try:
            box["reports"] = profile_hosts(RayExecutor(), device, tiny, tiny.default_input,
                                           tmp_path, slots, protocol, calibration_n=8,
                                           progress=False)
        except BaseException as e:  # noqa: B036 - handed to the test thread
            box["error"] = e

    driver = threading.Thread(target=drive)
    driver.start()
    scratch, killed, deadline = cluster["scratch"], None, time.time() + 120
    while killed is None and time.time() < deadline and driver.is_alive():
        for journal in scratch.glob("*.partial.json"):
            try:
                rounds = len(json.loads(journal.read_text())["rounds"][0])
                pid = int(journal.with_name(journal.name.replace(".partial.json", ".pid"))
                          .read_text())
            except (OSError, ValueError, KeyError, IndexError):
                continue
            if rounds >= 10:
                os.kill(pid, signal.SIGKILL)
                killed = (pid, rounds)
                break
        time.sleep(0.05)
    driver.join(180)
    assert killed is not None, "no shard could be killed mid-run"
    assert "error" not in box, box.get("error")
    (rep,) = box["reports"]
    t, keys = _rows(tmp_path, tiny)
    # the same op keys as an in-process run, each once, with the worker's host and fingerprint
    assert keys == _rows(tiny_tables, tiny)[1] and rep.measured_ops == len(keys)
    assert t.host == here and t.meta["fingerprint"]["cpu_model"] == device.fingerprint()["cpu_model"]
    assert rep.resumed_rounds >= killed[1]  # the retry took over the killed shard's rounds
    assert t.meta["calibration"] and t.meta["canary"]["arch"] == str(tiny.canary())
    assert not list(scratch.glob("*.partial.json")) and not t.path.with_suffix(
        ".shards.partial.json").exists()


DRIVER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from conftest import FAST
from hwnas import fleet
from hwnas.devices import load_device
from hwnas.latency.shards import profile_hosts
from hwnas.spaces import get_space
fleet.connect({address!r})
tiny = get_space("tiny")
profile_hosts(fleet.RayExecutor(), load_device("cpu-ort-fp32"), tiny, tiny.default_input,
              Path({root!r}), fleet.device_slots("cpu-ort-fp32"), {protocol}, calibration_n=0,
              shard_size=5, progress=False)
"""


@needs_ray
def test_killed_driver_rerun_resumes(cluster, tmp_path, device, tiny):
    from hwnas.fleet import RayExecutor, device_slots

    protocol = "dataclasses.replace(FAST, rounds=40)"
    code = "import dataclasses" + DRIVER.format(
        tests=os.path.dirname(__file__), address=cluster["address"], root=str(tmp_path),
        protocol=protocol)
    journal = table_path(tmp_path, "cpu-ort-fp32", "tiny", tiny.default_input,
                         host_id(device.fingerprint())).with_suffix(".shards.partial.json")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline, kept = time.time() + 120, {}
    while time.time() < deadline and proc.poll() is None and not kept:
        if journal.exists():
            kept = json.loads(journal.read_text())["results"]
        time.sleep(0.02)
    assert proc.poll() is None, f"the driver ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = json.loads(journal.read_text())["results"]
    assert 1 <= len(kept) < 4  # 19 labels in shards of 5: some done, some not
    (rep,) = profile_hosts(RayExecutor(), device, tiny, tiny.default_input, tmp_path,
                           device_slots("cpu-ort-fp32"), dataclasses.replace(FAST, rounds=40),
                           calibration_n=0, shard_size=5, progress=False)
    t, keys = _rows(tmp_path, tiny)
    assert rep.measured_ops == len(keys) == len(tiny.unique_op_keys())
    for res in kept.values():  # the finished shards were taken over, not measured again
        for label, stats in res["stats"].items():
            if label in t.rows:
                # the same measurement: the table's CSV keeps 6 decimals of it
                assert t.rows[label].best_ms == pytest.approx(stats["best_ms"], abs=1e-6)
    assert not journal.exists()


@pytest.fixture(scope="module")
def tiny_supernet(tmp_path_factory):
    root = tmp_path_factory.mktemp("sn")
    class_folders(root / "data", size=32, per_class=8)
    ck = root / "tiny.pt"
    run_cli("supernet", "train", "--space", "tiny", "--data", root / "data", "--image-size",
            32, "--steps", 3, "--warmup-steps", 1, "--match-steps", 1, "--batch-size", 8,
            "--ckpt-every", 2, "-o", ck, "--quiet", check_rc=0)
    return ck


@needs_ray
def test_search_on_actors_equals_in_process(cluster, tmp_path, tiny_tables, tiny_supernet,
                                            capsys):
    from hwnas.cli import main
    from hwnas.latency import LutPredictor

    lut = LutPredictor(LatencyTable.load(table_path(tiny_tables, "cpu-ort-fp32", "tiny",
                                                    (1, 3, 32, 32))), get_space("tiny"))
    common = ["search", "--device", "cpu-ort-fp32", "--space", "tiny", "--tables", tiny_tables,
              "--budget-ms", f"{lut.fastest_ms() * 1.5:.4f}", "--supernet", tiny_supernet,
              "--method", "evolution", "--evaluations", 24, "--seed", 3, "--quiet", "--json"]
    runs = {}
    for name, extra in (("local", []), ("ray", ["--cluster", cluster["address"],
                                                 "--actors", 2])):
        assert main([str(a) for a in common + ["-o", tmp_path / name] + extra]) == 0
        out = json.loads(capsys.readouterr().out)
        runs[name] = (out, json.loads((tmp_path / f"{name}.json").read_text()))
    (a, fa), (b, fb) = runs["local"], runs["ray"]
    assert b["context"]["evaluated_on"]["actors"] == 2
    assert a["best_arch"] == b["best_arch"] and a["score"] == b["score"]
    assert fa["evaluated"] == fb["evaluated"]  # every candidate's score, bit for bit


@needs_ray
def test_actor_scores_do_not_depend_on_the_split_and_survive_a_kill(cluster, tiny_supernet):
    from hwnas.data import load_data
    from hwnas.fleet import RayExecutor
    from hwnas.train import SupernetScorer, load_supernet

    net, meta = load_supernet(tiny_supernet)
    scorer = SupernetScorer(net, load_data(meta["data"], 32), bn_batches=2, seed=0)
    tiny = get_space("tiny")
    archs = tiny.sample_distinct(7, np.random.default_rng(0), set())
    here = InProcessExecutor().evaluate(scorer, archs)
    ex = RayExecutor(actors=2)
    assert np.array_equal(ex.evaluate(scorer, archs), here)
    assert np.array_equal(ex.evaluate(scorer, archs[::-1]), here[::-1])
    os.kill(ex.actor_pids()[0], signal.SIGKILL)  # restarted with its model, call retried
    assert np.array_equal(ex.evaluate(scorer, archs), here)
    ex.close()


@needs_ray
def test_validate_and_status_on_the_cluster(cluster, tmp_path, tiny_tables, capsys):
    from hwnas.cli import main

    assert main(["validate", "--device", "cpu-ort-fp32", "--space", "tiny", "--tables",
                 str(tiny_tables), "--n", "4", "--span-s", "0", "--out", str(tmp_path / "v"),
                 "--quiet", "--json", "--cluster", cluster["address"]]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["n"] == 4 and rep["drift"] is not None
    assert len((tmp_path / "v.validation.csv").read_text().splitlines()) == 5
    assert main(["fleet", "status", "--cluster", cluster["address"], "--json"]) == 0
    (node,) = json.loads(capsys.readouterr().out)["nodes"]
    here = host_id(load_device("cpu-ort-fp32").fingerprint())
    assert node["address"] == "127.0.0.1" and node["slots"] == {
        f"device:cpu-ort-fp32@{here}": 2}
    assert main(["profile", "--device", "cpu-ort-fp32", "--space", "tiny", "--tables",
                 str(tiny_tables), "--cluster", cluster["address"], "--json"]) == 0
    (table,) = json.loads(capsys.readouterr().out)["tables"]  # complete: nothing to measure
    assert table["host"] == here and table["measured_ops"] == 0
    assert main(["profile", "--device", "cpu-ort-fp32", "--space", "tiny", "--tables",
                 str(tmp_path), "--cluster", cluster["address"], "--hosts",
                 "other-host-1234"]) == 2
    assert "no node of the cluster advertises cpu-ort-fp32 on host other-host-1234" in \
        capsys.readouterr().err


def test_fleet_start_dry_run():
    p = run_cli("fleet", "start", "--head", "--loopback", "--slots", 2, "--dry-run", "--json",
                check_rc=0)
    out = json.loads(p.stdout)
    here = host_id(load_device("cpu-ort-fp32").fingerprint(volatile=False))
    assert out["resources"] == {f"device:cpu-ort-fp32@{here}": 2.0} and not out["ran"]
    assert out["command"][:3] == ["ray", "start", "--head"]
    assert "--include-dashboard=false" in out["command"]
    assert "--node-ip-address=127.0.0.1" in out["command"]


def test_slot_resources_and_shards():
    from hwnas.fleet import device_slots, parse_slot_resource, slot_resource
    from hwnas.latency.shards import split

    name = slot_resource("cpu-ort-fp32", "amd-epyc-avx512-2c-1a2b3c4d")
    assert parse_slot_resource(name) == ("cpu-ort-fp32", "amd-epyc-avx512-2c-1a2b3c4d")
    assert parse_slot_resource("CPU") is None and parse_slot_resource("node:127.0.0.1") is None
    assert device_slots("cpu-ort-fp32", {name: 2.0, "CPU": 2.0, slot_resource(
        "cpu-ort-int8", "x-host-1"): 1.0}) == {"amd-epyc-avx512-2c-1a2b3c4d": 2}
    labels = [f"l{i}" for i in range(7)]
    parts = split(labels, 3)
    assert parts == [("l0", "l3", "l6"), ("l1", "l4"), ("l2", "l5")]
    assert sorted(sum(parts, ())) == sorted(labels) and split(labels[:1], 4) == [("l0",)]
