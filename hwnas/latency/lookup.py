"""Opening a predictor, the one way: this host's table (or a forced foreign one), its
fingerprint checked, and optionally the canary re-timed to measure the host's drift since the
table was made.

Why the canary: this class of host does not keep one uncontended speed. A table checked at
12:13 on an AMD EPYC host was +2.7% off; the same table at 13:40, on a quiet host, was +15.5%
off with every candidate off by 14–18% alike (rank order intact). Timing one fixed candidate now
and dividing by its time in the table measures that drift in a few seconds; `--canary correct`
scales every prediction by it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from hwnas.devices import Device, load_device
from hwnas.errors import UserError
from hwnas.latency.predict import LutPredictor
from hwnas.latency.table import LatencyTable, locate_table, now_iso, tables_dir
from hwnas.measure import Protocol
from hwnas.spaces import SearchSpace, get_space
from hwnas.spaces.base import Shape

CANARY_MODES = ("off", "report", "correct")


@dataclass(frozen=True)
class Drift:
    """The canary now vs in the table: `ratio` = now / then (1.10: the host is 10% slower)."""

    canary: str
    table_ms: float
    now_ms: float
    table_measured: str
    now_measured: str

    @property
    def ratio(self) -> float:
        return self.now_ms / self.table_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "drift_pct": 100 * (self.ratio - 1)}

    def line(self) -> str:
        return (f"canary {self.canary}: {self.table_ms:.3f} ms in the table "
                f"({self.table_measured}), {self.now_ms:.3f} ms now: host drift "
                f"{100 * (self.ratio - 1):+.1f}%")


def canary_of(table: LatencyTable) -> dict:
    c = table.meta.get("canary")
    if not c:
        raise UserError(f"latency table {table.path} has no canary (made before canaries); "
                        "re-time it with `hwnas profile` on its host, or use --canary off")
    return c


def drift_from(table: LatencyTable, now_ms: float) -> Drift:
    c = canary_of(table)
    return Drift(c["arch"], float(c["latency_ms"]), float(now_ms), c["measured"], now_iso())


def time_canary(table: LatencyTable, device: Device, space: SearchSpace, shape: Shape,
                protocol: Protocol = Protocol()) -> Drift:
    """Time the table's canary now (one protocol measurement, a few seconds)."""
    from hwnas.latency.profile import candidate_builder, measure_labelled

    arch = canary_of(table)["arch"]
    got = measure_labelled([arch], candidate_builder(space, shape), device, protocol,
                           progress=False)
    return drift_from(table, got.stats[arch].best_ms)


def open_predictor(device: str | Device, space: str | SearchSpace, shape: Shape | None = None,
                   tables: Path | None = None, host: str | None = None, strict: bool = False,
                   canary: str = "off", protocol: Protocol = Protocol(),
                   ) -> tuple[LutPredictor, Drift | None]:
    """This host's predictor for (device, space, shape), and the canary's drift if asked.

    `host` forces another host's table (with a warning); `strict` refuses a fingerprint that
    differs in anything that matters; `canary` is off, report (time it, say the drift) or
    correct (and scale every prediction by it)."""
    if canary not in CANARY_MODES:
        raise UserError(f"--canary must be one of {', '.join(CANARY_MODES)}, not {canary!r}")
    device = load_device(device) if isinstance(device, str) else device
    space = get_space(space) if isinstance(space, str) else space
    shape = tuple(shape or space.default_input)
    table = LatencyTable.load(locate_table(tables or tables_dir(), device, space.name, shape,
                                           host))
    table.check_fingerprint(device, strict=strict)
    predictor = LutPredictor(table, space, shape)
    if canary == "off":
        return predictor, None
    drift = time_canary(table, device, space, shape, protocol)
    if canary == "correct":
        predictor = predictor.scaled(drift.ratio)
    return predictor, drift
