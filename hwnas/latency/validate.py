"""Predicted vs measured on held-out random candidates: the figures that make a LUT trustworthy.

Candidates are drawn from a seeded generator, skipping the ones the calibration was fitted on;
each is exported whole and measured with the protocol, `group` candidates interleaved at a time
(by default all of them: the host's slow regimes then touch every candidate alike).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import stats as sstats
from tqdm import tqdm

from hwnas.devices import Device
from hwnas.fileio import atomic_path, atomic_write_text
from hwnas.latency.lookup import drift_from, drift_over, references
from hwnas.latency.predict import LutPredictor
from hwnas.latency.profile import candidate_builder, contention_check, measure_labelled
from hwnas.latency.table import shape_text
from hwnas.measure import Contention, Protocol


def metrics(predicted: np.ndarray, measured: np.ndarray) -> dict:
    """Fidelity figures of predictions against measurements (errors in % of measured)."""
    err = (predicted / measured - 1) * 100
    a = np.abs(err)
    rho = (float(sstats.spearmanr(predicted, measured).statistic) if len(a) > 2
           else float("nan"))
    return {"within_5pct": float((a <= 5).mean()), "within_10pct": float((a <= 10).mean()),
            "mean_abs_err_pct": float(a.mean()), "p95_abs_err_pct": float(np.percentile(a, 95)),
            "bias_pct": float(err.mean()), "spearman_rho": rho}


@dataclass
class ValidationReport:
    device: str
    host: str
    table: str
    space: str
    input_shape: list[int]
    n: int
    seed: int
    within_5pct: float  # fraction of candidates with |error| ≤ 5%
    within_10pct: float
    mean_abs_err_pct: float
    p95_abs_err_pct: float
    bias_pct: float  # mean signed error (predicted above measured is positive)
    spearman_rho: float
    noise_floor_pct: float | None  # between-process CV from `hwnas noise`, if measured
    contention: dict  # how quiet the host was while the candidates were timed
    drift: dict | None  # the reference candidates (canary first), timed interleaved with the
    # candidates, vs the table's
    canary_corrected: dict | None  # the figures above with predictions scaled by the drift
    table_age_h: float | None  # hours between the table's canary and this validation
    csv: str
    plot: str
    # the figures with each interleaved group's predictions scaled by that group's own median
    # measured / predicted: the most any drift correction from references timed with the group
    # could reach. What it leaves is the table's error and the spread within one measurement;
    # the gap to `canary_corrected` is the references misreading the host. A diagnosis, never a
    # price (it is fitted to the measurements it scores).
    group_ceiling: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        nf = (f"{self.noise_floor_pct:.2f}%" if self.noise_floor_pct is not None
              else "not measured (run `hwnas noise`)")
        out = [f"{self.space} @ {'x'.join(map(str, self.input_shape))} on {self.device}, host "
               f"{self.host}: {self.n} held-out candidates (seed {self.seed})"]
        figs = [("as priced", self.to_dict())]
        if self.canary_corrected:
            figs.append(("canary-corrected", self.canary_corrected))
        if self.group_ceiling:
            figs.append(("group ceiling (each group at its own median ratio; a diagnosis)",
                         self.group_ceiling))
        for name, f in figs:
            out += [f"  {name}: within ±5% {100 * f['within_5pct']:.1f}%, within ±10% "
                    f"{100 * f['within_10pct']:.1f}%, mean |error| {f['mean_abs_err_pct']:.2f}%, "
                    f"p95 {f['p95_abs_err_pct']:.2f}%, bias {f['bias_pct']:+.2f}%, "
                    f"Spearman rho {f['spearman_rho']:.4f}"]
        if self.drift:
            age = f", table {self.table_age_h:.1f} h old" if self.table_age_h is not None else ""
            out.append(f"  canary drift: {self.drift['drift_pct']:+.2f}%{age}")
        c = self.contention
        tries = c.get("attempts_per_group")  # --quiet-retries: busy groups timed again
        again = (f"; groups timed {sum(tries)} times for {len(tries)} (busy ones again)"
                 if tries and sum(tries) > len(tries) else "")
        known = Contention(**{f.name: c[f.name] for f in fields(Contention) if f.name in c})
        out += [f"  contention: {known.line()}{again}",
                f"  noise floor:  {nf}",
                f"  rows: {self.csv}   plot: {self.plot}"]
        return out


def noise_floor_pct(noise_file: Path) -> float | None:
    try:
        return 100 * json.loads(noise_file.read_text())["protocol"]["cv"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


DEFAULT_NOISE_PCT = 3.0  # the tolerance where `hwnas noise --publish` has not been run


def noise_tolerance_pct(noise_file: Path) -> float:
    """The budget check's tolerance: the published noise floor, else `DEFAULT_NOISE_PCT`."""
    noise = noise_floor_pct(noise_file)
    return noise if noise is not None else DEFAULT_NOISE_PCT


def budget_verdict(measured_ms: float, budget_ms: float, noise_file: Path,
                   shift: float = 1.0) -> dict:
    """The one budget check: a measured latency keeps `budget_ms` when it is within the
    device's published noise floor of it (3% where none is published), after allowing for the
    host's change between pricing and measuring (`shift`: the reference candidates timed with
    the measurement vs when the prices were made, `Drift.shift`; 1.10 = the host is 10% slower
    now). `keeps_budget_raw` ignores the shift."""
    noise, tol = noise_floor_pct(noise_file), noise_tolerance_pct(noise_file)
    return {"budget_ms": budget_ms, "measured_ms": measured_ms, "noise_floor_pct": noise,
            "tolerance_pct": tol, "host_shift_pct": round((shift - 1) * 100, 2),
            "keeps_budget": measured_ms <= budget_ms * shift * (1 + tol / 100),
            "keeps_budget_raw": measured_ms <= budget_ms * (1 + tol / 100)}


