"""Multi-process start-up: one process per host (TPU VM worker, GPU node, or a test on localhost).

Every process runs the same command. ``jax.distributed.initialize`` must run before JAX touches a
device; afterwards ``jax.devices()`` lists every host's devices, the mesh spans them all, each
process feeds its own slice of the batch, only process 0 writes logs, and orbax saves from all.

Set-up comes from the config (``mesh.coordinator``, ``mesh.num_processes``) or the environment,
which wins: ``RESEARCH_COORDINATOR=host:port``, ``RESEARCH_NUM_PROCESSES``,
``RESEARCH_PROCESS_ID``. ``auto`` lets JAX find them itself (Cloud TPU slices, SLURM, ...).
"""

from __future__ import annotations

import os

import jax
import numpy as np

from research.config import ConfigError, MeshConfig


def initialize(cfg: MeshConfig) -> bool:
    """Join the other processes if this run is multi-process; True when it is."""
    coordinator = os.environ.get("RESEARCH_COORDINATOR", cfg.coordinator)
    if not coordinator:
        return False
    if jax.distributed.is_initialized():
        return True
    # CPU processes need a cross-process collectives library (the default on newer JAX).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator == "auto":
        jax.distributed.initialize()
        return True
    count = int(os.environ.get("RESEARCH_NUM_PROCESSES", cfg.num_processes))
    index = os.environ.get("RESEARCH_PROCESS_ID", "")
    if count < 1 or not index.isdigit() or int(index) >= count:
        raise ConfigError(
            f"coordinator {coordinator} given, but the process count ({count}) or this process' "
            f"id ({index or 'unset'}) is missing or out of range; set RESEARCH_NUM_PROCESSES "
            "(or mesh.num_processes) and RESEARCH_PROCESS_ID=0..N-1 on every process, or "
            "mesh.coordinator=auto where JAX can detect them (Cloud TPU)"
        )
    jax.distributed.initialize(coordinator, count, int(index))
    return True


def gather_to_host(tree):
    """A tree of global arrays as numpy on every process (all processes must call it)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def put_global(batch: np.ndarray, sharding) -> jax.Array:
    """A batch every process holds in full, placed on a (possibly multi-host) sharding."""
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
