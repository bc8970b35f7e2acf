"""Attention speed and memory: our flash attention beside cuDNN, XLA and the stock Pallas op.

    python benchmarks/attention.py               # a GPU: TFLOP/s table, all implementations
    python benchmarks/attention.py --cpu         # CPU: a training step at 4k and 16k context,
                                                 # blockwise vs the quadratic xla reference

GPU mode: forward and forward+backward TFLOP/s, causal and not, sequence 1k..16k with
batch * seq fixed, 16 heads of 128, bfloat16; ours (Pallas Triton kernel) beside
``jax.nn.dot_product_attention(implementation='cudnn')``, the XLA reference and the stock
``jax.experimental.pallas.ops.gpu.attention.mha``, all in one run. FLOPs: 4 * B * H * T^2 * D
for the forward (two matmuls), 2.5x that for the backward (five), causal counted as half.
``--profile DIR`` writes a jax.profiler trace of ours at the longest length.

CPU mode: each case (implementation, context) runs in a fresh subprocess with an address-space
limit (``--mem-limit-gb``); it trains a small model for a few steps and reports seconds per
step and peak resident memory. A case that runs out of memory is recorded as such.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import median_seconds  # noqa: E402  (this folder, on sys.path)


def _gpu_impls(causal: bool, blocks):
    import jax
    from jax.experimental.pallas.ops.gpu import attention as stock

    from research.kernels.flash_attention import flash_attention
    from research.models.attention import xla_attention

    def xla(q, k, v):
        pos = jax.numpy.arange(q.shape[1])
        return xla_attention(q, k, v, pos, pos, causal=causal)

    return {
        "ours": lambda q, k, v: flash_attention(q, k, v, causal=causal, block_sizes=blocks),
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"
        ),
        "xla": xla,
        "stock pallas": lambda q, k, v: stock.mha(
            q, k, v, None, sm_scale=1 / math.sqrt(q.shape[-1]), causal=causal
        ),
    }


def gpu_table(args) -> None:
    import jax
    import jax.numpy as jnp

    from research.kernels.flash_attention import BlockSizes

    blocks = BlockSizes(*args.blocks) if args.blocks else None
    device = jax.devices()[0]
    print(f"{device.device_kind}, jax {jax.__version__}, bf16, heads {args.heads}, head_dim "
          f"{args.head_dim}, batch * seq = {args.tokens}")  # fmt: skip
    rows = []
    for causal in (True, False):
        impls = _gpu_impls(causal, blocks)
        for seq in args.seqs:
            batch = max(1, args.tokens // seq)
            shape = (batch, seq, args.heads, args.head_dim)
            keys = jax.random.split(jax.random.PRNGKey(0), 4)
            q, k, v, do = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in keys)
            flops = 4 * batch * args.heads * seq * seq * args.head_dim * (0.5 if causal else 1)
            for name, fn in impls.items():
                fwd = jax.jit(fn)
                fwd_bwd = jax.jit(lambda q, k, v, do, fn=fn: jax.vjp(fn, q, k, v)[1](do))
                row = {"causal": causal, "seq": seq, "impl": name}
                for mode, f, args_, work in (
                    ("fwd", fwd, (q, k, v), flops),
                    ("fwd+bwd", fwd_bwd, (q, k, v, do), 3.5 * flops),
                ):
                    try:
                        row[mode] = work / median_seconds(f, *args_, repeats=args.repeats) / 1e12
                    except Exception as error:  # noqa: BLE001 - OOM or unsupported: a result
                        kind = "OOM" if "RESOURCE_EXHAUSTED" in str(error) else "error"
                        row[mode] = kind
                        print(f"  {name} {mode} seq {seq}: {kind}: {str(error)[:200]}")
                rows.append(row)
                print(json.dumps(row))
    _print_gpu_table(rows, args.seqs, device.device_kind)
    if args.profile:
        seq = max(args.seqs)
        shape = (max(1, args.tokens // seq), seq, args.heads, args.head_dim)
        q = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.bfloat16)
        ours = _gpu_impls(True, blocks)["ours"]
        step = jax.jit(lambda q: jax.vjp(lambda q: ours(q, q, q), q)[1](q))
        jax.block_until_ready(step(q))
        with jax.profiler.trace(args.profile):
            for _ in range(3):
                jax.block_until_ready(step(q))
        print(f"profile of ours (causal fwd+bwd, seq {seq}) in {args.profile}")


def _print_gpu_table(rows, seqs, device_kind: str) -> None:
    def cell(x):
        return f"{x:.0f}" if isinstance(x, float) else x

    names = ["ours", "cudnn", "xla", "stock pallas"]
    for causal in (True, False):
        for mode in ("fwd", "fwd+bwd"):
            print(f"\n{'causal' if causal else 'non-causal'} {mode} TFLOP/s on {device_kind}")
            print("| seq | " + " | ".join(names) + " | ours / cudnn | ours / stock |")
            print("|---" * (len(names) + 3) + "|")
            for seq in seqs:
                got = {
                    r["impl"]: r[mode] for r in rows if r["causal"] == causal and r["seq"] == seq
                }
                ratios = []
                for ref in ("cudnn", "stock pallas"):
                    ok = all(isinstance(got.get(n), float) for n in ("ours", ref))
                    ratios.append(f"{got['ours'] / got[ref]:.2f}x" if ok else "-")
                values = " | ".join(cell(got.get(n, "-")) for n in names)
                print(f"| {seq} | {values} | {' | '.join(ratios)} |")


def cpu_child(impl: str, seq: int, steps: int) -> None:
    """One case in this process: prints a JSON line with seconds per step and peak RSS."""
    os.environ.setdefault("RESEARCH_CPU_DEVICES", "1")  # batch 1: one multi-threaded device
    from research import runtime

    runtime.setup()
    import jax
    import numpy as np

    from research.config import ExperimentConfig, ModelConfig, OptimConfig, TrainConfig
    from research.parallel.mesh import batch_sharding
    from research.run import build_run

    model = ModelConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=2, seq_len=seq,
                        attention=impl).resolved()  # fmt: skip
    with tempfile.TemporaryDirectory() as run_dir:  # the Run builder's state and jitted step
        train = TrainConfig(steps=100, batch_size=1, run_dir=run_dir)
        cfg = ExperimentConfig(model=model, optim=OptimConfig(warmup_steps=1), train=train)
        run = build_run(cfg, "train")
    mesh, state, step = run.mesh, run.state, run.train_step
    tokens = np.random.default_rng(0).integers(0, 256, (1, 1, seq + 1)).astype(np.int32)
    data = jax.device_put(tokens, batch_sharding(mesh, 1))
    start = time.perf_counter()
    state, metrics = step(state, data)
    jax.block_until_ready(metrics)
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"first_step_s": first, "step_s": statistics.median(times),
                      "peak_rss_gb": peak_kb / 2**20, "loss": float(metrics["loss"])}))  # fmt: skip


def cpu_table(args) -> None:
    limit = int(args.mem_limit_gb * 2**30)

    def cap():  # in the child: past the cap an allocation fails instead of swapping the host
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = f"{names[0] if names else cpu}, {os.cpu_count()} cores"
    print(f"CPU: {cpu}; model d_model 128, 2 layers, 2 heads of 64, batch 1, AdamW step; "
          f"address-space cap {args.mem_limit_gb:g} GiB per case")  # fmt: skip
    results = {}
    for seq in args.cpu_seqs:
        for impl in ("xla", "blockwise"):
            command = [sys.executable, __file__, "--child", impl, str(seq), "--steps",
                       str(args.steps)]  # fmt: skip
            start = time.perf_counter()
            proc = subprocess.run(command, capture_output=True, text=True, preexec_fn=cap,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
            wall = time.perf_counter() - start
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode == 0 and lines:
                results[seq, impl] = json.loads(lines[-1])
            else:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                oom = any(s in proc.stderr for s in ("RESOURCE_EXHAUSTED", "bad_alloc", "memory"))
                results[seq, impl] = {"failed": "out of memory" if oom else "failed",
                                      "detail": tail[0][:160], "wall_s": wall}  # fmt: skip
            print(f"  seq {seq} {impl}: {json.dumps(results[seq, impl])}", flush=True)
    print("\n| context | implementation | s / train step | peak RSS | vs xla (time) |")
    print("|---|---|---|---|---|")
    for seq in args.cpu_seqs:
        ref = results[seq, "xla"].get("step_s")
        for impl in ("xla", "blockwise"):
            r = results[seq, impl]
            if "failed" in r:
                print(f"| {seq} | {impl} | {r['failed']} (cap {args.mem_limit_gb:g} GiB) | - | - |")
                continue
            ratio = f"{r['step_s'] / ref:.2f}x" if ref else "-"
            print(f"| {seq} | {impl} | {r['step_s']:.3f} | {r['peak_rss_gb']:.2f} GiB | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU memory/time table instead")
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq (GPU mode)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--blocks", type=int, nargs=4, help="ours: block_q block_kv q_bwd kv_bwd")
    parser.add_argument("--profile", help="write a jax.profiler trace of ours here")
    parser.add_argument("--cpu-seqs", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per CPU case")
    parser.add_argument("--mem-limit-gb", type=float, default=12.0)
    parser.add_argument("--child", nargs=2, metavar=("IMPL", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        cpu_child(args.child[0], int(args.child[1]), args.steps)
    elif args.cpu:
        cpu_table(args)
    else:
        import jax

        if jax.default_backend() != "gpu":
            sys.exit("no GPU here: run with --cpu for the CPU memory/time table")
        gpu_table(args)


if __name__ == "__main__":
    main()
