"""Compiled TPU memory of our Mosaic flash attention: what the lse/delta layout costs.

    python benchmarks/flash_lse_layout.py [--generation v5e] [--seq 4096] [--heads 8]

Compiles (TPU compiler, compile-only device: any machine with libtpu) the forward alone and
forward+backward of `flash_attention(kernel="tpu")` for one bf16 causal shape and prints the
compiler's memory_analysis(): HBM temporaries and outputs. Run it on two commits to compare
layouts (e.g. the [.., T, 1] row statistics against lane-dense [.., 1, T]); no TPU needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generation", default="v5e", choices=("v4", "v5e", "v5p", "v6e"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from research.aot.topology import parse_topology
    from research.backend import target_backend
    from research.kernels.flash_attention import flash_attention

    name = {"v4": "v4-8", "v5e": "v5e-4", "v5p": "v5p-8", "v6e": "v6e-4"}[args.generation]
    device = parse_topology(name).devices()[0]
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    x = jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=SingleDeviceSharding(device))

    def attn(q, k, v):
        return flash_attention(q, k, v, causal=True, kernel="tpu")

    def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32))

    fwd_res = jax.jit(lambda q, k, v: jax.vjp(attn, q, k, v)[1])  # output + saved residuals
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    print(f"{args.generation} B{args.batch} H{args.heads} T{args.seq} D{args.head_dim} bf16 causal")
    with target_backend("tpu"):
        for label, fn in (("forward (residuals out)", fwd_res), ("forward+backward", grad)):
            mem = fn.lower(x, x, x).compile().memory_analysis()
            print(
                f"{label:24s} temp {mem.temp_size_in_bytes / 2**20:8.2f} MiB"
                f"  output {mem.output_size_in_bytes / 2**20:8.2f} MiB"
            )


if __name__ == "__main__":
    main()
