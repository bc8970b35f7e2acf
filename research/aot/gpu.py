"""An H100 as a compile-only JAX device, and what ptxas says about each kernel compiled for it.

The CUDA PJRT plugin (``jax[cuda12-local]``: jax-cuda12-plugin + jax-cuda12-pjrt, no CUDA
wheels) compiles without a GPU when its topology is given a ``GpuTargetConfigProto``:
``jit(...).lower(...).compile()`` then runs XLA:GPU, its bundled Triton (our Pallas Triton
kernels) and Mosaic GPU's pass pipeline (our Hopper kernels) down to PTX, and hands each PTX
module to the ``ptxas`` binary, all on a CPU machine. Nothing here runs the code.

What comes back is captured on the way: ``compile_env`` (set before jax starts) puts a
``ptxas`` wrapper in front of the real one that keeps a copy of every PTX module, turns on
XLA's dump (its thunk list gives each Triton kernel's dynamic shared memory) and Mosaic GPU's
(its resources give each kernel's SMEM scratch). ``ptxas_usage`` then runs ``ptxas -v`` on a
module for registers, spills and static shared memory per entry.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

from research.config import ResearchError

ARCH = "sm_90a"
MAX_REGISTERS = 255  # per thread, any NVIDIA GPU
SMEM_LIMIT = 227 * 1024  # H100: shared memory a block may opt in to (232448 bytes)

# XLA's own description of an H100 SXM (xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb): what the
# compiler would otherwise read from the device.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84978434048
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# Keeps a copy of each PTX file ptxas is given (the compiler deletes its temporary files).
_WRAPPER = """#!/bin/sh
for a in "$@"; do
  if [ -f "$a" ] && head -c 4096 "$a" | grep -q '^\\.version'; then
    cp "$a" "{capture}/$(date +%s%N)-$$.ptx"
  fi
done
exec "{ptxas}" "$@"
"""


class GpuCompileError(ResearchError):
    """A compile for a GPU this machine does not have cannot be set up."""


@dataclasses.dataclass(frozen=True)
class KernelUsage:
    """ptxas -v's figures for one entry function (bytes, registers per thread)."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    static_smem: int
    advisories: int = 0  # ptxas' numbered notes on the entry, e.g. C7519: wgmma serialised


def find_ptxas() -> str:
    """The real ptxas: $PTXAS, else the one on PATH, else the nvidia-cuda-nvcc wheel's."""
    for candidate in (os.environ.get("PTXAS"), shutil.which("ptxas")):
        if candidate and Path(candidate).is_file():
            return candidate
    try:
        import nvidia.cuda_nvcc  # the CUDA wheel jax[cuda12] installs

        for root in nvidia.cuda_nvcc.__path__:
            if (Path(root) / "bin/ptxas").is_file():
                return str(Path(root) / "bin/ptxas")
    except ImportError:
        pass
    raise GpuCompileError(
        "no ptxas found: install the CUDA toolkit (ptxas on PATH), set PTXAS=/path/to/ptxas, "
        "or pip install nvidia-cuda-nvcc-cu12"
    )


