"""Pause other work on this host while hwnas times something, and resume it afterwards.

On a 2-core host a training job running beside a measurement distorts the measurement. Start
the measuring side with ``HWNAS_MEASURING_FLAG=/tmp/hwnas-measuring`` in its environment (every
`hwnas.measure.measure_interleaved` call then holds that file while it times), and the gate on
the other side:

  python tools/quiet_gate.py --flag /tmp/hwnas-measuring PID [PID ...]

The gate sends SIGSTOP to the PIDs while the flag file exists (and names a live process) and
SIGCONT otherwise, until all PIDs have exited. With ``--all-python`` instead of PIDs, it pauses
every other Python process on the host (not the measuring process, its parents or children, nor
itself) while the flag is held, until the measuring side writes ``--until`` (a file) — for a
host shared with test suites that cannot be gated one by one. Compiling, exporting and tuning-free phases of the
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
    ap.add_argument("--all-python", action="store_true")
    ap.add_argument("--until", type=Path, default=None,
                    help="with --all-python: stop when this file exists")
    ap.add_argument("pids", type=int, nargs="*")
    args = ap.parse_args()
    if args.all_python:
        return gate_all_python(args.flag, args.until, args.poll_s)
    if not args.pids:
        ap.error("give PIDs, or --all-python")
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


def _others(holder: int) -> list:
    """Python processes that are neither the flag holder's family nor this gate."""
    import psutil

    try:
        h = psutil.Process(holder)
        family = {holder, os.getpid(), *(p.pid for p in h.parents()),
                  *(p.pid for p in h.children(recursive=True))}
    except psutil.Error:
        return []
    out = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.pid not in family and "python" in (p.info["name"] or "") + cmd[:60]:
                out.append(p)
        except psutil.Error:
            continue
    return out


def gate_all_python(flag: Path, until: Path | None, poll_s: float) -> None:
    stopped, last_scan = [], 0.0
    try:
        while until is None or not until.exists():
            try:
                holder = int(flag.read_text().split()[0]) if measuring(flag) else None
            except (OSError, ValueError, IndexError):
                holder = None
            # (re)scan about once a second: a process started meanwhile is paused too
            if holder is not None and time.monotonic() - last_scan > (1.0 if stopped else 0.0):
                last_scan = time.monotonic()
                known = {p.pid for p in stopped}
                new = [p for p in _others(holder) if p.pid not in known]
                for p in new:
                    try:
                        p.suspend()
                        stopped.append(p)
                    except Exception:  # gone meanwhile
                        pass
                if new:
                    print(f"{time.strftime('%H:%M:%S')} paused {len(new)}", file=sys.stderr,
                          flush=True)
            elif holder is None and stopped:
                for p in stopped:
                    try:
                        p.resume()
                    except Exception:
                        pass
                stopped = []
                print(f"{time.strftime('%H:%M:%S')} resumed", file=sys.stderr, flush=True)
            time.sleep(poll_s)
    finally:
        for p in stopped:
            try:
                p.resume()
            except Exception:
                pass


if __name__ == "__main__":
    main()
