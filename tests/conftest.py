"""Shared fixtures: real components (onnxruntime sessions, real exports) on tiny inputs."""

import shutil
import subprocess
import sys

import pytest

from hwnas.devices import load_device
from hwnas.latency.profile import profile
from hwnas.measure import Protocol
from hwnas.spaces import get_space

# a protocol that is fast enough for tests; its numbers are never asserted
FAST = Protocol(warmup_ms=5, min_warmup=2, rounds=3, span_s=0.0, round_ms=2.0, min_reps=2)


@pytest.fixture(scope="session")
def device():
    return load_device("cpu-ort-fp32")


@pytest.fixture(scope="session")
def tiny():
    return get_space("tiny")


def profiled(tmp_path_factory, device, space_name: str, calibration_n: int):
    """A tables folder holding a complete, calibrated LUT of `space_name` (FAST protocol)."""
    root = tmp_path_factory.mktemp(f"tables-{space_name}")
    space = get_space(space_name)
    profile(device, space, space.default_input, root, FAST, calibration_n=calibration_n,
            progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_tables(tmp_path_factory, device):
    """A complete, calibrated tiny LUT (built once per session), as a tables folder."""
    return profiled(tmp_path_factory, device, "tiny", 8)


@pytest.fixture(scope="session")
def tiny_mixed_tables(tmp_path_factory, device):
    """A calibrated LUT of the per-layer-choice space `tiny-mixed`."""
    return profiled(tmp_path_factory, device, "tiny-mixed", 7)


@pytest.fixture(scope="session")
def fcos_tables(tmp_path_factory, device):
    """A calibrated LUT of the detector space `tiny-fcos` (backbone, FPN, head, NMS ops)."""
    return profiled(tmp_path_factory, device, "tiny-fcos", 6)


@pytest.fixture
def tables_copy(tiny_tables, tmp_path):
    """A private copy of the tiny LUT that a test may damage."""
    dst = tmp_path / "tables"
    shutil.copytree(tiny_tables, dst)
    return dst


def run_cli(*args, check_rc=None, timeout=300):
    """Run `python -m hwnas ARGS` in a fresh process, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "hwnas", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


SMALL = {"train": 64, "val": 20, "test": 20}


@pytest.fixture(scope="session")
def splits(tmp_path_factory):
    """Small proxy splits of the built-in `shapes` data at 32 px, generated into a private cache."""
    import os

    from hwnas.data import load_data

    old = os.environ.get("HWNAS_CACHE")
    os.environ["HWNAS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return load_data("shapes", 32, SMALL)
    finally:
        if old is None:
            os.environ.pop("HWNAS_CACHE")
        else:
            os.environ["HWNAS_CACHE"] = old


def class_folders(root, size=16, per_class=6):
    """Two class folders ('a', 'b') of random `size`-px PNGs under `root`; returns `root`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png")
    return root
