"""One command for a lent GPU: are our kernels right there, and how fast is everything?

    python benchmarks/device_check.py                 # on the GPU machine: <= ~8 min on an H100
    python benchmarks/device_check.py --dry-run       # any CPU: every case tiny, kernels in
                                                      # interpret mode (proves the script works)

Writes ``device_check.json`` and ``device_check.md`` to ``$OUT`` (or ``--out``) after every case,
so a run cut short still leaves what it measured. Five sections, each case in its own try, with
the time budget checked before each one (a case that would not fit is recorded as skipped):

1. kernels: every compiled case of our flash attention (forward, dq, dk, dv) against the float32
   XLA reference on the same inputs: causal, non-causal, window, segments, grouped-query; head
   dim 64/128/256; bf16/fp16/fp32. Each also checks that query rows which see no key are exactly
   0 (output and dq), and that the reference with the other causality is far off (a wrong mask
   cannot pass). Then the Mosaic GPU (Hopper) kernels through ``kernel="hopper"`` at default
   positions, the route each pass took recorded (head_dim 256: Hopper forward, Triton backward).
2. attention: TFLOP/s forward and forward+backward, causal, at 2k/4k/8k/16k (batch x seq = 16k
   tokens, 16 heads of 128, bf16): ours (Triton), ours (Hopper), cuDNN, the stock Pallas op,
   JAX's own Mosaic GPU FA3 op, XLA.
3. gpt2_small: train-step MFU, bf16, with cuDNN attention and with our kernels (Triton, Hopper).
4. moe: step time of dropless (ragged_dot), capacity and a dense model of the same active size.
5. blocks: a short sweep of our kernel's block sizes, warps and stages (causal fwd+bwd at 4k),
   and the Hopper backward with one and with two consumer warpgroups (the register-spill trade).

It runs with the device's own jax (0.11 on the lent machines) and imports nothing of grain or
``research.data``: its data is random tokens. Needs nothing beyond jax, flax and optax.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import median_seconds  # noqa: E402  (this folder, on sys.path)

# In the order they run: correctness first, then what the targets are measured on.
SECTIONS = ("kernels", "attention", "gpt2_small", "moe", "blocks")
# Relative-error bounds against the float32 reference (METHOD: bf16 operands land 1e-3..1e-2,
# tf32-like float32 dots near 3e-4).
TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3, "float32": 2e-3}


class Check:
    """Runs cases under a time budget and writes every result as it comes."""

    def __init__(self, out: Path, budget_s: float, meta: dict):
        self.out, self.budget, self.meta = out, budget_s, meta
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def case(self, section: str, name: str, fn: Callable[[], dict], needs_s: float) -> dict:
        row = {"section": section, "case": name}
        if self.left() < needs_s:
            row["status"] = f"skipped: {self.left():.0f} s of the budget left, needs ~{needs_s:.0f}"
        else:
            started = time.perf_counter()
            try:
                row.update(fn())
                row.setdefault("status", "ok")
            except Exception as error:  # one case's failure must not stop the others
                row["status"] = "error"
                row["error"] = f"{type(error).__name__}: {str(error)[:600]}"
                row["traceback"] = traceback.format_exc()[-2000:]
            row["seconds"] = round(time.perf_counter() - started, 2)
        self.rows.append(row)
        shown = {k: v for k, v in row.items() if k not in ("traceback", "section")}
        print(f"[{section}] {json.dumps(shown, default=str)[:400]}", flush=True)
        self.save()
        return row

    def save(self) -> None:
        payload = {**self.meta, "elapsed_s": round(time.perf_counter() - self.start, 1)}
        payload["rows"] = self.rows
        (self.out / "device_check.json").write_text(json.dumps(payload, indent=1, default=str))
        (self.out / "device_check.md").write_text(markdown(payload))


def markdown(payload: dict) -> str:
    """One table per section; the columns are the keys its rows have."""
    lines = [
        f"# Device check: {payload['device']} ({payload['device_kind']}), jax "
        f"{payload['jax']}, {'dry run' if payload['dry_run'] else 'full run'}, "
        f"{payload['elapsed_s']} s",
        "",
    ]
    for section in SECTIONS:
        rows = [r for r in payload["rows"] if r["section"] == section]
        if not rows:
            continue
        keys = [k for k in rows[0] if k not in ("section", "traceback")]
        for r in rows[1:]:
            keys += [k for k in r if k not in keys and k not in ("section", "traceback")]
        lines += [f"## {section}", "", "| " + " | ".join(keys) + " |"]
        lines.append("|" + "---|" * len(keys))
        for r in rows:
            cells = [_cell(r.get(k, "")) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "/").replace("\n", " ")[:160]


def _rel(x, ref) -> float:
    import jax.numpy as jnp

    x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
    return float(jnp.linalg.norm(x - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30))


# --- 1. kernels ----------------------------------------------------------------------------


def kernel_cases(dry: bool) -> list[tuple[str, str, int, str]]:
    """(kernel, dtype, head_dim, variant). Triton: the whole variant grid in bf16 at every
    head_dim, and the other dtypes at the head dims where shared memory is tightest. Hopper:
    its scope (fp16/bf16, causal or not, sliding window, GQA, default positions), each
    head_dim once."""
    variants = ("causal", "noncausal", "window", "segments", "gqa")
    cases = [("gpu", "bfloat16", d, v) for d in (64, 128, 256) for v in variants]
    cases += [("gpu", t, d, "causal") for t in ("float16", "float32") for d in (128, 256)]
    hopper = [("bfloat16", 64, "causal"), ("bfloat16", 128, "causal"), ("bfloat16", 128, "gqa"),
              ("bfloat16", 128, "noncausal"), ("float16", 128, "causal"),
              ("bfloat16", 256, "causal"), ("bfloat16", 128, "window")]  # fmt: skip
    return cases + [("hopper", *case) for case in hopper]


def kernel_case_name(kernel: str, dtype: str, head_dim: int, variant: str) -> str:
    return f"{'hopper ' if kernel == 'hopper' else ''}{dtype} d{head_dim} {variant}"


def kernel_case(kernel: str, dtype_name: str, head_dim: int, variant: str, dry: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from research.kernels.flash_attention import flash_attention, hopper_bwd, hopper_route
    from research.kernels.flash_attention.common import visible
    from research.models.attention import xla_attention

    dtype = jnp.dtype(dtype_name)
    batch, seq, heads = (1, 64, 2) if dry else (2, 1024, 8)
    kv_heads = heads // 2 if variant == "gqa" else heads
    causal = variant != "noncausal"
    window = seq // 4 if variant == "window" else 0
    key = jax.random.key(hash((dtype_name, head_dim, variant)) % 2**31)
    kq, kk, kv, kd, ks = jax.random.split(key, 5)
    q = jax.random.normal(kq, (batch, seq, heads, head_dim), jnp.float32)
    k = jax.random.normal(kk, (batch, seq, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(kv, (batch, seq, kv_heads, head_dim), jnp.float32)
    d_out = jax.random.normal(kd, q.shape, jnp.float32)
    q, k, v, d_out = (x.astype(dtype) for x in (q, k, v, d_out))
    seg = None
    if variant == "segments":  # three packed documents of random lengths per row
        cuts = jnp.sort(jax.random.randint(ks, (batch, 2), 1, seq), axis=1)
        seg = (jnp.arange(seq)[None, :] >= cuts[:, :1]).astype(jnp.int32) + (
            jnp.arange(seq)[None, :] >= cuts[:, 1:]
        ).astype(jnp.int32)
    # Keys start `shift` positions after the queries: with causality, the first `shift` query
    # rows see no key at all, and so does the start of every later packed document (its first
    # `shift` rows see only the previous document's keys). Such rows must come out exactly 0
    # (out and dq), while the reference gives them a uniform average (softmax of equal scores):
    # compare only the rows that see a key, and give the empty ones no output gradient, so that
    # the reference's dk/dv carry none from them.
    shift = 8 if dry else 64
    # The Hopper kernels take default positions only: no shift (the route says if they ran).
    shift = shift if causal and kernel != "hopper" else 0
    q_pos = jnp.arange(seq, dtype=jnp.int32)
    kv_pos = q_pos + shift
    if kernel == "hopper" and dry and not hopper_bwd.INTERPRETER_WORKS:
        return {"status": f"skipped: jax {jax.__version__}'s Mosaic GPU interpreter (jax >= 0.11)"}
    route = None
    if kernel == "hopper":
        route, why = hopper_route(q, k, None, None, seg, seg, window)
        if route[0] != "hopper":
            return {"route": "/".join(route), "status": f"error: not routed to Mosaic GPU: {why}"}
    seg_rows = seg if seg is not None else jnp.zeros((batch, seq), jnp.int32)
    sees = visible(
        q_pos[None, :, None], kv_pos[None, None, :],
        seg_rows[:, :, None], seg_rows[:, None, :], causal, window,
    ).any(axis=-1)[:, :, None, None]  # [B, T, 1, 1]: the row sees at least one key  # fmt: skip
    d_out = jnp.where(sees, d_out, 0).astype(dtype)
    interpret = True if dry else None

    def ours(q, k, v, causal=causal):
        seg_ids = (seg, seg) if seg is not None else (None, None)
        positions = (None, None) if kernel == "hopper" else (q_pos, kv_pos)
        return flash_attention(q, k, v, *positions, *seg_ids, causal=causal, window=window,
                               kernel=kernel, interpret=interpret)  # fmt: skip

    def reference(q, k, v, causal=causal):
        with jax.default_matmul_precision("highest"):
            f32 = [x.astype(jnp.float32) for x in (q, k, v)]
            return xla_attention(*f32, q_pos, kv_pos, window, seg, seg, causal=causal)

    def seen(x):
        return jnp.where(sees, jnp.asarray(x, jnp.float32), 0)

    out, vjp = jax.vjp(jax.jit(ours), q, k, v)
    grads = jax.jit(vjp)(d_out)
    ref_out, ref_vjp = jax.vjp(reference, q, k, v)
    ref_grads = ref_vjp(d_out.astype(jnp.float32))
    errors = {"out": _rel(seen(out), seen(ref_out)), "dq": _rel(seen(grads[0]), seen(ref_grads[0]))}
    errors["dk"], errors["dv"] = _rel(grads[1], ref_grads[1]), _rel(grads[2], ref_grads[2])
    tol = TOLERANCE[dtype_name]
    row = {f"err_{n}": e for n, e in errors.items()}
    if route:
        row["route"] = "/".join(route)  # forward/backward: hopper (Mosaic GPU) or gpu (Triton)
    row["tolerance"] = tol
    # Control: the reference with the other causality must be far off (not for a window,
    # which needs causality, or where the shifted positions make both agree).
    if variant in ("causal", "noncausal", "gqa"):
        other = reference(q, k, v, causal=not causal)
        row["err_vs_wrong_causality"] = _rel(seen(out), seen(other))
        control_ok = row["err_vs_wrong_causality"] > 20 * tol
    else:
        control_ok = True
    empty = ~sees
    row["empty_rows"] = int(jnp.sum(empty))
    if row["empty_rows"]:
        empty_out = float(jnp.max(jnp.where(empty, jnp.abs(out.astype(jnp.float32)), 0)))
        empty_dq = float(jnp.max(jnp.where(empty, jnp.abs(grads[0].astype(jnp.float32)), 0)))
        row["empty_rows_max"] = max(empty_out, empty_dq)
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in (out, *grads))
    correct = finite and all(e < tol for e in errors.values()) and control_ok
    correct = correct and row.get("empty_rows_max", 0.0) == 0.0
    row["status"] = "ok" if correct else "WRONG"
    return row


# --- 2. attention speed --------------------------------------------------------------------


def attention_impls(dry: bool) -> dict[str, Callable]:
    import jax
    import jax.numpy as jnp

    from research.kernels.flash_attention import flash_attention, hopper_bwd
    from research.models.attention import xla_attention

    def xla(q, k, v):
        pos = jnp.arange(q.shape[1], dtype=jnp.int32)
        return xla_attention(q, k, v, pos, pos, causal=True)

    impls = {"ours": lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=dry or None)}
    if not dry or hopper_bwd.INTERPRETER_WORKS:
        impls["ours hopper"] = lambda q, k, v: flash_attention(
            q, k, v, causal=True, kernel="hopper", interpret=dry or None
        )
    if not dry:
        from jax.experimental.pallas.ops.gpu import attention as stock

        impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        )
        impls["stock pallas"] = lambda q, k, v: stock.mha(
            q, k, v, None, sm_scale=1 / math.sqrt(q.shape[-1]), causal=True
        )
        impls["stock mgpu fa3"] = stock_fa3()
    impls["xla"] = xla
    return impls


def stock_fa3():
    """JAX's own Mosaic GPU FlashAttention-3 op (its tiles, backward blocks set)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3

    config = fa3.TuningConfig(
        block_q=64, block_kv=128, max_concurrent_steps=2, causal=True,
        block_q_dq=64, block_kv_dq=64, block_q_dkv=64, block_kv_dkv=64,
    )  # fmt: skip
    return lambda q, k, v: fa3.attention(q, k, v, config)


