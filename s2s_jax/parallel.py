"""Data parallelism with JAX's own runtime: a 1-D mesh over every device of every process.

The per-device step body (steps.py) is wrapped three ways, chosen by `train.parallel`:
- "shard_map" (default): `jax.shard_map` over the mesh axis "data"; batch split along rows,
  state replicated. `check_vma=False` so gradients of replicated parameters are *local* (as under
  pmap) and the body's explicit `psum` is the one reduction (with check_vma=True JAX would insert
  its own psum in the transpose and the update would be N times too large — ENVIRONMENT.md).
- "pmap": the same body under `jax.pmap` (state replicated with a leading device axis).
- "none": plain `jax.jit` on one device (debugging).
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from s2s_jax.config import Config, ConfigError

AXIS = "data"
log = logging.getLogger(__name__)


def maybe_initialize_distributed(config: Config) -> None:
    """jax.distributed.initialize when the config or the environment asks for multi-process.

    Config fields win; otherwise JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID are
    read (on TPU VMs and SLURM, jax.distributed.initialize() also auto-detects them).
    """
    tc = config.train
    addr = tc.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    nproc = tc.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0") or 0)
    pid = tc.process_id if tc.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1") or -1)
    if not addr and nproc <= 1:
        return
    if not addr or nproc <= 0 or pid < 0:
        raise ConfigError("multi-process training needs train.coordinator_address, train.num_processes and "
                          "train.process_id (or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    if jax.devices()[0].platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=addr, num_processes=nproc, process_id=pid)


def make_mesh(mode: str) -> jax.sharding.Mesh:
    devices = jax.devices() if mode != "none" else jax.local_devices()[:1]
    return jax.sharding.Mesh(np.array(devices), (AXIS,))


def device_count(mode: str) -> int:
    return 1 if mode == "none" else jax.device_count()


class Parallel:
    """Places state and batches on the devices and wraps step bodies for the chosen mode."""

    def __init__(self, mode: str):
        self.mode = mode
        self.mesh = make_mesh(mode)
        self.num_devices = self.mesh.devices.size
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

    # -- placement ---------------------------------------------------------------------------
    def put_state(self, state):
        """Host/replicated state -> the layout the wrapped steps take."""
        if self.mode == "pmap":
            n = jax.local_device_count()  # pmap moves the stacked copies onto the devices
            return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), state)
        return jax.device_put(state, self.replicated)

    def get_state(self, state):
        """The wrapped layout -> a replicated, unsharded-looking state (for checkpoints)."""
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x[0], state)
        return state

    def put_batch(self, batch: dict[str, np.ndarray]):
        """Process-local numpy batch -> global device arrays split over 'data'."""
        if self.mode == "pmap":
            n = jax.local_device_count()
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
        if self.mode == "pmap":
            return jax.tree.map(lambda x: x[0], metrics)
        return metrics
