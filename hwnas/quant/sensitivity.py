"""How much each unit minds being quantised: Hessian traces, weight perturbations, and the
metric drop measured when that unit alone is int8.

- **Hessian trace** (HAWQ-V2/V3), by Hutchinson's method: for Rademacher vectors v over all the
  quantised weights, E[vᵀHv] restricted to a unit's weights is that unit's trace (the cross
  terms vanish in expectation), so one Hessian-vector product (torch autograd, double backward
  on the trained model's loss over a real training batch) gives every unit's sample at once.
  `samples` products, each on the next of `batches` real batches; the mean and its standard
  error per unit are reported. The model is in eval mode (BatchNorm statistics fixed: the loss
  is then a function of the weights alone).
- **Perturbation** ‖Q(W) − W‖²: what the quantiser does to the unit's Conv/Linear weights —
  per-output-channel symmetric int8 (onnxruntime's per-channel ``WeightSymmetric`` rule; it
  quantises the BN-folded weights, which per channel comes to the same relative error, see
  `weight_perturbation`), in the trained parameters' coordinates, so it pairs with the Hessian;
  for fp16 the rounding to half precision.
- **Ω = Tr(H)/n · ‖ΔW‖²** per unit and precision: HAWQ-V3's sensitivity-weighted perturbation,
  the ILP's objective.
- **Measured drop**: the metric of the realised model with only that unit in int8 (calibrated
  on real training images), minus the all-fp32 metric; and the Spearman correlation of the
  drops with the traces and with Ω.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hwnas.quant.units import PrecisionSpace


def quantised_weights(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight parameter, per-output-channel BN scale folded into it by the exporter) for every
    Conv2d / Linear of `module`; the scale is 1 where no BatchNorm follows."""
    out = []
    mods = list(module.modules())
    for m in mods:
        if isinstance(m, nn.Sequential):
            kids = list(m.children())
            for a, b in zip(kids, kids[1:] + [None]):
                if isinstance(a, nn.Conv2d):
                    if isinstance(b, nn.BatchNorm2d):
                        g = b.weight.detach() if b.affine else torch.ones_like(b.running_var)
                        s = g / torch.sqrt(b.running_var + b.eps)
                    else:
                        s = torch.ones(a.out_channels)
                    out.append((a.weight, s))
    seen = {id(w) for w, _ in out}
    for m in mods:  # convs outside a Sequential, and linear layers
        if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m.weight) not in seen:
            out.append((m.weight, torch.ones(m.weight.shape[0])))
            seen.add(id(m.weight))
    return out


def weight_perturbation(module: nn.Module, precision: str) -> float:
    """‖Q(W) − W‖² over the unit's Conv/Linear weights, in the trained parameters' coordinates.

    onnxruntime quantises the BN-folded weight s·W per output channel and symmetrically, and
    that is scale-invariant per channel (Q(s·W_c) = s·Q(W_c) for a channel scale s > 0), so the
    error in the trained coordinates is that of quantising W itself per channel; dividing the
    folded error by s instead blew up on channels whose BN scale is ~0 (1e19 on det20's first
    blocks). fp16 rounding is relative too (outside subnormals)."""
    total = 0.0
    for w, _ in quantised_weights(module):
        w = w.detach().double()
        shape = (-1,) + (1,) * (w.dim() - 1)
        if precision == "int8":
            amax = w.abs().reshape(w.shape[0], -1).max(1).values.reshape(shape)
            scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
            q = torch.clamp(torch.round(w / scale), -127, 127) * scale
        elif precision == "fp16":
            q = w.half().double()
        else:
            q = w
        total += float(((q - w) ** 2).sum())
    return total


