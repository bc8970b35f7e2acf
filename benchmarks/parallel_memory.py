"""Remat and scan-over-layers, measured: XLA's temp memory of the compiled train step beside our
activation estimate (research/train/memory.py) per remat policy, and the compile time of a
deep model unrolled beside scanned.

    PYTHONPATH=. python benchmarks/parallel_memory.py [--layers 16]

One device (mesh data=1). The reference for memory is XLA's own memory_analysis() of the same
compiled program; the reference for compile time is the unrolled model.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("RESEARCH_COMPILE_CACHE", "")  # time real compiles, not cache hits

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from research.config import ExperimentConfig, MeshConfig, ModelConfig, TrainConfig  # noqa: E402
from research.models import Transformer  # noqa: E402
from research.models.layers import rope_tables  # noqa: E402
from research.models.stack import block_function  # noqa: E402
from research.parallel.mesh import batch_sharding, make_mesh, on_mesh  # noqa: E402
from research.train.memory import (  # noqa: E402
    compiled_memory,
    memory_report,
    saved_residual_bytes,
)
from research.train.state import init_train_state  # noqa: E402
from research.train.step import cross_entropy, make_train_step  # noqa: E402


def compile_step(cfg: ExperimentConfig):
    mesh = make_mesh(cfg.mesh)
    graphdef, state, tx, schedule = init_train_state(cfg, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_spec = batch_sharding(mesh, leading_dims=1)
    step = jax.jit(
        on_mesh(make_train_step(graphdef, tx, schedule, cfg.model, 0.0), mesh),
        in_shardings=(shardings, batch_spec),
        out_shardings=(shardings, None),
    )
    batch = jax.ShapeDtypeStruct(
        (1, cfg.train.batch_size, cfg.model.seq_len + 1), np.int32, sharding=batch_spec
    )
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    report = memory_report(cfg.model, mesh, tx, cfg.train.batch_size)
    return compiled, time.perf_counter() - start, report


def residuals(model_cfg: ModelConfig, batch: int) -> int:
    graphdef, params = nnx.split(Transformer(model_cfg, nnx.Rngs(0)))
    tokens = jnp.zeros((batch, model_cfg.seq_len), jnp.int32)

    def loss(p):
        return cross_entropy(nnx.merge(graphdef, p)(tokens), tokens)[0]

    return saved_residual_bytes(loss, params, batch)


def config(**model) -> ExperimentConfig:
    base = dict(vocab_size=512, d_model=256, n_layers=4, n_heads=8, seq_len=256)
    return ExperimentConfig(
        model=ModelConfig(**(base | model)).resolved(),
        train=TrainConfig(batch_size=6, steps=10),  # 6: no weight has a dim of 6
        mesh=MeshConfig(data=1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16, help="depth for the compile-time test")
    args = parser.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"JAX {jax.__version__} on {jax.devices()[0].device_kind}"
    )

    print(
        "\nremat policy | JAX residuals (reference) | our estimate | estimate / reference"
        " | XLA CPU temp"
    )
    for remat in ("none", "save-dots", "full"):
        cfg = config(remat=remat)
        compiled, _, report = compile_step(cfg)
        reference = residuals(cfg.model, cfg.train.batch_size)
        temp = compiled_memory(compiled).get("temp", 0)
        print(
            f"{remat:>12} | {reference / 2**20:20.1f} MiB | {report.activation_bytes / 2**20:8.1f}"
            f" MiB | {report.activation_bytes / reference:.2f} | {temp / 2**20:.1f} MiB"
        )

    print(f"\n{args.layers} layers, d_model 128 | compile seconds")
    times = {}
    for scan in (True, False):  # scan first: any warm-up cost lands on it
        cfg = config(d_model=128, n_heads=4, seq_len=128, n_layers=args.layers, scan_layers=scan)
        times[scan] = compile_step(cfg)[1]
        print(f"{'scan' if scan else 'unrolled':>8} | {times[scan]:.1f} s")
    print(f"unrolled / scan compile time: {times[False] / times[True]:.1f}x")
    blocks_only(args.layers)


def blocks_only(layers: int) -> None:
    """Where scan's compile time goes: the gradient of the blocks alone, scanned over parameters
    stacked outside the program (what model.scan_layers does), stacked inside it (what it did
    before the model kept them stacked), or unrolled."""
    cfg = config(d_model=128, n_heads=4, seq_len=128, n_layers=layers).model
    model = Transformer(cfg, nnx.Rngs(0))
    apply = block_function(model.blocks[0], "none", 1)
    positions = jnp.arange(cfg.seq_len)
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    x = jnp.zeros((8, cfg.seq_len, cfg.d_model))
    states = [nnx.state(block) for block in model.blocks]

    def stack(states):
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)

    def scanned(stacked, x):
        body = lambda x, state: (apply(state, x, positions, rope, None)[0], None)  # noqa: E731
        return jax.lax.scan(body, x, stacked)[0].sum()

    def unrolled(states, x):
        for state in states:
            x = apply(state, x, positions, rope, None)[0]
        return x.sum()

    print(f"\n{layers} blocks alone, gradient | compile seconds")
    variants = {
        "scan, params stacked outside": (scanned, stack(states)),
        "scan, stacked inside the step": (lambda s, x: scanned(stack(s), x), states),
        "unrolled": (unrolled, states),
    }
    for name, (fn, params) in variants.items():
        start = time.perf_counter()
        jax.jit(jax.grad(fn)).lower(params, x).compile()
        print(f"{name:>30} | {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
