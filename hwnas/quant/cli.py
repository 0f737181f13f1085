"""`hwnas quantize`: parsing → one library call (`hwnas.quant.run`) → lines or one JSON object.

    hwnas quantize --device D --space S --arch A --ckpt C --budget-ms B [--size-mb S] -o q.onnx
    hwnas quantize --profile --device D --space S --arch A     this host's mixed table
    hwnas quantize --validate N --device D --space S --arch A  predicted vs measured, N assignments

Wired into `hwnas.cli` by `add_parsers(sub)` and ``COMMANDS.update(hwnas.quant.cli.COMMANDS)``.
"""

from __future__ import annotations

from pathlib import Path

from hwnas.argtypes import (dumps_strict, finite_float, int_range, nonneg_int, positive_float,
                            positive_int)


def add_parsers(sub) -> None:
    from hwnas.cli import SPAN
    from hwnas.latency.lookup import CANARY_MODES
    from hwnas.measure import MIXED_ESTIMATE
    from hwnas.quant.sensitivity import DEFAULT_OBJECTIVE, OBJECTIVES

    p = sub.add_parser("quantize", help="per-layer mixed precision under a latency budget: "
                       "table, sensitivity, ILP, a real QDQ model")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--profile", action="store_true",
                      help="build or resume this host's mixed-precision table of the arch")
    mode.add_argument("--validate", type=positive_int, default=None, metavar="N",
                      help="predicted vs measured latency of N random assignments")
    p.add_argument("--device", required=True, help="a device with int8 (e.g. cpu-ort-int8)")
    p.add_argument("--space", required=True, help="det20, det20-fcos-w0.5, …")
    p.add_argument("--arch", required=True, help="the fixed candidate, e.g. det20:0123…")
    p.add_argument("--input", default=None, help="input shape NxCxHxW (default: the space's)")
    p.add_argument("--ckpt", type=Path, default=None,
                   help="trained classifier (tools/train_classifier.py) or detector checkpoint")
    p.add_argument("--budget-ms", type=positive_float, default=None)
    p.add_argument("--size-mb", type=positive_float, default=None,
                   help="also keep the priced model's weights under this many MB")
    p.add_argument("-o", "--output", type=Path, default=None, help="the QDQ model (.onnx); a "
                   ".json sidecar is written beside it")
    p.add_argument("--method", choices=["ilp", "greedy", "random"], default="ilp")
    p.add_argument("--canary", choices=CANARY_MODES, default="correct",
                   help="time the table's reference assignments first and report the host's "
                   "drift since the table, or also scale every price by it before choosing "
                   "(default correct: the budget is a budget on this host now)")
    p.add_argument("--margin", type=_margin, default=None, metavar="PCT|auto",
                   help="choose under budget / (1 + PCT/100), so that the pick keeps the budget "
                   "though the table under-prices it (default auto: the 90th percentile of the "
                   "table's leave-one-out under-prediction; 0 chooses under the budget as priced)")
    p.add_argument("--repair", type=int_range(0, 10), default=2, metavar="N",
                   help="when the realised pick measures over the budget, choose again under "
                   "its price scaled by the miss and time the new pick afresh, at most N times "
                   "(default 2; 0: report the miss)")
    p.add_argument("--verify", type=int_range(0, 50), default=0, metavar="K",
                   help="also time the method's K best answers priced up to the table's own "
                   "over-prediction above the price it chose under, and take the one of least "
                   "perturbation that ran within the budget less the noise floor (default 0: "
                   "off; on this host's sweeps it gained nothing, see the README)")
    p.add_argument("--precisions", default=None,
                   help="comma-separated subset of the device's precisions (default: all; "
                   "fp32 is always allowed)")
    p.add_argument("--assignment", default=None,
                   help="realise this assignment (one letter per unit: f fp32, h fp16, i int8) "
                   "instead of choosing one")
    p.add_argument("--compare", action="store_true",
                   help="also realise greedy, random, uniform fp32 and int8, time and score "
                   "them all, and plot the latency-accuracy plane (<output>.pareto.png)")
    p.add_argument("--data", default=None, help="default: the checkpoint's training data")
    p.add_argument("--calibration-images", type=int_range(1, 4096), default=64,
                   help="real training images the quantiser calibrates on (default 64)")
    p.add_argument("--hutchinson-samples", type=int_range(2, 10000), default=48)
    p.add_argument("--objective", choices=OBJECTIVES, default=DEFAULT_OBJECTIVE,
                   help="what the methods minimise the sum of: hessian, HAWQ-V3's "
                   "Tr(H)/n·‖ΔW‖²; drop, the measured single-unit drops (ties broken by the "
                   "Hessian's); blend, the mean of the drop and the Hessian's estimate of it "
                   "(default %(default)s)")
    p.add_argument("--drop-images", type=positive_int, default=None, metavar="N",
                   help="measure the single-unit drops on N generated validation images (the "
                   "built-in data only; default: the data's own validation split)")
    p.add_argument("--fresh-sensitivity", action="store_true",
                   help="recompute the sensitivity even if it is cached")
    p.add_argument("--no-measure", action="store_true", help="do not time the realised model")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--calibration-n", type=nonneg_int, default=24,
                   help="--profile: whole assignments measured for the calibration")
    p.add_argument("--out", type=Path, default=None, help="--validate: prefix of CSV and PNG")
    p.add_argument("--publish", action="store_true",
                   help="--validate: write the CSV and PNG beside the table")
    p.add_argument("--require-quiet", action="store_true",
                   help="refuse a measurement taken on a busy host (exit 2)")
    p.add_argument("--quiet-retries", type=int_range(0, 20), default=0, metavar="N",
                   help="--validate: time a group again (at most N more times) while the host "
                   "was busy through it, and keep its quietest attempt (default 0)")
    p.add_argument("--tables", type=Path, default=None)
    p.add_argument("--host", default=None, metavar="ID", help="price with another host's table")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--span-s", type=SPAN, default=None, help="protocol span (see profile)")
    p.add_argument("--estimate", choices=("local", "lowest"), default=MIXED_ESTIMATE,
                   help="--profile: the statistic a new mixed table reads latencies with: "
                   "'local', each assignment's level against the host speed all interleaved "
                   "items show, or 'lowest', its lowest round median (default "
                   f"{MIXED_ESTIMATE}; see hwnas/measure.py). Whatever is timed against an "
                   "existing table is read as that table was")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _margin(text: str) -> float | None:
    """``auto`` (None: the table's own margin) or a percentage in [0, 100]."""
    if text.strip().lower() == "auto":
        return None
    return finite_float(0.0, 100.0)(text)


