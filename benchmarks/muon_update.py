"""Where Muon's time goes in the quickstart's optimizer update, on this machine's CPU.

    python benchmarks/muon_update.py              # one device
    python benchmarks/muon_update.py --data 2     # split over 2 data-parallel devices

Times the jitted optimizer update alone (no forward or backward) on the quickstart's parameters
for AdamW (the floor), Muon as optax.contrib.muon runs it (one Newton-Schulz chain per matrix)
and grouped Muon (``optim.muon_group_matrices``: one batched chain per matrix shape), in
alternating rounds in one process; then the Newton-Schulz FLOPs per step, the rate Muon's part
(its time above AdamW's) reaches, and the rate of a chain of 512 x 512 matmuls on one device
for reference: what this CPU gives on matmuls big enough to run at speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from research import runtime  # noqa: E402

runtime.setup()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from research.config import MeshConfig, load_experiment  # noqa: E402
from research.parallel.mesh import make_mesh, on_mesh  # noqa: E402
from research.run.builder import resolve_config  # noqa: E402
from research.train.muon import MATRIX_AXES, is_muon_param  # noqa: E402
from research.train.optimizer import make_optimizer  # noqa: E402
from research.train.shardings import optimizer_shardings  # noqa: E402
from research.train.state import build_model  # noqa: E402


def newton_schulz_flops(params, ns_steps: int = 5) -> float:
    """Five quintic steps on each matrix X (m <= n after Muon's transpose): X X^T (2m^2 n),
    its square (2m^3) and the product with X (2m^2 n) per step."""
    total = 0.0
    flat = jax.tree_util.tree_leaves_with_path(params)
    muon = jax.tree.leaves(is_muon_param(params))
    for (path, x), on in zip(flat, muon, strict=True):
        if not on:
            continue
        dims = MATRIX_AXES[str(path[-1].key)]
        red = (
            dims.reduction_axis
            if isinstance(dims.reduction_axis, tuple)
            else (dims.reduction_axis,)
        )
        out = dims.output_axis if isinstance(dims.output_axis, tuple) else (dims.output_axis,)
        rows = math.prod(x.shape[a] for a in red)
        cols = math.prod(x.shape[a] for a in out)
        batch = x.size // (rows * cols)
        m, n = sorted((rows, cols))
        total += batch * ns_steps * (4 * m * m * n + 2 * m**3)
    return total


def timed(functions: dict, rounds: int, steps: int) -> dict[str, float]:
    for fn in functions.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            start = time.perf_counter()
            for _ in range(steps):
                out = fn()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=int, default=1, help="data-parallel devices")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    cfg, _ = resolve_config(load_experiment("shakespeare_char", ["train.run_dir=/tmp/unused"]))
    mesh = make_mesh(MeshConfig(data=args.data))
    _, params = build_model(cfg.model, 0, mesh)
    grads = jax.tree.map(
        lambda p: jax.device_put(jax.random.normal(jax.random.key(p.size), p.shape), p.sharding),
        params,
    )
    optimizers = {
        "adamw": dataclasses.replace(cfg.optim, optimizer="adamw"),
        "muon (optax, per matrix)": cfg.optim,
        "muon grouped": dataclasses.replace(cfg.optim, muon_group_matrices=True),
    }
    functions = {}
    for name, optim in optimizers.items():
        tx, _ = make_optimizer(optim, cfg.train.steps)
        state = jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, mesh))(params)
        update = jax.jit(on_mesh(lambda g, s, p, tx=tx: tx.update(g, s, p)[0], mesh))
        functions[name] = lambda update=update, state=state: update(grads, state, params)
    a, chain = jnp.ones((512, 512)), jax.jit(lambda a: a @ a @ a @ a)
    functions["512x512 matmul x3"] = lambda: chain(a)
    median = timed(functions, args.rounds, args.steps)
    flops = newton_schulz_flops(params)
    floor = median["adamw"]
    for name, seconds in median.items():
        print(f"{name:<26} {1e3 * seconds:7.2f} ms")
    print(f"Newton-Schulz: {flops / 1e9:.2f} GFLOP per step ({args.data} device(s) share it)")
    for name in ("muon (optax, per matrix)", "muon grouped"):
        part = median[name] - floor
        print(f"{name:<26} Muon part {1e3 * part:6.2f} ms = {flops / part / 1e9:5.1f} GFLOP/s")
    print(f"512x512 matmuls: {3 * 2 * 512**3 / median['512x512 matmul x3'] / 1e9:.1f} GFLOP/s")
    grouped, per_matrix = (median[n] - floor for n in ("muon grouped", "muon (optax, per matrix)"))
    print(f"grouped / per-matrix Muon part: {grouped / per_matrix:.2f}x")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
