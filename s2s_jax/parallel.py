"""Data parallelism with JAX's own runtime: a 1-D mesh over every device of every process.

The per-device step body (training/steps.py) is wrapped three ways, chosen by `train.parallel`:
- "shard_map" (default): `jax.shard_map` over the mesh axis "data"; batch split along rows,
  state replicated. `check_vma=False` so gradients of replicated parameters are *local* (as under
  pmap) and the body's explicit `psum` is the one reduction (with check_vma=True JAX would insert
  its own psum in the transpose and the update would be N times too large — ENVIRONMENT.md).
- "pmap": the same body under `jax.pmap` (state replicated with a leading local-device axis).
- "none": plain `jax.jit` on one device (debugging; single process only).

The global batch (data.batch_size / data.batch_tokens) is split over the mesh: device d of
the mesh holds rows [d*b, (d+1)*b) with b = global rows / devices. The mesh lists each
process's devices contiguously, in process order, because the data loader gives process p the
contiguous slice p of every global batch; so the global array the step sees is the very batch a
single device would see, and the dropout row ids in training/steps.py (axis_index * b + arange(b)) are
its global row numbers, which is why the masks do not depend on the device count.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from s2s_jax.config import Config, ConfigError, TrainConfig, choices

AXIS = "data"
log = logging.getLogger(__name__)


def distributed_settings(config: Config) -> dict | None:
    """The jax.distributed.initialize arguments asked for, or None for a single process.

    Config fields win; otherwise JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    `coordinator_address="auto"` lets JAX detect everything (Cloud TPU pods, SLURM, Open MPI).
    """
    tc = config.train
    addr = tc.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    nproc = tc.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = tc.process_id if tc.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    if addr == "auto":
        return {}
    if not addr and nproc <= 1:
        return None
    if not addr or nproc <= 0 or not 0 <= pid < nproc:
        raise ConfigError(
            f"multi-process training needs train.coordinator_address (host:port of process 0; got "
            f"{addr!r}), train.num_processes (got {nproc}) and train.process_id in [0, num_processes) "
            f"(got {pid}), or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; "
            "or train.coordinator_address=auto on a TPU pod / SLURM")
    return {"coordinator_address": addr, "num_processes": nproc, "process_id": pid}


def maybe_initialize_distributed(config: Config) -> None:
    """jax.distributed.initialize when the config or the environment asks for multi-process.

    Must run before anything touches a JAX backend (jax.devices(), the first array).
    """
    settings = distributed_settings(config)
    if settings is None or jax.distributed.is_initialized():
        return
    # CPU processes need a cross-process collectives implementation (the default has none);
    # the option only concerns the CPU backend, so it is harmless on GPU/TPU hosts. Set
    # without asking jax for the platform, which would initialise the backend too early.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def mesh_devices(mode: str) -> list:
    """The mesh's devices: process-major (matching the loader's per-process slices), then by id."""
    if mode == "none":
        return jax.local_devices()[:1]
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def make_mesh(mode: str) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(mesh_devices(mode)), (AXIS,))


def _host(x) -> np.ndarray:
    """A (replicated) array as numpy, also when it spans other processes' devices."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)  # replicated: every shard is the whole value
    return np.asarray(x)