def _age_h(then: str) -> float | None:
    try:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(then)).total_seconds() / 3600
    except (TypeError, ValueError):
        return None


def validate(predictor: LutPredictor, device: Device, n: int, seed: int, out_prefix: Path,
             noise_file: Path | None = None, protocol: Protocol = Protocol(), group: int = 100,
             progress: bool = True, canary: bool = True,
             require_quiet: bool = False, executor=None) -> ValidationReport:
    """Measure `n` held-out candidates (and, with `canary`, the table's reference candidates,
    the canary first, interleaved with every group, for the drift since the table was made); write
    ``<out_prefix>.validation.{csv,png}``.

    With a cluster `executor` (`hwnas.distributed.get_executor`), the groups are timed on the
    nodes of the table's host, one group per timing slot at a time, instead of here."""
    space, shape, table = predictor.space, predictor.input_shape, predictor.table
    canary_arch = (table.meta.get("canary") or {}).get("arch") if canary else None
    refs = list(references(table)) if canary_arch else []
    exclude = set(predictor.calibration.archs) | set(refs)
    archs = space.sample_distinct(n, np.random.default_rng(seed), exclude)
    predicted = predictor.predict_many(archs)
    measured, ratio = np.zeros(len(archs)), np.ones(len(archs))
    parts, canary_now = [], []
    bar = tqdm(total=len(archs), desc="validating", unit="cand", disable=not progress,
               dynamic_ncols=True)
    starts = list(range(0, len(archs), group))
    chunks = [[str(a) for a in archs[s:s + group]] for s in starts]
    labels = [c + refs for c in chunks]

    def take(i: int, got) -> None:  # a measured group (in-process `Labelled`, or a shard's)
        start, chunk = starts[i], chunks[i]
        measured[start:start + len(chunk)] = [got.stats[lb].best_ms for lb in chunk]
        if canary_arch:
            now = {r: got.stats[r].best_ms for r in refs}
            canary_now.append(now)
            ratio[start:start + len(chunk)] = drift_from(table, now).ratio
        parts.append(got.contention)
        bar.update(len(chunk))

    if executor is None:
        for i, g in enumerate(labels):
            take(i, measure_labelled(g, candidate_builder(space, shape), device, protocol,
                                     progress=False))
    else:
        from hwnas.latency.shards import measure_on_host

        measure_on_host(executor, device, table.host, space, shape, labels, protocol, take)
    bar.close()
    contention = Contention.combine(parts)
    contention_check(contention, "this validation", require_quiet)
    err = (predicted / measured - 1) * 100
    corrected = predicted * ratio
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arch", "predicted_ms", "measured_ms", "error_pct"]
               + (["canary_corrected_ms", "canary_corrected_error_pct"] if canary_arch else []))
    for a, p, m, e, c in zip(archs, predicted, measured, err, corrected):
        w.writerow([str(a), f"{p:.4f}", f"{m:.4f}", f"{e:+.2f}"]
                   + ([f"{c:.4f}", f"{(c / m - 1) * 100:+.2f}"] if canary_arch else []))
    csv_path = out_prefix.with_name(out_prefix.name + ".validation.csv")
    png_path = out_prefix.with_name(out_prefix.name + ".validation.png")
    atomic_write_text(csv_path, buf.getvalue())
    drift = drift_over(table, canary_now).to_dict() if canary_arch else None
    report = ValidationReport(
        device=device.name, host=table.host, table=str(table.path), space=space.name,
        input_shape=list(shape), n=len(archs), seed=seed, **metrics(predicted, measured),
        noise_floor_pct=noise_floor_pct(noise_file) if noise_file else None,
        contention=contention.to_dict(), drift=drift,
        canary_corrected=metrics(corrected, measured) if canary_arch else None,
        table_age_h=_age_h(table.meta["canary"]["measured"]) if canary_arch else None,
        csv=str(csv_path), plot=str(png_path))
    scatter_plot(predicted, measured, report, png_path,
                 corrected if canary_arch else None)
    return report


def scatter_plot(predicted: np.ndarray, measured: np.ndarray, report: ValidationReport,
                 path: Path, corrected: np.ndarray | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    every = np.concatenate([predicted, measured] + ([corrected] if corrected is not None else []))
    lo, hi = float(every.min()) * 0.95, float(every.max()) * 1.05
    xs = np.linspace(lo, hi, 2)
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="tab:green", alpha=0.10, label="±10%")
    ax.fill_between(xs, xs * 0.95, xs * 1.05, color="tab:green", alpha=0.20, label="±5%")
    ax.plot(xs, xs, color="black", lw=0.8)
    ax.scatter(measured, predicted, s=14, color="tab:blue", zorder=3, label="as priced")
    if corrected is not None:
        ax.scatter(measured, corrected, s=10, color="tab:orange", zorder=4, marker="x",
                   label=f"canary-corrected ({report.drift['drift_pct']:+.1f}% drift)")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(f"{report.space} @ {shape_text(report.input_shape)} on {report.device}\n"
                 f"n={report.n}: {100 * report.within_5pct:.0f}% within ±5%, "
                 f"{100 * report.within_10pct:.0f}% within ±10%, rho={report.spearman_rho:.3f}",
                 fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
