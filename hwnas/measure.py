"""The timing protocol: the only place in hwnas that reads a clock.

Latency on a shared 2-core host is noisy. The protocol that makes a LUT worth trusting:

1. **warm-up**: each item runs for `warmup_ms` (at least `min_warmup` runs) before anything is
   recorded; the warm-up also sets how many repetitions fill a round;
2. **rounds, interleaved**: `rounds` rounds; in each, every item runs `round_warmup` untimed
   times and then `reps` timed times back to back, items in turn (so a slow drift of the machine
   touches every item alike, not the last one; the untimed runs make each round measure the
   warm, back-to-back latency a deployed model sees, whatever ran before it);
3. **robust statistics**: each round's median (immune to single-run spikes), then the *lowest*
   round median, `best_ms`, as the estimate of the device's latency; the median of the round
   medians (`median_ms`) and the relative standard deviation of the round medians (`spread`) are
   recorded beside it;
4. **quiet**: Python's GC is off while timing; backends run one intra-op thread by default with
   spinning off (see the device descriptors).

Why the lowest round median and not the median of round medians: this class of shared host
switches between a fast and a ~35% slower regime for 0.2–2 s stretches (a busy neighbour on
the physical core; no steal time is reported). The median lands in whichever regime held most
of an item's rounds, so two processes disagree by up to 35%; the lowest of many short rounds
spread over time finds the uncontended latency, which is what repeats (see `hwnas noise`).

**The local estimate** (``Protocol(estimate="local")``, what mixed-precision tables use): the
lowest round median is an extreme value of one item's own rounds, so on a host quiet in a few
rounds it carries that item's luck: two runs of the same 30 whole detector assignments
disagreed by 2.8% (std of the log ratio, common scale removed) on the AVX2 host. The rounds of
all items interleaved in one run see the same host, so the host's speed can be read from all
of them at once: in time order (round by round, item by item), log t = item level + host
factor + noise, the host factor a running median (`local_window` neighbours each side) of the
residuals, fitted by alternating medians (`local_levels`); an item's latency is its level at
the run's quietest host factor. The same two runs then disagreed by 1.1% (four runs at
11-46% host swings, ±10 neighbours; ±4: 1.3%), at the lowest round median's level (within
±1.3%). One item alone keeps the lowest round median.

`measure_noise` reports the protocol's own noise floor (between-process spread of the median),
so every fidelity figure can be read against it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from hwnas.backends.base import Runner


ESTIMATES = {
    "lowest": "latency_ms = best_ms: the lowest per-round median of the protocol",
    "local": "latency_ms = best_ms: the item's level at the run's quietest host factor, read "
             "from all interleaved items' round medians (hwnas.measure.local_levels)"}

MIXED_ESTIMATE = "local"  # mixed-precision tables' statistic (hwnas.quant.latency)


@dataclass(frozen=True)
class Protocol:
    warmup_ms: float = 150.0
    min_warmup: int = 5
    rounds: int = 20  # at least this many rounds...
    span_s: float = 5.0  # ...and enough more that the rounds cover this much wall time
    round_ms: float = 25.0  # target time per item per round (timed runs)
    round_warmup: int = 4  # untimed runs that start each item's round: switching items leaves
    # the caches cold, and a latency must not depend on what it was interleaved with
    min_reps: int = 3
    max_reps: int = 2000
    max_rounds: int = 2000
    # ...and, on a host that is rarely quiet, more rounds until the estimate settles: after the
    # planned rounds, go on while the items' best round medians (median over items) still
    # improved by more than `settle_pct` over the last `settle_window` rounds, for at most
    # `settle_factor` × `span_s` of timing, or `settle_plan_factor` × the planned rounds' time
    # where that is longer. A quiet host settles at once, so its figures are unchanged; `span_s`
    # 0 (tests) never extends.
    settle_pct: float = 0.5
    settle_window: int = 10
    settle_factor: float = 24.0
    # Why relative to the plan too: a mixed table's profile (511 items, 22 s a round) plans 20
    # rounds, 7 minutes, past the 2 minutes above before its plan ends, so on a host quiet in 5%
    # of rounds it never extended, and each item's best was its lowest of 20 round medians: an
    # item without one quiet round kept a busy time (the AVX2 host, 2026-11-23 19:25: the same
    # whole detector assignments 0.76-1.08x an earlier run's, a calibration leave-one-out of 46%).
    settle_plan_factor: float = 2.0
    # the statistic each item's latency is read with: "lowest", its lowest round median, or
    # "local", its level against the host factor that all items' rounds show (module docstring)
    estimate: str = "lowest"
    local_window: int = 10

    def __post_init__(self):
        if self.estimate not in ESTIMATES:
            raise ValueError(f"unknown estimate {self.estimate!r}; known: {', '.join(ESTIMATES)}")

    def rounds_for(self, round_time_ms: float) -> int:
        """Rounds needed when one round of every item takes `round_time_ms`."""
        need = int(np.ceil(self.span_s * 1000.0 / max(round_time_ms, 1e-3)))
        return int(np.clip(need, self.rounds, self.max_rounds))

    def settled(self, per_item: Sequence[Sequence[Sequence[float]]]) -> bool:
        """Whether the lowest round medians stopped improving (see `settle_pct`)."""
        w = self.settle_window
        if min(len(r) for r in per_item) <= w:
            return False
        gains = [min(np.median(x) for x in r[:-w]) / min(np.median(x) for x in r) - 1
                 for r in per_item]
        return float(np.median(gains)) * 100 <= self.settle_pct

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LatencyStats:
    """One measurement. `best_ms`, the lowest per-round median, is the protocol's latency;
    `median_ms` is the median of the per-round medians; `spread` is the relative standard
    deviation of the round medians (0.01 = 1%); p10/p90/mean/std are over all `n` runs."""

    best_ms: float
    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    n: int
    spread: float

    @classmethod
    def from_rounds(cls, rounds: Sequence[Sequence[float]]) -> "LatencyStats":
        """Statistics of per-run times (ms) grouped by round."""
        rounds = [np.asarray(r, dtype=np.float64) for r in rounds if len(r)]
        if not rounds:
            raise ValueError("no samples")
        allv = np.concatenate(rounds)
        medians = np.array([np.median(r) for r in rounds])
        med = float(np.median(medians))
        spread = float(np.std(medians) / med) if len(medians) > 1 and med > 0 else 0.0
        return cls(float(medians.min()), med, float(np.percentile(allv, 10)), float(np.percentile(allv, 90)),
                   float(allv.mean()), float(allv.std()), int(allv.size), spread)

    def to_dict(self) -> dict:
        return asdict(self)


QUIET_PCT = 3.0  # a round is quiet when the items ran within this much of their best round
QUIET_MIN = 0.5  # below this fraction of quiet rounds a measurement counts as contended


@dataclass(frozen=True)
class Contention:
    """How much of a measurement's span the host was quiet (the idea of
    `tools/host_regimes.py`, from the protocol's own rounds): per round, the median over items
    of (round median / that item's best round median); `quiet_fraction` is the share of rounds
    within `QUIET_PCT` of 1. The protocol's latency (the best round) holds while some rounds
    are quiet; a mostly slow span means the host was busy, and the figure deserves a second
    look (`--require-quiet` refuses it)."""

    rounds: int
    quiet_fraction: float
    median_slowdown_pct: float
    worst_slowdown_pct: float
    threshold_pct: float = QUIET_PCT

    @property
    def contended(self) -> bool:
        return self.quiet_fraction < QUIET_MIN

    @classmethod
    def from_rounds(cls, per_item: Sequence[Sequence[Sequence[float]]]) -> "Contention":
        return cls.from_medians(round_medians(per_item))

    @classmethod
    def from_medians(cls, medians: np.ndarray) -> "Contention":
        """From the round medians [items, rounds] (`round_medians`)."""
        slow = np.median(medians / medians.min(axis=1, keepdims=True), axis=0) - 1  # [rounds]
        return cls(int(slow.size), float((slow <= QUIET_PCT / 100).mean()),
                   float(100 * np.median(slow)), float(100 * slow.max()))

    @classmethod
    def combine(cls, parts: Sequence["Contention"]) -> "Contention":
        """Several measurements' records as one (weighted by rounds)."""
        n = sum(p.rounds for p in parts)
        if not n:
            return cls(0, 1.0, 0.0, 0.0)
        w = [p.rounds / n for p in parts]
        return cls(n, float(sum(p.quiet_fraction * x for p, x in zip(parts, w))),
                   float(sum(p.median_slowdown_pct * x for p, x in zip(parts, w))),
                   float(max(p.worst_slowdown_pct for p in parts)))

    def to_dict(self) -> dict:
        return {**asdict(self), "contended": self.contended}

    def line(self) -> str:
        return (f"host quiet in {100 * self.quiet_fraction:.0f}% of {self.rounds} rounds "
                f"(median round +{self.median_slowdown_pct:.1f}% over the best)")


@dataclass(frozen=True)
class Measurement:
    """What one protocol run returns: a `LatencyStats` per item and the host's contention."""

    stats: list[LatencyStats]
    contention: Contention


@dataclass
class _Item:
    runner: Runner
    feed: dict
    reps: int = 1
    typical_ms: float = 0.0
    rounds: list[list[float]] = field(default_factory=list)


def _time_runs(runner: Runner, feed: dict, reps: int) -> list[float]:
    run = runner._run
    clock = time.perf_counter_ns
    out = []
    for _ in range(reps):
        t0 = clock()
        run(feed)
        out.append((clock() - t0) / 1e6)
    return out


def _warm_up(item: _Item, p: Protocol) -> None:
    times: list[float] = []
    deadline = time.perf_counter() + p.warmup_ms / 1000
    while len(times) < p.min_warmup or time.perf_counter() < deadline:
        times.extend(_time_runs(item.runner, item.feed, 1))
    typical = float(np.median(times[len(times) // 2:]))  # the warm half
    item.typical_ms = typical
    item.reps = int(np.clip(round(p.round_ms / max(typical, 1e-6)), p.min_reps, p.max_reps))


def measure_interleaved(runners: Sequence[Runner], protocol: Protocol = Protocol(),
                        prior_rounds: Sequence[list[list[float]]] | None = None,
                        on_round: Callable[[int, int, list[list[list[float]]]], None]
                        | None = None,
                        ) -> Measurement:
    """Measure several runners with interleaved rounds: one `LatencyStats` per runner, and how
    quiet the host was meanwhile.

    `prior_rounds[i]` are rounds already recorded for runner i (a resumed run): only the missing
    rounds are measured. `on_round(done, total, all_rounds)` is called after every completed
    round, so a caller can show progress and save it, losing at most the round in flight.
    """
    with announce_measuring():
        return _measure_interleaved(runners, protocol, prior_rounds, on_round)


MEASURING_FLAG_ENV = "HWNAS_MEASURING_FLAG"


@contextlib.contextmanager
def announce_measuring():
    """While timing, hold the file named by ``$HWNAS_MEASURING_FLAG`` (if set), containing this
    process id, so cooperating jobs on the host can pause meanwhile (`tools/quiet_gate.py`)."""
    flag = os.environ.get(MEASURING_FLAG_ENV)
    if not flag:
        yield
        return
    with open(flag, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(flag)


def _measure_interleaved(runners, protocol, prior_rounds, on_round) -> Measurement:
    rng = np.random.default_rng(0)
    items = [_Item(r, r.random_feed(rng)) for r in runners]
    if prior_rounds is not None:
        for item, prior in zip(items, prior_rounds):
            item.rounds = [list(r) for r in prior]
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for item in items:
            _warm_up(item, protocol)
        rounds = protocol.rounds_for(sum((i.reps + protocol.round_warmup) * i.typical_ms
                                         for i in items))
        if prior_rounds is not None:  # a resumed run keeps the plan it started with
            rounds = max(rounds, max(len(i.rounds) for i in items))
        r = min((len(i.rounds) for i in items), default=0)
        start = time.perf_counter()
        deadline = start + protocol.settle_factor * protocol.span_s
        settled = r >= rounds and (protocol.span_s == 0 or r >= protocol.max_rounds
                                   or protocol.settled([i.rounds for i in items]))
        while r < rounds or not settled:
            for item in items:
                for _ in range(protocol.round_warmup):
                    item.runner._run(item.feed)
                item.rounds.append(_time_runs(item.runner, item.feed, item.reps))
            r += 1
            if r == rounds and protocol.span_s > 0:  # the plan's time sets how long
                # settling may take too (span 0 never extends)
                deadline = max(deadline, start + protocol.settle_plan_factor
                               * (time.perf_counter() - start))
            settled = (r >= protocol.max_rounds or time.perf_counter() >= deadline
                       or protocol.settled([i.rounds for i in items]))
            if on_round is not None:  # past the plan the total is one more until settled
                on_round(r, rounds if r < rounds else r + (not settled), [i.rounds for i in items])
        rounds = r
    finally:
        if gc_was_enabled:
            gc.enable()
    kept = [i.rounds[:rounds] for i in items]
    medians = round_medians(kept)
    stats = [LatencyStats.from_rounds(r) for r in kept]
    if protocol.estimate == "local" and len(kept) > 1:
        levels = local_levels(medians, protocol.local_window)
        stats = [replace(s, best_ms=float(v)) for s, v in zip(stats, levels)]
    return Measurement(stats, Contention.from_medians(medians))


def round_medians(per_item: Sequence[Sequence[Sequence[float]]]) -> np.ndarray:
    """Each item's per-round medians, [items, rounds], from per-run times grouped by round."""
    return np.array([[np.median(r) for r in rounds] for rounds in per_item])


def local_levels(medians: np.ndarray, window: int, iterations: int = 8) -> np.ndarray:
    """Each item's latency at the quietest host speed of an interleaved run, from its round
    medians `medians` [items, rounds] (the module docstring's local estimate): in time order
    (round-major), log t = level[item] + host[t] + noise, with host a running median over
    ±`window` neighbours of log t − level, and level an item's median of log t − host,
    alternated `iterations` times from the items' median round; → exp(level + min host)."""
    from scipy.ndimage import median_filter

    logs = np.log(np.asarray(medians, dtype=np.float64))
    n, r = logs.shape
    seq = logs.T.reshape(-1)  # time order: round 0's items, then round 1's, ...
    item = np.tile(np.arange(n), r)
    level = np.median(logs, axis=1)
    host = np.zeros_like(seq)
    for _ in range(iterations):
        host = median_filter(seq - level[item], size=2 * window + 1, mode="nearest")
        level = np.median((seq - host).reshape(r, n), axis=0)
    return np.exp(level + host.min())


def measure(runner: Runner, protocol: Protocol = Protocol()) -> LatencyStats:
    return measure_interleaved([runner], protocol).stats[0]


def naive_loop_ms(runner: Runner, runs: int = 100) -> float:
    """The loop the protocol replaces (mean of back-to-back runs, no warm-up), for comparison."""
    feed = runner.random_feed()
    t0 = time.perf_counter_ns()
    for _ in range(runs):
        runner._run(feed)
    return (time.perf_counter_ns() - t0) / 1e6 / runs


@dataclass(frozen=True)
class NoiseReport:
    """Between-process variation of one model's latency: `processes` fresh processes each
    measure it once; `cv` = std / mean of their results, `range_rel` = (max - min) / median."""

    method: str
    medians_ms: list[float]
    cv: float
    range_rel: float

    @classmethod
    def from_values(cls, method: str, values: Sequence[float]) -> "NoiseReport":
        v = np.asarray(values, dtype=np.float64)
        return cls(method, [round(float(x), 4) for x in v], float(v.std(ddof=1) / v.mean()),
                   float((v.max() - v.min()) / np.median(v)))

    def to_dict(self) -> dict:
        return asdict(self)


def measure_noise(onnx_path: str, device_name: str, processes: int = 5, naive: bool = False,
                  span_s: float | None = None) -> list[NoiseReport]:
    """Run `hwnas measure` on `onnx_path` in `processes` fresh processes, one after another.

    With the protocol, two reports from the same runs: its latency (`best_ms`) and, for
    comparison, the median of round medians; with `naive`, the naive loop's.
    """
    values = []
    for _ in range(processes):
        cmd = [sys.executable, "-m", "hwnas", "measure", "--device", device_name,
               "--onnx", onnx_path, "--json"] + (["--naive"] if naive else [])
        if span_s is not None:
            cmd += ["--span-s", str(span_s)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        values.append(json.loads(out.stdout))
    if naive:
        return [NoiseReport.from_values("naive_loop", [v["latency_ms"] for v in values])]
    return [NoiseReport.from_values("protocol", [v["best_ms"] for v in values]),
            NoiseReport.from_values("median_of_rounds", [v["median_ms"] for v in values])]


def measure_file(onnx_path: str, device, protocol: Protocol = Protocol(),
                 naive: bool = False, module=None) -> dict:
    """Compile an ONNX file for `device` and measure it: the body of `hwnas measure`.
    `module` is the torch module it was exported from, for backends that run torch."""
    from hwnas.backends import compile_model
    from hwnas.export import load_onnx

    load_onnx(onnx_path)  # a clear error for a file that is not ONNX
    with compile_model(onnx_path, device, module=module) as runner:
        if naive:
            return {"latency_ms": naive_loop_ms(runner), "method": "naive-loop"}
        m = measure_interleaved([runner], protocol)
    return {"latency_ms": m.stats[0].best_ms, "method": "protocol", **m.stats[0].to_dict(),
            "contention": m.contention.to_dict()}
