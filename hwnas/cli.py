"""The `hwnas` command: argument parsing → one library call → a table or one JSON object.

Exit codes: 0 success, 2 bad input (one line on stderr saying what to do), 1 internal failure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

from hwnas.argtypes import (OneLineParser, dumps_strict, finite_float, int_range, nonneg_int,
                            positive_float, positive_int)
from hwnas.errors import UserError
from hwnas.measure import Protocol

SPAN = finite_float(0, 600)


def _common(p: argparse.ArgumentParser, device=True, space=True, tables=True) -> None:
    if device:
        p.add_argument("--device", required=True, help="device name (see `hwnas devices`)")
    if space:
        p.add_argument("--space", required=True, help="search space (det20, det40, tiny; "
                       "a width multiplier as det20-w0.5)")
        p.add_argument("--input", default=None, help="input shape NxCxHxW (default: the space's)")
    if tables:
        p.add_argument("--tables", type=Path, default=None,
                       help="folder of latency tables (default: latency_tables/ of the checkout)")
        p.add_argument("--strict", action="store_true",
                       help="refuse a table whose fingerprint differs from this machine's in "
                       "anything that matters, instead of warning")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--span-s", type=SPAN, default=None,
                   help="protocol: least wall time each measurement's rounds cover "
                   f"(default {Protocol.span_s}; shorter is faster and noisier)")


def _host(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, metavar="ID",
                   help="price with another host's table (`hwnas tables` lists them); a "
                   "warning says latencies from another machine may not hold here")


def _canary(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--canary", choices=["off", "report", "correct"], default=default,
                   help="re-time the table's canary candidate now and report the host's drift "
                   "since the table was made, or also correct predictions by it "
                   f"(default {default})")


def _quiet_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--require-quiet", action="store_true",
                   help="refuse (exit 2, nothing saved) a measurement taken while the host was "
                   "busy in most rounds, instead of warning")


def _cluster(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--cluster", default=None, metavar="ADDR",
                   help=f"where {what} runs: local (default: in this process, no Ray), auto (the "
                   "Ray cluster this machine joined with `hwnas fleet start`), HOST:PORT or "
                   "ray://HOST:PORT; default $HWNAS_CLUSTER, else local")


def _protocol(args) -> Protocol:
    span = getattr(args, "span_s", None)
    return Protocol() if span is None else Protocol(span_s=span)


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="hwnas", description="Hardware-aware NAS: profile, "
                                 "predict, validate, search, export.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("devices", help="list known devices and whether each is usable here")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("profile", help="build or resume this host's latency table")
    _common(p)
    _quiet_flag(p)
    p.add_argument("--calibration-n", type=nonneg_int, default=20,
                   help="whole candidates measured to calibrate the sum (default 20; 0: none)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    _cluster(p, "the timing")
    p.add_argument("--hosts", default=None, metavar="ID,ID",
                   help="with --cluster: the hosts whose tables to build (default: every host "
                   "whose nodes advertise the device; `hwnas fleet status` lists them)")
    p.add_argument("--shard-size", type=positive_int, default=None,
                   help="with --cluster: labels per timing task (default: one task per timing "
                   "slot of the host, so one slot measures everything interleaved)")

    p = sub.add_parser("predict", help="latency of a candidate from the LUT")
    _common(p)
    _host(p)
    _canary(p, "off")
    p.add_argument("--arch", required=True, help="e.g. det20:01230123012301230123")

    p = sub.add_parser("measure", help="measured latency of an ONNX file or a candidate")
    _common(p, space=False, tables=False)
    p.add_argument("--onnx", default=None)
    p.add_argument("--space", default=None)
    p.add_argument("--arch", default=None)
    p.add_argument("--input", default=None)
    p.add_argument("--naive", action="store_true",
                   help="time a plain loop instead of the protocol (for comparison only)")

    p = sub.add_parser("noise", help="this machine's noise floor for the protocol")
    _common(p, space=False)
    p.add_argument("--arch", default="det20:00000000000000000000",
                   help="the candidate to time (default: a det20 model of ~3 ms here)")
    p.add_argument("--processes", type=int_range(2, 100), default=6)
    p.add_argument("--out", type=Path, default=None,
                   help="where to save the report (default: a new run folder)")
    p.add_argument("--publish", action="store_true",
                   help="save it beside this host's tables, as the noise floor they cite")

    p = sub.add_parser("validate", help="predicted vs measured on N held-out random candidates")
    _common(p)
    _host(p)
    _quiet_flag(p)
    p.add_argument("--canary", choices=["off", "report"], default="report",
                   help="time the table's canary interleaved with the candidates and report "
                   "the figures corrected by the host's drift beside the raw ones (default)")
    p.add_argument("--n", type=positive_int, default=100)
    p.add_argument("--seed", type=nonneg_int, default=1)
    p.add_argument("--out", type=Path, default=None,
                   help="prefix of the CSV and PNG (default: a new run folder)")
    p.add_argument("--publish", action="store_true",
                   help="write the CSV and PNG beside the table, as its published evidence")
    p.add_argument("--explain", action="store_true",
                   help="profile the worst candidates per node and show which layers carry "
                   "their error (LUT price vs time inside the model)")
    p.add_argument("--explain-top", type=positive_int, default=3,
                   help="how many of the worst candidates --explain profiles (default 3)")
    _cluster(p, "the timing (on the nodes of the table's host)")

    p = sub.add_parser("compare", help="one model on several devices: output difference vs "
                       "onnxruntime fp32, and latency")
    p.add_argument("--devices", required=True, help="comma-separated device names")
    p.add_argument("--onnx", default=None, help="an ONNX file (torch devices need --arch)")
    p.add_argument("--space", default=None)
    p.add_argument("--arch", default=None)
    p.add_argument("--input", default=None)
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the random input")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--span-s", type=SPAN, default=None, help="protocol span (see profile)")

    p = sub.add_parser("export", help="a standalone candidate as ONNX")
    p.add_argument("--space", required=True)
    p.add_argument("--arch", required=True)
    p.add_argument("--input", default=None)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="the main job end to end on the embedded defaults")
    p.add_argument("--job", choices=["detect", "classify"], default="detect",
                   help="detect (default): search a detector with the committed detection "
                   "supernet, export it deployable, verify it on the device; classify: the "
                   "LUT-only job on a classification space (--space, --input)")
    p.add_argument("--device", default="cpu-ort-fp32")
    p.add_argument("--space", default=None, help="default det20-fcos-w0.5 (detect), det20 "
                   "(classify)")
    p.add_argument("--input", default="1x3x320x320", help="classify only")
    p.add_argument("--evaluations", type=positive_int, default=120, help="detect: search "
                   "evaluations (default 120)")
    p.add_argument("--supernet", type=Path, default=None, help="detect: a detection supernet "
                   "(default: the committed one)")
    p.add_argument("--budget-ms", type=positive_float, default=None)
    p.add_argument("--out", type=Path, default=None, help="default: a new run folder")
    p.add_argument("--tables", type=Path, default=None)
    _canary(p, "correct")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--span-s", type=SPAN, default=None, help="protocol span (see profile)")
    p = sub.add_parser("tables", help="the hosts and tables under a tables folder; "
                       "`migrate` moves tables from before hosts under their host")
    p.add_argument("action", nargs="?", choices=["list", "migrate"], default="list")
    p.add_argument("--tables", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    _add_search_parsers(sub)
    _add_fleet_parsers(sub)
    from hwnas.detection import cli as detect_cli  # torchvision: imported when building the CLI

    detect_cli.add_parsers(sub)
    from hwnas.quant import cli as quant_cli  # `hwnas quantize` (issue 11): its own module

    quant_cli.add_parsers(sub)
    return ap


def _add_search_parsers(sub) -> None:
    """`hwnas supernet train` and `hwnas search` (issue 4)."""
    p = sub.add_parser("supernet", help="train a weight-sharing supernet on proxy data")
    ssub = p.add_subparsers(dest="supernet_cmd", required=True)
    t = ssub.add_parser("train", help="SPOS training (uniform single path per step), resumable")
    t.add_argument("--space", default="det20-w0.25",
                   help="space and width (default det20-w0.25: det20's choices at 1/4 width)")
    t.add_argument("--data", default="shapes", help="'shapes' (built-in, offline) or a folder "
                   "with one sub-folder of images per class")
    t.add_argument("--image-size", type=int_range(16, 512), default=64)
    t.add_argument("--steps", type=positive_int, default=3000)
    t.add_argument("--batch-size", type=positive_int, default=64)
    t.add_argument("--lr", type=positive_float, default=0.1)
    t.add_argument("--ckpt-every", type=positive_int, default=200)
    t.add_argument("--warmup-steps", type=nonneg_int, default=400,
                   help="first train the reference path (choice 0 everywhere) alone")
    t.add_argument("--match-steps", type=nonneg_int, default=300,
                   help="then fit every other choice block to its layer's reference block; "
                   "0 and 0 give plain SPOS, which does not leave chance level on a CPU budget "
                   "(see hwnas/train/trainer.py)")
    t.add_argument("--seed", type=nonneg_int, default=0)
    t.add_argument("--fresh", action="store_true",
                   help="start over even if the output holds a checkpoint, overwriting it")
    t.add_argument("-o", "--output", type=Path, required=True,
                   help="checkpoint file; an existing one of the same space is resumed")
    t.add_argument("--json", action="store_true")
    t.add_argument("--quiet", action="store_true")

    p = sub.add_parser("search", help="a latency-budgeted search scored by a supernet")
    _common(p)
    _host(p)
    _canary(p, "off")
    p.add_argument("--budget-ms", type=positive_float, required=True)
    p.add_argument("--method", choices=["evolution", "pcnas", "random", "crnas"], default="evolution")
    p.add_argument("--supernet", type=Path, required=True, help="checkpoint from "
                   "`hwnas supernet train`")
    p.add_argument("--evaluations", type=positive_int, default=1000)
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--val-n", type=positive_int, default=None,
                   help="held-out images per score (default: the whole search-validation split)")
    p.add_argument("-o", "--out", type=Path, default=None,
                   help="prefix of the result files (default hwnas-search/<space>_<method>_"
                   "<budget>ms_s<seed>); an unfinished search there is resumed")
    p.add_argument("--verify", action="store_true",
                   help="export the pick and measure it on the device against the budget")
    _cluster(p, "candidate evaluation")
    p.add_argument("--actors", type=positive_int, default=None,
                   help="with --cluster: evaluation actors, each holding the supernet (default: "
                   "one per CPU of the cluster)")


def _add_fleet_parsers(sub) -> None:
    """`hwnas fleet start|status` (issue 12): a machine joins a Ray cluster with its devices."""
    p = sub.add_parser("fleet", help="a device fleet on Ray: start a head or a worker with this "
                       "machine's devices, list the nodes and their timing slots")
    fsub = p.add_subparsers(dest="fleet_cmd", required=True)
    s = fsub.add_parser("start", help="`ray start` with this machine's devices as resources "
                        "(one unit of device:<name>@<host id> per timing slot)")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--head", action="store_true", help="start the head of a new cluster")
    where.add_argument("--address", default=None, metavar="HOST:PORT",
                       help="join the cluster whose head is there")
    s.add_argument("--devices", default="cpu-ort-fp32",
                   help="comma-separated devices this machine times (default cpu-ort-fp32)")
    s.add_argument("--slots", type=positive_int, default=1,
                   help="timing slots per device (default 1: one measurement at a time)")
    s.add_argument("--num-cpus", type=positive_int, default=None,
                   help="CPUs Ray may use here (default: all)")
    s.add_argument("--port", type=int_range(1024, 65535), default=6379, help="head's port")
    s.add_argument("--node-ip-address", default=None, help="this node's address on the network "
                   "the cluster uses (default: Ray's guess)")
    s.add_argument("--loopback", action="store_true",
                   help="a one-machine cluster that listens on 127.0.0.1 only")
    s.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (off)")
    s.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    s.add_argument("--json", action="store_true")
    s = fsub.add_parser("status", help="the cluster's nodes, CPUs and device timing slots")
    _cluster(s, "the cluster to list")
    s.add_argument("--json", action="store_true")


def cmd_fleet(args) -> None:
    from hwnas import fleet
    from hwnas.distributed import cluster_address

    if args.fleet_cmd == "status":
        address = cluster_address(args.cluster) or "auto"
        fleet.connect(address)
        st = fleet.status()
        _emit(args, {"cluster": address, **st},
              [f"{len(st['nodes'])} node(s), {st['cpus']:g} CPUs"]
              + [f"  {n['address']}: {n['cpus']:g} CPUs, {n['gpus']:g} GPUs; "
                 + (", ".join(f"{k} x{v}" for k, v in n["slots"].items()) or "no device slots")
                 for n in st["nodes"]])
        return
    import os
    import shlex
    import subprocess

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    resources = fleet.node_resources(devices, args.slots)
    node_ip = "127.0.0.1" if args.loopback else args.node_ip_address
    cmd = fleet.ray_start_command(args.head, args.address, resources, args.num_cpus, args.port,
                                  node_ip, args.dashboard)
    env = {**os.environ, **({fleet._LOOPBACK_ENV: "0"} if args.loopback else {})}
    out = {"command": cmd, "resources": resources, "ran": not args.dry_run}
    if not args.dry_run:
        try:
            proc = subprocess.run([sys.executable, "-m", "ray.scripts.scripts"] + cmd[1:],
                                  env=env, capture_output=True, text=True, timeout=300)
        except FileNotFoundError:
            raise UserError(f"`ray start` needs Ray: {fleet.INSTALL}") from None
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"`{' '.join(cmd)}` failed: {tail}")
        out["output"] = proc.stdout
    _emit(args, out, [shlex.join(cmd)] + ([] if args.dry_run else [proc.stdout.strip()]))


def _shape(args, space):
    from hwnas.spaces import parse_shape

    shape = parse_shape(args.input) if args.input else space.default_input
    if shape[1] != space.default_input[1]:
        raise UserError(f"input {args.input} has {shape[1]} channels; {space.name} takes "
                        f"{space.default_input[1]}")
    return shape


def _predictor(args, canary: str | None = None):
    """(device, space, shape, predictor, drift): this host's table, or --host's."""
    from hwnas.devices import load_device
    from hwnas.latency.lookup import open_predictor
    from hwnas.spaces import get_space

    device, space = load_device(args.device), get_space(args.space)
    shape = _shape(args, space)
    pred, drift = open_predictor(device, space, shape, args.tables, args.host, args.strict,
                                 canary if canary is not None else args.canary, _protocol(args))
    return device, space, shape, pred, drift


def _emit(args, obj: dict, lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(dumps_strict(obj))
    else:
        print("\n".join(lines))


def cmd_devices(args) -> None:
    from hwnas.backends import backend_available
    from hwnas.devices import list_devices

    rows = []
    for d in list_devices():
        ok, why = backend_available(d)
        rows.append({"name": d.name, "backend": d.backend, "precision": d.precision,
                     "threads": d.threads, "available": ok, "why_not": why,
                     "description": d.description})
    lines = [f"{'device':<20} {'backend':<12} {'prec':<6} {'usable':<7} why / description"]
    lines += [f"{r['name']:<20} {r['backend']:<12} {r['precision']:<6} "
              f"{'yes' if r['available'] else 'no':<7} {r['why_not'] or r['description']}"
              for r in rows]
    from hwnas.devices import gpu_info

    gpus = gpu_info()
    lines.append("GPUs here: " + (", ".join(f"{g['name']} (driver {g['driver']})" for g in gpus)
                                  or "none (nvidia-smi lists none)"))
    _emit(args, {"devices": rows, "host_gpus": gpus}, lines)


def cmd_profile(args) -> None:
    from hwnas.devices import load_device
    from hwnas.latency.profile import profile
    from hwnas.latency.table import tables_dir
    from hwnas.spaces import get_space

    from hwnas.distributed import cluster_address

    device, space = load_device(args.device), get_space(args.space)
    shape = _shape(args, space)
    if cluster_address(args.cluster) is not None:
        return _profile_fleet(args, device, space, shape)
    if args.hosts or args.shard_size:
        raise UserError("--hosts and --shard-size need --cluster")
    rep = profile(device, space, shape, args.tables or tables_dir(), _protocol(args),
                  calibration_n=args.calibration_n, seed=args.seed, progress=not args.quiet,
                  require_quiet=args.require_quiet)
    rep.table.check_fingerprint(device, strict=args.strict)
    d = rep.to_dict()
    _emit(args, d, _profile_lines(d))


def _profile_lines(d: dict) -> list[str]:
    cal = d["calibration"]
    canary = d["canary"] or {}
    return [f"{d['table']}: {d['rows']} ops ({d['measured_ops']} measured now, "
            f"{d['reused_ops']} reused), host {d['host']}",
            f"canary {canary.get('arch')}: {canary.get('latency_ms', float('nan')):.4f} ms",
            f"calibration: latency = {cal['intercept_ms']:.4f} ms + "
            + " + ".join(f"{v:.3f}×Σ{k}" for k, v in cal["slopes"].items())
            + f" (max fit error {cal['fit_max_abs_err_pct']:.2f}%)"
            if cal.get("slopes") is not None else "calibration: none"]


def _profile_fleet(args, device, space, shape) -> None:
    """`hwnas profile --cluster`: the tables of several hosts, each timed on its own nodes."""
    from hwnas import fleet
    from hwnas.distributed import get_executor
    from hwnas.hosts import check_host_id
    from hwnas.latency.shards import profile_hosts
    from hwnas.latency.table import tables_dir

    executor = get_executor(args.cluster)
    slots = fleet.device_slots(device.name)
    if args.hosts:
        wanted = [check_host_id(h.strip()) for h in args.hosts.split(",") if h.strip()]
        absent = [h for h in wanted if h not in slots]
        if absent:
            raise UserError(f"no node of the cluster advertises {device.name} on host "
                            f"{', '.join(absent)}; hosts with slots: {', '.join(slots) or 'none'} "
                            "(`hwnas fleet status`)")
        slots = {h: slots[h] for h in wanted}
    if not slots:
        raise UserError(f"no node of the cluster advertises device {device.name}: start workers "
                        f"with `hwnas fleet start --devices {device.name} ...`")
    reports = profile_hosts(executor, device, space, shape, args.tables or tables_dir(), slots,
                            _protocol(args), calibration_n=args.calibration_n, seed=args.seed,
                            shard_size=args.shard_size, progress=not args.quiet,
                            require_quiet=args.require_quiet)
    tables = [r.to_dict() for r in reports]
    _emit(args, {"cluster": executor.describe()["cluster"], "tables": tables},
          [line for d in tables for line in _profile_lines(d)])


def cmd_predict(args) -> None:
    from hwnas.spaces import get_space

    get_space(args.space).parse(args.arch)  # a bad arch fails before any timing
    device, space, shape, pred, drift = _predictor(args)
    arch = space.parse(args.arch)
    ms = pred.predict(arch)
    _emit(args, {"arch": str(arch), "latency_ms": ms, "device": device.name,
                 "host": pred.table.host, "input_shape": list(shape),
                 "drift": drift.to_dict() if drift else None,
                 "canary_corrected": args.canary == "correct"},
          [f"{arch}  {ms:.4f} ms  ({device.name}, host {pred.table.host}"
           + (", canary-corrected" if args.canary == "correct" else "") + ")"]
          + ([drift.line()] if drift else []))


def cmd_measure(args) -> None:
    from hwnas.devices import load_device
    from hwnas.measure import measure_file

    device = load_device(args.device)
    if (args.onnx is None) == (args.arch is None):
        raise UserError("give either --onnx F or --space S --arch A")
    with tempfile.TemporaryDirectory(prefix="hwnas-") as tmp:
        path, module = args.onnx, None
        if path is None:
            from hwnas.export import export_onnx
            from hwnas.spaces import get_space

            if args.space is None:
                raise UserError("--arch needs --space")
            space = get_space(args.space)
            arch = space.parse(args.arch)
            module = space.build(arch)
            path = str(export_onnx(module, _shape(args, space), Path(tmp) / "m.onnx"))
        res = measure_file(path, device, _protocol(args), naive=args.naive, module=module)
    res.update({"device": device.name, "onnx": args.onnx, "arch": args.arch})
    _emit(args, res, [f"{args.onnx or args.arch}: {res['latency_ms']:.4f} ms on {device.name} "
                      f"({res['method']})"])


def cmd_noise(args) -> None:
    from hwnas.devices import load_device
    from hwnas.export import export_onnx
    from hwnas.fileio import atomic_write_text, check_writable
    from hwnas.latency.table import host_dir, now_iso, tables_dir
    from hwnas.measure import measure_noise
    from hwnas.runs import new_run_dir
    from hwnas.spaces import get_space

    device = load_device(args.device)
    _protocol(args)  # checks --span-s
    n = args.processes
    space = get_space(args.arch.split(":")[0])
    arch = space.parse(args.arch)
    if args.publish:
        out = host_dir(args.tables or tables_dir(), device) / "noise.json"
    else:
        out = args.out or new_run_dir("noise", device.name) / "noise.json"
    check_writable(out)  # before a minute of measuring
    with tempfile.TemporaryDirectory(prefix="hwnas-") as tmp:
        path = str(export_onnx(space.build(arch), space.default_input, Path(tmp) / "m.onnx"))
        reports = {}
        for naive in (False, True):
            if not args.quiet:
                print(f"timing {arch} in {n} fresh processes "
                      f"({'naive loop' if naive else 'protocol'})...", file=sys.stderr)
            for rep in measure_noise(path, device.name, n, naive=naive, span_s=args.span_s):
                reports[rep.method] = rep.to_dict()
    result = {"device": device.name, "arch": str(arch), "processes": n, "date": now_iso(),
              "fingerprint": device.fingerprint(), **reports,
              "noise_floor_pct": 100 * reports["protocol"]["cv"]}
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    lines = [f"noise floor on {device.name} ({arch}, {n} processes, between-process spread of "
             "the latency):"]
    for method, r in reports.items():
        lines.append(f"  {method:<16} CV {100 * r['cv']:.2f}%  range {100 * r['range_rel']:.2f}%"
                     f"  values {r['medians_ms']}")
    lines.append(f"saved {out}")
    _emit(args, result, lines)


def cmd_validate(args) -> None:
    from hwnas.latency.table import shape_text
    from hwnas.latency.validate import validate

    from hwnas.fileio import check_writable
    from hwnas.runs import new_run_dir

    if args.publish and args.out:
        raise UserError("give --out or --publish, not both")
    device, space, shape, pred, _ = _predictor(args, canary="off")
    held_out = math.prod(space.num_choices) - len(set(pred.calibration.archs) | {
        str(space.canary())})
    if args.n > held_out:
        raise UserError(f"--n {args.n} is more than the {held_out} candidates of {space.name} "
                        f"outside the table's calibration set; pass --n {held_out} or less")
    name = f"{space.name}_{shape_text(shape)}"
    if args.publish:
        prefix = pred.table.path.parent / name
    else:
        prefix = args.out or new_run_dir("validate", f"{device.name}-{name}") / name
    check_writable(prefix.with_name(prefix.name + ".validation.csv"))  # before measuring
    from hwnas.distributed import cluster_address, get_executor

    executor = get_executor(args.cluster) if cluster_address(args.cluster) else None
    rep = validate(pred, device, args.n, args.seed, prefix,
                   noise_file=pred.table.path.parent / "noise.json", protocol=_protocol(args),
                   progress=not args.quiet, canary=args.canary == "report",
                   require_quiet=args.require_quiet, executor=executor)
    d, lines = rep.to_dict(), rep.lines()
    if args.explain:
        from hwnas.latency import explain

        exps = explain.explain_worst(pred, device, rep.csv, args.explain_top)
        d["explain"] = [e.to_dict() for e in exps]
        lines += [f"explain: the {len(exps)} worst candidates profiled per node on "
                  f"{device.name}"] + explain.lines(exps)
    _emit(args, d, lines)


def cmd_compare(args) -> None:
    from hwnas import compare as cmp
    from hwnas.devices import load_device

    names = [n.strip() for n in args.devices.split(",") if n.strip()]
    if not names:
        raise UserError("--devices needs at least one device name, e.g. cpu-ort-fp32,cpu-ort-int8")
    devices = [load_device(n) for n in names]
    protocol = _protocol(args)
    if (args.onnx is None) == (args.arch is None):
        raise UserError("give either --onnx F or --space S --arch A")
    if args.onnx is not None:
        from hwnas.export import load_onnx

        load_onnx(args.onnx)  # a clear error for a missing or broken file
        results, what = cmp.compare(args.onnx, devices, protocol, seed=args.seed), args.onnx
    else:
        from hwnas.spaces import get_space

        if args.space is None:
            raise UserError("--arch needs --space")
        space = get_space(args.space)
        arch = space.parse(args.arch)
        results = cmp.compare_arch(space, arch, _shape(args, space), devices, protocol,
                                   seed=args.seed)
        what = str(arch)
    _emit(args, {"model": what, "reference": "onnxruntime CPU fp32", "seed": args.seed,
                 "tolerances": cmp.TOLERANCES, "devices": [r.to_dict() for r in results],
                 "all_within_tolerance": all(r.within_tolerance for r in results)},
          cmp.lines(results, what))


def cmd_export(args) -> None:
    from hwnas.export import check_export, export_onnx
    from hwnas.spaces import get_space

    space = get_space(args.space)
    arch = space.parse(args.arch)
    shape = _shape(args, space)
    if args.output.exists() and not args.force:
        raise UserError(f"{args.output} exists; pass --force to overwrite it")
    model = space.build(arch)
    path = export_onnx(model, shape, args.output)
    check = check_export(model, path, shape)
    if not check.ok:
        raise RuntimeError(f"exported model differs from torch: rel err {check.rel_err:.2e}")
    _emit(args, {"arch": str(arch), "onnx": str(path), "input_shape": list(shape),
                 "max_rel_err_vs_torch": check.rel_err},
          [f"wrote {path} ({arch}, input {'x'.join(map(str, shape))}; onnxruntime vs torch "
           f"max rel err {check.rel_err:.1e})"])


def cmd_demo(args) -> None:
    from hwnas.demo import DemoConfig, run_demo
    from hwnas.spaces import get_space, parse_shape

    if args.job == "detect":
        return cmd_detect_demo(args)
    args.space = args.space or "det20"
    get_space(args.space)
    res = run_demo(DemoConfig(device=args.device, space=args.space,
                              input_shape=parse_shape(args.input), tables=args.tables,
                              out=args.out, budget_ms=args.budget_ms, seed=args.seed,
                              protocol=_protocol(args), progress=not args.quiet,
                              canary=args.canary))
    v, p = res["validation"], res["pick"]
    vf = v["canary_corrected"] if args.canary == "correct" and v["canary_corrected"] else v
    drift = res["drift"]
    lines = [f"1. profile: {res['profile']['table']} ({res['profile']['rows']} ops, "
             f"{res['profile']['measured_ops']} measured now; host {res['host']})",
             "   canary: " + (f"host drift {drift['drift_pct']:+.1f}% since the table (median "
                              f"of {max(len(drift.get('refs') or {}), 1)} reference candidates; "
                              f"the canary {drift['table_ms']:.3f} → {drift['now_ms']:.3f} ms)"
                              + ("; prices corrected by it" if args.canary == "correct" else "")
                              if drift else "not timed (--canary off)"),
             f"2. validate: {v['n']} held-out candidates, mean |error| "
             f"{vf['mean_abs_err_pct']:.2f}%, {100 * vf['within_10pct']:.0f}% within ±10%"
             + (" (drift-corrected; timed with the references)" if vf is not v else ""),
             f"3. pick under {p['budget_ms']} ms (most MACs among the sample): {p['arch']} "
             f"({p['macs_m']} M MACs, predicted {p['predicted_ms']:.3f} ms)",
             f"4. export + measure: {p['onnx']} measured {p['measured_ms']:.3f} ms "
             f"(prediction error {p['error_pct']:+.2f}%; onnxruntime vs torch rel err "
             f"{p['onnx_max_rel_err_vs_torch']:.1e})",
             f"   budget {p['budget_ms']} ms {'KEPT' if p['keeps_budget'] else 'MISSED'} "
             f"(tolerance: noise floor {p['tolerance_pct']:.2f}%; the host ran "
             f"{p['host_shift_pct']:+.1f}% vs when priced, by the references timed with the pick; "
             f"without that allowance: {'kept' if p['keeps_budget_raw'] else 'missed'})",
             f"   results in {res['out']}"]
    _emit(args, res, lines)


def cmd_detect_demo(args) -> None:
    from hwnas.detection.demo import SUPERNET, DetDemoConfig, run_detect_demo

    res = run_detect_demo(DetDemoConfig(
        device=args.device, space=args.space or "det20-fcos-w0.5",
        supernet=args.supernet or SUPERNET, tables=args.tables, out=args.out,
        budget_ms=args.budget_ms, evaluations=args.evaluations, seed=args.seed,
        canary=args.canary, protocol=_protocol(args), progress=not args.quiet))
    p, s, drift = res["pick"], res["search"], res["drift"]
    par = p["parity"]
    lines = [f"1. table: {res['profile']['table']} ({res['profile']['rows']} ops, "
             f"{res['profile']['measured_ops']} measured now; host {res['host']})",
             "   canary: " + (f"host drift {drift['drift_pct']:+.1f}% since the table; prices "
                              "corrected by it" if drift else "not timed (--canary off)"),
             f"2. search: {s['method']}, {s['evaluations']} evaluations under "
             f"{p['budget_ms']} ms → {p['arch']} (predicted {p['predicted_ms']:.3f} ms, "
             f"supernet AP {100 * s['supernet_ap']:.1f}); {s['plot']}",
             f"3. export: {p['onnx']} ({p['nms_nodes']} NMS node(s) inside); detections match "
             f"torch on {par['images_ok']}/{par['images']} val images ({par['matched']}/"
             f"{par['detections_torch']} matched, max box rel err {par['max_box_rel_err']:.1e})",
             f"4. measured {p['measured_ms']:.3f} ms as shipped (trained weights; priced "
             f"{p['error_pct']:+.2f}% above, with NMS at its worst case) vs "
             f"budget {p['budget_ms']} ms: {'KEPT' if p['keeps_budget'] else 'MISSED'} "
             f"(tolerance {p['tolerance_pct']:.2f}%; host {p['host_shift_pct']:+.1f}% vs when "
             f"priced; without that allowance: {'kept' if p['keeps_budget_raw'] else 'missed'})",
             f"   results in {res['out']}"]
    _emit(args, res, lines)


def cmd_tables(args) -> None:
    from hwnas.hosts import describe, load_index
    from hwnas.latency.migrate import legacy_tables, migrate
    from hwnas.latency.table import tables_dir

    root = args.tables or tables_dir()
    if args.action == "migrate":
        moved = migrate(root)
        _emit(args, {"migrated": moved}, [f"{m['table']} (host {m['host']}; moved "
                                          f"{', '.join(m['moved'])})" for m in moved]
              or ["nothing to migrate"])
        return
    index = load_index(root)
    rows = []
    for hid, facts in sorted(index.items()):
        tables = sorted(str(p.relative_to(root)) for p in root.glob(f"*/{hid}/*.csv")
                        if ".validation" not in p.name and ".vs_ort" not in p.name)
        rows.append({"host": hid, "facts": facts, "tables": tables})
    legacy = [str(p) for p in legacy_tables(root)]
    lines = [f"{r['host']}: {describe(r['facts'])}\n    " + "\n    ".join(r["tables"])
             for r in rows] or [f"no hosts under {root}"]
    if legacy:
        lines.append(f"{len(legacy)} table(s) from before hosts: `hwnas tables migrate`")
    _emit(args, {"tables": str(root), "hosts": rows, "legacy": legacy}, lines)


COMMANDS = {"devices": cmd_devices, "tables": cmd_tables, "profile": cmd_profile, "predict": cmd_predict,
            "measure": cmd_measure, "noise": cmd_noise, "validate": cmd_validate,
            "compare": cmd_compare,
            "export": cmd_export, "demo": cmd_demo}


def cmd_supernet(args) -> None:
    from hwnas.train import SupernetTrainer, TrainConfig

    cfg = TrainConfig(space=args.space, data=args.data, image_size=args.image_size,
                      steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, ckpt_every=args.ckpt_every,
                      warmup_steps=args.warmup_steps, match_steps=args.match_steps,
                      fresh=args.fresh)
    if not 16 <= cfg.image_size <= 512:
        raise UserError(f"--image-size must be between 16 and 512, got {cfg.image_size}")
    res = SupernetTrainer(cfg, args.output, progress=not args.quiet).run()
    _emit(args, res, [f"{res['checkpoint']}: {res['space']} trained to step {res['step']} "
                      f"(resumed from {res['resumed_from']}; loss "
                      f"{'n/a' if res['loss_ema'] is None else format(res['loss_ema'], '.3f')}) on "
                      f"{res['data']}"])


def cmd_search(args) -> None:
    from hwnas.search.run import SearchConfig, run_search
    from hwnas.spaces import get_space

    space = get_space(args.space)
    res = run_search(SearchConfig(
        device=args.device, space=args.space, budget_ms=args.budget_ms, method=args.method,
        supernet=args.supernet, evaluations=args.evaluations,
        seed=args.seed, input_shape=_shape(args, space), tables=args.tables, out=args.out,
        verify=args.verify, strict=args.strict, host=args.host, canary=args.canary,
        val_n=args.val_n, progress=not args.quiet,
        protocol=_protocol(args), cluster=args.cluster, actors=args.actors))
    lines = [f"{res.method} under {res.budget_ms:g} ms ({res.evaluations} evaluations, seed "
             f"{res.seed}): {res.best_arch}",
             f"  predicted {res.predicted_latency_ms:.3f} ms, supernet score "
             f"{100 * res.score:.1f}%  ({res.context['mapping']})",
             f"  saved {res.context['json']} and {res.context['plot']}"]
    if res.verify:
        from hwnas.search.run import verify_line

        lines.append(verify_line(res.verify))
    out = res.to_dict()
    out.pop("evaluated")  # the JSON file has them; stdout stays one readable object
    _emit(args, out, lines)


COMMANDS.update({"supernet": cmd_supernet, "search": cmd_search, "fleet": cmd_fleet})


def cmd_detect(args) -> None:
    from hwnas.detection import cli as detect_cli

    detect_cli.cmd_detect(args)


COMMANDS["detect"] = cmd_detect


def cmd_quantize(args) -> None:
    from hwnas.quant import cli as quant_cli

    quant_cli.cmd_quantize(args)


COMMANDS["quantize"] = cmd_quantize


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.cmd](args)
    except UserError as e:
        print(f"hwnas {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hwnas {args.cmd}: interrupted (progress so far is saved)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
