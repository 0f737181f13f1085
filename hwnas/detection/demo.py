"""`hwnas demo` (the default job since issue 10): the mission's main job end to end.

1. this host's table of the deployable detector space (profiled first if the host has none;
   a progress bar with ETA), its canary re-timed to correct prices by the host's drift;
2. a latency-budgeted DetNAS evolution search scored by the small committed detection supernet
   (`hwnas/detection/assets/`, COCO AP of each path on held-out shapes-det images);
3. the pick taken out of the supernet as a stand-alone detector, exported as the deployable
   ONNX (decode + NMS inside), its detections compared with torch's on held-out images;
4. the ONNX measured on the device with the protocol, interleaved with the canary, against the
   budget (noise floor and the host's shift between pricing and measuring stated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hwnas.measure import Protocol

ASSETS = Path(__file__).parent / "assets"
SUPERNET = ASSETS / "det20-w0.5_det_supernet.pt"


@dataclass
class DetDemoConfig:
    device: str = "cpu-ort-fp32"
    space: str = "det20-fcos-w0.5"
    supernet: Path = SUPERNET
    tables: Path | None = None
    out: Path | None = None  # default: a new run folder
    budget_ms: float | None = None  # default: the median price of seeded random candidates
    evaluations: int = 120
    val_n: int = 50
    parity_n: int = 20
    seed: int = 0
    canary: str = "correct"
    protocol: Protocol = Protocol()
    progress: bool = True


def median_budget(predictor, seed: int, n: int = 2000) -> float:
    """The median price of `n` seeded random candidates, rounded up to 3 significant digits."""
    lat = predictor.predict_many(predictor.space.sample_many(n, np.random.default_rng(seed)))
    median = float(np.median(lat))
    step = 10.0 ** (math.floor(math.log10(median)) - 2)
    return round(math.ceil(median / step - 1e-9) * step, 12)


def run_detect_demo(cfg: DetDemoConfig) -> dict:
    from hwnas.detection.data import load_coco, resolve_data
    from hwnas.detection.export import export_detector, parity
    from hwnas.detection.search import DetSearchConfig, open_scorer, run_detect_search
    from hwnas.detection.supernet import standalone_detector
    from hwnas.devices import load_device
    from hwnas.errors import UserError
    from hwnas.latency.lookup import open_predictor
    from hwnas.latency.profile import measure_labelled, profile
    from hwnas.latency.table import tables_dir
    from hwnas.latency.validate import budget_verdict
    from hwnas.runs import new_run_dir
    from hwnas.spaces import get_space

    if not Path(cfg.supernet).is_file():
        raise UserError(f"detection supernet {str(cfg.supernet)!r} is missing; reinstall hwnas "
                        "or pass one trained with `hwnas detect supernet`")
    device, space = load_device(cfg.device), get_space(cfg.space)
    shape = space.default_input
    root = cfg.tables or tables_dir()
    out = cfg.out or new_run_dir("demo", f"{device.name}-{space.name}")
    prof = profile(device, space, shape, root, cfg.protocol, progress=cfg.progress)
    predictor, drift = open_predictor(device, space, shape, root, canary=cfg.canary,
                                      protocol=cfg.protocol)
    budget = cfg.budget_ms if cfg.budget_ms is not None else median_budget(predictor, cfg.seed)
    predictor.require_feasible(budget)
    scfg = DetSearchConfig(device=device.name, space=space.name, budget_ms=budget,
                           method="evolution", supernet=Path(cfg.supernet),
                           evaluations=cfg.evaluations, seed=cfg.seed, tables=root,
                           out=out / "search", val_n=cfg.val_n, progress=cfg.progress,
                           protocol=cfg.protocol, latency=predictor)
    scfg.scorer = open_scorer(Path(cfg.supernet), space, scfg)
    meta = scfg.scorer[1]
    scorer = scfg.scorer[0]
    # the search prices with the canary-corrected predictor (the canary is timed once)
    res = run_detect_search(scfg)
    arch = space.parse(res.best_arch)
    ap = scorer.score(arch)  # leaves the path's recalibrated BN statistics in the supernet
    det = standalone_detector(scorer.det, arch)
    onnx_path = out / f"{str(arch).replace(':', '_')}.onnx"
    exported = export_detector(det, onnx_path)
    val = load_coco(resolve_data(meta["config"]["data"]), "val", det.cfg.image_size)
    par = parity(det, onnx_path, val, limit=cfg.parity_n)
    # measured as shipped (trained weights, NMS inside), interleaved with the drift's references
    from hwnas.latency.profile import candidate_builder
    build_candidate = candidate_builder(space, shape)
    refs = list(drift.refs) if drift else []

    def build(label: str):
        return (exported_module(det, exported), shape) if label == "pick" \
            else build_candidate(label)

    got = measure_labelled(["pick", *refs], build, device, cfg.protocol, progress=False)
    measured = got.stats["pick"].best_ms
    shift = drift.shift({k: got.stats[k].best_ms for k in refs}) if drift else 1.0
    noise_file = predictor.table.path.parent / "noise.json"
    verdict = budget_verdict(measured, budget, noise_file, shift)
    return {
        "device": device.name, "space": space.name, "input_shape": list(shape),
        "host": predictor.table.host, "out": str(out), "profile": prof.to_dict(),
        "drift": drift.to_dict() if drift else None,
        "search": {"method": res.method, "evaluations": res.evaluations,
                   "json": res.context["json"], "plot": res.context["plot"],
                   "supernet": str(cfg.supernet), "supernet_ap": round(ap, 4)},
        "pick": {"arch": str(arch), "budget_ms": budget,
                 "predicted_ms": round(res.predicted_latency_ms, 4),
                 "measured_ms": round(measured, 4),
                 "error_pct": round((res.predicted_latency_ms / measured - 1) * 100, 2),
                 "onnx": str(onnx_path), "nms_nodes": exported["nms_nodes"],
                 "parity": {k: par[k] for k in ("images", "images_ok", "matched",
                                                "detections_torch", "max_box_rel_err")},
                 "tolerance_pct": verdict["tolerance_pct"],
                 "host_shift_pct": verdict["host_shift_pct"],
                 "keeps_budget": verdict["keeps_budget"], "keeps_budget_raw": verdict["keeps_budget_raw"],
                 "contention": got.contention.to_dict()},
        "seed": cfg.seed,
    }


def exported_module(det, exported: dict):
    """The deployable module `export_detector` wrote (same thresholds), for timing."""
    from hwnas.detection.export import DeployableDetector

    return DeployableDetector(det, exported["score_thresh"], exported["iou"],
                              exported["max_det"]).eval()
