"""`output_lock`: a second process is refused at once with the holder's PID; a SIGKILLed holder's
lock is taken over; the CLI refuses a second training into one checkpoint."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import class_folders, run_cli

from hwnas import locks
from hwnas.errors import UserError


HOLD = textwrap.dedent("""
    import sys, time
    from hwnas.locks import output_lock
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def _holder(path):
    """A real process holding the lock on `path` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_holder_refused_with_pid_then_stale_lock_taken_over(tmp_path):
    out = tmp_path / "result.json"
    proc = _holder(out)
    try:
        t0 = time.monotonic()
        with pytest.raises(UserError, match=f"in use by process {proc.pid}"):
            with locks.output_lock(out):
                pass
        assert time.monotonic() - t0 < 2  # refused at once, not after waiting
        assert not locks.is_held(out)
    finally:
        proc.send_signal(signal.SIGKILL)  # dies holding the lock: no cleanup code runs
        proc.wait()
    # the lock file and the dead holder's PID are still there...
    assert str(proc.pid) in locks.lock_path(out).read_text()
    # ...but the kernel released the flock with the process, so the next run takes over
    with locks.output_lock(out) as lp:
        assert lp.read_text().split()[0] == str(os.getpid())
        with locks.output_lock(out):  # re-entrant within one process
            assert locks.is_held(out)
        assert locks.is_held(out)
    assert not locks.is_held(out)
    # released: another process can take it now
    proc = _holder(out)
    proc.kill()
    proc.wait()


def test_search_refuses_a_state_another_process_writes(tmp_path, tiny):
    from hwnas.search import RandomSearch

    class Flat:
        def predict_many(self, rows):
            return np.ones(len(rows))

        def predict(self, arch):
            return 1.0

    class Zero:
        def predict(self, archs):
            return np.zeros(len(archs))

    state = tmp_path / "s.state.json"
    proc = _holder(state)
    try:
        with pytest.raises(UserError, match=f"process {proc.pid}"):
            RandomSearch(tiny, Flat(), Zero(), 2.0, 4, 0, state_path=state).run()
        assert not state.exists()
    finally:
        proc.kill()
        proc.wait()
    assert RandomSearch(tiny, Flat(), Zero(), 2.0, 4, 0, state_path=state).run().evaluations == 4


@pytest.mark.slow
def test_cli_refuses_two_trainings_into_one_checkpoint(tmp_path):
    class_folders(tmp_path / "data")
    ck = tmp_path / "sn.pt"
    args = ["supernet", "train", "--space", "tiny", "--data", tmp_path / "data",
            "--image-size", 16, "--warmup-steps", 0, "--match-steps", 0, "--batch-size", 4,
            "--quiet", "-o", ck]
    first = subprocess.Popen([sys.executable, "-m", "hwnas", *map(str, args), "--steps",
                              "100000", "--ckpt-every", "100000"], stderr=subprocess.PIPE,
                             text=True)
    try:
        lock = locks.lock_path(ck)
        for _ in range(600):  # until the first run holds the lock (its PID is written inside)
            if lock.exists() and lock.read_text().startswith(str(first.pid)):
                break
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        else:
            pytest.fail("the first training never took the lock")
        p = run_cli(*args, "--steps", 2, check_rc=2)
        assert f"in use by process {first.pid}" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()
    run_cli(*args, "--steps", 2, check_rc=0)  # the killed run's lock is taken over
