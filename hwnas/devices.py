"""Device descriptors (`devices/<name>.toml`) and the device fingerprint.

A descriptor names a backend, a precision, a thread count and backend options. Dataclass
defaults are the configuration; the TOML only overrides them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from hwnas.backends import get_backend
from hwnas.errors import UserError

_REPO = Path(__file__).resolve().parents[1]


def repo_dir(name: str, env: str) -> Path:
    """`$env` if set, else `<checkout>/<name>` when running from a checkout, else `./<name>`."""
    if os.environ.get(env):
        return Path(os.environ[env])
    if (_REPO / "pyproject.toml").is_file():
        return _REPO / name
    return Path.cwd() / name


def devices_dir() -> Path:
    return repo_dir("devices", "HWNAS_DEVICES")


@dataclass(frozen=True)
class Device:
    name: str
    backend: str
    precision: str = "fp32"
    threads: int = 1
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self, volatile: bool = True) -> dict[str, Any]:
        """What a measurement on this device depends on: hardware, OS, backend and versions.
        `volatile=False` leaves out compiler facts that change as a backend's caches fill (a
        TVM tuning database's id), for naming the host before those caches exist."""
        backend = get_backend(self.backend)
        compiler = (backend.compiler(self, volatile) if backend.volatile_compiler_keys
                    else backend.compiler(self))
        return {
            "cpu_model": cpu_model(),
            "cpu_isa": cpu_isa(),
            "logical_cores": os.cpu_count(),
            "machine": platform.machine(),
            "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "backend": self.backend,
            "precision": self.precision,
            "threads": self.threads,
            "options": self.options,
            "packages": package_versions(),
            "gpus": gpu_info(),
            "uses_gpu": backend.uses_gpu(self),
            **({"compiler": compiler} if compiler is not None else {}),
        }


# the fields whose difference makes a stored latency untrustworthy here
FINGERPRINT_MUST_MATCH = ("cpu_model", "cpu_isa", "logical_cores", "machine", "backend",
                          "precision", "threads", "options", "compiler")


def fingerprint_diff(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences in the fields that matter (and the backend's version)."""
    diffs = [f"{k}: {stored.get(k)!r} → {current.get(k)!r}" for k in FINGERPRINT_MUST_MATCH
             if stored.get(k) != current.get(k)]
    # a GPU device's latency belongs to its GPU and driver; a CPU device ignores what GPUs exist
    if current.get("uses_gpu") and stored.get("gpus") != current.get("gpus"):
        diffs.append(f"gpus: {stored.get('gpus')!r} → {current.get('gpus')!r}")
    backend = get_backend(current["backend"])
    a = backend.version(stored.get("packages", {}))
    b = backend.version(current.get("packages", {}))
    if a != b:
        diffs.append(f"{backend.name}: {a} → {b}")
    return diffs


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


_ISA = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
        "amx_int8", "avx_vnni", "asimd", "sve")


def cpu_isa() -> list[str]:
    """The vector ISA extensions kernels are chosen by ('model name' alone can be generic)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in _ISA if f in have]
    except OSError:
        pass
    return []


@functools.lru_cache(maxsize=1)
def _gpu_info() -> tuple[tuple[tuple[str, str], ...], ...]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run([exe, "--query-gpu=name,driver_version,memory.total,compute_cap",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    gpus = []
    for line in out.strip().splitlines():
        parts = [x.strip() for x in line.split(",")]
        if len(parts) == 4:
            gpus.append(tuple(zip(("name", "driver", "memory", "compute_cap"), parts)))
    return tuple(gpus)


def gpu_info() -> list[dict[str, str]]:
    """NVIDIA GPUs on this host (name, driver, memory, compute capability) from nvidia-smi;
    empty where there is none. Read once per process (nvidia-smi takes ~0.1 s)."""
    return [dict(g) for g in _gpu_info()]


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("hwnas", "numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu",
                "apache-tvm", "tensorrt", "tensorrt-cu12", "tensorrt-cu13"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def fingerprint_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


def list_devices() -> list[Device]:
    d = devices_dir()
    return [load_device(p.stem) for p in sorted(d.glob("*.toml"))]


def load_device(name: str) -> Device:
    """`devices/<name>.toml` → `Device`; a `UserError` naming the known devices otherwise."""
    d = devices_dir()
    path = d / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(d.glob("*.toml"))) or "none"
        raise UserError(f"unknown device {name!r}; known devices: {known} "
                        f"(descriptors live in {d})")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"device descriptor {path} is not valid TOML ({e}); fix or restore it")
    unknown = set(raw) - {"backend", "precision", "threads", "description", "options"}
    if unknown or "backend" not in raw:
        raise UserError(f"device descriptor {path}: needs 'backend' and may have precision, "
                        f"threads, description, [options]; unexpected: {sorted(unknown)}")
    return Device(name=name, **raw)
