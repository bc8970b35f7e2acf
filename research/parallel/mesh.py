"""Device meshes and the logical-axis rules that map model dimensions onto them.

Single device is a 1x1x1x1 mesh: there is one code path. Parameters carry logical axis names
(``embed``, ``heads``, ...); ``LOGICAL_RULES`` says which mesh axes shard each of them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research.config import MeshConfig, MeshShapeError

MESH_AXES = ("data", "fsdp", "tensor", "expert")

LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),  # expert parallelism also splits the tokens
    "seq": None,
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "expert": ("expert",),
    "layers": None,  # the leading axis of scan_layers' stacked blocks: every device holds all
}


# Activations keep ``embed`` whole: FSDP splits the batch and gathers each layer's weights, and
# tensor parallelism all-reduces a block's output, so the residual stream is never split on it.
ACTIVATION_RULES = {**LOGICAL_RULES, "embed": None}


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    sizes = {axis: getattr(cfg, axis) for axis in MESH_AXES}
    rest = [axis for axis, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise MeshShapeError(
            f"only one mesh axis may be -1 (the rest), got {rest}; give the others a size, "
            "e.g. --set mesh.data=1 --set mesh.fsdp=-1"
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if n_devices % fixed:
            raise MeshShapeError(
                f"mesh axes {sizes} need a multiple of {fixed} devices, but there are {n_devices}"
            )
        sizes[rest[0]] = n_devices // fixed
    total = math.prod(sizes.values())
    if n_devices % total:
        raise MeshShapeError(
            f"mesh {sizes} needs {total} devices, which does not divide the {n_devices} present; "
            "set one axis to -1 to use the rest, or change the sizes so they multiply to a "
            f"divisor of {n_devices}"
        )
    return sizes


def make_mesh(cfg: MeshConfig, devices=None, batch_size: int = 0) -> Mesh:
    """The mesh for a config. On CPU, with data=-1 and a (micro)batch size given, it uses as many
    devices as divide the batch (12 sequences on 8 cores run on 6), so any batch fits any host."""
    devices = list(devices if devices is not None else jax.devices())
    available = len(devices)
    single_host_cpu = devices[0].platform == "cpu" and jax.process_count() == 1
    if batch_size and cfg.data == -1 and single_host_cpu:
        fixed = math.prod(max(getattr(cfg, a), 1) for a in MESH_AXES if a != "data")
        fitting = [
            d
            for d in range(1, len(devices) // fixed + 1)
            if batch_size % (d * cfg.fsdp * cfg.expert) == 0
        ]
        devices = devices[: max(fitting, default=1) * fixed]
    sizes = mesh_shape(cfg, len(devices))
    # A fixed mesh smaller than the machine (e.g. data=1 on 8 devices) runs on the first devices.
    devices = devices[: math.prod(sizes.values())]
    shape = [sizes[a] for a in MESH_AXES]
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if devices[0].platform == "cpu" or len(devices) != available:
        grid = np.asarray(devices).reshape(shape)
    elif slices > 1:  # multi-slice: data parallelism across slices (DCN), the rest within (ICI)
        if sizes["data"] % slices:
            raise MeshShapeError(
                f"{slices} slices need mesh.data to be a multiple of {slices} (data parallelism "
                f"runs across slices), got {sizes['data']}"
            )
        ici = [sizes[a] // (slices if a == "data" else 1) for a in MESH_AXES]
        dcn = [slices if a == "data" else 1 for a in MESH_AXES]
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, allow_split_physical_axes=True
        )
    else:  # all of a GPU/TPU slice: an order that follows the interconnect (ICI, NVLink)
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


def logical_to_spec(
    axes: tuple, shape: tuple[int, ...], mesh: Mesh, name: str = ""
) -> PartitionSpec:
    """The PartitionSpec for an array with these logical axes; dims must divide their mesh axes."""
    spec = []
    for axis, dim in zip(axes, shape, strict=True):
        mesh_axes = tuple(a for a in (LOGICAL_RULES.get(axis) or ()) if mesh.shape[a] > 1)
        ways = math.prod(mesh.shape[a] for a in mesh_axes)
        if ways > 1 and dim % ways:
            raise MeshShapeError(
                f"{name or 'array'}: dimension '{axis}' of size {dim} does not divide over mesh "
                f"axes {mesh_axes} of total size {ways}; change the mesh or the model size"
            )
        spec.append(mesh_axes if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return PartitionSpec(*spec)


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
    """Batches split over data, fsdp and expert, after ``leading_dims`` unsharded dims."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading_dims), LOGICAL_RULES["batch"]))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways a batch is split."""
    return math.prod(mesh.shape[axis] for axis in LOGICAL_RULES["batch"])


def _spec(axes: tuple, shape: tuple[int, ...], mesh_shape: dict, rules: dict) -> PartitionSpec:
    """Mesh axes per dimension; an axis that does not divide the dimension is left out."""
    spec = []
    for axis, dim in zip(axes, shape, strict=True):
        mesh_axes = tuple(a for a in (rules.get(axis) or ()) if mesh_shape.get(a, 1) > 1)
        if dim % math.prod(mesh_shape[a] for a in mesh_axes):
            mesh_axes = ()
        spec.append(mesh_axes if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
    """Pin an activation's sharding by its logical axes; a no-op outside ``on_mesh``."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = _spec(axes, x.shape, dict(mesh.shape), ACTIVATION_RULES)
    return jax.lax.with_sharding_constraint(x, spec)


def per_shard(fn: Callable, in_axes: tuple, out_axes: tuple) -> Callable:
    """``fn`` run on each device's block of its arguments (``shard_map`` over the context mesh),
    arguments split by logical axes (``None``: replicated); its output is shaped like the first
    argument (attention's q). For custom calls such as Pallas kernels, which XLA cannot partition
    and would otherwise gather whole onto every device. Outside ``on_mesh`` (or on one device) it
    is ``fn`` itself."""

    @functools.wraps(fn)
    def wrapped(*args):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or math.prod(mesh.shape.values()) == 1:
            return fn(*args)
        sizes = dict(mesh.shape)

        def spec(axes, shape):
            return PartitionSpec() if axes is None else _spec(axes, shape, sizes, ACTIVATION_RULES)

        return jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=tuple(spec(ax, a.shape) for ax, a in zip(in_axes, args, strict=True)),
            out_specs=spec(out_axes, args[0].shape),
            check_vma=False,  # the kernels are per-device code with no collectives
        )(*args)

    return wrapped


def on_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """``fn`` traced with ``mesh`` as the context mesh, so the model's ``constrain`` calls apply.
    (``jax.set_mesh`` may not be entered inside jit; the abstract mesh may.)"""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced
