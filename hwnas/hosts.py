"""Hosts: which machine (and which backend build) a latency table belongs to.

A device descriptor says *how* to run a model (backend, precision, options); a host says *where*.
Latency depends on both, so a table lives under ``<tables>/<device>/<host id>/``. The host id is
derived from the fingerprint fields that change latency: the CPU model and vector ISA, the
logical core count and architecture, the GPUs (for a device that runs on one), and the backend's
package version and compiler identity (`Backend.host_facts`). It reads like
``amd-epyc-avx512-2c-1a2b3c4d``: a slug a person can recognise, then a hash of every field, so
two hosts that only differ in an onnxruntime version never share a table.

`latency_tables/hosts.json` is the readable index: host id → those fields, the devices with
tables there, and when each was first seen.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from hwnas.errors import UserError

INDEX = "hosts.json"
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{2,80}$")


def host_key(fp: dict[str, Any]) -> dict[str, Any]:
    """The fields of a device fingerprint (`Device.fingerprint()`, live or stored in a table's
    sidecar) that make a latency belong to one host."""
    from hwnas.backends import get_backend

    backend = get_backend(fp["backend"])
    key = {k: fp.get(k) for k in ("cpu_model", "cpu_isa", "logical_cores", "machine")}
    key["backend"] = fp["backend"]
    key["backend_version"] = backend.version(fp.get("packages", {}))
    key.update(backend.host_facts(fp))
    if fp.get("uses_gpu"):
        key["gpus"] = fp.get("gpus")
    return key


def _slug(key: dict[str, Any]) -> str:
    model = re.sub(r"\((r|tm)\)", "", str(key.get("cpu_model") or "cpu").lower())
    model = re.sub(r"\b(processor|cpu|\d+-core)\b|@.*$", "", model)
    words = re.findall(r"[a-z0-9]+", model)[:4] or ["cpu"]
    isa = key.get("cpu_isa") or []
    top = next((name for flag, name in (("amx_tile", "amx"), ("avx512f", "avx512"),
                                        ("avx2", "avx2"), ("sve", "sve"), ("asimd", "neon"))
                if flag in isa), "")
    gpu = ""
    if key.get("gpus"):
        gpu = "-" + "-".join(re.findall(r"[a-z0-9]+", key["gpus"][0]["name"].lower())[-2:])
    return "-".join(words + ([top] if top else []) + [f"{key.get('logical_cores')}c"]) + gpu


def host_id(fp: dict[str, Any]) -> str:
    """``<readable slug>-<8 hex digits of the host key>``."""
    key = host_key(fp)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    return f"{_slug(key)}-{digest}"


def check_host_id(text: str) -> str:
    """A host id as a user may type it: lowercase letters, digits and dashes (never a path)."""
    if not _ID.match(text):
        raise UserError(f"host id {text!r} is not a host id (like amd-epyc-avx512-2c-1a2b3c4d); "
                        "`hwnas tables` lists the known ones")
    return text


def known_hosts(root: Path, device: str) -> list[str]:
    """Host ids with a folder of tables for `device` under `root`."""
    d = Path(root) / device
    return sorted(p.name for p in d.iterdir() if p.is_dir() and _ID.match(p.name)
                  and any(p.glob("*.csv"))) if d.is_dir() else []


def load_index(root: Path) -> dict[str, Any]:
    path = Path(root) / INDEX
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore it (git checkout) or delete it "
                        "and let `hwnas profile` rebuild it") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} should map host ids to their facts; restore or delete it")
    return doc


def record_host(root: Path, fp: dict[str, Any], device: str, when: str) -> str:
    """Add (or update) this fingerprint's host in the index; returns its id."""
    from hwnas.fileio import atomic_write_text

    hid = host_id(fp)
    index = load_index(root)
    entry = index.get(hid) or {"first_seen": when, **host_key(fp), "devices": []}
    if device not in entry["devices"]:
        entry["devices"] = sorted(entry["devices"] + [device])
    index[hid] = entry
    atomic_write_text(Path(root) / INDEX, json.dumps(index, indent=1, sort_keys=True) + "\n")
    return hid


def describe(key: dict[str, Any]) -> str:
    """One line a person can match against `lscpu`."""
    gpus = ", ".join(g["name"] for g in key.get("gpus") or [])
    return (f"{key.get('cpu_model')}, {key.get('logical_cores')} cores, "
            f"{'/'.join((key.get('cpu_isa') or [])[-3:]) or 'no vector ISA'}, "
            f"{key.get('backend')} {key.get('backend_version')}" + (f", {gpus}" if gpus else ""))
