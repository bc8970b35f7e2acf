"""The Hopper (Mosaic GPU) attention backward on a GPU: values first, then speed beside the rest.

    python benchmarks/hopper_bwd.py             # an H100/H200: JSON into $OUT (or --out)
    python benchmarks/hopper_bwd.py --dry-run   # any jax >= 0.11: tiny values, interpreted

Values: dq, dk, dv of ours (compiled) against jax.vjp of the float32 XLA reference, fed the
reference's base-2 lse and delta, at head_dim 64/128, causal and not, float16 and bfloat16,
GQA, a ragged length; the largest error relative to the largest gradient entry. Speed: the
backward alone at 2k-16k (batch x seq = 16k tokens, 16 heads of 128, bfloat16, causal and
not): ours beside our Triton backward (``gpu.backward``, the same inputs), as a ratio from one
run; cuDNN's and JAX's own FlashAttention-3 op's backward as (forward+backward) - forward.
FLOPs: 10 * B * H * T^2 * D (five matmuls of the forward's two), causal counted as half.

It records the CUDA runtime: JAX's FA3 op refuses causal masking on 12.8.0 <= v < 12.9.1 (a
ptxas miscompilation); ours has no such guard, so a causal value row failing on such a runtime
points there first. Every case runs in its own try; results are rewritten after each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import median_seconds  # noqa: E402  (this folder, on sys.path)


def machine() -> dict:
    import jax

    info = {"jax": jax.__version__, "device": jax.devices()[0].device_kind}
    try:
        from jax._src.lib import cuda_versions

        info["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
    except Exception as error:  # a CPU-only jaxlib has no CUDA plugin
        info["cuda_runtime"] = f"unavailable ({type(error).__name__})"
    return info


def problem(batch, t, heads, kv_heads, head_dim, dtype, causal, seed=0):
    """Inputs and the float32 reference: q, k, v, dO, lse (base 2), delta, (dq, dk, dv)."""
    import jax
    import jax.numpy as jnp

    from research.kernels.flash_attention.common import LOG2_E
    from research.models.attention import xla_attention

    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, t, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, t, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, t, kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], q.shape, dtype)
    pos = jnp.arange(t)

    @jax.jit
    def reference(q, k, v, d_out):
        f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
        with jax.default_matmul_precision("highest"):
            out, vjp = jax.vjp(lambda *a: xla_attention(*a, pos, pos, causal=causal), *f32[:3])
            k_all = jnp.repeat(f32[1], heads // kv_heads, axis=2)
            s = jnp.einsum("bthd,bshd->bhts", f32[0], k_all) * (LOG2_E / math.sqrt(head_dim))
            if causal:
                s = jnp.where(pos[None, :] <= pos[:, None], s, -jnp.inf)
            lse = jax.nn.logsumexp(s * math.log(2), axis=-1) / math.log(2)
            delta = jnp.einsum("bthd,bthd->bht", out, f32[3])
            return lse, delta, vjp(f32[3])

    return (q, k, v, d_out, *reference(q, k, v, d_out))


def ours(causal: bool, interpret: bool):
    import jax

    from research.kernels.flash_attention import hopper_bwd

    def run(q, k, v, d_out, lse, delta):
        return hopper_bwd.backward(
            q, k, v, None, None, None, None, lse, d_out, delta,
            causal=causal, window=0, blocks=None, interpret=interpret,
        )  # fmt: skip

    return run if interpret else jax.jit(run)


def value_case(head_dim, causal, dtype_name, group, dry) -> dict:
    import jax.numpy as jnp

    t = 136 if dry else 1000  # ragged: padded to whole tiles, padded keys never visible
    q, k, v, d_out, lse, delta, want = problem(
        1, t, 4, 4 // group, head_dim, getattr(jnp, dtype_name), causal
    )
    got = ours(causal, interpret=dry)(q, k, v, d_out, lse, delta)
    errors = {
        name: float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
        for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True)
    }
    tol = 5e-3 if dtype_name == "float16" else 3e-2
    return {**errors, "ok": max(errors.values()) < tol}


def speed_case(seq: int, causal: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from research.kernels.flash_attention import common, gpu

    batch, heads, head_dim = 16384 // seq, 16, 128
    q, k, v, d_out, lse, delta, _ = problem(batch, seq, heads, heads, head_dim, jnp.bfloat16,
                                            causal)  # fmt: skip
    pos = jnp.arange(seq)

    @jax.jit
    def triton(q, k, v, d_out, lse, delta):
        blocks = common.BlockSizes.for_backend("gpu")
        return gpu.backward(q, k, v, pos, pos, None, None, lse, d_out, delta,
                            causal=causal, window=0, blocks=blocks, interpret=False)  # fmt: skip

    def backward_by_difference(forward):
        """(forward + backward) - forward seconds of an op with its own custom VJP."""
        fwd = jax.jit(forward)
        both = jax.jit(lambda q, k, v, g: jax.vjp(forward, q, k, v)[1](g))
        both_s = median_seconds(both, q, k, v, d_out, repeats=10)
        return both_s - median_seconds(fwd, q, k, v, repeats=10)

    flops = 10 * batch * heads * seq * seq * head_dim / (2 if causal else 1)
    row = {"seq": seq, "causal": causal, "batch": batch}
    args = (q, k, v, d_out, lse, delta)
    for name, timing in (
        ("ours", lambda: median_seconds(ours(causal, False), *args, repeats=10)),
        ("triton", lambda: median_seconds(triton, *args, repeats=10)),
        ("cudnn", lambda: backward_by_difference(
            lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, implementation="cudnn"))),
        ("stock_fa3", lambda: backward_by_difference(_stock_fa3(causal))),
    ):  # fmt: skip
        try:
            row[f"{name}_ms"] = 1e3 * timing()
            row[f"{name}_tflops"] = flops / (row[f"{name}_ms"] * 1e-3) / 1e12
        except Exception as error:
            row[f"{name}_error"] = f"{type(error).__name__}: {str(error)[:200]}"
    if "ours_ms" in row and "triton_ms" in row:
        row["ours_vs_triton_speedup"] = row["triton_ms"] / row["ours_ms"]
    return row


def _stock_fa3(causal: bool):
    from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3

    config = fa3.TuningConfig(
        block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal,
        block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64,
    )  # fmt: skip
    return lambda q, k, v: fa3.attention(q, k, v, config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny values, interpreted")
    parser.add_argument("--out", default=os.environ.get("OUT", "device_check_out"))
    parser.add_argument("--seqs", default="2048,4096,8192,16384")
    args = parser.parse_args(argv)
    if args.dry_run:
        from research import runtime

        runtime.skip_absent_tpu()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if jax.devices()[0].platform != "gpu" and not args.dry_run:
        print("no GPU here: run with --dry-run", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "dry_run": args.dry_run, "values": [], "speed": []}

    def save():
        (out / "hopper_bwd.json").write_text(json.dumps(report, indent=1, default=str))

    cases = [(d, c, dt, g) for d in (64, 128) for c in (True, False)
             for dt in ("bfloat16", "float16") for g in (1, 4)]  # fmt: skip
    for head_dim, causal, dtype_name, group in cases[:2] if args.dry_run else cases:
        row = {"head_dim": head_dim, "causal": causal, "dtype": dtype_name, "group": group}
        try:
            row.update(value_case(head_dim, causal, dtype_name, group, args.dry_run))
        except Exception:
            row["error"] = traceback.format_exc(limit=3)[-400:]
        report["values"].append(row)
        print(json.dumps(row), flush=True)
        save()
    if not args.dry_run:
        for seq in map(int, args.seqs.split(",")):
            for causal in (True, False):
                try:
                    row = speed_case(seq, causal)
                except Exception:
                    row = {"seq": seq, "causal": causal, "error": traceback.format_exc()[-400:]}
                report["speed"].append(row)
                print(json.dumps(row), flush=True)
                save()
    print(f"machine: {report['machine']}; written to {out / 'hopper_bwd.json'}")
    return 0 if all(r.get("ok") for r in report["values"]) else 1


if __name__ == "__main__":
    sys.exit(main())