def hutchinson_traces(target, units: list[nn.Module | None], samples: int = 32,
                      batches: int = 8, batch_size: int = 32, seed: int = 0,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(trace mean, its standard error, weight count) per unit (0s for units without weights)."""
    model = target.module
    model.eval()
    params = [[w for w, _ in quantised_weights(m)] if m is not None else [] for m in units]
    flat = [p for ps in params for p in ps]
    data = target.batches(batches, batch_size, seed)
    gen = torch.Generator().manual_seed(seed)
    draws = np.zeros((samples, len(units)))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in flat:
        p.requires_grad_(True)
    try:
        for s in tqdm(range(samples), desc="Hutchinson", unit="HVP", file=sys.stderr,
                      disable=not progress, leave=False, dynamic_ncols=True):
            loss = target.loss(data[s % len(data)])
            grads = torch.autograd.grad(loss, flat, create_graph=True)
            vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in flat]
            hv = torch.autograd.grad(grads, flat, grad_outputs=vs)
            i = 0
            for u, ps in enumerate(params):
                draws[s, u] = sum(float((v * h).sum()) for v, h in
                                  zip(vs[i:i + len(ps)], hv[i:i + len(ps)]))
                i += len(ps)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    n = np.array([sum(p.numel() for p in ps) for ps in params], dtype=np.int64)
    se = draws.std(0, ddof=1) / np.sqrt(samples) if samples > 1 else np.zeros(len(units))
    return draws.mean(0), se, n


OBJECTIVES = ("hessian", "drop", "blend")
# what `hwnas quantize` minimises unless told: the blend beat Omega alone on test images that no
# choice was made on (README, "Mixed precision"); "hessian" until 2026-11-24
DEFAULT_OBJECTIVE = "blend"


def spearman(a, b) -> float | None:
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    return float(stats.spearmanr(a[ok], b[ok]).statistic)


@dataclass
class Sensitivity:
    """Per unit (in `units` order): see the module docstring. `omega[p][u]` is Ω of unit u at
    precision p (0 for fp32); `drop` the measured metric drop with that unit alone int8."""

    units: list[str]
    trace: list[float]
    trace_se: list[float]
    n_weights: list[int]
    perturbation: dict[str, list[float]]
    omega: dict[str, list[float]]
    metric: str = ""
    base_metric: float | None = None
    drop: list[float | None] | None = None
    drop_split: str = ""
    rank_correlation: dict[str, float | None] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        return cls(**d)

    def omega_matrix(self, ps: PrecisionSpace, objective: str = "hessian") -> np.ndarray:
        """[U, P]: the objective's cost of unit u at its choice c (the ILP's coefficients; 0 at
        fp32): `costs`."""
        cost = self.costs(objective)
        P = max(len(u.precisions) for u in ps.units)
        out = np.zeros((len(ps.units), P))
        for i, u in enumerate(ps.units):
            for c, p in enumerate(u.precisions):
                out[i, c] = cost.get(p, [0.0] * len(ps.units))[i] if p != "fp32" else 0.0
        return out

    def costs(self, objective: str = "hessian") -> dict[str, list[float]]:
        """Per precision and unit, what the methods minimise the sum of.

        - "hessian": HAWQ-V3's Ω.
        - "drop": the measured single-unit drop, clipped at 0 (a drop below 0 is the split's
          noise, not a gain); at fp16 the int8 drop scaled by the weights' perturbation ratio
          ‖ΔW_fp16‖² / ‖ΔW_int8‖² (the unit's Hessian is the same, so HAWQ's quadratic model
          scales a drop so). To it a tie-break: Ω scaled so that all units' together come to
          a tenth of the smallest positive drop, so among assignments of equal summed drop the
          one of least Ω is chosen. Larger would let Ω outweigh a measured drop; much smaller
          would fall under the MILP solver's optimality gap.
        - "blend": the mean of the two estimates of a unit's drop, the measured (clipped, as
          "drop") and the curvature's, κ·Ω, with κ the median of drop / Ω over the units with
          both positive (in the metric's units). A drop within the split's noise of 0 then
          keeps the curvature's share rather than costing nothing: under "drop" such units are
          free, so the latency tie-break quantises them at any budget."""
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; one of {OBJECTIVES}")
        if objective == "hessian":
            return {p: list(map(float, om)) for p, om in self.omega.items()}
        if self.drop is None:
            raise ValueError("this sensitivity has no measured drops")
        d = np.array([max(x, 0.0) if x is not None else 0.0 for x in self.drop])
        tiny = 0.1 * (d[d > 0].min() if (d > 0).any() else 1.0)
        oi = np.asarray(self.omega.get("int8", np.zeros_like(d)), float)
        both = (d > 0) & (oi > 0)
        kappa = float(np.median(d[both] / oi[both])) if both.any() else 1.0
        out = {}
        for p, om in self.omega.items():
            om = np.asarray(om, float)
            if p == "int8":
                base = d
            else:
                pp = np.asarray(self.perturbation[p], float)
                pi = np.asarray(self.perturbation.get("int8", np.zeros_like(pp)), float)
                base = d * np.divide(pp, pi, out=np.zeros_like(pp), where=pi > 0)
            if objective == "blend":
                out[p] = list(0.5 * (base + kappa * om))
            else:
                scale = tiny / om.sum() if om.sum() > 0 else 0.0
                out[p] = list(base + scale * om)
        return out

    def correlate(self) -> None:
        if self.drop is None:
            return
        drop = [np.nan if d is None else d for d in self.drop]
        avg = [t / n if n else np.nan for t, n in zip(self.trace, self.n_weights)]
        self.rank_correlation = {
            "trace_vs_drop": spearman(self.trace, drop),
            "avg_trace_vs_drop": spearman(avg, drop),
            "omega_int8_vs_drop": spearman(self.omega.get("int8", []), drop)
            if "int8" in self.omega else None}


def hessian_sensitivity(target, ps: PrecisionSpace, samples: int = 32, batches: int = 8,
                        batch_size: int = 32, seed: int = 0, progress: bool = True
                        ) -> Sensitivity:
    """Traces, perturbations and Ω for every unit of `ps` (`target.unit_modules` in order)."""
    trace, se, n = hutchinson_traces(target, target.unit_modules, samples, batches, batch_size,
                                     seed, progress)
    precs = [p for p in ps.precisions if p != "fp32"]
    pert = {p: [weight_perturbation(m, p) if m is not None else 0.0
                for m in target.unit_modules] for p in precs}
    # a Hutchinson mean can come out negative for a unit whose curvature is ~0 (a noisy
    # estimate, or a non-convex direction); HAWQ's objective assumes a PSD Hessian, so Ω
    # counts such a unit as free to quantise, never as a gain
    omega = {p: [max(float(t / k), 0.0) * d if k else 0.0 for t, k, d in zip(trace, n, pert[p])]
             for p in precs}
    return Sensitivity([u.name for u in ps.units], [float(t) for t in trace],
                       [float(s) for s in se], [int(k) for k in n], pert, omega,
                       settings={"samples": samples, "batches": batches,
                                 "batch_size": batch_size, "seed": seed})


def measure_drops(target, ps: PrecisionSpace, device, fp32_onnx, feeds, split: str,
                  workdir, progress: bool = True, images: int | None = None
                  ) -> tuple[float, list[float | None]]:
    """(all-fp32 metric, per unit the metric drop with only that unit in int8) on `split`
    (`images`: that split of the generated data drawn with so many, `Target.split`), each
    model realised by `hwnas.quant.realise.realise` with the real calibration `feeds`; None
    for a unit that cannot be int8."""
    from pathlib import Path

    from hwnas.quant.realise import realise

    data = target.split(split, images)
    base = target.metric(Path(fp32_onnx), data)
    drops: list[float | None] = []
    for i, u in enumerate(tqdm(ps.units, desc="single-unit int8", unit="unit", file=sys.stderr,
                               disable=not progress, leave=False, dynamic_ncols=True)):
        if "int8" not in u.precisions:
            drops.append(None)
            continue
        choices = [0] * len(ps.units)
        choices[i] = u.precisions.index("int8")
        a = ps.arch.__class__(ps.name, tuple(choices))
        path = realise(fp32_onnx, Path(workdir) / f"only-{u.name}.onnx", device, ps, a, feeds)
        drops.append(float(base - target.metric(path, data)))
        path.unlink(missing_ok=True)
    return float(base), drops
