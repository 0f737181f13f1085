"""`hwnas detect search`: a latency-budgeted detector search (DetNAS, CRNAS), scored by a
detection supernet and priced by the table of the *whole deployable detector*.

The search runs over a detector space (``det20-fcos-w0.5`` at 1×3×128×128: backbone blocks,
FPN, FCOS head and the NMS post-processing are all ops of its table); the detection supernet
(`hwnas detect supernet`) of the backbone space with the same layers and choices
(``det20-w0.5``) scores each candidate by its COCO AP on held-out images after BatchNorm
recalibration (`hwnas.detection.supernet.DetSupernetScorer`). Methods: evolution, PC-NAS and
random search (hwnas.search), and CRNAS's two-step reallocation (`hwnas.search.crnas`) on a
CRNAS space. `--verify` exports the pick as the deployable ONNX (NMS inside) and measures it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hwnas.errors import UserError
from hwnas.locks import output_lock
from hwnas.measure import Protocol
from hwnas.search import METHODS, SearchResult


@dataclass
class DetSearchConfig:
    device: str
    space: str  # a detector space: det20-fcos-w0.5, crnas20-fcos-w0.5, ...
    budget_ms: float
    method: str
    supernet: Path
    evaluations: int = 1000
    seed: int = 0
    tables: Path | None = None
    out: Path | None = None  # prefix of <out>.json, <out>.png, <out>.state.json, <out>.onnx
    verify: bool = False
    strict: bool = False
    host: str | None = None
    canary: str = "off"
    val_n: int = 100
    bn_batches: int = 4
    bn_batch_size: int = 32
    progress: bool = True
    options: dict | None = None
    protocol: Protocol | None = None
    cluster: str | None = None  # where candidates are scored (hwnas.distributed.get_executor)
    actors: int | None = None  # evaluation actors on a cluster (default: one per CPU)
    threads: int = 1  # torch threads for scoring in this process (2 fight on a busy 2-core host)
    latency: object = None  # a ready predictor (e.g. canary-corrected) instead of the table's
    scorer: object = None  # a ready DetSupernetScorer of `supernet` (the demo reuses it)


def default_out(cfg: DetSearchConfig) -> Path:
    return Path("hwnas-search") / f"{cfg.space}_{cfg.method}_{cfg.budget_ms:g}ms_s{cfg.seed}"


def _file(prefix: Path, ext: str) -> Path:
    return prefix.with_name(prefix.name + ext)


def open_scorer(path: Path, space, cfg: DetSearchConfig):
    """The detection supernet in `path` as the accuracy model of `space`'s candidates."""
    from hwnas.detection.data import load_coco, resolve_data
    from hwnas.detection.supernet import DetSupernetScorer, load_det_supernet

    det, meta = load_det_supernet(path)
    inner = det.backbone.space
    backbone = getattr(space, "backbone", None)
    if backbone is None:
        raise UserError(f"space {space.name} is not a detector space; search det20-fcos-w0.5, "
                        "crnas20-fcos-w0.5 or another <backbone>-fcos space")
    if (backbone.num_choices != inner.num_choices
            or backbone.name.partition("-w")[0] != inner.name.partition("-w")[0]):
        raise UserError(f"supernet {str(path)!r} is of space {inner.name}; it cannot score "
                        f"{space.name} candidates: train one with `hwnas detect supernet "
                        f"--space {backbone.name}`")
    data = meta["config"]["data"]
    size = det.cfg.image_size
    root = resolve_data(data)
    scorer = DetSupernetScorer(det, load_coco(root, "train", size), load_coco(root, "val", size),
                               cfg.bn_batches, cfg.bn_batch_size, cfg.val_n, cfg.seed)
    return scorer, meta


def run_detect_search(cfg: DetSearchConfig) -> SearchResult:
    import torch

    from hwnas.devices import load_device
    from hwnas.latency.lookup import open_predictor
    from hwnas.search.identity import search_identity
    from hwnas.search.run import run_method, verify_pick
    from hwnas.spaces import get_space

    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    device, space = load_device(cfg.device), get_space(cfg.space)
    torch.set_num_threads(cfg.threads)
    shape = space.default_input
    protocol = cfg.protocol or Protocol()
    if cfg.latency is not None:
        lut, drift = cfg.latency, None
    else:
        lut, drift = open_predictor(device, space, shape, cfg.tables, cfg.host, cfg.strict,
                                    cfg.canary, protocol)
    lut.require_feasible(cfg.budget_ms)  # before loading anything heavy
    if cfg.method == "crnas":
        from hwnas.search.crnas import crnas_backbone
        crnas_backbone(space)
    scorer, meta = cfg.scorer or open_scorer(cfg.supernet, space, cfg)
    out = cfg.out or default_out(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        identity = search_identity(device, lut.table.path, cfg.supernet, shape,
                                   bn_batches=cfg.bn_batches, options=cfg.options or {},
                                   host=lut.table.host, canary=cfg.canary)
        result, evaluated_on = run_method(cfg, space, lut, scorer, out, identity)
        result.context = {
            "evaluated_on": evaluated_on,
            "device": device.name, "table": str(lut.table.path), "host": lut.table.host,
            "drift": drift.to_dict() if drift else None, "input_shape": list(shape),
            "supernet": str(cfg.supernet), "supernet_space": det_space(meta),
            "supernet_step": meta["step"], "val_n": scorer.val_n,
            "score_label": "supernet COCO AP (held-out images, ×100)",
            "mapping": f"{space.name} arch choices scored as {det_space(meta)} paths of the "
                       f"detection supernet at {meta['detector']['image_size']} px on "
                       f"{meta['config']['data']}; priced as the deployable detector "
                       f"{space.name} at {'x'.join(map(str, shape))} on {device.name}",
            "json": str(_file(out, ".json")), "plot": str(_file(out, ".png")),
        }
        if cfg.verify:
            result.verify = verify_pick(result, device, space, shape, out, protocol,
                                        lut.table, lut.scale)
        result.plot(_file(out, ".png"))
        result.save(_file(out, ".json"))
    return result


def det_space(meta: dict) -> str:
    return meta["detector"]["space"]
