"""Per-device memory of a run: parameters, optimizer state (both exact, from their shardings) and
an estimate of the activations the backward pass keeps (from the model shape and remat policy).

The activation estimate counts the tensors each block saves, as in Korthikanti et al. 2022
("Reducing activation recomputation in large transformer models"), for this model's layers:
per token and layer, with tensor parallelism dividing the per-head and MLP terms. The check is
JAX's own residuals (what ``jax.vjp`` keeps): tests/test_parallel.py and
benchmarks/parallel_memory.py compare the two.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from research.backend import backend
from research.config import ModelConfig, ResearchError
from research.models.attention import resolve_implementation
from research.models.moe import resolve_dispatch
from research.models.transformer import compute_dtype
from research.parallel.mesh import data_parallel_size
from research.train.shardings import abstract_params, optimizer_shardings
from research.train.zero import optimizer_layout


@dataclass(frozen=True)
class MemoryReport:
    params_bytes: int  # per device
    optimizer_bytes: int  # per device
    activation_bytes: int  # per device, estimated
    devices: int
    remat: str
    gradient_bytes: int = 0  # per device: one gradient per parameter, sharded like it
    working_bytes: int = 0  # per device: the layer being worked on (see ``working_bytes``)

    @property
    def total_bytes(self) -> int:
        state = self.params_bytes + self.optimizer_bytes + self.gradient_bytes
        return state + self.activation_bytes + self.working_bytes

    def summary(self) -> str:
        return (
            f"memory per device: params {_mib(self.params_bytes)}, optimizer "
            f"{_mib(self.optimizer_bytes)}, gradients {_mib(self.gradient_bytes)}, "
            f"activations ~{_mib(self.activation_bytes)} (remat={self.remat}), working set "
            f"~{_mib(self.working_bytes)}, total ~{_mib(self.total_bytes)}"
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded arrays (or ShapeDtypeStructs with shardings)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def activation_elements_per_token(
    cfg: ModelConfig, tensor: int, layer: int, expert: int = 1, fused: bool = False
) -> int:
    """Elements one layer keeps per token for the backward pass (attention's T x T included).
    ``expert``: the expert-parallel group size; dropless dispatch runs the group's gathered
    tokens through each device's experts (research/parallel/expert_shard.py). ``fused``: what
    the compiled program keeps rather than what ``jax.vjp`` hands XLA (see below)."""
    d, hd, t = cfg.d_model, cfg.head_dim, cfg.seq_len
    q, kv = cfg.n_heads * hd // tensor, cfg.n_kv_heads * hd // tensor
    # Only the reference implementation keeps T x T scores (raw, masked, normalised); the
    # others keep one float32 log-sum-exp per head and query (about 2 elements).
    if resolve_implementation(cfg.attention, compute_dtype(cfg.compute_dtype), t) == "xla":
        scores = 3 * cfg.n_heads * t // tensor
    else:
        scores = 2 * cfg.n_heads // tensor
    dispatch = 0  # MoE: the routed copies of the tokens going in and coming out of the experts
    if cfg.is_moe_layer(layer):
        # Capacity dispatch pads every expert to capacity_factor x its share; dropless does not.
        dropless = resolve_dispatch(cfg.moe_dispatch) == "dropless"
        routed = cfg.top_k * (expert if dropless else cfg.capacity_factor)
        hidden = (routed + cfg.n_shared_experts) * cfg.expert_hidden
        dispatch = int(2 * routed * d)
    else:
        hidden = cfg.mlp_hidden
    hidden = int(hidden) // tensor
    if cfg.remat == "full":
        return d  # the block input; the block is recomputed in the backward pass
    if cfg.remat == "save-dots":
        # matmuls against weights: q, k, v, attention output, gate, up, down; plus the input
        return d + q + 2 * kv + d + 2 * hidden + d + dispatch
    # none: both norms' inputs and outputs, q/k/v, the rotated q/k and their RoPE products,
    # the scores, the attention output, and gate, up, sigmoid(gate) and silu(gate) * up
    if fused:
        # XLA fuses the norms, RoPE and softmax into their neighbours and recomputes them: the
        # TPU compiler keeps the matmuls' inputs and outputs, one copy of the scores, and the
        # residual stream (benchmarks/memory_vs_compiler.py: 1.34x over without this).
        return 4 * d + 2 * q + 2 * kv + scores // 3 + 3 * hidden + dispatch
    return 4 * d + 4 * q + 4 * kv + scores + 4 * hidden + dispatch


def activation_bytes(
    cfg: ModelConfig, tokens_per_device: int, tensor: int, expert: int = 1, fused: bool = False
) -> int:
    """What the forward pass leaves for the backward pass. With remat, the backward pass also
    holds one block's recomputed set at a time, on top of this."""
    itemsize = jnp.dtype(compute_dtype(cfg.compute_dtype)).itemsize
    layers = range(cfg.n_layers)
    per_token = sum(activation_elements_per_token(cfg, tensor, i, expert, fused) for i in layers)
    per_token += 2 * cfg.d_model  # the final norm's input and output
    # One float32 copy of the logits: XLA fuses the softmax into the loss and its gradient (the
    # TPU compiler's temporaries for Llama-3 and gpt2_small showed 2 copies over-counted).
    logits = cfg.vocab_size // tensor * 4
    return tokens_per_device * (per_token * itemsize + logits)


def layer_weight_matrices(cfg: ModelConfig, tensor: int, expert: int, layer: int) -> list[int]:
    """Elements of each of one layer's weight tensors on a device once FSDP has gathered them
    (still split by tensor and expert parallelism): q, k, v, o, then the MLP's three (an MoE
    layer's gate, up and down each hold all its local experts)."""
    d, hd = cfg.d_model, cfg.head_dim
    attention = [d * n * hd // tensor for n in (cfg.n_heads, cfg.n_kv_heads, cfg.n_kv_heads)]
    attention.append(cfg.n_heads * hd * d // tensor)
    if cfg.is_moe_layer(layer):
        mlp = [cfg.n_experts // expert * d * cfg.expert_hidden // tensor] * 3
        mlp += [d * cfg.expert_hidden * cfg.n_shared_experts // tensor] * 3
    else:
        mlp = [d * cfg.mlp_hidden // tensor] * 3
    return attention + [m for m in mlp if m]


def layer_weight_elements(cfg: ModelConfig, tensor: int, expert: int, layer: int) -> int:
    """One layer's weights on a device once FSDP has gathered them."""
    return sum(layer_weight_matrices(cfg, tensor, expert, layer))


def working_bytes(cfg: ModelConfig, tokens_per_device: int, mesh_shape: dict) -> int:
    """Transient memory on top of what the forward pass saves, for the layer being worked on:
    under remat, its recomputed activations (the remat=none set) in the backward pass; under
    FSDP, its weights gathered in the compute dtype plus one weight's gradient before its
    reduce-scatter: the TPU compiler reduces each gradient as soon as it is computed and
    reuses the space (Mixtral's gate, up and down gradients, 896 MiB each, share buffers), so
    the layer's gradients are never all held at once (README: estimate vs compiler)."""
    itemsize = jnp.dtype(compute_dtype(cfg.compute_dtype)).itemsize
    tensor, expert, fsdp = mesh_shape["tensor"], mesh_shape["expert"], mesh_shape["fsdp"]
    layers = range(cfg.n_layers)
    total = 0
    if cfg.remat != "none":
        plain = dataclasses.replace(cfg, remat="none")
        per_token = max(
            activation_elements_per_token(plain, tensor, i, expert, fused=True) for i in layers
        )
        total += tokens_per_device * per_token * itemsize
    if fsdp > 1:
        held = max(
            layer_weight_elements(cfg, tensor, expert, i)
            + max(layer_weight_matrices(cfg, tensor, expert, i))
            for i in layers
        )
        total += held * itemsize
    moe_layers = [i for i in layers if cfg.is_moe_layer(i)]
    if moe_layers and resolve_dispatch(cfg.moe_dispatch) == "dropless" and backend() != "cpu":
        # ragged_dot's backward takes a transposed copy of one expert weight at a time
        # (research/models/grouped_matmul.py; [4] is the gate: all local experts); the CPU
        # path runs dense blocks instead
        total += (
            max(layer_weight_matrices(cfg, tensor, expert, i)[4] for i in moe_layers) * itemsize
        )
    return total


def memory_report(
    cfg: ModelConfig,
    mesh: Mesh,
    tx: optax.GradientTransformation,
    micro_batch: int,
    shard_optimizer_update: bool = False,
) -> MemoryReport:
    """Per-device memory for a resolved model config trained with ``tx`` on ``mesh``;
    ``micro_batch``: sequences per optimizer microbatch (global, split over the batch axes).
    ``shard_optimizer_update`` (ZeRO-1, research/train/zero.py): the optimizer state follows the
    update shardings, so each data-parallel replica holds a slice of it."""
    params = abstract_params(cfg, mesh)
    opt_shapes = jax.eval_shape(tx.init, params)
    opt = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        opt_shapes,
        optimizer_shardings(tx, optimizer_layout(params, mesh, shard_optimizer_update), mesh),
    )
    tokens = max(1, micro_batch // data_parallel_size(mesh)) * cfg.seq_len
    return MemoryReport(
        # The step holds every gradient at once (the optimizer update takes the whole tree),
        # in the parameters' dtype and shardings: the TPU compiler counts them (README).
        gradient_bytes=per_device_bytes(params),
        params_bytes=per_device_bytes(params),
        optimizer_bytes=per_device_bytes(opt),
        activation_bytes=activation_bytes(
            cfg, tokens, mesh.shape["tensor"], mesh.shape["expert"], fused=True
        ),
        working_bytes=working_bytes(cfg, tokens, dict(mesh.shape)),
        devices=mesh.devices.size,
        remat=cfg.remat,
    )


class OutOfMemoryError(ResearchError):
    """The per-device memory estimate exceeds what the device has: refused before allocating."""


def device_memory_bytes(device, configured_gb: float = 0.0) -> int | None:
    """Memory one device may use: ``configured_gb`` GiB when set (``log.device_memory_gb``),
    else the device's own limit where it reports one (GPU, TPU), else None (CPU: no check)."""
    if configured_gb > 0:
        return int(configured_gb * 2**30)
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats()
    except (RuntimeError, NotImplementedError):  # no statistics here: nothing to check against
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None


def check_fits(report: MemoryReport, device_memory: int | None) -> None:
    """Refuse a run whose per-device estimate exceeds ``device_memory`` bytes (None: skip),
    saying by how much and which settings shrink it, instead of an allocation that dies."""
    if device_memory is None or report.total_bytes <= device_memory:
        return
    over = report.total_bytes - device_memory
    knobs = []
    if report.remat != "full":
        knobs.append(f"--set model.remat=full (activations ~{_mib(report.activation_bytes)})")
    knobs.append("a smaller train.batch_size, or a larger optim.grad_accum for the same batch")
    knobs.append(
        "a larger mesh.fsdp, over more devices (it shards params "
        f"{_mib(report.params_bytes)} and optimizer {_mib(report.optimizer_bytes)} per device)"
    )
    raise OutOfMemoryError(
        f"the run needs ~{_mib(report.total_bytes)} per device but the device has "
        f"{_mib(device_memory)}: {_mib(over)} too much ({report.summary()}). What helps: "
        + "; ".join(knobs)
    )


def compiled_memory(compiled) -> dict[str, int]:
    """XLA's per-device figures for a compiled step (``jax.jit(f).lower(...).compile()``)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    names = ("argument", "output", "temp", "generated_code", "alias")
    return {name: int(getattr(stats, f"{name}_size_in_bytes", 0)) for name in names}


def saved_residual_bytes(loss_fn, params, batch: int) -> int:
    """Bytes of activations ``jax.vjp(loss_fn, params)`` keeps for the backward pass, from JAX's
    own residuals (nothing is computed): those with a leading batch dimension of size ``batch``
    (or a layer axis then batch, under scan); weights kept in other layouts do not count."""
    vjp_fn = jax.eval_shape(lambda p: jax.vjp(loss_fn, p)[1], params)
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(vjp_fn)
        if x.ndim >= 2 and batch in x.shape[:2]
    )
