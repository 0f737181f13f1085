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


@pytest.fixture(scope="session")
def tiny_tables(tmp_path_factory, device, tiny):
    """A complete, calibrated tiny LUT (built once per session), as a tables folder."""
    root = tmp_path_factory.mktemp("tables")
    profile(device, tiny, tiny.default_input, root, FAST, calibration_n=8, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_mixed_tables(tmp_path_factory, device):
    """A calibrated LUT of the per-layer-choice space `tiny-mixed`."""
    root = tmp_path_factory.mktemp("mixed_tables")
    space = get_space("tiny-mixed")
    profile(device, space, space.default_input, root, FAST, calibration_n=7, progress=False)
    return root


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
