"""Profiling and validation split into shards that run on an executor: several hosts' tables in
one command, each measured on its own host's nodes.

A `Shard` is picklable and self-contained (device descriptor, space, input shape, labels,
protocol, and the host id whose timing slot it must run on). `run_shard` runs on the worker:
it checks that the worker *is* that host (its fingerprint's host id), measures the labels
interleaved with the protocol (`measure_labelled`), and returns the stats with the worker's
fingerprint. It journals its rounds on the worker (``$HWNAS_FLEET_SCRATCH``, default
``<tmp>/hwnas-fleet``), so a retry on the same node after its worker was killed resumes the
rounds instead of starting over.

`profile_hosts` plans each host's table on the driver exactly as `hwnas profile` does
(`plan_profile`: the missing ops, the calibration candidates and the canary), splits the labels
round-robin into one shard per timing slot of that host (or `shard_size` labels each), and
records every finished shard in ``<table>.shards.partial.json`` as it arrives: a killed driver
rerun with the same command submits only the shards that are not there. Rows enter the table
once, when all of its shards are in; a shard retried after a kill returns its labels once, so
nothing is duplicated or lost. With one slot per host (the default) the shard is the whole
plan, measured interleaved as in-process; with several, each shard interleaves its own labels
(ops and candidates mixed, round-robin).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from hwnas.devices import Device
from hwnas.errors import UserError
from hwnas.fileio import atomic_write_text
from hwnas.fleet import slot_resource
from hwnas.hosts import host_id
from hwnas.latency.profile import (ProfileReport, clean_profile_orphans, contention_check,
                                   finish_profile, label_builder, measure_labelled,
                                   plan_profile)
from hwnas.latency.table import table_path
from hwnas.locks import output_lock
from hwnas.measure import Contention, LatencyStats, Protocol
from hwnas.spaces import get_space
from hwnas.spaces.base import SearchSpace, Shape

SCRATCH_ENV = "HWNAS_FLEET_SCRATCH"
JOURNAL_FORMAT = "hwnas-shards/1"


def scratch_dir() -> Path:
    return Path(os.environ.get(SCRATCH_ENV) or Path(tempfile.gettempdir()) / "hwnas-fleet")


@dataclass(frozen=True)
class Shard:
    """One timing task: `labels` (op key strings and arch strings of `space`) measured
    interleaved on `device`, on a node of host `host`."""

    device: Device
    space: str
    input_shape: Shape
    host: str
    labels: tuple[str, ...]
    protocol: Protocol

    @property
    def key(self) -> str:
        """Names the shard (its journals): the same work has the same key."""
        doc = [asdict(self.device), self.space,
               list(self.input_shape), self.host, list(self.labels), self.protocol.to_dict()]
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def placement(self) -> dict:
        """Ray options: one timing slot of the device on the host, and its threads' CPUs."""
        return {"resources": {slot_resource(self.device.name, self.host): 1},
                "num_cpus": self.device.threads}


@dataclass
class ShardResult:
    """What a worker sends back: stats by label, its fingerprint and host id, the contention
    of its rounds, the rounds it took over from its own journal, and its process id."""

    key: str
    host: str
    fingerprint: dict[str, Any]
    stats: dict[str, LatencyStats]
    contention: Contention
    resumed_rounds: int
    pid: int

    def to_dict(self) -> dict:
        return {**asdict(self), "stats": {k: v.to_dict() for k, v in self.stats.items()},
                "contention": asdict(self.contention)}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardResult":
        return cls(d["key"], d["host"], d["fingerprint"],
                   {k: LatencyStats(**v) for k, v in d["stats"].items()},
                   Contention(**d["contention"]), int(d["resumed_rounds"]), int(d["pid"]))


def probe(job: tuple[Device, str]) -> dict[str, Any]:
    """On the worker: its fingerprint for `device`, checked to be host `host`'s."""
    device, host = job
    fp = device.fingerprint()
    _check_host(fp, device, host)
    return fp


def _check_host(fp: dict, device: Device, host: str) -> None:
    here = host_id(fp)
    if here != host:
        raise UserError(f"a node advertises {slot_resource(device.name, host)} but measures as "
                        f"host {here}: restart it with `hwnas fleet start` so that its resources "
                        "name its own host")


def run_shard(shard: Shard) -> ShardResult:
    """On the worker: measure the shard's labels with the protocol, journaled locally."""
    fp = shard.device.fingerprint()
    _check_host(fp, shard.device, shard.host)
    space = get_space(shard.space)
    keys = {str(k): k for k in space.unique_op_keys(shard.input_shape, shard.device.precision)}
    scratch = scratch_dir()
    scratch.mkdir(parents=True, exist_ok=True)
    journal = scratch / f"{shard.key}.partial.json"
    pid_file = scratch / f"{shard.key}.pid"
    atomic_write_text(pid_file, f"{os.getpid()}\n")  # who is measuring it (tests kill it)
    got = measure_labelled(list(shard.labels), label_builder(space, shard.input_shape, keys),
                           shard.device, shard.protocol, journal, progress=False)
    result = ShardResult(shard.key, shard.host, fp, got.stats, got.contention,
                         got.resumed_rounds, os.getpid())
    journal.unlink(missing_ok=True)
    pid_file.unlink(missing_ok=True)
    return result


