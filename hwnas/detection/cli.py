"""`hwnas detect {train,supernet,search,eval,export,data}`: parsing → one library call → a line or one JSON object.

`export --to onnx|tvm|trt` writes the deployable ONNX file or a deployed folder
(`hwnas.detection.deploy`); `eval --deployed DIR` scores such a folder (and with --ckpt compares
it with torch).

Wired into `hwnas.cli` by `add_parsers(sub)` and ``COMMANDS.update(detection.cli.COMMANDS)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hwnas.errors import UserError


def add_parsers(sub) -> None:
    """Add the `detect` command (and its subcommands) to the top-level subparsers `sub`."""
    from hwnas.detection.config import DetTrainConfig

    d = DetTrainConfig()
    p = sub.add_parser("detect", help="detection: train, evaluate, export a detector; make data")
    dsub = p.add_subparsers(dest="detect_cmd", required=True)

    t = dsub.add_parser("train", help="train (or resume) an FCOS detector on a candidate")
    t.add_argument("--space", default=d.space, help=f"search space (default {d.space})")
    t.add_argument("--arch", default=d.arch, help=f"backbone arch (default {d.arch})")
    t.add_argument("--data", default=d.data, help="shapes-det or a COCO-format folder")
    t.add_argument("--steps", type=int, default=d.steps)
    t.add_argument("-o", "--output", required=True, type=Path, help="checkpoint (resumed if "
                   "it exists)")
    t.add_argument("--init", default=None, help="backbone init: a candidate state dict, or a "
                   "supernet / detector checkpoint")
    t.add_argument("--image-size", type=int, default=d.image_size)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--optimizer", choices=("adamw", "sgd"), default=d.optimizer)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    t.add_argument("--no-vflip", action="store_true", help="no vertical flips (natural images)")
    t.add_argument("--fpn-channels", type=int, default=d.fpn_channels)
    t.add_argument("--head-convs", type=int, default=d.head_convs)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    t.add_argument("--threads", type=int, default=d.threads)
    t.add_argument("--json", action="store_true")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    sn = dsub.add_parser("supernet", help="fine-tune a DetNAS detection supernet (shared FPN + "
                         "head, one path per step), resumable")
    sn.add_argument("--space", default="det20-w0.5", help="backbone space and width (default "
                    "det20-w0.5; crnas20-w0.5 for CRNAS)")
    sn.add_argument("--init", default=None, help="classification supernet of the same space "
                    "(`hwnas supernet train`): DetNAS's ImageNet-pretraining step")
    sn.add_argument("--data", default=d.data, help="shapes-det or a COCO-format folder")
    sn.add_argument("--steps", type=int, default=3000)
    sn.add_argument("--ref-steps", type=int, default=0, help="first steps on the reference "
                    "path (all choice 0) before uniform sampling")
    sn.add_argument("-o", "--output", required=True, type=Path, help="checkpoint (resumed if "
                    "it exists with the same settings)")
    for name, default, kind in (("--image-size", d.image_size, int),
                                ("--batch-size", d.batch_size, int), ("--lr", d.lr, float),
                                ("--warmup-steps", d.warmup_steps, int),
                                ("--fpn-channels", d.fpn_channels, int),
                                ("--head-convs", d.head_convs, int), ("--seed", d.seed, int),
                                ("--ckpt-every", d.ckpt_every, int),
                                ("--threads", d.threads, int)):
        sn.add_argument(name, type=kind, default=default)
    sn.add_argument("--json", action="store_true")
    sn.add_argument("--quiet", action="store_true", help="no progress bar")

    s = dsub.add_parser("search", help="latency-budgeted detector search (DetNAS evolution, "
                        "PC-NAS, random, CRNAS) priced by the whole detector's table")
    s.add_argument("--device", required=True)
    s.add_argument("--space", required=True, help="detector space: det20-fcos-w0.5, "
                   "crnas20-fcos-w0.5, ...")
    s.add_argument("--budget-ms", type=float, required=True)
    s.add_argument("--method", choices=["evolution", "pcnas", "random", "crnas"],
                   default="evolution")
    s.add_argument("--supernet", type=Path, required=True,
                   help="checkpoint from `hwnas detect supernet`")
    s.add_argument("--evaluations", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--val-n", type=int, default=100, help="val images per score (default 100)")
    s.add_argument("--tables", type=Path, default=None)
    s.add_argument("--host", default=None, metavar="ID")
    s.add_argument("--strict", action="store_true")
    s.add_argument("--canary", choices=["off", "report", "correct"], default="off")
    s.add_argument("-o", "--out", type=Path, default=None, help="prefix of the result files "
                   "(default hwnas-search/<space>_<method>_<budget>ms_s<seed>); an unfinished "
                   "search there is resumed")
    s.add_argument("--verify", action="store_true", help="export the pick (NMS inside) and "
                   "measure it on the device against the budget")
    s.add_argument("--span-s", type=float, default=None, help="protocol span for --verify")
    s.add_argument("--cluster", default=None, metavar="ADDR", help="where candidates are "
                   "scored: local (default, in this process), auto, HOST:PORT or ray://HOST:PORT"
                   " (Ray actors each holding the supernet); default $HWNAS_CLUSTER, else local")
    s.add_argument("--actors", type=int, default=None, help="with --cluster: evaluation actors")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    e = dsub.add_parser("eval", help="COCO metrics of a checkpoint, an exported ONNX file or a "
                        "deployed TVM/TensorRT folder; with a checkpoint and one of the others, "
                        "their detections compared image by image (parity)")
    e.add_argument("--ckpt", type=Path, default=None)
    e.add_argument("--onnx", type=Path, default=None)
    e.add_argument("--deployed", type=Path, default=None, metavar="DIR",
                   help="a folder from `hwnas detect export --to tvm|trt`")
    e.add_argument("--data", default=None, help="default: the checkpoint's training data")
    e.add_argument("--split", default="val")
    e.add_argument("--image-size", type=int, default=None,
                   help="default: the checkpoint's (or the ONNX input's)")
    e.add_argument("--json", action="store_true")

    x = dsub.add_parser("export", help="deployable ONNX (backbone, neck, head, decode and NMS), "
                        "or that detector compiled by TVM / built by TensorRT into a folder")
    x.add_argument("--ckpt", type=Path, required=True)
    x.add_argument("-o", "--output", type=Path, required=True,
                   help="the ONNX file (--to onnx) or the folder (--to tvm|trt)")
    x.add_argument("--to", choices=("onnx", "tvm", "trt"), default="onnx",
                   help="onnx (default): one file, NMS inside; tvm: dense part compiled by TVM "
                   "+ NMS stage on onnxruntime; trt: a TensorRT engine, NMS inside")
    x.add_argument("--device", default=None, help="with --to tvm (default cpu-tvm-untuned) or "
                   "--to trt (default gpu-trt-fp16)")
    x.add_argument("--score-thresh", type=float, default=None, help="default: the model's")
    x.add_argument("--iou", type=float, default=None, help="NMS IoU (default: the model's)")
    x.add_argument("--max-det", type=int, default=None, help="default: the model's")
    x.add_argument("--force", action="store_true", help="overwrite an existing file (or "
                   "deployed folder)")
    x.add_argument("--quiet", action="store_true", help="no tuning progress (--to tvm)")
    x.add_argument("--json", action="store_true")

    g = dsub.add_parser("data", help="generate shapes-det (COCO format) into a folder")
    g.add_argument("-o", "--output", type=Path, default=None, help="default: the cache")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true")


def _emit(args, obj: dict, line: str) -> None:
    print(json.dumps(obj) if args.json else line)


def _train(args) -> None:
    from hwnas.detection.train import DetectorTrainer, DetTrainConfig

    cfg = DetTrainConfig(space=args.space, arch=args.arch, data=args.data,
                         image_size=args.image_size, steps=args.steps,
                         batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup_steps, vflip=not args.no_vflip,
                         fpn_channels=args.fpn_channels, head_convs=args.head_convs,
                         seed=args.seed, init=args.init, ckpt_every=args.ckpt_every,
                         threads=args.threads)
    res = DetectorTrainer(cfg, args.output, progress=not args.quiet).run()
    _emit(args, res, f"trained {res['arch']} to step {res['step']} → {res['checkpoint']} "
          f"(loss {res['loss_ema']:.3f}, {res['images_per_s']} images/s)")


def _eval(args) -> None:
    import contextlib

    from hwnas.detection.data import load_coco, resolve_data
    from hwnas.detection.evaluate import evaluate
    from hwnas.detection.train import load_detector

    if args.onnx is not None and args.deployed is not None:
        raise UserError("give --onnx FILE or --deployed DIR, not both")
    if args.ckpt is None and args.onnx is None and args.deployed is None:
        raise UserError("give --ckpt FILE, --onnx FILE, or both (to compare them); or "
                        "--deployed DIR, with --ckpt to compare them")
    with contextlib.ExitStack() as stack:
        det, meta, size, runner = None, {}, args.image_size, None
        if args.ckpt is not None:
            det, meta = load_detector(args.ckpt)
            size = size or det.cfg.image_size
        if args.deployed is not None:
            from hwnas.detection.deploy import DeployedDetectorRunner

            runner = stack.enter_context(DeployedDetectorRunner(args.deployed))
            deployed_size = runner.inputs[0].shape[2]
            if det is not None and deployed_size != det.cfg.image_size:
                raise UserError(f"{args.deployed} takes {deployed_size} px images, the checkpoint "
                                f"{det.cfg.image_size} px; compare a folder exported from it")
            size = size or deployed_size
            meta = meta or {"config": {"data": runner.manifest.get("data")}}
        elif det is None:
            from hwnas.export import load_onnx, onnx_input_shape
            size = size or onnx_input_shape(load_onnx(args.onnx))[2]
        spec = args.data or meta.get("config", {}).get("data")
        if spec is None:
            raise UserError("--onnx needs --data (shapes-det or a COCO-format folder)")
        split = load_coco(resolve_data(spec), args.split, size)
        for source, ids in ((args.ckpt, meta.get("cat_ids")),
                            (args.deployed, runner.manifest["cat_ids"] if runner else None)):
            if ids is not None and list(split.cat_ids) != list(ids):
                raise UserError(f"the data's categories {split.cat_ids} are not those of "
                                f"{source} ({ids}); evaluate on data with the same categories")
        if det is not None and (args.onnx is not None or runner is not None):
            _parity(args, det, split, runner)
            return
        m = evaluate(split, det=det, onnx=args.onnx, runner=runner)
        m.update({"split": args.split, "model": str(args.ckpt or args.onnx or args.deployed)})
        if runner is not None:
            m.update({"target": runner.target, "device": runner.device.name})
        _emit(args, m, " ".join(f"{k} {m[k]:.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm",
                                                             "APl")) + f" ({m['images']} images)")


def _parity(args, det, split, runner) -> None:
    """Torch vs the ONNX file or the deployed folder, image by image (`parity`)."""
    from hwnas.detection.export import parity

    if runner is None:
        from hwnas.detection.deploy import with_thresholds
        from hwnas.detection.export import read_thresholds

        baked = read_thresholds(args.onnx)  # the file's own settings, where it records them
        p = parity(with_thresholds(det, baked) if baked else det, args.onnx, split)
        p.update({"split": args.split, "ckpt_path": str(args.ckpt),
                  "onnx_path": str(args.onnx)})
        label, name = "onnx", "onnx"
    else:
        from hwnas.detection.deploy import parity_tolerance, with_thresholds
        from hwnas.fileio import sha256_file

        p = parity(with_thresholds(det, runner.manifest), runner, split,
                   rel_tol=parity_tolerance(runner.manifest), label="deployed")
        made_from = (runner.manifest.get("checkpoint") or {}).get("sha256")
        p.update({"split": args.split, "ckpt_path": str(args.ckpt),
                  "deployed_path": str(args.deployed), "target": runner.target,
                  "device": runner.device.name,
                  "exported_from_this_ckpt": made_from == sha256_file(args.ckpt)})
        label, name = "deployed", f"{runner.target} ({runner.device.name})"
    _emit(args, p, f"{p['images_ok']}/{p['images']} images agree ({p['matched']}/"
          f"{p['detections_torch']} torch detections matched, max box rel err "
          f"{p['max_box_rel_err']:.2e}); AP torch {p['torch']['AP']:.4f} {name} "
          f"{p[label]['AP']:.4f}")


def _export(args) -> None:
    from hwnas.detection.train import load_detector

    if args.to == "onnx":
        from hwnas.detection.export import export_detector

        if args.device is not None:
            raise UserError("--device is for --to tvm or --to trt; the ONNX file runs anywhere")
        if args.output.exists() and not args.force:
            raise UserError(f"{args.output} exists; pass --force to overwrite it")
        det, meta = load_detector(args.ckpt)
        res = export_detector(det, args.output, score_thresh=args.score_thresh, iou=args.iou,
                              max_det=args.max_det)
        res["classes"], res["cat_ids"] = meta["classes"], meta["cat_ids"]
        _emit(args, res, f"wrote {res['path']} ({res['nms_nodes']} NonMaxSuppression node, "
              f"max_det {res['max_det']}, input {res['input_shape']})")
        return
    from hwnas.detection import deploy

    device = deploy.resolve_device(args.to, args.device)
    deploy.check_output(args.output, args.force)
    deploy.check_available(args.to, device)
    det, meta = load_detector(args.ckpt)
    m = deploy.export_deployed(args.to, det, meta, args.output, device,
                               score_thresh=args.score_thresh, iou=args.iou,
                               max_det=args.max_det, checkpoint=args.ckpt,
                               progress=not args.quiet)
    stages = " → ".join(f"{s['file']} ({s['runtime']})" for s in m["stages"])
    _emit(args, {"path": str(args.output), **m},
          f"wrote {args.output}/ for {device.name}: {stages}, max_det {m['max_det']}, input "
          f"{m['input']['shape']}")


def _data(args) -> None:
    from hwnas.detection.data import generate_shapes_det

    root = generate_shapes_det(args.output, seed=args.seed)
    _emit(args, {"path": str(root)}, f"shapes-det in {root}")


def _supernet(args) -> None:
    from hwnas.detection.supernet import DetSupernetConfig, DetSupernetTrainer

    if args.ref_steps < 0 or args.ref_steps >= args.steps:
        raise UserError(f"--ref-steps must be in 0..{args.steps - 1}, got {args.ref_steps}")
    cfg = DetSupernetConfig(space=args.space, data=args.data, image_size=args.image_size,
                            steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            warmup_steps=args.warmup_steps, fpn_channels=args.fpn_channels,
                            head_convs=args.head_convs, seed=args.seed, init=args.init,
                            ckpt_every=args.ckpt_every, threads=args.threads,
                            ref_steps=args.ref_steps)
    res = DetSupernetTrainer(cfg, args.output, progress=not args.quiet).run()
    _emit(args, res, f"detection supernet {args.space} trained to step {res['step']} → "
          f"{res['checkpoint']} (loss {res['loss_ema']:.3f})")


def _search(args) -> None:
    from hwnas.detection.search import DetSearchConfig, run_detect_search
    from hwnas.measure import Protocol

    for name, v, lo in (("--evaluations", args.evaluations, 1), ("--seed", args.seed, 0),
                        ("--val-n", args.val_n, 1)):
        if v < lo:
            raise UserError(f"{name} must be ≥ {lo}, got {v}")
    if not args.budget_ms > 0 or args.budget_ms == float("inf"):
        raise UserError(f"--budget-ms must be a positive number, got {args.budget_ms}")
    res = run_detect_search(DetSearchConfig(
        device=args.device, space=args.space, budget_ms=args.budget_ms, method=args.method,
        supernet=args.supernet, evaluations=args.evaluations, seed=args.seed,
        tables=args.tables, out=args.out, verify=args.verify, strict=args.strict,
        host=args.host, canary=args.canary, val_n=args.val_n, progress=not args.quiet,
        protocol=Protocol() if args.span_s is None else Protocol(span_s=args.span_s),
        cluster=args.cluster, actors=args.actors))
    line = (f"{res.method} under {res.budget_ms:g} ms ({res.evaluations} evaluations, seed "
            f"{res.seed}): {res.best_arch}\n  predicted {res.predicted_latency_ms:.3f} ms, "
            f"supernet AP {100 * res.score:.1f}\n  saved {res.context['json']} and "
            f"{res.context['plot']}")
    if res.verify:
        from hwnas.search.run import verify_line

        line += "\n" + verify_line(res.verify)
    out = res.to_dict()
    out.pop("evaluated")
    _emit(args, out, line)


def cmd_detect(args) -> None:
    {"train": _train, "eval": _eval, "export": _export, "data": _data,
     "supernet": _supernet, "search": _search}[args.detect_cmd](args)


COMMANDS = {"detect": cmd_detect}


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m hwnas.detection.cli detect …``) until `hwnas.cli`
    wires the command; same exit codes (2 and one line for a `UserError`)."""
    ap = argparse.ArgumentParser(prog="hwnas")
    add_parsers(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(argv)
    try:
        COMMANDS[args.cmd](args)
    except UserError as e:
        print(f"hwnas {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
