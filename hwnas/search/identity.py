"""The inputs a search's saved scores and prices come from, as a JSON-able dict (`Search`'s
``identity=``): content hashes of the files, not their names, so a checkpoint retrained into the
same path, or a table re-profiled in place, is a different identity, and the same files reached
by another path are the same one.

`Search.identity()` adds, by itself, a digest of the latency model's prices and the accuracy
model's own identity (`SupernetScorer.identity()`: weights, data content, val_n, BN settings);
this adds what only the caller knows: which files and which device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from hwnas.fileio import sha256_file


def search_identity(device: Any, table_csv: Path, supernet: Path,
                    input_shape: Sequence[int], **extra: Any) -> dict:
    """`device`: an `hwnas.devices.Device` (its name and how it runs: backend, precision,
    threads, options); `table_csv`: the LUT's CSV (its sidecar's dates change on every resumed
    profile, and its calibration is in the price digest already); `supernet`: the checkpoint;
    `extra`: any other setting the results depend on (JSON-able)."""
    ident = {
        "device": {"name": getattr(device, "name", str(device)),
                   **{k: getattr(device, k) for k in ("backend", "precision", "threads",
                                                       "options") if hasattr(device, k)}},
        "table_sha256": sha256_file(Path(table_csv)),
        "supernet_sha256": sha256_file(Path(supernet)),
        "input_shape": [int(d) for d in input_shape],
    }
    ident.update(extra)
    return ident