def split(labels: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """`labels` round-robin into at most `n` non-empty shards (ops and candidates mixed)."""
    n = max(1, min(n, len(labels)))
    return [tuple(labels[i::n]) for i in range(n)]


def _load_journal(path: Path, labels: list[str], protocol: Protocol) -> tuple[int | None, dict]:
    """(shards, finished results by key) of an earlier run of the same plan, else (None, {})."""
    try:
        doc = json.loads(path.read_text())
        if (doc.get("format") == JOURNAL_FORMAT and doc.get("labels") == labels
                and doc.get("protocol") == protocol.to_dict()):
            return int(doc["shards"]), {k: ShardResult.from_dict(v)
                                        for k, v in doc["results"].items()}
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError, AttributeError):
        pass  # an unreadable journal costs only its shards
    return None, {}


def profile_hosts(executor, device: Device, space: SearchSpace, input_shape: Shape, root: Path,
                  hosts: dict[str, int], protocol: Protocol = Protocol(),
                  calibration_n: int = 20, seed: int = 0, shard_size: int | None = None,
                  progress: bool = True, require_quiet: bool = False) -> list[ProfileReport]:
    """Build or resume the tables of `device` for every host in `hosts` (host id → timing
    slots) on `executor`, each on its own host's nodes; one report per host."""
    root = Path(root)
    with contextlib.ExitStack() as stack:
        for h in hosts:  # one run per table, as in-process
            path = table_path(root, device, space.name, input_shape, h)
            stack.enter_context(output_lock(path))
            clean_profile_orphans(path, root)
        fps = dict(zip(hosts, executor.map(
            probe, [(device, h) for h in hosts],
            placement=lambda job: {"resources": {slot_resource(device.name, job[1]): 0.01},
                                   "num_cpus": 0})))
        plans = {h: plan_profile(device, space, input_shape, root, protocol, calibration_n, seed,
                                 fingerprint=fps[h]) for h in hosts}
        journals = {h: p.table.path.with_suffix(".shards.partial.json") for h, p in plans.items()}
        done: dict[str, dict[str, ShardResult]] = {}
        todo: list[Shard] = []
        n_shards: dict[str, int] = {}
        for h, plan in plans.items():
            n, done[h] = _load_journal(journals[h], plan.labels, protocol)
            if n is None:
                n = (-(-len(plan.labels) // shard_size) if shard_size else hosts[h])
            n_shards[h] = n
            for labels in (split(plan.labels, n) if plan.labels else []):
                shard = Shard(device, space.name, tuple(input_shape), h, labels, protocol)
                if shard.key not in done[h]:
                    todo.append(shard)
        total = sum(len(d) for d in done.values()) + len(todo)
        bar = tqdm(total=total, initial=total - len(todo), unit="shard", disable=not progress,
                   desc=f"profiling {space.name} on {len(hosts)} host(s)", dynamic_ncols=True)

        def arrived(i: int, res: ShardResult) -> None:
            h = todo[i].host
            done[h][res.key] = res
            atomic_write_text(journals[h], json.dumps({
                "format": JOURNAL_FORMAT, "labels": plans[h].labels,
                "protocol": protocol.to_dict(), "shards": n_shards[h],
                "results": {k: r.to_dict() for k, r in done[h].items()}}))
            bar.update(1)

        executor.map(run_shard, todo, placement=Shard.placement, on_result=arrived)
        bar.close()
        reports = []
        for h, plan in plans.items():
            results = [done[h][k] for k in sorted(done[h])]
            if not plan.labels:
                reports.append(finish_profile(plan, space, input_shape, root, device, None, None,
                                              fingerprint=fps[h]))
                continue
            stats: dict[str, LatencyStats] = {}
            for r in results:
                stats.update(r.stats)
            missing = [lb for lb in plan.labels if lb not in stats]
            if missing:
                raise RuntimeError(f"shards of {h} did not measure {missing[:3]}")
            contention = Contention.combine([r.contention for r in results])
            contention_check(contention, plan.table.path.name, require_quiet, journals[h])
            reports.append(finish_profile(
                plan, space, input_shape, root, device, stats, contention,
                fingerprint=results[0].fingerprint,
                resumed_rounds=sum(r.resumed_rounds for r in results)))
            journals[h].unlink(missing_ok=True)
        return reports


def measure_on_host(executor, device: Device, host: str, space: SearchSpace, input_shape: Shape,
                    groups: Sequence[Sequence[str]], protocol: Protocol,
                    on_result: Callable[[int, ShardResult], None]) -> list[ShardResult]:
    """Measure each group of labels (arch strings) as one shard on host `host`'s nodes (what
    `hwnas validate --cluster` times)."""
    shards = [Shard(device, space.name, tuple(input_shape), host, tuple(g), protocol)
              for g in groups]
    return executor.map(run_shard, shards, placement=Shard.placement, on_result=on_result)
