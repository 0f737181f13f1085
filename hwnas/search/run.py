"""`hwnas search`: the LUT of the deployment space prices, the supernet of a proxy-width copy of
it scores, one of the searches picks; optionally the pick is exported and measured (`--verify`).

The mapping between the two spaces is explicit: the search runs over the LUT's space (det20 at
1×3×320×320), and the accuracy model scores each candidate on the supernet's space (det20-w0.25
at 64×64 on the proxy data) with the same choice digits (`hwnas.train.supernet.proxy_arch`),
which is refused unless both have the same layers and choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hwnas.errors import UserError
from hwnas.locks import output_lock
from hwnas.measure import Protocol
from hwnas.search import METHODS, SearchResult


@dataclass
class SearchConfig:
    device: str
    space: str
    budget_ms: float
    method: str
    supernet: Path
    evaluations: int = 1000
    seed: int = 0
    input_shape: tuple[int, ...] | None = None
    tables: Path | None = None
    out: Path | None = None  # prefix of <out>.json, <out>.png, <out>.state.json
    verify: bool = False
    strict: bool = False
    host: str | None = None  # another host's table, forced
    canary: str = "off"  # off | report | correct (re-time the canary before searching)
    val_n: int | None = None  # held-out images per score (default: the whole val split)
    bn_batches: int = 4
    progress: bool = True
    options: dict = field(default_factory=dict)  # method-specific keyword arguments
    protocol: object = None
    cluster: str | None = None  # where candidates are scored (`hwnas.distributed.get_executor`)
    actors: int | None = None  # evaluation actors on a cluster (default: one per CPU)
    threads: int = 1  # torch threads for in-process scoring: torch's default 2 ran 13x slower
    # than 1 on this busy 2-core host (tools/bench_fleet.py, README "Fleet")


def _file(prefix: Path, ext: str) -> Path:
    # not with_suffix: a prefix such as "det20_evolution_3.4ms_s0" already contains a dot
    return prefix.with_name(prefix.name + ext)


def default_out(cfg: SearchConfig) -> Path:
    return Path("hwnas-search") / f"{cfg.space}_{cfg.method}_{cfg.budget_ms:g}ms_s{cfg.seed}"


def run_search(cfg: SearchConfig) -> SearchResult:
    from hwnas.data import load_data
    from hwnas.devices import load_device
    from hwnas.latency.lookup import open_predictor
    from hwnas.search.identity import search_identity
    from hwnas.spaces import get_space
    from hwnas.train import SupernetScorer, load_supernet
    from hwnas.train.supernet import base_name

    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    import torch
    torch.set_num_threads(cfg.threads)
    if not cfg.budget_ms > 0:
        raise UserError(f"--budget-ms must be positive, got {cfg.budget_ms}")
    device, space = load_device(cfg.device), get_space(cfg.space)
    shape = cfg.input_shape or space.default_input
    lut, drift = open_predictor(device, space, shape, cfg.tables, cfg.host, cfg.strict,
                                cfg.canary, cfg.protocol or Protocol())
    table = lut.table
    lut.require_feasible(cfg.budget_ms)  # before loading anything heavy
    net, meta = load_supernet(cfg.supernet)
    if base_name(meta["space"]) != base_name(space.name) or net.space.num_layers != \
            space.num_layers:
        raise UserError(f"supernet {str(cfg.supernet)!r} is for space {meta['space']!r}; it "
                        f"cannot score {space.name} candidates: train one with "
                        f"`hwnas supernet train --space {base_name(space.name)}-w0.25`")
    splits = load_data(meta["data"], int(meta["image_size"]))
    scorer = SupernetScorer(net, splits, bn_batches=cfg.bn_batches, val_n=cfg.val_n,
                            seed=cfg.seed)
    out = cfg.out or default_out(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):  # one run per output: state, JSON, plot and ONNX
        identity = search_identity(device, table.path, cfg.supernet, shape,
                                   bn_batches=cfg.bn_batches, options=cfg.options,
                                   host=table.host, canary=cfg.canary)
        result, evaluated_on = run_method(cfg, space, lut, scorer, out, identity)
        result.context = {
            "evaluated_on": evaluated_on,
            "device": device.name, "table": str(table.path), "host": table.host,
            "drift": drift.to_dict() if drift else None, "input_shape": list(shape),
            "supernet": str(cfg.supernet), "supernet_space": meta["space"],
            "supernet_step": meta["step"], "proxy_data": splits.describe(),
            "mapping": f"{space.name} arch digits scored as {meta['space']} at "
                       f"{meta['image_size']}x{meta['image_size']} on {meta['data']}; priced as "
                       f"{space.name} at {'x'.join(map(str, shape))} on {device.name}",
            "json": str(_file(out, ".json")), "plot": str(_file(out, ".png")),
        }
        if cfg.verify:
            result.verify = verify_pick(result, device, space, shape, out, cfg.protocol,
                                        table, lut.scale)
        result.plot(_file(out, ".png"))
        result.save(_file(out, ".json"))
    return result


def run_method(cfg, space, lut, scorer, out: Path, identity: dict):
    """Run (or resume) `cfg.method` on `cfg.cluster`'s executor (in-process unless one is
    named): the result and where its candidates were scored. `cfg`: a `SearchConfig` or any
    config with the same search fields (the detection search's)."""
    from hwnas.distributed import get_executor

    executor = get_executor(cfg.cluster, cfg.actors)
    try:
        search = METHODS[cfg.method](space, lut, scorer, cfg.budget_ms, cfg.evaluations,
                                     cfg.seed, state_path=_file(out, ".state.json"),
                                     progress=cfg.progress, identity=identity,
                                     executor=executor, **(cfg.options or {}))
        return search.run(), executor.describe()
    finally:
        executor.close()


def verify_pick(result: SearchResult, device, space, shape, out: Path, protocol=None,
                table=None, scale: float = 1.0) -> dict:
    """Export the pick (`hwnas.export.export_onnx`) and measure it with the protocol,
    interleaved with the table's reference candidates, against the budget: the verdict allows
    for the host's change since the prices were made (the references now vs in the table,
    divided by the `scale` the prices were corrected by), as `hwnas demo` does."""
    from hwnas.export import export_onnx
    from hwnas.latency.lookup import drift_from, references
    from hwnas.latency.profile import candidate_builder, measure_labelled
    from hwnas.latency.validate import budget_verdict

    arch = space.parse(result.best_arch)
    onnx_path = export_onnx(space.build(arch), shape, _file(out, ".onnx"))
    refs = list(references(table)) if table is not None and table.meta.get("canary") else []
    build = candidate_builder(space, shape)
    labels = list(dict.fromkeys([str(arch), *refs]))
    got = measure_labelled(labels, build, device, protocol or Protocol(), progress=False)
    measured = got.stats[str(arch)].best_ms
    now = {r: got.stats[r].best_ms for r in refs}
    shift = drift_from(table, now).ratio / scale if now else 1.0
    verdict = budget_verdict(measured, result.budget_ms,
                             Path(result.context["table"]).parent / "noise.json", shift)
    return {"onnx": str(onnx_path), "predicted_ms": result.predicted_latency_ms,
            "error_pct": 100 * (result.predicted_latency_ms / measured - 1), **verdict,
            "contention": got.contention.to_dict()}


def verify_line(v: dict) -> str:
    """The one line a search prints for its `verify_pick` result."""
    return (f"  verify: measured {v['measured_ms']:.3f} ms vs predicted {v['predicted_ms']:.3f} ms "
            f"({v['error_pct']:+.2f}%) vs budget {v['budget_ms']:g} ms: "
            f"{'KEPT' if v['keeps_budget'] else 'MISSED'} (within the {v['tolerance_pct']:.1f}% "
            f"noise floor, host {v['host_shift_pct']:+.1f}% since priced; without that "
            f"allowance: {'kept' if v['keeps_budget_raw'] else 'missed'})")
