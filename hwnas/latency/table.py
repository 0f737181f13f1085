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
import sys
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hwnas.devices import Device, fingerprint_diff, load_device, repo_dir
from hwnas.errors import UserError
from hwnas.fileio import atomic_write_text
from hwnas.hosts import check_host_id, host_id, known_hosts
from hwnas.measure import ESTIMATES, LatencyStats
from hwnas.spaces.base import OpKey, Shape

FORMAT = 1
STAT_FIELDS = [f.name for f in fields(LatencyStats)]
COLUMNS = ["key"] + STAT_FIELDS


def tables_dir() -> Path:
    return repo_dir("latency_tables", "HWNAS_TABLES")


def shape_text(shape: Shape) -> str:
    return "x".join(str(d) for d in shape)


def table_name(space: str, input_shape: Shape) -> str:
    return f"{space}_{shape_text(input_shape)}.csv"


def host_dir(root: Path, device: Device | str, host: str | None = None) -> Path:
    """``<root>/<device>/<host>/``: a device's tables (and evidence) on one host; `host`
    defaults to this host's id."""
    if isinstance(device, str):
        device = load_device(device)
    return Path(root) / device.name / (host or host_id(device.fingerprint()))


def table_path(root: Path, device: Device | str, space: str, input_shape: Shape,
               host: str | None = None) -> Path:
    """``<root>/<device>/<host>/<space>_<NxCxHxW>.csv``; `host` defaults to this host's id."""
    return host_dir(root, device, host) / table_name(space, input_shape)


def profile_command(device: str, space: str, input_shape: Shape) -> str:
    return f"hwnas profile --device {device} --space {space} --input {shape_text(input_shape)}"


def locate_table(root: Path, device: Device, space: str, input_shape: Shape,
                 host: str | None = None) -> Path:
    """The table to price with: this host's, or `host`'s when forced (with a warning).

    Without this host's table, a `UserError` names the exact `hwnas profile` command, and the
    hosts that do have one (for `--host`); an old-layout table (before hosts) asks for
    `hwnas tables migrate`."""
    root = Path(root)
    here = host_id(device.fingerprint())
    name = table_name(space, input_shape)
    legacy = root / device.name / name
    if legacy.is_file():
        raise UserError(f"{legacy} is a table from before tables were kept per host; move it "
                        f"under its host with `hwnas tables migrate --tables {root}`")
    if host is not None:
        check_host_id(host)
        known = known_hosts(root, device.name)
        if host not in known:
            raise UserError(f"unknown host id {host!r} for device {device.name}; hosts with "
                            f"tables: {', '.join(known) or 'none'} (`hwnas tables`)")
        if host != here:
            print(f"warning: pricing with host {host}'s table, not this host's ({here}): "
                  "latencies measured on another machine may not hold here", file=sys.stderr)
        return root / device.name / host / name
    path = root / device.name / here / name
    if not path.is_file():
        others = [h for h in known_hosts(root, device.name)
                  if (root / device.name / h / name).is_file()]
        hint = (f"; or use another host's table with --host ID (at your own risk): "
                f"{', '.join(others)}" if others else "")
        raise UserError(f"no {device.name} table for {space} @ {shape_text(input_shape)} on this "
                        f"host ({here}); build it with `{profile_command(device.name, space, input_shape)}`"
                        f"{hint}")
    return path


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


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
    def host(self) -> str:
        return self.meta["host"]

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
            if not isinstance(meta.get("host"), str):
                raise ValueError("it names no host (a table from before tables were kept per "
                                 "host: `hwnas tables migrate` moves it under its host)")
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
                key = cls.parse_key(rec[0])
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
        if isinstance(meta.get("rows"), int) and meta["rows"] != len(rows):
            raise UserError(f"latency table {path} has {len(rows)} rows but its sidecar recorded "
                            f"{meta['rows']}: rows were added or deleted by hand; {fix}")
        return cls(path, meta, rows)

    @classmethod
    def parse_key(cls, text: str) -> str:
        """A row's key in canonical form; `ValueError` if malformed (a table of other row
        names, such as `hwnas.quant.latency.MixedTable`, overrides it)."""
        return str(OpKey.parse(text))

    def check_fingerprint(self, device: Device, strict: bool = False) -> list[str]:
        """Compare the stored fingerprint with this machine: warn, or refuse when `strict`."""
        diffs = fingerprint_diff(self.meta["fingerprint"], device.fingerprint())
        if diffs:
            msg = (f"latency table {self.path} was measured on another machine or setup "
                   f"({'; '.join(diffs)})")
            if strict:
                raise UserError(msg + "; rebuild it with `hwnas profile` (--tables DIR for a "
                                "separate folder), or drop --strict to use it anyway")
            print(f"warning: {msg}; predictions may not hold here", file=sys.stderr)
        return diffs


def new_table(path: Path, device: Device, space: str, input_shape: Shape,
              protocol: dict[str, Any], fingerprint: dict[str, Any] | None = None
              ) -> LatencyTable:
    """An empty table; `fingerprint` is the measuring machine's (default: this one's, as
    `device.fingerprint()`; a fleet worker's when the table is built on another node)."""
    fp = fingerprint if fingerprint is not None else device.fingerprint()
    meta = {"format": FORMAT, "device": device.name, "host": host_id(fp), "space": space,
            "input_shape": list(input_shape), "fingerprint": fp,
            "protocol": protocol, "created": now_iso(),
            "statistic": ESTIMATES[protocol.get("estimate", "lowest")],
            "calibration": None}
    return LatencyTable(path, meta)


def _fmt(v: float | int) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"
