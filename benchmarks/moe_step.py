"""Train-step time of an MoE (8 experts, top-2) beside a dense model with the same active
parameters, same batch, one run, on whatever backend is present.

    python benchmarks/moe_step.py                 # CPU: d_model 256, 4 layers, batch 16 x 128
    python benchmarks/moe_step.py --d-model 1024 --layers 8 --batch 32 --seq 1024   # a GPU

The MoE's experts are dense_hidden / top_k wide, so a token passes through as many MLP
parameters as in the dense model (plus the small router). MFU counts active FLOPs only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from research import runtime  # noqa: E402

runtime.setup()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from research.config import ExperimentConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from research.models.accounting import count_params  # noqa: E402
from research.parallel.mesh import batch_sharding  # noqa: E402
from research.run import build_run  # noqa: E402
from research.train.accounting import job_peak, measure_matmul_peak  # noqa: E402


def step_time(model_cfg: ModelConfig, batch: int, steps: int, repeats: int) -> float:
    """Median seconds per train step (compile excluded), one step in flight as the trainer."""
    with tempfile.TemporaryDirectory() as run_dir:  # the Run builder's state and jitted step
        cfg = ExperimentConfig(
            model=model_cfg,
            optim=OptimConfig(warmup_steps=10),
            train=TrainConfig(steps=1000, batch_size=batch, run_dir=run_dir),
        )
        run = build_run(cfg, "train")
    mesh, state, step = run.mesh, run.state, run.train_step
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model_cfg.vocab_size, (1, batch, model_cfg.seq_len + 1))
    data = jax.device_put(tokens.astype(np.int32), batch_sharding(mesh, 1))
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            previous = metrics["loss"]
            state, metrics = step(state, data)
            jax.block_until_ready(previous)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=768, help="dense SwiGLU hidden size")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    peak = measure_matmul_peak() if on_cpu else (job_peak().total or float("nan"))
    print(
        f"device: {device.device_kind} x{jax.device_count()}, jax {jax.__version__}; "
        f"peak {'(f32 matmul, measured)' if on_cpu else '(bf16, data sheet)'} "
        f"{peak / 1e9:,.0f} GFLOP/s"
    )
    base = dict(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        seq_len=args.seq,
    )
    variants = {
        "dense": ModelConfig(**base, mlp_hidden=args.hidden),
        "moe capacity 1.25": ModelConfig(
            **base,
            n_experts=args.experts,
            top_k=args.top_k,
            expert_hidden=args.hidden // args.top_k,
            moe_dispatch="capacity",
            capacity_factor=1.25,
        ),
        "moe dropless": ModelConfig(
            **base,
            n_experts=args.experts,
            top_k=args.top_k,
            expert_hidden=args.hidden // args.top_k,
            moe_dispatch="dropless",
        ),
    }
    tokens = args.batch * args.seq
    results = {}
    for name, cfg in variants.items():
        cfg = cfg.resolved()
        size = count_params(cfg)
        seconds = step_time(cfg, args.batch, args.steps, args.repeats)
        results[name] = seconds
        mfu = tokens * size.flops_per_token / seconds / peak
        print(
            f"{name:18s} {1e3 * seconds:8.2f} ms/step  {tokens / seconds:10,.0f} tokens/s  "
            f"params {size.total_params / 1e6:6.2f}M total / {size.active_params / 1e6:5.2f}M "
            f"active  MFU(active) {100 * mfu:5.1f}%  ratio vs dense "
            f"{seconds / results['dense']:.2f}x"
        )
    fastest = min(
        ("capacity", results["moe capacity 1.25"]),
        ("dropless", results["moe dropless"]),
        key=lambda item: item[1],
    )[0]
    print(
        f"fastest MoE dispatch on {device.platform}: {fastest} "
        f"(model.moe_dispatch=auto picks {'capacity' if on_cpu else 'dropless'} here)"
    )


if __name__ == "__main__":
    main()
