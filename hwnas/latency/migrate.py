"""`hwnas tables migrate`: tables from before hosts move under their host, unchanged in content.

The old layout was ``<tables>/<device>/<space>_<NxCxHxW>.{csv,json}`` with the evidence beside it
(``.validation.{csv,png}``, ``noise.json``, a TVM ``tuning_db/``). Each table's host id is
computed from the fingerprint its sidecar recorded (never from the machine running the
migration), the sidecar gains ``host`` and, where it had none, a ``canary`` taken from its own
calibration (the uniform choice-0 candidate is always the calibration's first), and the files
move to ``<tables>/<device>/<host id>/``. Rows are not touched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hwnas.errors import UserError
from hwnas.fileio import atomic_write_text
from hwnas.hosts import host_id, record_host
from hwnas.latency.profile import CANARY_WHAT

# evidence that sits beside a device's tables and belongs to the same host
_BESIDE = ("noise.json", "tuning_db")


def legacy_tables(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).glob("*/*.csv")
                  if p.with_suffix(".json").is_file() and ".validation" not in p.name
                  and not p.name.endswith(".vs_ort.csv"))


def migrate(root: Path) -> list[dict]:
    """Move every old-layout table under `root` to its host; returns what moved where."""
    root = Path(root)
    moved = []
    for csv_path in legacy_tables(root):
        sidecar = csv_path.with_suffix(".json")
        try:
            meta = json.loads(sidecar.read_text())
            fp = meta["fingerprint"]
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{sidecar} is not a table sidecar ({e}); restore it before "
                            "migrating") from None
        hid = host_id(fp)
        dest = csv_path.parent / hid
        if (dest / csv_path.name).exists():
            raise UserError(f"{dest / csv_path.name} exists already; move one of the two away "
                            "before migrating")
        dest.mkdir(parents=True, exist_ok=True)
        meta["host"] = hid
        cal = meta.get("calibration") or {}
        if not meta.get("canary") and cal.get("archs"):
            meta["canary"] = {"arch": cal["archs"][0], "latency_ms": cal["measured_ms"][0],
                              "measured": meta.get("updated") or meta.get("created"),
                              "source": "the calibration's measurement of this candidate "
                                        "(migrated table)", "what": CANARY_WHAT}
        stem = csv_path.stem
        files = [p for p in csv_path.parent.iterdir()
                 if p.is_file() and p.name.startswith(stem + ".") and p != sidecar]
        files += [csv_path.parent / n for n in _BESIDE if (csv_path.parent / n).exists()]
        for f in files:
            shutil.move(str(f), str(dest / f.name))
        atomic_write_text(dest / sidecar.name, json.dumps(meta, indent=1, sort_keys=True) + "\n")
        sidecar.unlink()
        record_host(root, fp, meta["device"], meta.get("created", ""))
        moved.append({"table": str(dest / csv_path.name), "host": hid,
                      "moved": sorted(f.name for f in files)})
    return moved
