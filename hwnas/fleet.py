"""A device fleet on Ray: connecting, the devices each node advertises, and the Ray executor.

**Devices as resources.** A node advertises every device it can time as a Ray custom resource
named ``device:<device>@<host id>`` (`slot_resource`), one unit per timing slot (default 1).
A timing task asks for one unit, so two timing tasks never share a slot and measurements do not
disturb each other; it runs only on a node of the host whose table it builds, because the host id
is in the name (identical machines share a host id, and so the work of building that host's
table). `hwnas fleet start` computes the resources from this machine's fingerprint and runs
``ray start`` with them; `hwnas fleet status` lists the nodes and their slots.

**Safety.** Ray's token authentication stays as Ray sets it (on by default since Ray 2.52 for a
cluster `ray.init` starts; ``RAY_AUTH_MODE=token`` for `ray start`): hwnas never turns it off.
The dashboard is off unless asked for. A single-machine Ray that hwnas starts (`start_local`:
tests, benchmarks, ``hwnas fleet start --loopback``) listens on 127.0.0.1 only.

Ray is imported inside the functions here, never at module level: ``import hwnas.fleet`` costs
nothing, and a missing Ray is one line (`import_ray`).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from hwnas.errors import UserError, first_line

INSTALL = "install the ray extra: pip install -e '.[ray]'"
PREFIX = "device:"
# Ray's switch for "this machine only": nodes then bind to the loopback address (on Linux Ray
# otherwise resolves 127.0.0.1 to the machine's routable address and listens there)
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--cluster needs Ray: {INSTALL}") from None
    return ray


# ---- devices as resources ---------------------------------------------------------------------
def slot_resource(device: str, host: str) -> str:
    """The Ray resource of one timing slot of `device` on host `host`."""
    return f"{PREFIX}{device}@{host}"


def parse_slot_resource(name: str) -> tuple[str, str] | None:
    """(device, host) of a resource `slot_resource` named, else None."""
    if not name.startswith(PREFIX) or "@" not in name:
        return None
    device, _, host = name[len(PREFIX):].rpartition("@")
    return (device, host) if device and host else None


def node_resources(devices: Sequence[str], slots: int = 1) -> dict[str, float]:
    """The resources this machine advertises: `slots` units of each device's slot resource,
    for the devices usable here (a device whose backend is missing is refused, with why)."""
    from hwnas.backends import backend_available
    from hwnas.devices import load_device
    from hwnas.hosts import host_id

    if slots < 1:
        raise UserError(f"--slots must be at least 1, got {slots}")
    out = {}
    for name in devices:
        device = load_device(name)
        ok, why = backend_available(device)
        if not ok:
            raise UserError(f"device {name} cannot be timed on this machine ({why}); leave it out "
                            "of --devices")
        out[slot_resource(device.name, host_id(device.fingerprint(volatile=False)))] = float(slots)
    return out


def device_slots(device: str, resources: dict[str, float] | None = None) -> dict[str, int]:
    """Host id → timing slots of `device` in the cluster (all of its nodes together)."""
    if resources is None:
        resources = import_ray().cluster_resources()
    out = {}
    for name, units in resources.items():
        parsed = parse_slot_resource(name)
        if parsed and parsed[0] == device and units >= 1:
            out[parsed[1]] = int(units)
    return dict(sorted(out.items()))


# ---- connecting -------------------------------------------------------------------------------
def connect(address: str) -> None:
    """Join the cluster at `address` (``auto``, ``ray://HOST:PORT``, ``HOST:PORT``) unless this
    process is connected already (e.g. to a cluster `start_local` started)."""
    ray = import_ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, logging_level="warning")
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot join the Ray cluster at {address!r} ({first_line(e)}); start "
                        "one with `hwnas fleet start --head`, or drop --cluster") from None
    except ImportError as e:  # ray:// needs Ray Client (grpcio), part of the ray extra
        raise UserError(f"--cluster {address} needs {first_line(e)}: {INSTALL}") from None


def start_local(num_cpus: int = 2, resources: dict[str, float] | None = None,
                dashboard: bool = False) -> str:
    """Start a single-machine Ray in this process, listening on 127.0.0.1 only, with
    `resources` (`node_resources`); returns its address (``127.0.0.1:PORT``) for other
    processes' `--cluster`."""
    os.environ[_LOOPBACK_ENV] = "0"  # before Ray reads its constants, and for its processes
    ray = import_ray()
    import ray._private.ray_constants as constants

    constants.ENABLE_RAY_CLUSTER = False  # a Ray imported before the variable was set
    ray.init(num_cpus=num_cpus, resources=resources or {}, include_dashboard=dashboard,
             _node_ip_address="127.0.0.1", logging_level="warning")
    address = ray.get_runtime_context().gcs_address
    if not address.startswith("127."):
        ray.shutdown()
        raise RuntimeError(f"a local Ray came up on {address}, not on loopback")
    return address


def shutdown() -> None:
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


def ray_start_command(head: bool, address: str | None, resources: dict[str, float],
                      num_cpus: int | None = None, port: int = 6379,
                      node_ip: str | None = None, dashboard: bool = False) -> list[str]:
    """The ``ray start`` command line of a head (`head`) or a worker joining `address`."""
    cmd = ["ray", "start"] + (["--head", f"--port={port}"] if head else [f"--address={address}"])
    if head:
        cmd.append(f"--include-dashboard={'true' if dashboard else 'false'}")
    if node_ip:
        cmd.append(f"--node-ip-address={node_ip}")
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if resources:
        cmd.append("--resources=" + json.dumps(resources, sort_keys=True))
    return cmd


def status() -> dict[str, Any]:
    """The cluster's live nodes and the device slots each advertises."""
    ray = import_ray()
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        res = n.get("Resources", {})
        slots = {name: int(units) for name, units in sorted(res.items())
                 if parse_slot_resource(name)}
        nodes.append({"address": n.get("NodeManagerAddress"), "cpus": res.get("CPU", 0),
                      "gpus": res.get("GPU", 0), "slots": slots})
    return {"nodes": nodes, "cpus": ray.cluster_resources().get("CPU", 0)}


# ---- the executor -----------------------------------------------------------------------------
class ModelHolder:
    """A Ray actor's state: one copy of an accuracy model, loaded once (from the object store)
    when the actor starts, scoring whatever archs it is sent."""

    def __init__(self, model, threads: int = 1):
        if "torch" in sys.modules:  # the model brought it in (a supernet)
            sys.modules["torch"].set_num_threads(threads)  # one actor per CPU: no oversubscription
        self.model = model

    def predict(self, archs) -> np.ndarray:
        return np.asarray(self.model.predict(list(archs)), dtype=np.float64)

    def pid(self) -> int:
        return os.getpid()


@dataclass
class _Actors:
    model: object  # held so that its id stays this model's
    ref: object  # the model in the object store, for actors started again
    handles: list


class RayExecutor:
    """Runs work on the Ray cluster this process is connected to (`connect`, `start_local`).

    `evaluate` splits the archs into one contiguous part per actor; each actor holds one copy of
    the model (put in the object store once, loaded once per actor). If an actor's process dies,
    the actors are started again from the stored model and the call is repeated (scores are a
    pure function of the model and the arch), up to `max_retries` times. `map` submits one task
    per item with `placement(item)`'s Ray options (resources, num_cpus) and retries a task whose
    worker died up to `max_retries` times, on any node that has the resources; an exception
    raised by the work itself is not retried."""

    def __init__(self, actors: int | None = None, max_retries: int = 3, threads: int = 1):
        self.ray = import_ray()
        if not self.ray.is_initialized():
            raise RuntimeError("connect to a cluster first (hwnas.fleet.connect)")
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        if actors is not None and actors < 1:
            raise UserError(f"--actors must be at least 1, got {actors}")
        self.n_actors = actors or max(1, cpus // threads)
        self.max_retries, self.threads = max_retries, threads
        self._actors: _Actors | None = None

    def describe(self) -> dict[str, Any]:
        return {"cluster": self.ray.get_runtime_context().gcs_address, "actors": self.n_actors}

    # ---- search evaluation ----
    def _holders(self, model) -> list:
        if self._actors is None or self._actors.model is not model:
            self.reload(model)
            self._actors = _Actors(model, self.ray.put(model), [])
        if not self._actors.handles:
            holder = self.ray.remote(ModelHolder).options(num_cpus=self.threads)
            self._actors.handles = [holder.remote(self._actors.ref, self.threads)
                                    for _ in range(self.n_actors)]
        return self._actors.handles

    def evaluate(self, model, archs) -> np.ndarray:
        if not archs:
            return np.zeros(0)
        archs = list(archs)
        for attempt in range(self.max_retries + 1):
            holders = self._holders(model)
            parts = [p for p in np.array_split(np.arange(len(archs)), len(holders)) if len(p)]
            refs = [h.predict.remote([archs[i] for i in p]) for h, p in zip(holders, parts)]
            try:
                return np.concatenate([self._get(r) for r in refs])
            except self.ray.exceptions.RayActorError as e:
                for h in self._actors.handles:  # start every actor again from the stored model
                    self.ray.kill(h)
                self._actors.handles = []
                if attempt == self.max_retries:
                    raise UserError(f"an evaluation actor died {attempt + 1} times "
                                    f"({first_line(e)[:120]}); the search saved its progress: "
                                    "rerun the same command to resume") from None

    def reload(self, model) -> None:
        """Drop the actors (the model changed, or another one is evaluated next)."""
        if self._actors is not None:
            for h in self._actors.handles:
                self.ray.kill(h)
            self._actors = None

    def actor_pids(self) -> list[int]:
        return [self._get(h.pid.remote()) for h in self._actors.handles] if self._actors else []

    # ---- tasks ----
    def map(self, fn: Callable, items: Sequence, placement: Callable[[Any], dict] | None = None,
            on_result: Callable[[int, Any], None] | None = None) -> list:
        remote = self.ray.remote(fn)
        have = self.ray.cluster_resources()
        refs = []
        for item in items:
            opts: dict[str, Any] = {"max_retries": self.max_retries, "retry_exceptions": False,
                                    "num_cpus": self.threads}
            opts.update(placement(item) if placement else {})
            for name, units in (opts.get("resources") or {}).items():
                if have.get(name, 0) < units:  # Ray would wait for such a node forever
                    raise UserError(f"no node of the cluster has {name}: start one on that host "
                                    "with `hwnas fleet start --devices ...` (`hwnas fleet status` "
                                    "lists the slots there are)")
            refs.append(remote.options(**opts).remote(item))
        index = {r: i for i, r in enumerate(refs)}
        out: list = [None] * len(refs)
        pending = list(refs)
        try:
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                for r in done:
                    i = index[r]
                    out[i] = self._get(r)
                    if on_result is not None:
                        on_result(i, out[i])
        finally:
            for r in pending:  # a failure (or ^C) leaves nothing running for nobody
                self.ray.cancel(r, force=True)
        return out

    def _get(self, ref):
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, UserError):
                raise e.cause from None
            raise
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError) as e:
            raise UserError(f"a Ray worker died {self.max_retries + 1} times running hwnas work "
                            f"({first_line(e)[:120]}); what finished is saved: rerun the same "
                            "command to resume") from None

    def close(self) -> None:
        self.reload(None)
