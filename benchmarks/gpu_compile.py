"""Our flash-attention kernels compiled for an H100 (sm_90a) on a machine without a GPU:
registers, spills and shared memory per kernel, from ptxas, before any GPU session.

    python benchmarks/gpu_compile.py                       # B=1 T=4096 H=16 D=64,128 bf16 causal
    python benchmarks/gpu_compile.py --seq 256 --head-dims 64 --json out.json

Needs jax >= 0.11 with its CUDA plugin but not the CUDA wheels (``pip install -e
'.[gpu-compile]'``: jax[cuda12-local]) and a ptxas (the CUDA toolkit's, or $PTXAS). For each
head_dim it compiles the gradient of ``flash_attention`` (forward, dQ and dK/dV) once with
kernel="gpu" (our Triton kernels, compiled by XLA's Triton) and once with kernel="hopper" (the
Mosaic GPU kernels), for a compile-only H100 (research/aot/gpu.py), keeps every PTX module the
compile hands to ptxas, and runs ``ptxas -arch=sm_90a -v`` on it. Shared memory is ptxas'
static figure plus the dynamic one each kernel is launched with (XLA's for Triton, Mosaic
GPU's for Hopper); a kernel fits when it has at most 255 registers per thread and 227 KB.

The ptxas here may not be the one the GPU machine runs (its version is printed): register
counts can move by a few between CUDA releases. The Hopper kernels launch with what ptxas
allots three warpgroups (168) and then move registers between them with ``setmaxnreg`` (the
counts in brackets: consumers up, producer down), so their spill columns are what tell.
"ptxas notes" counts ptxas' numbered advisories on the kernel (C7519: wgmma serialised by an
injected warpgroup.arrive, a speed loss rather than an error).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research.aot import gpu as aot_gpu  # noqa: E402

# Triton entries are the pallas_call names; Mosaic GPU's are "<kernel_name>_mosaic_gpu_kernel"
# (the forward has no kernel_name: "anonymous").
_KERNELS = {
    "gpu": {"flash_attention_fwd": "fwd", "flash_attention_dq": "dq",
            "flash_attention_dkv": "dkv"},
    "hopper": {"anonymous_mosaic_gpu_kernel": "fwd", "flash_attention_dq_hopper_mosaic_gpu_kernel":
               "dq", "flash_attention_dkv_hopper_mosaic_gpu_kernel": "dkv"},
}  # fmt: skip
_FAMILY = {"gpu": "triton", "hopper": "hopper"}


def _new(folder: Path, seen: set[Path]) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p not in seen)
    seen.update(files)
    return files


def compile_case(kernel: str, head_dim: int, args, workdir: Path, seen: set[Path]) -> list[dict]:
    """Compile d(sum of flash_attention)/d(q, k, v) with ``kernel`` for the H100; one row per
    kernel of ours in it."""
    import jax
    import jax.numpy as jnp

    from research.backend import target_backend
    from research.kernels.flash_attention import flash_attention

    device = aot_gpu.h100()
    sharding = jax.sharding.SingleDeviceSharding(device)
    dtype = jnp.dtype(args.dtype)
    shape = (args.batch, args.seq, args.heads, head_dim)
    spec = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def loss(q, k, v):
        out = flash_attention(q, k, v, causal=not args.non_causal, kernel=kernel, interpret=False)
        return out.astype(jnp.float32).sum()

    start = time.perf_counter()
    # The default device names the GPU the Triton lowering targets (its compute capability).
    with target_backend("gpu"), jax.default_device(device):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(spec, spec, spec).lower()
    lowered.compile()
    seconds = time.perf_counter() - start
    files = _new(workdir, seen)
    dynamic = aot_gpu.xla_dynamic_smem(files)
    mosaic = aot_gpu.mosaic_smem(files)
    rows = []
    for ptx in (f for f in files if f.suffix == ".ptx" and f.parent == workdir / "ptx"):
        moves = aot_gpu.setmaxnreg(ptx.read_text())
        for entry, usage in aot_gpu.ptxas_usage(ptx).items():
            name = _KERNELS[kernel].get(entry)
            if name is None:
                continue  # XLA's own fusions (padding, delta)
            if kernel == "gpu":
                dyn = dynamic.get(entry)
            else:
                dyn = mosaic.get(entry.removesuffix("_mosaic_gpu_kernel"))
            smem = usage.static_smem + (dyn or 0)
            rows.append(
                dict(
                    kernel=f"{_FAMILY[kernel]} {name}",
                    head_dim=head_dim,
                    registers=usage.registers,
                    setmaxnreg=moves,
                    spill_stores=usage.spill_stores,
                    spill_loads=usage.spill_loads,
                    stack=usage.stack,
                    advisories=usage.advisories,
                    static_smem=usage.static_smem,
                    dynamic_smem=dyn,
                    smem=smem,
                    fits=usage.registers <= aot_gpu.MAX_REGISTERS
                    and smem <= aot_gpu.SMEM_LIMIT
                    and dyn is not None,
                    compile_s=round(seconds, 1),
                )
            )
    names = [r["kernel"] for r in rows]
    if len(set(names)) != len(names):
        raise aot_gpu.GpuCompileError(f"{kernel} d={head_dim}: a kernel twice in {names}")
    order = ["fwd", "dq", "dkv"]
    rows.sort(key=lambda r: order.index(r["kernel"].split()[1]))
    missing = set(_KERNELS[kernel].values()) - {r["kernel"].split()[1] for r in rows}
    if missing:
        raise aot_gpu.GpuCompileError(
            f"{kernel} d={head_dim}: no PTX seen for {sorted(missing)} (kernel='hopper' runs "
            "Triton for a pass outside its scope: see flash_attention.hopper_route)"
        )
    return rows


def machine() -> str:
    ptxas = aot_gpu.find_ptxas()
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    release = version.strip().splitlines()[-1] if version.strip() else "?"
    load = os.getloadavg()[0]
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load:.1f}; "
        f"ptxas {release}"
    )


def table(rows: list[dict]) -> str:
    head = (
        "| kernel | head_dim | registers/thread (setmaxnreg) | spill stores / loads (B) "
        "| smem (B): static + dynamic | ptxas notes | fits |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        dyn = "?" if r["dynamic_smem"] is None else r["dynamic_smem"]
        moves = f" ({'/'.join(map(str, r['setmaxnreg']))})" if r["setmaxnreg"] else ""
        lines.append(
            f"| {r['kernel']} | {r['head_dim']} | {r['registers']}{moves} | "
            f"{r['spill_stores']} / {r['spill_loads']} | {r['smem']} = {r['static_smem']} + "
            f"{dyn} | {r['advisories']} | {'yes' if r['fits'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--kernels", default="gpu,hopper", help="gpu (Triton), hopper or both")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--keep", action="store_true", help="keep the PTX and dumps (printed)")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="gpu-compile-"))
    os.environ.update(aot_gpu.compile_env(workdir))
    # Compile-only: the CUDA plugin still loads for its topology, but without "cuda" among the
    # platforms it neither checks for CUDA libraries (absent here) nor takes a GPU it finds.
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    print(f"# {machine()}; jax {jax.__version__}")
    print(
        f"# B={args.batch} T={args.seq} H={args.heads} {args.dtype} "
        f"{'non-causal' if args.non_causal else 'causal'}, compiled for {aot_gpu.ARCH}"
    )
    seen: set[Path] = set()
    rows = []
    try:
        for kernel in args.kernels.split(","):
            for head_dim in map(int, args.head_dims.split(",")):
                rows += compile_case(kernel, head_dim, args, workdir, seen)
    finally:  # the dumps run to ~40 MB a Mosaic GPU kernel: never leave them behind unasked
        if args.keep:
            print(f"# PTX and dumps kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
