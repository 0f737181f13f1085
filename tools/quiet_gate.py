"""Pause other work on this host while hwnas times something, and resume it afterwards.

On a 2-core host a training job running beside a measurement distorts the measurement. Start
the measuring side with ``HWNAS_MEASURING_FLAG=/tmp/hwnas-measuring`` in its environment (every
`hwnas.measure.measure_interleaved` call then holds that file while it times), and the gate on
the other side:

  python tools/quiet_gate.py --flag /tmp/hwnas-measuring PID [PID ...]

The gate sends SIGSTOP to the PIDs while the flag file exists (and names a live process) and
SIGCONT otherwise, until all PIDs have exited. Compiling, exporting and tuning-free phases of the
measuring side run beside the paused jobs' work; only the timing is kept quiet.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def measuring(flag: Path) -> bool:
    try:
        return alive(int(flag.read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flag", type=Path, required=True)
    ap.add_argument("--poll-s", type=float, default=0.2)
    ap.add_argument("pids", type=int, nargs="+")
    args = ap.parse_args()
    paused = False
    try:
        while any(alive(p) for p in args.pids):
            want = measuring(args.flag)
            if want != paused:
                for p in args.pids:
                    if alive(p):
                        os.kill(p, signal.SIGSTOP if want else signal.SIGCONT)
                paused = want
                print(f"{time.strftime('%H:%M:%S')} {'paused' if want else 'resumed'}",
                      file=sys.stderr, flush=True)
            time.sleep(args.poll_s)
    finally:
        for p in args.pids:
            if alive(p):
                os.kill(p, signal.SIGCONT)


if __name__ == "__main__":
    main()