class Parallel:
    """Places state and batches on the devices and wraps step bodies for the chosen mode."""

    def __init__(self, mode: str):
        if mode not in choices(TrainConfig, "parallel"):
            raise ConfigError(f"train.parallel={mode!r}: use shard_map, pmap or none")
        if mode == "none" and jax.process_count() > 1:
            raise ConfigError(f"train.parallel=none runs on one device, but this is one of "
                              f"{jax.process_count()} processes; use shard_map or pmap")
        self.mode = mode
        self.mesh = make_mesh(mode)
        self.num_devices = self.mesh.devices.size
        # Devices whose batch rows this process feeds (pmap: its local devices).
        self.local_devices = (1 if mode == "none" else jax.local_device_count())
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(AXIS))
        if mode == "pmap":  # the layout jax.pmap gives its outputs: split over local devices
            local = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
            self._stacked = NamedSharding(local, P(AXIS))

    def describe(self, rows_per_bucket, grad_accum: int = 1) -> str:
        """One line for the start of a run: devices, processes, global and per-device batch."""
        rows = sorted(set(int(r) for r in rows_per_bucket))
        span = (lambda f: f"{f(rows[0])}" if len(rows) == 1 else f"{f(rows[0])}-{f(rows[-1])}")  # noqa: E731
        n = self.num_devices
        text = (f"{n} device(s) ({self.mode}; {jax.process_count()} process(es), "
                f"{self.local_devices} local); global batch {span(lambda r: r)} sentences, "
                f"per device {span(lambda r: r // n)}")
        if grad_accum > 1:
            text += f" in {grad_accum} micro-batches of {span(lambda r: r // n // grad_accum)}"
        return text

    # -- placement ---------------------------------------------------------------------------
    def state_target(self, abstract_state):
        """ShapeDtypeStructs that restore a checkpoint straight onto this layout's devices
        (any device count can read any checkpoint). pmap restores onto the first local device,
        then put_state stacks it."""
        sharding = (jax.sharding.SingleDeviceSharding(jax.local_devices()[0]) if self.mode == "pmap"
                    else self.replicated)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            abstract_state)

    def put_state(self, state):
        """Host/replicated state -> the layout the wrapped steps take (state replicated)."""
        if self.mode == "pmap":
            n = jax.local_device_count()
            # Placed with pmap's own output layout, so the second step does not recompile.
            return jax.tree.map(lambda x: jax.device_put(
                np.broadcast_to(_host(x), (n,) + np.shape(x)), self._stacked), state)
        if jax.process_count() == 1:
            return jax.device_put(state, self.replicated)

        def replicate(x):
            if isinstance(x, jax.Array) and x.sharding == self.replicated:
                return x
            host = _host(x)
            return jax.make_array_from_callback(host.shape, self.replicated, lambda index: host[index])
        return jax.tree.map(replicate, state)

    def get_state(self, state):
        """The wrapped layout -> one replicated copy (for checkpoints, evaluation, export)."""
        if self.mode == "pmap":
            if jax.process_count() == 1:
                return jax.tree.map(lambda x: x[0], state)
            # Multi-process pmap outputs are global [devices, ...] arrays. A per-process copy on
            # a local device would be written by every process; a global replicated array is
            # written once by Orbax.
            def replicate(x):
                host = np.asarray(x.addressable_data(0))[0]
                return jax.make_array_from_callback(host.shape, self.replicated, lambda index: host[index])
            return jax.tree.map(replicate, state)
        return state

    def put_batch(self, batch: dict[str, np.ndarray]):
        """Process-local numpy batch (this process's contiguous rows) -> arrays split over 'data'."""
        for k, v in batch.items():
            if v.shape[0] % self.local_devices:
                raise ValueError(f"batch {k!r} has {v.shape[0]} rows, not a multiple of the "
                                 f"{self.local_devices} local devices")
        if self.mode == "pmap":
            n = self.local_devices
            return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in batch.items()}
        if jax.process_count() == 1:
            return jax.device_put(batch, self.batch_sharding)
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in batch.items()}

    # -- wrapping ----------------------------------------------------------------------------
    def wrap_train(self, body):
        """body(state, batch, axis_name=...) -> (state, metrics) as a jitted global step."""
        if self.mode == "none":
            return jax.jit(functools.partial(body, axis_name=None), donate_argnums=0)
        if self.mode == "pmap":
            return jax.pmap(functools.partial(body, axis_name=AXIS), axis_name=AXIS, donate_argnums=0)
        f = jax.shard_map(functools.partial(body, axis_name=AXIS), mesh=self.mesh,
                          in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False)
        return jax.jit(f, donate_argnums=0)

    def wrap_eval(self, body):
        """body(params, batch, axis_name=...) -> metric sums, jitted."""
        if self.mode == "none":
            return jax.jit(functools.partial(body, axis_name=None))
        if self.mode == "pmap":
            return jax.pmap(functools.partial(body, axis_name=AXIS), axis_name=AXIS)
        f = jax.shard_map(functools.partial(body, axis_name=AXIS), mesh=self.mesh,
                          in_specs=(P(), P(AXIS)), out_specs=P(), check_vma=False)
        return jax.jit(f)

    def unreplicate_metrics(self, metrics):
        """Step metrics -> scalars (pmap returns one copy per device)."""
        if self.mode == "pmap":  # [devices] arrays, global across processes: read a local copy
            return jax.tree.map(lambda x: x.addressable_data(0).reshape(x.shape[1:]), metrics)
        return metrics
