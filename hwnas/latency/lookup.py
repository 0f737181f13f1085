"""Opening a predictor, the one way: this host's table (or a forced foreign one), its
fingerprint checked, and optionally the canary re-timed to measure the host's drift since the
table was made.

Why the canary: this class of host does not keep one uncontended speed. A table checked at
12:13 on an AMD EPYC host was +2.7% off; the same table at 13:40, on a quiet host, was +15.5%
off with every candidate off by 14–18% alike (rank order intact). Timing one fixed candidate now
and dividing by its time in the table measures that drift in a few seconds; `--canary correct`
scales every prediction by it. The canary stands with a few more reference candidates from the
table's calibration (`DRIFT_REFS`), and the drift is their median ratio.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from hwnas.devices import Device, load_device
from hwnas.errors import UserError
from hwnas.latency.predict import LutPredictor
from hwnas.latency.table import LatencyTable, locate_table, now_iso, tables_dir
from hwnas.measure import Protocol
from hwnas.spaces import SearchSpace, get_space
from hwnas.spaces.base import Shape

CANARY_MODES = ("off", "report", "correct")


DRIFT_REFS = 5  # reference candidates whose median ratio is the drift: the canary and the next
# calibration candidates (the space's uniform candidates first), all timed with the table. One
# candidate's ratio carries its own noise: on the AMD host a validation right after profiling
# found the canary 4.6% faster while the held-out candidates were 2.3% faster on average, so the
# correction overshot; the median of five is steadier and costs one interleaved measurement.


@dataclass(frozen=True)
class Drift:
    """The reference candidates now vs in the table: `ratio` = the median over references of
    now / then (1.10: the host is 10% slower). `canary`, `table_ms` and `now_ms` are the canary's
    (the first reference); `refs` maps each reference to [then, now]."""

    canary: str
    table_ms: float
    now_ms: float
    table_measured: str
    now_measured: str
    refs: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if len(self.refs) > 1:
            return float(np.median([now / then for then, now in self.refs.values()]))
        return self.now_ms / self.table_ms

    def shift(self, later: dict[str, float]) -> float:
        """The host's change since this drift was timed, from the references timed again
        (`later`: label → ms; those it lacks are left out): the median ratio, 1.0 if none."""
        r = [later[k] / now for k, (_, now) in self.refs.items() if k in later]
        if not r and self.canary in later:
            r = [later[self.canary] / self.now_ms]
        return float(np.median(r)) if r else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "drift_pct": 100 * (self.ratio - 1)}

    @classmethod
    def from_dict(cls, d: dict) -> "Drift":
        return cls(d["canary"], float(d["table_ms"]), float(d["now_ms"]), d["table_measured"],
                   d["now_measured"], {k: [float(a), float(b)] for k, (a, b)
                                       in (d.get("refs") or {}).items()})

    def line(self) -> str:
        return (f"canary {self.canary}: {self.table_ms:.3f} ms in the table "
                f"({self.table_measured}), {self.now_ms:.3f} ms now; host drift "
                f"{100 * (self.ratio - 1):+.1f}% (median of {max(len(self.refs), 1)} "
                "reference candidates)")


def canary_of(table: LatencyTable) -> dict:
    c = table.meta.get("canary")
    if not c:
        raise UserError(f"latency table {table.path} has no canary (made before canaries); "
                        "re-time it with `hwnas profile` on its host, or use --canary off")
    return c


def references(table: LatencyTable, k: int = DRIFT_REFS) -> dict[str, float]:
    """The drift's reference candidates and their times in the table: the canary first, then
    the calibration candidates in order (a table without them has the canary alone)."""
    c = canary_of(table)
    refs = {c["arch"]: float(c["latency_ms"])}
    cal = table.meta.get("calibration") or {}
    names = cal.get("archs")
    if not names and cal.get("assignments"):  # a mixed-precision table: named as its canary is
        prefix = c["arch"].rpartition(":")[0] + ":"
        names = [prefix + a for a in cal["assignments"]]
    for arch, ms in zip(names or (), cal.get("measured_ms") or ()):
        if len(refs) >= k:
            break
        refs.setdefault(arch, float(ms))
    return refs


def drift_from(table: LatencyTable, now: float | dict[str, float]) -> Drift:
    """The drift from the canary's time now (a number) or the references' (label → ms)."""
    c = canary_of(table)
    if not isinstance(now, dict):
        return Drift(c["arch"], float(c["latency_ms"]), float(now), c["measured"], now_iso())
    then = references(table, len(now))
    refs = {k: [then[k], float(v)] for k, v in now.items() if k in then}
    return Drift(c["arch"], float(c["latency_ms"]), float(now[c["arch"]]), c["measured"],
                 now_iso(), refs)


SETTLE_ATTEMPTS = 3  # reference timings at most, for the host's speed now
SETTLE_AGREE_PCT = 3.0  # two timings this close (median over references) settle it
# settled this far over the table, the references are timed again after a pause: slow spells
# seen here ran +20…+29% for about a minute, the host's slower states for hours +4…+16%
SPELL_PCT = 12.0


def _median_ratio(now: dict[str, float], then: dict[str, float]) -> float:
    return float(np.median([now[k] / then[k] for k in now if k in then]))


def settled_times(time_once: Callable[[], dict[str, float]], attempts: int = SETTLE_ATTEMPTS,
                  agree_pct: float = SETTLE_AGREE_PCT, expected: dict[str, float] | None = None,
                  pause_s: float = 0.0, spell_pct: float = SPELL_PCT,
                  sleep: Callable[[float], None] | None = None,
                  note: Callable[[str], None] | None = None) -> dict[str, float]:
    """The references' times now, robust to a slow spell: timed until two consecutive timings
    agree within `agree_pct` (the median over references of their ratio), at most `attempts`
    times, each reference at its lowest. The protocol takes a measurement's lowest round for
    the same reason; on a shared host a slow spell can cover a whole short timing (once, all
    five of the detector's references ran 20–29% over the table, and within 3% of it a minute
    later), and a price scaled by that spell is a budget on a host that is gone.

    Two timings can agree inside a spell that outlasts them (a detector sweep's references
    settled at +20.5%, and its picks ran at +6.6% a minute later). So with `expected` (the
    table's times of the same references) and `pause_s` > 0, references that settled more than
    `spell_pct` over `expected` are settled again after `pause_s` seconds, each at its lowest
    of both: a spell is gone by then, a slower host is still there (the price then follows
    it); `note` hears why it waits."""
    def settle() -> dict[str, float]:
        best = time_once()
        last = best
        for _ in range(attempts - 1):
            now = time_once()
            agree = abs(_median_ratio(now, last) - 1) * 100 <= agree_pct
            best = {k: min(best[k], now[k]) for k in best}
            last = now
            if agree:
                break
        return best

    best = settle()
    if expected and pause_s > 0:
        over = (_median_ratio(best, expected) - 1) * 100
        if over > spell_pct:
            if note:
                note(f"the references ran {over:+.1f}% over the table; timing them again in "
                     f"{pause_s:.0f} s in case it is a slow spell")
            (sleep or time.sleep)(pause_s)
            again = settle()
            best = {k: min(best[k], again[k]) for k in best}
    return best


def drift_over(table: LatencyTable, groups: list[dict[str, float]]) -> Drift:
    """The drift from references timed in several groups (label → ms each): every reference at
    its median over the groups."""
    return drift_from(table, {r: float(np.median([g[r] for g in groups])) for r in groups[0]})


def check_canary_mode(mode: str) -> None:
    if mode not in CANARY_MODES:
        raise UserError(f"--canary must be one of {', '.join(CANARY_MODES)}, not {mode!r}")


def time_canary(table: LatencyTable, device: Device, space: SearchSpace, shape: Shape,
                protocol: Protocol = Protocol()) -> Drift:
    """Time the table's reference candidates now (interleaved protocol measurements until two
    agree, `settled_times`; seconds) for the host's drift since the table was made."""
    from hwnas.latency.profile import candidate_builder, measure_labelled

    labels = list(references(table))

    def once():
        got = measure_labelled(labels, candidate_builder(space, shape), device, protocol,
                               progress=False)
        return {k: got.stats[k].best_ms for k in labels}
    return drift_from(table, settled_times(once))


def open_predictor(device: str | Device, space: str | SearchSpace, shape: Shape | None = None,
                   tables: Path | None = None, host: str | None = None, strict: bool = False,
                   canary: str = "off", protocol: Protocol = Protocol(),
                   ) -> tuple[LutPredictor, Drift | None]:
    """This host's predictor for (device, space, shape), and the canary's drift if asked.

    `host` forces another host's table (with a warning); `strict` refuses a fingerprint that
    differs in anything that matters; `canary` is off, report (time it, say the drift) or
    correct (and scale every prediction by it)."""
    check_canary_mode(canary)
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
