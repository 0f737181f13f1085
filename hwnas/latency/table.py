"""The latency lookup table: rows keyed by `OpKey` string, metadata in a JSON sidecar.

On disk: ``<dir>/<device>/<space>_<NxCxHxW>.csv`` (reviewable in git) and ``… .json`` (device,
fingerprint, protocol, versions, dates, calibration). Both are written atomically (temp file +
rename), so a kill never leaves half a file; a file that is malformed anyway (edited by hand,
truncated by a copy) is refused with the line that is wrong, never silently repaired.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hwnas.devices import Device, fingerprint_diff, repo_dir
from hwnas.errors import UserError
from hwnas.measure import LatencyStats
from hwnas.spaces.base import OpKey, Shape

FORMAT = 1
STAT_FIELDS = [f.name for f in fields(LatencyStats)]
COLUMNS = ["key"] + STAT_FIELDS


def tables_dir() -> Path:
    return repo_dir("latency_tables", "HWNAS_TABLES")


def shape_text(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def table_path(root: Path, device: str, space: str, input_shape: Shape) -> Path:
    return Path(root) / device / f"{space}_{shape_text(input_shape)}.csv"


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class LatencyTable:
    """Measured op latencies for one (device, space, input shape). `meta` is the sidecar."""

    path: Path
    meta: dict[str, Any]
    rows: dict[str, LatencyStats] = field(default_factory=dict)

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")

    @property
    def device(self) -> str:
        return self.meta["device"]

    @property
    def precision(self) -> str:
        """The precision of the ops in this table (the device's)."""
        return self.meta["fingerprint"].get("precision", "fp32")

    def latency_ms(self, key: OpKey | str) -> float | None:
        row = self.rows.get(str(key))
        return None if row is None else row.best_ms

    # ---- saving ------------------------------------------------------------------------------
    def save(self) -> None:
        """Write CSV and sidecar atomically (rows sorted by key, so diffs are reviewable)."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(COLUMNS)
        for key in sorted(self.rows):
            r = self.rows[key]
            w.writerow([key] + [_fmt(getattr(r, f)) for f in STAT_FIELDS])
        self.meta["updated"] = now_iso()
        self.meta["rows"] = len(self.rows)
        atomic_write_text(self.sidecar, json.dumps(self.meta, indent=1, sort_keys=True) + "\n")
        atomic_write_text(self.path, buf.getvalue())

    # ---- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        """Read and check a table; every malformation is a `UserError` naming file and line."""
        path = Path(path)
        fix = (f"restore it (e.g. `git checkout -- {path}`), or move it away and rebuild it with "
               "`hwnas profile`")
        if not path.is_file():
            raise UserError(f"no latency table at {path}; build it with `hwnas profile`")
        sidecar = path.with_suffix(".json")
        try:
            meta = json.loads(sidecar.read_text())
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError("not a format-1 sidecar")
            for k in ("device", "space", "input_shape", "fingerprint", "protocol"):
                if k not in meta:
                    raise ValueError(f"missing {k!r}")
        except FileNotFoundError:
            raise UserError(f"latency table {path} has no sidecar {sidecar.name}; {fix}") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"latency table sidecar {sidecar} is malformed ({e}); {fix}") from None
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise UserError(f"latency table {path} is not text; {fix}") from None
        if text and not text.endswith("\n"):
            raise UserError(f"latency table {path} is truncated (its last line is cut off); {fix}")
        rows: dict[str, LatencyStats] = {}
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header != COLUMNS:
            raise UserError(f"latency table {path} line 1: expected header {','.join(COLUMNS)}; "
                            f"{fix}")
        for lineno, rec in enumerate(reader, start=2):
            try:
                if len(rec) != len(COLUMNS):
                    raise ValueError(f"{len(rec)} fields, expected {len(COLUMNS)}")
                key = str(OpKey.parse(rec[0]))
                vals = [float(x) for x in rec[1:]]
                if not all(math.isfinite(v) and v >= 0 for v in vals):
                    raise ValueError("values must be finite and non-negative")
                stats = LatencyStats(*[int(v) if f == "n" else v
                                       for f, v in zip(STAT_FIELDS, vals)])
                if stats.best_ms <= 0:
                    raise ValueError("latency must be positive")
            except ValueError as e:
                raise UserError(f"latency table {path} line {lineno}: {e}; {fix}") from None
            if key in rows:
                raise UserError(f"latency table {path} line {lineno}: duplicate key {key}; {fix}")
            rows[key] = stats
        return cls(path, meta, rows)

    def check_fingerprint(self, device: Device, strict: bool = False) -> list[str]:
        """Compare the stored fingerprint with this machine: warn, or refuse when `strict`."""
        diffs = fingerprint_diff(self.meta["fingerprint"], device.fingerprint())
        if diffs:
            msg = (f"latency table {self.path} was measured on another machine or setup "
                   f"({'; '.join(diffs)})")
            if strict:
                raise UserError(msg + "; rebuild it here with `hwnas profile --tables DIR`, or "
                                "drop --strict to use it anyway")
            print(f"warning: {msg}; predictions may not hold here", file=sys.stderr)
        return diffs


def new_table(path: Path, device: Device, space: str, input_shape: Shape,
              protocol: dict[str, Any]) -> LatencyTable:
    meta = {"format": FORMAT, "device": device.name, "space": space,
            "input_shape": list(input_shape), "fingerprint": device.fingerprint(),
            "protocol": protocol, "created": now_iso(),
            "statistic": "latency_ms = best_ms: the lowest per-round median of the protocol",
            "calibration": None}
    return LatencyTable(path, meta)


def _fmt(v: float | int) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"