def _emit(args, obj: dict, lines: list[str]) -> None:
    print(dumps_strict(obj) if args.json else "\n".join(lines))


def cmd_quantize(args) -> None:
    from dataclasses import replace

    from hwnas.cli import _protocol
    from hwnas.quant.latency import WITH_TRIPLES
    from hwnas.quant.run import QuantizeConfig, lines, run_profile, run_quantize, run_validate
    from hwnas.spaces.base import parse_shape

    cfg = QuantizeConfig(
        device=args.device, space=args.space, arch=args.arch, ckpt=args.ckpt,
        budget_ms=args.budget_ms, output=args.output, size_mb=args.size_mb,
        input_shape=parse_shape(args.input) if args.input else None, tables=args.tables,
        host=args.host, strict=args.strict, method=args.method, data=args.data,
        precisions=tuple(p.strip() for p in args.precisions.split(",")) if args.precisions
        else None, assignment=args.assignment,
        calibration_images=args.calibration_images,
        hutchinson_samples=args.hutchinson_samples, measure=not args.no_measure,
        compare=args.compare, force=args.force, fresh_sensitivity=args.fresh_sensitivity,
        objective=args.objective, drop_images=args.drop_images,
        seed=args.seed, protocol=replace(_protocol(args), estimate=args.estimate),
        progress=not args.quiet,
        margin_pct=args.margin, canary=args.canary, repair=args.repair,
        verify=args.verify)
    if args.profile:
        res = run_profile(cfg, args.calibration_n, args.require_quiet)
        cal = res["calibration"]
        older = ("" if res["items"] == WITH_TRIPLES else "; made before triples: move it away "
                 "and profile again to price neighbour triples too")
        _emit(args, res, [f"{res['table']}: {res['rows']} rows of {res['items']} "
                          f"({res['measured_rows']} measured now, {res['reused_rows']} "
                          f"reused{older})",
                          f"  calibration: intercept {cal['intercept_ms']:.3f} ms, slope "
                          f"{cal['slope']:.3f}, edge offsets "
                          + ", ".join(f"{k} {1000 * v:+.0f} us" for k, v in
                                      (cal["edge_offsets_ms"] or {}).items())
                          + f"; max fit error {cal['fit_max_abs_err_pct']:.2f}%, leave-one-out "
                          f"{100 * cal['loo_within_5pct']:.0f}% within 5%"])
        return
    if args.validate is not None:
        rep = run_validate(cfg, args.validate, args.out, args.publish,
                           require_quiet=args.require_quiet, quiet_retries=args.quiet_retries)
        _emit(args, rep.to_dict(), rep.lines())
        return
    res = run_quantize(cfg)
    _emit(args, res, lines(res))


COMMANDS = {"quantize": cmd_quantize}

__all__ = ["COMMANDS", "add_parsers", "cmd_quantize"]
