"""Lowering GPU kernels on a machine without a GPU (tests, ahead-of-time export).

From jax 0.11 the Pallas Triton lowering reads the target GPU (its compute capability) from the
current device, and off a GPU from the abstract mesh's device, so lowering for ``cuda`` on a
CPU needs a named GPU in scope. jax 0.10 lowers without one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

# The lent machines' GPU and its streaming multiprocessors.
H100 = ("NVIDIA H100 80GB HBM3", 132)


@contextlib.contextmanager
def abstract_gpu(device_kind: str = H100[0], num_cores: int = H100[1]) -> Iterator[None]:
    """Within this block, lowering for ``cuda`` targets ``device_kind`` (one device)."""
    if not hasattr(jax.sharding, "AbstractDevice"):  # older jax: lowering needs no GPU named
        yield
        return
    device = jax.sharding.AbstractDevice(
        device_kind=device_kind, num_cores=num_cores, platform="gpu"
    )
    mesh = jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        yield
