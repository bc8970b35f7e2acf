"""The Hopper (Mosaic GPU) attention forward on a GPU: values first, then speed beside the rest.

    python benchmarks/hopper_fwd.py             # an H100/H200: JSON + table into $OUT (or --out)
    python benchmarks/hopper_fwd.py --dry-run   # anywhere: tiny value checks, interpreted

Values: ours (compiled; P from registers and P through SMEM) against the float32 XLA reference
at head_dim 64/128/256, causal and not, float16 and bfloat16, GQA, a ragged length; max abs
error of the output and of the base-2 log-sum-exp. Speed: forward TFLOP/s at 2k-16k (batch x
seq = 16k, 16 heads of 128, bfloat16), causal and not: ours beside JAX's own FlashAttention-3
op (``jax.experimental.pallas.ops.gpu.attention_mgpu``), cuDNN and our Triton kernel, as
ratios, from one run; then ours at 8k over a few tile settings (``SWEEP``) to pick defaults.
FLOPs: 4 * B * H * T^2 * D, causal counted as half.

It records the CUDA runtime: JAX's FA3 op refuses causal masking on 12.8.0 <= v < 12.9.1 (a
ptxas miscompilation); ours has no such guard, so a causal value row that fails on such a
runtime points there first. Every case runs in its own try; results are rewritten after each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import median_seconds  # noqa: E402  (this folder, on sys.path)


def environment() -> dict:
    import jax

    info = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind)}
    try:
        from jax._src.lib import cuda_versions

        info["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
    except Exception as error:  # CPU-only jaxlib: no CUDA plugin
        info["cuda_runtime"] = f"unavailable ({type(error).__name__})"
    return info


def inputs(batch, t, heads, kv_heads, head_dim, dtype, seed=0):
    import jax

    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, t, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, t, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, t, kv_heads, head_dim), dtype)
    return q, k, v


def value_case(head_dim, causal, dtype_name, group, registers_pv, dry) -> dict:
    import jax
    import jax.numpy as jnp

    from research.kernels.flash_attention import hopper_fwd
    from research.kernels.flash_attention.common import LOG2_E
    from research.models.attention import xla_attention

    t = 200 if dry else 1000  # ragged: padded to whole tiles, padded keys never visible
    q, k, v = inputs(1 if dry else 2, t, 4, 4 // group, head_dim, getattr(jnp, dtype_name))
    blocks = dataclasses.replace(
        hopper_fwd.HopperBlocks.for_head_dim(head_dim), registers_pv=registers_pv
    )
    fwd = jax.jit(
        lambda q, k, v: hopper_fwd.forward(
            q, k, v, None, None, None, None,
            causal=causal, window=0, blocks=blocks, interpret=dry,
        )
    )  # fmt: skip
    out, lse = fwd(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    pos = jnp.arange(t)
    with jax.default_matmul_precision("highest"):
        ref = xla_attention(*f32, pos, pos, causal=causal)
        kk = jnp.repeat(f32[1], group, axis=2)
        s = jnp.einsum("bthd,bshd->bhts", f32[0], kk) * (LOG2_E / math.sqrt(head_dim))
    if causal:
        s = jnp.where(pos[None, None, None, :] <= pos[None, None, :, None], s, -jnp.inf)
    ref_lse = jax.nn.logsumexp(s * math.log(2), axis=-1) / math.log(2)
    out_err = float(jnp.max(jnp.abs(out[:, :t].astype(jnp.float32) - ref)))
    lse_err = float(jnp.max(jnp.abs(lse[:, :, :t] - ref_lse)))
    tol = 4e-3 if dtype_name == "float16" else 3e-2
    return {"out_err": out_err, "lse_err": lse_err, "ok": out_err < tol and lse_err < 1e-3}


# Tile settings tried at 8k (head_dim 128), each a change from HopperBlocks.for_head_dim.
SWEEP = {
    "default": {},
    "block_kv=64": {"block_kv": 64},
    "block_kv=64 stages=3": {"block_kv": 64, "stages": 3},
    "block_kv=64 stages=4": {"block_kv": 64, "stages": 4},
    "consumers=1": {"consumers": 1},
    "no pingpong": {"pingpong": False},
    "block_q=128 consumers=1": {"block_q": 128, "consumers": 1},
}


def ours_fn(causal: bool, **changes):
    import jax

    from research.kernels.flash_attention import hopper_fwd

    def run(q, k, v):
        blocks = dataclasses.replace(hopper_fwd.HopperBlocks.for_head_dim(q.shape[-1]), **changes)
        return hopper_fwd.forward(
            q, k, v, None, None, None, None,
            causal=causal, window=0, blocks=blocks, interpret=False,
        )[0]  # fmt: skip

    return jax.jit(run)


def speed_impls(causal: bool) -> dict:
    import jax

    from research.kernels.flash_attention import common, gpu

    def triton(q, k, v):
        pos = jax.numpy.arange(q.shape[1])
        blocks = common.BlockSizes.for_backend("gpu")
        return gpu.forward(
            q, k, v, pos, pos, None, None,
            causal=causal, window=0, blocks=blocks, interpret=False,
        )[0]  # fmt: skip

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")

    def stock_fa3(q, k, v):
        from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3

        config = fa3.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=causal)
        return fa3.attention(q, k, v, config)

    return {
        "ours": ours_fn(causal),
        "ours_p_smem": ours_fn(causal, registers_pv=False),
        "stock_fa3": jax.jit(stock_fa3),
        "cudnn": jax.jit(cudnn),
        "triton": jax.jit(triton),
    }


def speed_case(name, fn, seq, causal) -> dict:
    import jax.numpy as jnp

    del name  # the key names it

    batch, heads, head_dim = 16384 // seq, 16, 128
    q, k, v = inputs(batch, seq, heads, heads, head_dim, jnp.bfloat16)
    seconds = median_seconds(fn, q, k, v, repeats=10)
    flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    return {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12}


def table(payload: dict) -> str:
    lines = [f"environment: {payload['environment']}", ""]
    lines += ["| value case | out err | lse err | ok |", "|---|---|---|---|"]
    for key, row in payload["values"].items():
        cells = [row.get("out_err", row.get("error", "")), row.get("lse_err", ""), row.get("ok")]
        lines.append(f"| {key} | " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "| speed case | TFLOP/s | ours / this |", "|---|---|---|"]
    for key, row in payload["speed"].items():
        ratio = row.get("ours_over_this", "")
        lines.append(f"| {key} | {row.get('tflops', row.get('error', ''))} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny, interpreted, no speed")
    parser.add_argument("--out", default=os.environ.get("OUT", "device_check_out"))
    parser.add_argument("--budget-s", type=float, default=400.0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment(), "values": {}, "speed": {}}

    def save():
        (out_dir / "hopper_fwd.json").write_text(json.dumps(payload, indent=1))
        (out_dir / "hopper_fwd.md").write_text(table(payload))

    def attempt(section, key, fn, *fn_args):
        if time.monotonic() - started > args.budget_s:
            payload[section][key] = {"error": "skipped: over the time budget"}
            return
        try:
            payload[section][key] = fn(*fn_args)
        except Exception as error:  # one failing case must not lose the others
            payload[section][key] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        print(section, key, payload[section][key], flush=True)
        save()

    dims = (64,) if args.dry_run else (64, 128, 256)
    for head_dim in dims:
        for causal in (True, False):
            for dtype_name in ("bfloat16", "float16"):
                for group, registers_pv in ((1, True), (4, True), (4, False)):
                    if args.dry_run and registers_pv:
                        continue  # the interpreter runs only the P-through-SMEM path
                    key = f"d{head_dim} {'causal' if causal else 'full'} {dtype_name} g{group}"
                    key += " p_regs" if registers_pv else " p_smem"
                    case = (head_dim, causal, dtype_name, group, registers_pv, args.dry_run)
                    attempt("values", key, value_case, *case)
    if not args.dry_run:
        for causal in (True, False):
            impls = speed_impls(causal)
            for seq in (2048, 4096, 8192, 16384):
                rows = {}
                for name, fn in impls.items():
                    key = f"{name} {'causal' if causal else 'full'} {seq}"
                    attempt("speed", key, speed_case, name, fn, seq, causal)
                    rows[name] = payload["speed"][key]
                ours = rows["ours"].get("tflops")
                for row in rows.values():
                    if ours and row.get("tflops"):
                        row["ours_over_this"] = round(ours / row["tflops"], 3)
                save()
        for causal in (True, False):
            for name, changes in SWEEP.items():
                key = f"tiles {name} {'causal' if causal else 'full'} 8192"
                attempt("speed", key, speed_case, name, ours_fn(causal, **changes), 8192, causal)
    print(table(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
