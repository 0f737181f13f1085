"""One detector checkpoint deployed three ways, timed together and checked against torch:
the deployable ONNX on onnxruntime (`cpu-ort-fp32`), the TVM folder untuned (`cpu-tvm-untuned`)
and, with --tuned, the TVM folder with MetaSchedule kernels (`cpu-tvm-tuned`; tuning what its
database lacks first, which can take long). Prints one JSON object.

    flock /tmp/hwnas-heavy.lock python tools/bench_deploy.py --ckpt det.pt [--tuned] \
        [--n 100] [--span-s 5] [--out bench-deploy/det]

- exports go to --out (default ``bench-deploy/<ckpt stem>``): ``det.onnx`` and one folder per
  TVM device; a folder already there from the same checkpoint and device is reused (compiling
  and tuning are the slow part), anything else is exported again;
- parity: `hwnas.detection.export.parity` of each deployment vs torch `postprocess` on the first
  --n images of --split (matched detections, boxes within 1e-3 relative);
- latency: the project's protocol over the opened runners, interleaved round by round
  (`hwnas.latency.profile.measure_opened`, what `measure_labelled` runs for runners that open
  themselves), every runner on the same real, letterboxed image (val image 0: NMS's work follows
  the boxes, so random pixels would time another workload), the rounds journalled in --out so
  an interrupted run resumes. The whole pipeline is timed: for TVM, the dense part on the Relax
  VM and the NMS stage on onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hwnas.backends.ort import OrtRunner
from hwnas.detection import deploy
from hwnas.detection.data import load_coco, resolve_data
from hwnas.detection.export import export_detector, parity
from hwnas.detection.train import load_detector
from hwnas.devices import load_device
from hwnas.errors import UserError
from hwnas.fileio import sha256_file
from hwnas.latency.profile import measure_opened
from hwnas.measure import Protocol
from hwnas.quant.latency import SameFeed


def tvm_folder(det, meta, ckpt: Path, out: Path, device_name: str, progress: bool) -> Path:
    """The deployed TVM folder for `device_name` under `out`, reused when it holds this
    checkpoint's export for that device."""
    folder = out / device_name
    digest = sha256_file(ckpt)
    try:
        m = deploy.read_manifest(folder)
        if (m["device"]["name"] == device_name
                and (m.get("checkpoint") or {}).get("sha256") == digest
                and (m["score_thresh"], m["iou"], m["max_det"])
                == (det.cfg.score_thresh, det.cfg.nms_thresh, det.cfg.max_det)):
            return folder
    except UserError:
        pass
    device = deploy.resolve_device("tvm", device_name)
    deploy.check_available("tvm", device)
    deploy.check_output(folder, force=True)
    deploy.export_deployed("tvm", det, meta, folder, device, checkpoint=ckpt, progress=progress)
    return folder


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True, help="a `hwnas detect train` checkpoint")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tuned", action="store_true", help="also cpu-tvm-tuned (tunes first)")
    ap.add_argument("--data", default=None, help="default: the checkpoint's training data")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=100, help="images for parity (default 100)")
    ap.add_argument("--span-s", type=float, default=Protocol().span_s,
                    help="protocol span (0: the test suite's minimal protocol, to check that "
                    "the tool runs; its figures mean nothing)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()
    try:
        print(json.dumps(run(args), indent=1))
    except UserError as e:
        print(f"bench_deploy: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(args) -> dict:
    if args.n < 1 or args.span_s < 0:
        raise UserError("--n must be ≥ 1 and --span-s ≥ 0")
    det, meta = load_detector(args.ckpt)
    out = args.out or Path("bench-deploy") / args.ckpt.stem
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_detector(det, out / "det.onnx")["path"]
    folders = {name: tvm_folder(det, meta, args.ckpt, out, name, not args.quiet)
               for name in ["cpu-tvm-untuned"] + (["cpu-tvm-tuned"] if args.tuned else [])}
    split = load_coco(resolve_data(args.data or meta["config"]["data"]), args.split,
                      det.cfg.image_size)
    ort_device = load_device("cpu-ort-fp32")
    labels = ["onnx cpu-ort-fp32"] + [f"tvm {name}" for name in folders]

    def open_runner(label: str):
        kind, name = label.split(" ", 1)
        if kind == "onnx":
            return OrtRunner(onnx_path, ort_device)
        return deploy.DeployedDetectorRunner(folders[name])

    results: dict = {label: {} for label in labels}
    for label in labels:  # parity first: a deployment that disagrees is not worth timing
        with open_runner(label) as runner:
            model = onnx_path if label.startswith("onnx") else runner
            results[label]["parity"] = parity(det, model, split, limit=args.n,
                                              label="deployed")

    x = split.batch([0])[0].numpy()

    def same_image(runners):
        # aligned for TVM's zero-copy input (DeployedDetectorRunner.random_feed), same pixels
        tvm = next(r for r in runners if isinstance(r, deploy.DeployedDetectorRunner))
        feed = tvm.random_feed()
        feed["input"][...] = x
        return [SameFeed(r, feed) for r in runners]

    protocol = Protocol(span_s=args.span_s) if args.span_s else Protocol(
        warmup_ms=5, min_warmup=2, rounds=3, span_s=0.0, round_ms=2.0, min_reps=2)
    timed = measure_opened(labels, open_runner, protocol, journal=out / "timing.journal.json",
                           desc="timing", progress=not args.quiet, wrap=same_image)
    base = timed.stats[labels[0]].best_ms
    for label in labels:
        s = timed.stats[label]
        results[label].update({"latency": s.to_dict(), "vs_onnx": s.best_ms / base})
    return {"checkpoint": str(args.ckpt), "image_size": det.cfg.image_size,
            "arch": meta["detector"]["arch"], "split": args.split, "parity_images": args.n,
            "protocol": protocol.to_dict(), "contention": timed.contention.to_dict(),
            "resumed_rounds": timed.resumed_rounds, "out": str(out),
            "host": json.loads((folders["cpu-tvm-untuned"] / deploy.MANIFEST).read_text())[
                "host"],
            "results": results}


if __name__ == "__main__":
    sys.exit(main())
