"""Proof that the search helps (issue 4): supernet ranking quality and search vs random.

Resumable: every finished unit of work is appended to ``<out>/results.jsonl`` and skipped on the
next run; supernet training resumes from its checkpoint. Run in chunks that hold the heavy-compute
lock, e.g. ``flock /tmp/hwnas-heavy.lock python tools/bench_search.py --minutes 9`` repeatedly
until it prints ``all done``; ``--report`` prints the tables from what has finished.

What runs (sizes in `Bench`, chosen so the whole benchmark is ~40 minutes on a 2-core CPU):
1. SPOS supernet: det20-w0.25 at 64×64 on the built-in ``shapes`` proxy: reference-path
   warm-up, sibling matching, then uniform single path (`hwnas.train.trainer` says why).
2. PC-NAS supernet: the SPOS run's half-way checkpoint (uniform warm-up), then PC-NAS partial-
   pool shrinking at the middle budget whose training intervals spend the other half of the steps.
3. Ranking: `rank_n` uniform det20 archs trained stand-alone (`standalone_steps`); Kendall τ
   between each supernet's score and stand-alone test accuracy.
4. Search vs baseline: 3 budgets (the 10th/50th/90th percentile of det20's LUT latency over
   uniform candidates), `seeds` seeds, evolution / PC-NAS / random at equal evaluation counts
   on the SPOS supernet; each pick trained stand-alone and measured (hwnas.measure protocol).
5. Timing: one full-size evolution search (1,000 evaluations, SPOS/DetNAS settings) at the
   middle budget, wall time recorded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from hwnas.data import load_data
from hwnas.devices import load_device
from hwnas.latency import LatencyTable, LutPredictor, table_path, tables_dir
from hwnas.latency.table import host_dir
from hwnas.search import METHODS
from hwnas.spaces import get_space
from hwnas.train import SupernetScorer, SupernetTrainer, TrainConfig, load_supernet
from hwnas.train.evaluate import train_standalone


@dataclass
class Bench:
    device: str = "cpu-ort-fp32"
    space: str = "det20"
    proxy_space: str = "det20-w0.25"
    image_size: int = 64
    supernet_steps: int = 4000  # 400 warm-up + 300 matching + 3300 SPOS; ~70 ms a SPOS step
    standalone_steps: int = 400  # ~25-45 s an arch here; all-shuffle3 reaches ~50% at 500
    # stand-alone accuracy is the mean over these training seeds (one run of 400 steps moves by
    # ~5 points between runs; the report prints the measured seed-to-seed difference)
    standalone_seeds: int = 2
    rank_n: int = 10
    seeds: int = 3
    # evaluations per search, equal for all methods: the least PC-NAS can do with a pool of 2
    # and one completion per extension on 20 layers is 4 + 19*8 + 8 = 164
    evaluations: int = 170
    val_n: int = 500
    bn_batches: int = 2
    # evolution scaled to 170 evaluations: 10 generations of 17, top 4, 8+9 children
    evo: tuple = (("population", 17), ("parents", 4), ("mutations", 8), ("crossovers", 9))
    pcnas: tuple = (("pool_size", 2),)


class Ledger:
    def __init__(self, path: Path):
        self.path = path
        self.rows = ([json.loads(l) for l in path.read_text().splitlines() if l.strip()]
                     if path.exists() else [])

    def get(self, key: str):
        return next((r for r in self.rows if r["key"] == key), None)

    def add(self, key: str, **data) -> dict:
        row = {"key": key, **data}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        print(json.dumps(row)[:300], file=sys.stderr, flush=True)
        return row


class OutOfTime(Exception):
    pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench_out/search"))
    ap.add_argument("--minutes", type=float, default=9.0, help="stop after the unit running "
                    "when this much time has passed (resume with the same command)")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--no-measure", action="store_true", help="skip measuring the picks' "
                    "latency (for when the host is not quiet); a later run measures them")
    args = ap.parse_args()
    b = Bench()
    args.out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(args.out / "results.jsonl")
    if args.report:
        report(ledger, b)
        return
    deadline = time.monotonic() + 60 * args.minutes

    def check_time():
        if time.monotonic() > deadline:
            raise OutOfTime

    try:
        run(b, args.out, ledger, check_time, measure=not args.no_measure)
        print("all done", file=sys.stderr)
    except OutOfTime:
        print("out of time for this chunk; run the same command again to resume",
              file=sys.stderr)
    report(ledger, b)


def train_chunked(tr: SupernetTrainer, stop: int, check_time, sampler=None) -> None:
    while tr.step < stop:
        check_time()
        tr.train_to(min(stop, tr.step + tr.cfg.ckpt_every), sampler)


def run(b: Bench, out: Path, ledger: Ledger, check_time, measure: bool = True) -> None:
    space, proxy = get_space(b.space), get_space(b.proxy_space)
    device = load_device(b.device)
    table = LatencyTable.load(table_path(tables_dir(), device.name, space.name,
                                         space.default_input))
    lut = LutPredictor(table, space)
    lat = lut.predict_many(space.sample_many(100_000, np.random.default_rng(0)))
    budgets = [round(float(np.percentile(lat, q)), 2) for q in (10, 50, 90)]
    splits = load_data("shapes", b.image_size)
    cfg = TrainConfig(space=b.proxy_space, image_size=b.image_size, steps=b.supernet_steps)

    # 1. SPOS supernet (uniform single path); keep the half-way checkpoint for PC-NAS
    spos_ck, half_ck = out / "spos.pt", out / "half.pt"
    tr = SupernetTrainer(cfg, spos_ck, splits)
    if not half_ck.exists():
        train_chunked(tr, b.supernet_steps // 2, check_time)
        shutil.copyfile(spos_ck, half_ck)
    train_chunked(tr, b.supernet_steps, check_time)
    if not ledger.get("supernet:spos"):
        ledger.add("supernet:spos", step=tr.step, loss_ema=tr.loss_ema)

    # 2. PC-NAS supernet: warm-up = the half checkpoint, then shrinking with training intervals
    pc_ck = out / "pcnas.pt"
    if not ledger.get("supernet:pcnas"):
        check_time()
        if not pc_ck.exists():
            shutil.copyfile(half_ck, pc_ck)
        ptr = SupernetTrainer(cfg, pc_ck, splits)
        interval = (b.supernet_steps - b.supernet_steps // 2) // (space.num_layers - 1)
        scorer = SupernetScorer(ptr.model, splits, b.bn_batches, val_n=b.val_n)
        res = METHODS["pcnas"](space, lut, scorer, budgets[1], b.evaluations, 0, trainer=ptr,
                               **dict(b.pcnas),
                               train_interval=interval, state_path=out / "pcnas_train.state.json",
                               progress=True).run()
        ledger.add("supernet:pcnas", step=ptr.step, loss_ema=ptr.loss_ema, budget_ms=budgets[1],
                   interval=interval, pick=res.best_arch)

    # 3. ranking: stand-alone accuracy vs supernet score for uniform archs
    rank_archs = [space.sample(np.random.default_rng([123, i])) for i in range(b.rank_n)]
    nets = {"spos": load_supernet(spos_ck)[0], "pcnas": load_supernet(pc_ck)[0]}
    for a in rank_archs:
        key = f"standalone:{a}"
        if not ledger.get(key):
            check_time()
            r = train_standalone(proxy, a, splits, b.standalone_steps, progress=True)
            ledger.add(key, test_acc=r["test_acc"], val_acc=r["val_acc"],
                       steps=b.standalone_steps)
    for name, net in nets.items():
        key = f"rankscores:{name}"
        if not ledger.get(key):
            scorer = SupernetScorer(net, splits, b.bn_batches, val_n=b.val_n)
            ledger.add(key, scores={str(a): float(s) for a, s in
                                    zip(rank_archs, scorer.predict(rank_archs))})

    # 4. search vs random at 3 budgets × seeds, on the SPOS supernet
    scorer = SupernetScorer(nets["spos"], splits, b.bn_batches, val_n=b.val_n)
    from hwnas.export import export_onnx
    from hwnas.measure import measure_file

    for seed in range(b.seeds):
        for budget in budgets:
            for method in ("evolution", "pcnas", "random"):
                key = f"search:{method}:{budget}:{seed}"
                if not ledger.get(key):
                    check_time()
                    kw = {"evolution": dict(b.evo), "pcnas": dict(b.pcnas)}.get(method, {})
                    t0 = time.perf_counter()  # wall time of the search, not a device latency
                    res = METHODS[method](space, lut, scorer, budget, b.evaluations, seed,
                                          state_path=out / f"{method}_{budget}_{seed}.state.json",
                                          progress=True, **kw).run()
                    res.save(out / f"{method}_{budget}_{seed}.json")
                    ledger.add(key, pick=res.best_arch, score=res.score,
                               predicted_ms=res.predicted_latency_ms,
                               evaluations=res.evaluations,
                               seconds_per_eval=(time.perf_counter() - t0) / res.evaluations)
                pick = ledger.get(key)["pick"]
                skey = f"standalone:{pick}"
                if not ledger.get(skey):
                    check_time()
                    r = train_standalone(proxy, space.parse(pick), splits, b.standalone_steps,
                                         progress=True)
                    ledger.add(skey, test_acc=r["test_acc"], val_acc=r["val_acc"],
                               steps=b.standalone_steps)
                mkey = f"measured:{pick}"
                if measure and not ledger.get(mkey):
                    check_time()
                    onnx = export_onnx(space.build(space.parse(pick)), space.default_input,
                                       out / "pick.onnx")
                    m = measure_file(str(onnx), device)
                    ledger.add(mkey, measured_ms=m["latency_ms"], spread=m["spread"])


    # 4b. more stand-alone seeds for every arch trained so far (after the searches, so a chunked
    # run reports one-seed results early)
    archs = [k.split(":", 1)[1] for k in [r["key"] for r in ledger.rows]
             if k.startswith("standalone:")]
    for seed in range(1, b.standalone_seeds):
        for a in archs:
            key = f"standalone@{seed}:{a}"
            if not ledger.get(key):
                check_time()
                r = train_standalone(proxy, space.parse(a), splits, b.standalone_steps,
                                     seed=seed, progress=True)
                ledger.add(key, test_acc=r["test_acc"], val_acc=r["val_acc"],
                           steps=b.standalone_steps, seed=seed)

    # 5. a full-size evolution search, timed (wall time of the whole search, not a latency)
    if not ledger.get("fullsearch:evolution"):
        check_time()
        state = out / "full_evolution.state.json"
        resumed = state.exists()  # then the wall time covers only the part after the resume
        t0 = time.perf_counter()
        res = METHODS["evolution"](space, lut, scorer, budgets[1], 1000, 0, state_path=state,
                                   progress=True).run()
        res.save(out / "full_evolution.json")
        ledger.add("fullsearch:evolution", pick=res.best_arch, score=res.score,
                   evaluations=res.evaluations, budget_ms=budgets[1],
                   minutes=(time.perf_counter() - t0) / 60, resumed=resumed)


def report(ledger: Ledger, b: Bench) -> None:
    from scipy.stats import kendalltau

    print(f"config: {json.dumps(asdict(b))}")
    runs: dict[str, list[float]] = {}  # arch → stand-alone test accuracy per seed
    for r in ledger.rows:
        if r["key"].startswith(("standalone:", "standalone@")):
            runs.setdefault(r["key"].split(":", 1)[1], []).append(r["test_acc"])
    sa = {a: float(np.mean(v)) for a, v in runs.items()}
    pairs = [v[1] - v[0] for v in runs.values() if len(v) > 1]
    if pairs:
        print(f"stand-alone accuracy, seed 1 minus seed 0 over {len(pairs)} archs: mean "
              f"{100 * np.mean(pairs):+.1f}, std {100 * np.std(pairs):.1f} points (the ground "
              f"truth below is the mean of {max(len(v) for v in runs.values())} seeds)")
    for name in ("spos", "pcnas"):
        rs = ledger.get(f"rankscores:{name}")
        if rs:
            archs = [a for a in rs["scores"] if a in sa]
            x = [rs["scores"][a] for a in archs]
            y = [sa[a] for a in archs]
            tau, p = kendalltau(x, y)
            print(f"ranking {name}: Kendall tau {tau:.3f} (p={p:.3f}) over {len(archs)} archs; "
                  f"stand-alone test acc {100 * min(y):.1f}–{100 * max(y):.1f}% "
                  f"(std {100 * np.std(y):.1f}); supernet score {100 * min(x):.1f}–"
                  f"{100 * max(x):.1f}%")
    for name in ("spos", "pcnas"):
        r = ledger.get(f"supernet:{name}")
        if r:
            print(f"supernet {name}: step {r['step']}, training loss (EMA) {r['loss_ema']:.3f}")
    full = ledger.get("fullsearch:evolution")
    if full:
        print(f"full evolution search: {full['evaluations']} evaluations in "
              f"{full['minutes']:.1f} min{' (after a resume)' if full.get('resumed') else ''} "
              f"at {full['budget_ms']} ms")
    searches = [r for r in ledger.rows if r["key"].startswith("search:")]
    meas = {r["key"].split(":", 1)[1]: r["measured_ms"] for r in ledger.rows
            if r["key"].startswith("measured:")}
    noise = json.loads((host_dir(tables_dir(), b.device) / "noise.json").read_text()
                       )["noise_floor_pct"]
    budgets = sorted({float(r["key"].split(":")[2]) for r in searches})
    print(f"{'budget':>7} {'method':<10} {'n':>2} {'stand-alone acc %':>18} {'supernet %':>11} "
          f"{'pred ms':>8} {'measured ms (max)':>18} {'evals':>6}")
    for budget in budgets:
        for method in ("evolution", "pcnas", "random"):
            rows = [r for r in searches if r["key"].startswith(f"search:{method}:{budget}:")]
            accs = [sa[r["pick"]] for r in rows if r["pick"] in sa]
            ms = [meas[r["pick"]] for r in rows if r["pick"] in meas]
            if not rows:
                continue
            ok = all(m <= budget * (1 + noise / 100) for m in ms)
            spe = [r["seconds_per_eval"] for r in rows if "seconds_per_eval" in r]
            print(f"{budget:>7.2f} {method:<10} {len(accs):>2} "
                  f"{100 * np.mean(accs):>10.1f} ± {100 * np.std(accs):>4.1f} "
                  f"{100 * np.mean([r['score'] for r in rows]):>11.1f} "
                  f"{np.mean([r['predicted_ms'] for r in rows]):>8.3f} "
                  f"{max(ms) if ms else float('nan'):>12.3f} {'ok' if ok else 'OVER':>5} "
                  f"{np.mean([r['evaluations'] for r in rows]):>6.0f} "
                  f"{np.mean(spe) if spe else float('nan'):>6.2f} s/eval")


if __name__ == "__main__":
    main()
