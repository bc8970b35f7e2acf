"""research/aot/gpu.py and benchmarks/gpu_compile.py: our GPU kernels compiled for an H100 on a
machine without one. The parsers run everywhere on fixed compiler output; the compile itself
needs jax >= 0.11 with its CUDA plugin and a ptxas, which CI has neither of (the plugin is not
in the test extra), so there it skips."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from research.aot import gpu as aot_gpu

ROOT = Path(__file__).resolve().parents[1]

PTXAS_V = """\
ptxas info    : (C7519) warpgroup.arrive is injected in around line 1374 by compiler to allow use of registers in GMMA in function 'dkv_kernel'
ptxas info    : (C7519) warpgroup.arrive is injected in around line 1522 by compiler to allow use of registers in GMMA in function 'dkv_kernel'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'dkv_kernel' for 'sm_90a'
ptxas info    : Function properties for dkv_kernel
    8 bytes stack frame, 16 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 255 registers, used 16 barriers, 1 bytes smem
ptxas info    : Compile time = 315.326 ms
ptxas info    : Compiling entry function 'fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for fwd_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 225 registers, used 1 barriers
ptxas info    : Compile time = 525.042 ms
"""  # noqa: E501  (ptxas' own lines)


def test_parse_ptxas_reads_each_entry():
    usage = aot_gpu.parse_ptxas(PTXAS_V)
    assert usage == {
        "dkv_kernel": aot_gpu.KernelUsage(255, 16, 24, 8, 1, advisories=2),
        "fwd_kernel": aot_gpu.KernelUsage(225, 0, 0, 0, 0, advisories=0),
    }


def test_launch_shared_memory_and_setmaxnreg_are_read_from_the_dumps(tmp_path):
    thunks = tmp_path / "module_0001.jit_f.thunk_sequence.txt"
    thunks.write_text(
        "001: kCustomKernel [source | sink] loop_fusion grid: [3, 1, 1] threads: [128, 1, 1]  "
        "shared_memory: 0 bytes\n"
        "002: kCustomKernel [prev=001 (1) | sink] flash_attention_fwd grid: [16, 1, 32] "
        "threads: [128, 1, 1]  shared_memory: 49408 bytes\n"
    )
    mosaic = tmp_path / "flash_attention_dq_hopper_2.before_layout_inference.txt"
    mosaic.write_text(
        "%c5_i32 = arith.constant 5 : i32\n%c84080_i32 = arith.constant 84080 : i32\n"
        "%78 = gpu.launch async [%10] blocks(%a) in (%b = %c16) threads(%c) in (%d = %c384) "
        "dynamic_shared_memory_size %c84080_i32 {\n"
    )
    files = [thunks, mosaic]
    assert aot_gpu.xla_dynamic_smem(files) == {"loop_fusion": 0, "flash_attention_fwd": 49408}
    assert aot_gpu.mosaic_smem(files) == {"flash_attention_dq_hopper": 84080}
    ptx = "\tsetmaxnreg.dec.sync.aligned.u32 24;\n\tsetmaxnreg.inc.sync.aligned.u32 240;\n" * 2
    assert aot_gpu.setmaxnreg(ptx) == [24, 240]
    assert aot_gpu.setmaxnreg(".entry f() { ret; }") == []


def test_missing_ptxas_is_an_error_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PTXAS", str(tmp_path / "absent"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "nvidia.cuda_nvcc", None)
    with pytest.raises(aot_gpu.GpuCompileError, match="PTXAS=/path/to/ptxas"):
        aot_gpu.find_ptxas()


_MISSING = [
    why
    for absent, why in (
        (jax.__version_info__ < (0, 11), "jax >= 0.11"),
        (
            importlib.util.find_spec("jax_cuda12_plugin") is None,
            "jax's CUDA plugin (pip install -e '.[gpu-compile]'; not in the test extra)",
        ),
        (shutil.which("ptxas") is None, "ptxas (the CUDA toolkit)"),
    )
    if absent
]


@pytest.mark.skipif(
    bool(_MISSING), reason=f"needs {'; '.join(_MISSING)} (CI has no CUDA plugin, no ptxas)"
)
def test_every_kernel_compiles_for_h100_and_fits(tmp_path):
    """One small case (T=256, head_dim 64): all six kernels come back from ptxas, fit an
    H100, and the Hopper kernels' launch SMEM is what their own accounting says."""
    from research.kernels.flash_attention import hopper_bwd, hopper_fwd

    out = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_compile.py"), "--seq", "256",
         "--head-dims", "64", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {f"{f} {k}" for f in ("triton", "hopper") for k in ("fwd", "dq", "dkv")}
    for row in rows.values():
        assert 0 < row["registers"] <= 255 and row["fits"], row
        assert row["dynamic_smem"] > 0, row
    assert rows["hopper fwd"]["dynamic_smem"] == hopper_fwd.smem_bytes(
        hopper_fwd.HopperBlocks.for_head_dim(64), 64, 2
    )
    for kernel in ("dq", "dkv"):
        own = hopper_bwd.smem_bytes(kernel, hopper_bwd.HopperBwdBlocks(), 64, 2)
        assert rows[f"hopper {kernel}"]["dynamic_smem"] == own
    assert rows["hopper dq"]["setmaxnreg"], "the Hopper kernels rebalance registers"
