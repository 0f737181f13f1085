"""TVM benchmarks on this host: tune det20's kernels, build the tuned LUT, compare with onnxruntime.

Each phase is resumable and bounded, so it can run in ≤10-minute chunks under the team's lock:

  flock /tmp/hwnas-heavy.lock python tools/bench_tvm.py tune --minutes 8     # repeat until done
  flock /tmp/hwnas-heavy.lock python tools/bench_tvm.py profile              # `hwnas profile`
  flock /tmp/hwnas-heavy.lock python tools/bench_tvm.py compare --n 20       # TVM vs onnxruntime
  flock /tmp/hwnas-heavy.lock python tools/bench_tvm.py validate --n 100     # `hwnas validate`
  python tools/bench_tvm.py status                                            # tuning spent so far
  python tools/bench_tvm.py compact                 # keep each workload's best record (to commit)

`tune` pre-tunes every tunable task of det20's unique ops (the same tasks `hwnas profile` would
tune on its own), stopping before a task once --minutes have passed; the database makes it
resume. `profile`/`validate` run the normal CLI. `compare` measures N held-out candidates (the
ones `hwnas validate --seed S` draws) on cpu-tvm-tuned and cpu-ort-fp32 interleaved in one run and
writes the ratio per candidate to latency_tables/cpu-tvm-tuned/det20_<shape>.vs_ort.{csv,json}.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hwnas.backends import compile_model
from hwnas.backends import tvm as tvm_backend
from hwnas.backends import tvm_tuning
from hwnas.devices import load_device
from hwnas.export import export_onnx
from hwnas.fileio import atomic_write_text
from hwnas.latency.table import LatencyTable, shape_text, table_path, tables_dir
from hwnas.measure import Protocol, measure_interleaved
from hwnas.spaces import get_space, parse_shape

DEVICE = "cpu-tvm-tuned"


def cmd_tune(args) -> dict:
    import tvm

    device, space = load_device(DEVICE), get_space(args.space)
    shape = parse_shape(args.input)
    target = tvm.target.Target(tvm_backend.target_dict(device))
    db = tvm_tuning.TuningDatabase(tvm_backend.database_path(device),
                                   tvm_backend.target_dict(device))
    trials = tvm_backend._options(device)["trials_per_task"]
    deadline = time.monotonic() + 60 * args.minutes
    keys = space.unique_op_keys(shape, device.precision)
    tuned_now, complete = 0, True
    with tempfile.TemporaryDirectory(prefix="hwnas-") as tmp:
        for i, key in enumerate(tqdm(keys, desc="ops", unit="op")):
            path = export_onnx(space.build_op(key), key.in_shape, Path(tmp) / f"op{i}.onnx")
            mod = tvm_backend.lower(tvm_backend.import_onnx(path, device), target)
            rep = tvm_tuning.tune(mod, target, db, trials, progress=True, deadline=deadline)
            tuned_now += len(rep.tuned)
            if not rep.complete:
                complete = False
                break
    return {"tuned_now": tuned_now, "complete": complete, "database": tvm_tuning.describe(db.path)}


def cmd_status(args) -> dict:
    device = load_device(DEVICE)
    path = tvm_backend.database_path(device)
    ledger_path = path / "tuned.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.is_file() else {}
    return {"database": str(path), "tasks_tuned": len(ledger),
            "tuning_minutes": round(sum(e["seconds"] for e in ledger.values()) / 60, 2),
            "trials": sum(e["trials"] for e in ledger.values()),
            "describe": tvm_tuning.describe(path)}


def cmd_compact(args) -> dict:
    path = tvm_backend.database_path(load_device(DEVICE))
    before, after = tvm_tuning.compact(path)
    sizes = {p.name: p.stat().st_size for p in path.glob("database_*.json")}
    return {"database": str(path), "records_before": before, "records_after": after,
            "bytes": sizes}


def _hwnas(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "hwnas", *argv, "--json"], text=True,
                          stdout=subprocess.PIPE)
    if proc.returncode != 0:
        raise SystemExit(f"hwnas {' '.join(argv)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout)


def cmd_profile(args) -> dict:
    before = cmd_status(args)["tuning_minutes"]
    res = _hwnas("profile", "--device", DEVICE, "--space", args.space, "--input", args.input)
    after = cmd_status(args)
    res["tuning_minutes_during_profile"] = round(after["tuning_minutes"] - before, 2)
    res["tuning_minutes_total"] = after["tuning_minutes"]
    return res


def cmd_validate(args) -> dict:
    res = _hwnas("validate", "--device", DEVICE, "--space", args.space, "--input", args.input,
                 "--n", str(args.n), "--seed", str(args.seed))
    res["tuning_minutes_total"] = cmd_status(args)["tuning_minutes"]
    return res


def cmd_compare(args) -> dict:
    """TVM tuned vs onnxruntime fp32 on the same held-out candidates, interleaved in one run."""
    tvm_dev, ort_dev = load_device(DEVICE), load_device("cpu-ort-fp32")
    space, shape = get_space(args.space), parse_shape(args.input)
    # the candidates `hwnas validate --seed S` draws: seeded, minus the calibration ones
    exclude: set[str] = set()
    tp = table_path(tables_dir(), DEVICE, space.name, shape)
    if tp.is_file():
        cal = LatencyTable.load(tp).meta.get("calibration") or {}
        exclude = set(cal.get("archs", ()))
    archs = space.sample_distinct(args.n, np.random.default_rng(args.seed), exclude)
    with tempfile.TemporaryDirectory(prefix="hwnas-") as tmp:
        runners, max_abs = [], []
        for i, a in enumerate(tqdm(archs, desc="compiling", unit="cand")):
            path = export_onnx(space.build(a), shape, Path(tmp) / f"c{i}.onnx")
            t, o = compile_model(path, tvm_dev), compile_model(path, ort_dev)
            if t.tuning is not None and t.tuning.tuned:
                print(f"note: {a} needed {len(t.tuning.tuned)} new tasks tuned", file=sys.stderr)
            feed = o.random_feed(np.random.default_rng(0))
            ref = o.run(feed)[0]
            max_abs.append(float(np.abs(t.run(feed)[0] - ref).max() / np.abs(ref).max()))
            runners += [t, o]
        stats = measure_interleaved(runners, Protocol()).stats
    rows = []
    for i, a in enumerate(archs):
        tvm_ms, ort_ms = stats[2 * i].best_ms, stats[2 * i + 1].best_ms
        rows.append({"arch": str(a), "tvm_ms": tvm_ms, "ort_ms": ort_ms,
                     "ratio_tvm_over_ort": tvm_ms / ort_ms, "max_rel_err": max_abs[i]})
    ratios = np.array([r["ratio_tvm_over_ort"] for r in rows])
    out = table_path(tables_dir(), DEVICE, space.name, shape).with_suffix(".vs_ort.csv")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(out, buf.getvalue())
    summary = {"n": len(rows), "seed": args.seed, "input": shape_text(shape),
               "ratio_median": float(np.median(ratios)), "ratio_min": float(ratios.min()),
               "ratio_max": float(ratios.max()), "max_rel_err": float(max(max_abs)),
               "tvm_fingerprint": tvm_dev.fingerprint()["compiler"], "csv": str(out),
               "tuning_minutes_total": cmd_status(args)["tuning_minutes"]}
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("tune", "status", "compact", "profile", "compare", "validate"):
        p = sub.add_parser(name)
        p.add_argument("--space", default="det20")
        p.add_argument("--input", default="1x3x320x320")
        if name == "tune":
            p.add_argument("--minutes", type=float, default=8.0,
                           help="start no new task after this long (a task takes ≤ ~1 min)")
        if name in ("compare", "validate"):
            p.add_argument("--n", type=int, default=20)
            p.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    fn = {"tune": cmd_tune, "status": cmd_status, "compact": cmd_compact, "profile": cmd_profile,
          "compare": cmd_compare, "validate": cmd_validate}[args.cmd]
    print(json.dumps(fn(args), indent=1))


if __name__ == "__main__":
    main()