def attention_case(name: str, fn, seq: int, dry: bool) -> dict:
    import jax
    import jax.numpy as jnp

    tokens, heads, head_dim = (128, 2, 64) if dry else (16384, 16, 128)
    batch = max(1, tokens // seq)
    keys = jax.random.split(jax.random.key(seq), 4)
    shape = (batch, seq, heads, head_dim)
    q, k, v, d_out = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
    forward = jax.jit(fn)

    @jax.jit
    def forward_backward(q, k, v):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(d_out)

    flops = 4 * batch * heads * seq * seq * head_dim / 2  # causal: half the matmul work
    repeats = 2 if dry else 10
    t_fwd = median_seconds(forward, q, k, v, repeats=repeats)
    t_all = median_seconds(forward_backward, q, k, v, repeats=repeats)
    return {
        "impl": name,
        "seq": seq,
        "batch": batch,
        "fwd_ms": 1e3 * t_fwd,
        "fwd_tflops": flops / t_fwd / 1e12,
        "fwd_bwd_ms": 1e3 * t_all,
        "fwd_bwd_tflops": 3.5 * flops / t_all / 1e12,  # backward: 2.5x the forward's FLOPs
    }


# --- 3. and 4. training steps --------------------------------------------------------------


def train_step_case(model_cfg, batch: int, steps: int, peak: float | None) -> dict:
    """Median step time (and MFU) of a jitted train step on random tokens, one device."""
    import jax
    import jax.numpy as jnp

    from research.config import ExperimentConfig, MeshConfig, OptimConfig, TrainConfig
    from research.models.accounting import count_params
    from research.parallel.mesh import make_mesh, on_mesh
    from research.train.state import init_train_state
    from research.train.step import make_train_step

    cfg = ExperimentConfig(
        name="device_check",
        model=model_cfg,
        optim=OptimConfig(lr=1e-4, warmup_steps=10),
        mesh=MeshConfig(data=1),
        train=TrainConfig(steps=1000, batch_size=batch),
    )
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
    graphdef, state, tx, schedule = init_train_state(cfg, mesh)
    step = jax.jit(
        on_mesh(make_train_step(graphdef, tx, schedule, model_cfg, 0.0), mesh), donate_argnums=0
    )
    tokens = jax.random.randint(
        jax.random.key(1), (1, batch, model_cfg.seq_len + 1), 0, model_cfg.vocab_size, jnp.int32
    )
    started = time.perf_counter()
    state, metrics = step(state, tokens)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state, metrics = step(state, tokens)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    flops = count_params(model_cfg).flops_per_token * batch * model_cfg.seq_len
    row = {
        "step_ms": 1e3 * seconds,
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
        "tflops": flops / seconds / 1e12,
    }
    if peak:
        row["mfu"] = flops / seconds / peak
    return row


def gpt2_config(attention: str, dry: bool):
    import dataclasses

    from research.config import ModelConfig, load_experiment

    if dry:
        return ModelConfig(
            vocab_size=256, d_model=64, n_layers=2, n_heads=2, seq_len=64, attention=attention
        ).resolved()
    # The experiment's own shape (experiments/gpt2_small.py imports only research.config).
    model = load_experiment("gpt2_small").model
    return dataclasses.replace(model, attention=attention, compute_dtype="bfloat16").resolved()


def moe_config(kind: str, dry: bool):
    from research.config import ModelConfig

    d, layers, seq, expert = (64, 2, 64, 128) if dry else (1024, 4, 1024, 2816)
    common = dict(vocab_size=32000 if not dry else 256, d_model=d, n_layers=layers,
                  n_heads=max(2, d // 128), seq_len=seq, compute_dtype="bfloat16")  # fmt: skip
    if kind == "dense":  # the same active parameters: top-2 of 8 experts of `expert`
        return ModelConfig(**common, mlp_hidden=2 * expert).resolved()
    return ModelConfig(
        **common, n_experts=8, top_k=2, expert_hidden=expert, moe_dispatch=kind
    ).resolved()


# --- 5. block sweep ------------------------------------------------------------------------


BLOCK_SWEEP = [  # BlockSizes fields; each pass (forward, dQ, dK/dV) has its own tiles/warps/stages
    {},  # the defaults
    {"block_kv": 128, "num_warps": 8},
    {"block_q": 64, "block_kv": 64, "num_warps": 4, "num_stages": 3},
    {"num_stages": 3, "num_stages_dq": 3, "num_stages_dkv": 2},
    {"block_q_dkv": 32, "block_kv_dkv": 128, "num_warps_dkv": 8},
    {
        "block_q_bwd": 128,
        "block_kv_bwd": 32,
        "num_warps_dq": 8,
        "block_q_dkv": 64,
        "block_kv_dkv": 64,
    },
]


def block_case(fields: dict, dry: bool) -> dict:
    from research.kernels.flash_attention import BlockSizes, flash_attention

    blocks = BlockSizes(**fields)
    seq = 64 if dry else 4096

    def fn(q, k, v):
        return flash_attention(q, k, v, causal=True, block_sizes=blocks, interpret=dry or None)

    row = attention_case("ours", fn, seq, dry)
    row["blocks"] = " ".join(f"{k}={v}" for k, v in fields.items()) or "defaults"
    return row


def hopper_backward_case(consumers: int, dry: bool) -> dict:
    """The Hopper backward alone at 4k causal (16 heads of 128, bf16) with 1 or 2 consumer
    warpgroups: at head_dim 128 two spill (ptxas: 32 B) and one does not but streams Q and dO
    twice as often (README, compiling the kernels for an H100); this row says which is faster."""
    import jax
    import jax.numpy as jnp

    from research.kernels.flash_attention import hopper_bwd, hopper_fwd

    if dry and not hopper_bwd.INTERPRETER_WORKS:
        return {"status": f"skipped: jax {jax.__version__}'s Mosaic GPU interpreter (jax >= 0.11)"}
    batch, seq, heads, head_dim = (1, 128, 2, 64) if dry else (4, 4096, 16, 128)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, d_out = (
        jax.random.normal(key, (batch, seq, heads, head_dim), jnp.bfloat16) for key in keys
    )
    kw = dict(causal=True, window=0, interpret=dry or None)
    out, lse = hopper_fwd.forward(q, k, v, None, None, None, None, blocks=None, **kw)
    out, lse = out[:, :seq], lse[:, :, :seq]
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), d_out.astype(jnp.float32))
    blocks = hopper_bwd.HopperBwdBlocks(consumers=consumers)

    def backward(q, k, v, lse, d_out, delta):
        args = (q, k, v, None, None, None, None, lse, d_out, delta)
        return hopper_bwd.backward(*args, blocks=blocks, **kw)

    inputs = (q, k, v, lse, d_out, delta)
    seconds = median_seconds(jax.jit(backward), *inputs, repeats=2 if dry else 10)
    flops = 2.5 * 4 * batch * heads * seq * seq * head_dim / 2  # causal; backward = 2.5 fwd
    return {"consumers": consumers, "seq": seq, "bwd_ms": 1e3 * seconds,
            "bwd_tflops": flops / seconds / 1e12}  # fmt: skip


# --- the run -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny, interpret mode")
    parser.add_argument("--out", default=os.environ.get("OUT", "device_check_out"))
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting cases after")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument(
        "--max-cases", type=int, default=0, help="at most this many cases per section (0: all)"
    )
    parser.add_argument(
        "--only", default="", help="run only the cases whose name contains this text"
    )
    args = parser.parse_args(argv)
    dry = args.dry_run
    if dry:
        from research import runtime

        runtime.skip_absent_tpu()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from research.train.accounting import BY_DEVICE_KIND

    device = jax.devices()[0]
    hardware = BY_DEVICE_KIND.get(device.device_kind)
    peak = hardware.peak_flops if hardware and hardware.peak_flops else None
    meta = {
        "device": device.platform,
        "device_kind": device.device_kind,
        "peak_flops": peak,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "dry_run": dry,
        "budget_s": args.budget_s,
        "grain_imported": "grain" in sys.modules,
        "research_data_imported": any(m.startswith("research.data") for m in sys.modules),
    }
    if device.platform != "gpu" and not dry:
        print("no GPU here: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    check = Check(Path(args.out), args.budget_s, meta)
    wanted = set(args.sections.split(","))

    def limit(cases):
        return cases[: args.max_cases] if args.max_cases else cases

    if "kernels" in wanted:
        grid = [c for c in kernel_cases(dry) if args.only in kernel_case_name(*c)]
        for case in limit(grid):
            check.case(
                "kernels",
                kernel_case_name(*case),
                lambda a=case: {
                    "kernel": a[0],
                    "dtype": a[1],
                    "head_dim": a[2],
                    "variant": a[3],
                    **kernel_case(*a, dry),
                },  # fmt: skip
                needs_s=10,
            )
    if "attention" in wanted:
        impls = attention_impls(dry)
        lengths = [32, 64] if dry else [2048, 4096, 8192, 16384]
        cases = [(seq, name) for seq in lengths for name in impls]
        for seq, name in limit(cases):
            check.case(
                "attention",
                f"{name} {seq}",
                lambda n=name, s=seq: attention_case(n, impls[n], s, dry),
                needs_s=15,
            )
    batch, steps = (2, 2) if dry else (16, 10)  # gpt2_small: 16 x 1024 tokens per step
    if "gpt2_small" in wanted:
        for attention in limit(["cudnn", "pallas", "hopper"] if not dry else ["xla", "pallas"]):
            check.case(
                "gpt2_small",
                f"attention={attention}",
                lambda a=attention: {
                    "attention": a,
                    **train_step_case(
                        gpt2_config(a, dry), 2 if dry else 16, 2 if dry else 10, peak
                    ),
                },
                needs_s=60,
            )
    if "moe" in wanted:
        for kind in limit(["dense", "dropless", "capacity"]):
            check.case(
                "moe",
                kind,
                lambda k=kind: {
                    "kind": k,
                    **train_step_case(moe_config(k, dry), batch, steps, peak),
                },
                needs_s=40,
            )
        dense = next((r for r in check.rows if r.get("kind") == "dense" and "step_ms" in r), None)
        for row in check.rows:
            if dense and row.get("kind") in ("dropless", "capacity") and "step_ms" in row:
                row["vs_dense"] = row["step_ms"] / dense["step_ms"]
        check.save()
    if "blocks" in wanted:
        for blocks in limit(BLOCK_SWEEP):
            name = " ".join(f"{k}={v}" for k, v in blocks.items()) or "defaults"
            check.case("blocks", name, lambda b=blocks: block_case(b, dry), 15)
        for consumers in (2, 1):
            name = f"hopper backward consumers={consumers}"
            check.case("blocks", name, lambda c=consumers: hopper_backward_case(c, dry), 15)
    check.meta["grain_imported"] = "grain" in sys.modules
    check.meta["research_data_imported"] = any(m.startswith("research.data") for m in sys.modules)
    check.save()
    bad = [r for r in check.rows if r.get("status") not in ("ok",) and "skipped" not in r["status"]]
    print(
        f"wrote {check.out}/device_check.json and .md: {len(check.rows)} cases, {len(bad)} not ok"
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