def compile_env(workdir: Path, ptxas: str | None = None) -> dict[str, str]:
    """Environment variables that make a compile leave its PTX and shared-memory figures under
    ``workdir``; set them before jax starts (XLA reads its flags once)."""
    ptxas = ptxas or find_ptxas()
    root = workdir / "cuda"  # stands in for the CUDA directory XLA looks in for ptxas
    (root / "bin").mkdir(parents=True, exist_ok=True)
    for sub in ("nvvm",):  # libdevice, for the math functions, beside the real toolkit's
        real = Path(ptxas).resolve().parent.parent / sub
        if real.is_dir() and not (root / sub).exists():
            (root / sub).symlink_to(real)
    for sub in ("ptx", "xla", "mosaic"):
        (workdir / sub).mkdir(exist_ok=True)
    wrapper = root / "bin/ptxas"
    wrapper.write_text(_WRAPPER.format(capture=workdir / "ptx", ptxas=ptxas))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    flags = f"--xla_gpu_cuda_data_dir={root} --xla_dump_to={workdir / 'xla'}"
    return {
        "PTXAS": ptxas,  # our own ptxas -v runs take the real one, not the wrapper
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
        "MOSAIC_GPU_DUMP_TO": str(workdir / "mosaic"),
        # Mosaic GPU runs the ptxas on PATH; XLA the one in its CUDA directory.
        "PATH": f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def h100():
    """A compile-only H100 (a jax Device that compiles but cannot run)."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(
            "h100", "cuda", target_config=H100_TARGET_CONFIG, topology="1x1x1"
        )
    except (NotImplementedError, RuntimeError) as e:
        raise GpuCompileError(
            f"no compile-only CUDA device ({e}): install jax's CUDA plugin without the CUDA "
            "wheels, pip install 'jax[cuda12-local]' (the same version as jaxlib)"
        ) from e
    return topo.devices[0]


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(text: str) -> dict[str, KernelUsage]:
    """Entry name -> usage, from ``ptxas -v`` output (one block per entry function)."""
    usage, entry, stack = {}, None, (0, 0, 0)
    advisories = collections.Counter(re.findall(r"\(C\d+\).*in function '([^']+)'", text))
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entry, stack = m.group(1), (0, 0, 0)
        elif (m := _STACK.search(line)) and entry:
            stack = tuple(int(g) for g in m.groups())
        elif (m := _USED.search(line)) and entry:
            smem = int(m.group(2) or 0)
            registers = int(m.group(1))
            usage[entry] = KernelUsage(
                registers, stack[1], stack[2], stack[0], smem, advisories[entry]
            )
            entry = None
    return usage


def ptxas_usage(ptx: Path, arch: str = ARCH, ptxas: str | None = None) -> dict[str, KernelUsage]:
    """Compile one PTX module with ``ptxas -v`` and return each entry's usage."""
    done = subprocess.run(
        [ptxas or find_ptxas(), f"-arch={arch}", "-v", str(ptx), "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise GpuCompileError(f"ptxas failed on {ptx}:\n{done.stderr[-2000:]}")
    return parse_ptxas(done.stderr + done.stdout)


_THUNK = re.compile(r"\] (\S+) grid: \[[^\]]*\] threads: \[[^\]]*\]\s+shared_memory: (\d+) bytes")


def xla_dynamic_smem(files: list[Path]) -> dict[str, int]:
    """Kernel name -> dynamic shared memory XLA launches it with (Triton kernels included),
    from the thunk lists among ``files`` (XLA's dump of one compile)."""
    smem = {}
    for path in sorted(f for f in files if f.name.endswith("thunk_sequence.txt")):
        for name, size in _THUNK.findall(path.read_text()):
            smem[name] = int(size)
    return smem


def mosaic_smem(files: list[Path]) -> dict[str, int]:
    """Kernel name -> dynamic shared memory Mosaic GPU launches it with (its buffers and
    barriers), read from the launch in the module it dumps before its passes
    (``<name>_<n>.before_layout_inference.txt``, one a kernel, among ``files``)."""
    smem = {}
    for path in sorted(f for f in files if f.name.endswith(".before_layout_inference.txt")):
        text = path.read_text()
        if m := re.search(r"dynamic_shared_memory_size %(\w+)", text):
            if c := re.search(rf"%{m.group(1)} = arith.constant (\d+)", text):
                name = path.name.removesuffix(".before_layout_inference.txt").rsplit("_", 1)[0]
                smem[name] = int(c.group(1))
    return smem


def setmaxnreg(ptx: str) -> list[int]:
    """The register counts a warp-specialised kernel moves its warpgroups to at run time
    (``setmaxnreg``), from its PTX; empty for a kernel that keeps its launch count."""
    return sorted({int(n) for n in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)})
