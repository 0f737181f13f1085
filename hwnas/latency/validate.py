"""Predicted vs measured on held-out random candidates: the figures that make a LUT trustworthy.

Candidates are drawn from a seeded generator, skipping the ones the calibration was fitted on;
each is exported whole and measured with the protocol, `group` candidates interleaved at a time
(by default all of them: the host's slow regimes then touch every candidate alike).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sstats
from tqdm import tqdm

from hwnas.devices import Device
from hwnas.latency.predict import LutPredictor
from hwnas.latency.profile import candidate_builder, measure_labelled
from hwnas.latency.table import atomic_write_text, shape_text
from hwnas.measure import Protocol


@dataclass
class ValidationReport:
    device: str
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
    csv: str
    plot: str

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        nf = (f"{self.noise_floor_pct:.2f}%" if self.noise_floor_pct is not None
              else "not measured (run `hwnas noise`)")
        return [f"{self.space} @ {'x'.join(map(str, self.input_shape))} on {self.device}: "
                f"{self.n} held-out candidates (seed {self.seed})",
                f"  within ±5%:  {100 * self.within_5pct:5.1f}%",
                f"  within ±10%: {100 * self.within_10pct:5.1f}%",
                f"  mean |error|: {self.mean_abs_err_pct:.2f}%   p95 |error|: "
                f"{self.p95_abs_err_pct:.2f}%   bias: {self.bias_pct:+.2f}%",
                f"  Spearman rho: {self.spearman_rho:.4f}",
                f"  noise floor:  {nf}",
                f"  rows: {self.csv}   plot: {self.plot}"]


def noise_floor_pct(noise_file: Path) -> float | None:
    try:
        return 100 * json.loads(noise_file.read_text())["protocol"]["cv"]
    except (OSError, ValueError, KeyError):
        return None


def validate(predictor: LutPredictor, device: Device, n: int, seed: int, out_prefix: Path,
             noise_file: Path | None = None, protocol: Protocol = Protocol(), group: int = 100,
             progress: bool = True) -> ValidationReport:
    """Measure `n` held-out candidates; write ``<out_prefix>.validation.{csv,png}``."""
    space, shape = predictor.space, predictor.input_shape
    archs = space.sample_distinct(n, np.random.default_rng(seed), set(predictor.calibration.archs))
    predicted = predictor.predict_many(archs)
    measured = np.zeros(len(archs))
    bar = tqdm(total=len(archs), desc="validating", unit="cand", disable=not progress,
               dynamic_ncols=True)
    for start in range(0, len(archs), group):
        chunk = [str(a) for a in archs[start:start + group]]
        stats, _ = measure_labelled(chunk, candidate_builder(space, shape), device, protocol,
                                    progress=False)
        measured[start:start + len(chunk)] = [stats[l].best_ms for l in chunk]
        bar.update(len(chunk))
    bar.close()
    err = (predicted / measured - 1) * 100
    abs_err = np.abs(err)
    csv_path = out_prefix.with_suffix(".validation.csv")
    png_path = out_prefix.with_suffix(".validation.png")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["arch", "predicted_ms", "measured_ms", "error_pct"])
    for a, p, m, e in zip(archs, predicted, measured, err):
        w.writerow([str(a), f"{p:.4f}", f"{m:.4f}", f"{e:+.2f}"])
    atomic_write_text(csv_path, buf.getvalue())
    report = ValidationReport(
        device=device.name, space=space.name, input_shape=list(shape), n=len(archs), seed=seed,
        within_5pct=float((abs_err <= 5).mean()), within_10pct=float((abs_err <= 10).mean()),
        mean_abs_err_pct=float(abs_err.mean()), p95_abs_err_pct=float(np.percentile(abs_err, 95)),
        bias_pct=float(err.mean()),
        spearman_rho=float(sstats.spearmanr(predicted, measured).statistic) if len(archs) > 2
        else float("nan"),
        noise_floor_pct=noise_floor_pct(noise_file) if noise_file else None,
        csv=str(csv_path), plot=str(png_path))
    scatter_plot(predicted, measured, report, png_path)
    return report


def scatter_plot(predicted: np.ndarray, measured: np.ndarray, report: ValidationReport,
                 path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    lo = float(min(predicted.min(), measured.min())) * 0.95
    hi = float(max(predicted.max(), measured.max())) * 1.05
    xs = np.linspace(lo, hi, 2)
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="tab:green", alpha=0.10, label="±10%")
    ax.fill_between(xs, xs * 0.95, xs * 1.05, color="tab:green", alpha=0.20, label="±5%")
    ax.plot(xs, xs, color="black", lw=0.8)
    ax.scatter(measured, predicted, s=14, color="tab:blue", zorder=3)
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
