"""Compiling for TPU slices on a CPU machine: libtpu's compile-only devices and the real TPU
compiler (XLA:TPU, Mosaic). `research compile`, the Mosaic flash-attention kernels forward and
backward, and dense/MoE train steps under fsdp x tensor and expert layouts on 8 chips."""

import itertools
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from research.aot.topology import TopologyError, parse_topology
from research.backend import target_backend
from research.cli import main


def test_slice_names_map_to_cloud_tpu_shapes():
    """v4/v5p names count TensorCores (two per chip), v5e/v6e count chips; NxNAME is N slices."""
    v5p = parse_topology("v5p-128")
    assert (v5p.chips, v5p.physical, v5p.hardware.name) == (64, "v5:4x4x4", "TPU v5p")
    v6e = parse_topology("v6e-256")
    assert (v6e.chips, v6e.physical, v6e.hbm_bytes) == (256, "v6e:16x16", 32 * 2**30)
    two = parse_topology("2xv5e-16")
    assert (two.slices, two.chips_per_slice, two.chips) == (2, 16, 32)
    assert parse_topology("v4-8").physical == "v4:2x2x1"
    with pytest.raises(TopologyError, match="v5p-8, v5p-16"):
        parse_topology("v5p-100")
    with pytest.raises(TopologyError, match="GENERATION-SIZE"):
        parse_topology("h100-8")


def test_bad_topology_is_one_error_line(capsys):
    assert main(["compile", "tiny", "--topology", "v7x-8"]) == 2
    assert capsys.readouterr().err.startswith("error: --topology 'v7x-8' is not a TPU slice")


def test_forecast_and_ledger_know_cloud_tpus(capsys):
    """The hardware table covers TPU v3-v6e by the names JAX reports, so a ledger on a Cloud
    TPU VM and `research forecast --hardware "TPU v5p"` have peak, power and price."""
    from research.train.accounting import device_hardware

    for kind, name in (("TPU v3", "TPU v3"), ("TPU v4", "TPU v4"), ("TPU v5 lite", "TPU v5e"),
                       ("TPU v5", "TPU v5p"), ("TPU v6 lite", "TPU v6e")):  # fmt: skip
        entry = device_hardware(kind, "tpu")
        assert entry.name == name and entry.peak_flops and entry.tdp_w and entry.price_per_hour
    args = ["forecast", "--params", "8e9", "--tokens", "1.6e11", "--hardware", "TPU v5p"]
    assert main([*args, "--devices", "64", "--mfu", "0.5"]) == 0
    out = capsys.readouterr().out
    # 6 x 8e9 x 1.6e11 = 7.68e21 FLOPs at 64 x 459 TFLOP/s x 50%: 5.2e5 s = 6.1 days
    assert "64 x TPU v5p (peak 459 TFLOP/s" in out and "time 6.1 days" in out
    assert "$4.20/device-hour" in out


pytest.importorskip("libtpu", reason="libtpu (the TPU compiler) is in the test extra")


def _device(generation: str):
    name = {"v4": "v4-8", "v5e": "v5e-4", "v5p": "v5p-8", "v6e": "v6e-4"}[generation]
    return parse_topology(name).devices()[0]


def test_compile_only_devices_are_the_named_chips():
    kinds = {g: _device(g).device_kind for g in ("v4", "v5e", "v5p", "v6e")}
    assert kinds == {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}
    assert len(parse_topology("2xv5p-16").devices()) == 16


def _compile_flash(generation, head_dim, variant, dtype=jnp.bfloat16, seq=512):
    """Forward and backward of our Mosaic kernel, compiled by the TPU compiler."""
    from research.kernels.flash_attention import flash_attention

    sharding = SingleDeviceSharding(_device(generation))
    heads, kv_heads = (8, 2) if "gqa" in variant else (4, 4)
    q = jax.ShapeDtypeStruct((2, seq, heads, head_dim), dtype, sharding=sharding)
    kv = jax.ShapeDtypeStruct((2, seq, kv_heads, head_dim), dtype, sharding=sharding)
    seg = jax.ShapeDtypeStruct((2, seq), jnp.int32, sharding=sharding)
    window = 128 if "window" in variant else 0
    segments = "segments" in variant

    def loss(q, k, v, seg):
        seg_ids = (seg, seg) if segments else (None, None)
        out = flash_attention(q, k, v, None, None, *seg_ids, causal=True, window=window)
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    with target_backend("tpu"):
        compiled = grad.lower(q, kv, kv, seg).compile()
    text = grad.lower(q, kv, kv, seg).as_text()
    # Our three kernels are in the program as Mosaic custom calls, not an XLA fallback.
    assert text.count("tpu_custom_call") >= 3
    # Row statistics (lse, delta) are lane-dense [B, H, 1, T], never [B, H, T, 1] (128x padded).
    assert not re.search(r"tensor<\d+x\d+x\d+x1xf32>", text)
    return compiled


FAST = [
    ("v4", 64, "causal"),
    ("v5e", 128, "window"),
    ("v5p", 256, "segments"),
    ("v6e", 128, "gqa+window+segments"),
]
VARIANTS = ("causal", "window", "segments", "gqa")
FULL = [
    case
    for case in itertools.product(("v4", "v5e", "v5p", "v6e"), (64, 128, 256), VARIANTS)
    if case not in FAST
]


@pytest.mark.parametrize("generation,head_dim,variant", FAST)
def test_flash_kernels_compile_for_tpu(generation, head_dim, variant):
    # 128 tokens: small tiles compile in seconds; the full grid compiles the default 512s.
    _compile_flash(generation, head_dim, variant, seq=128)


@pytest.mark.slow
@pytest.mark.parametrize("generation,head_dim,variant", FULL)
def test_flash_kernels_compile_for_tpu_full_grid(generation, head_dim, variant):
    _compile_flash(generation, head_dim, variant)


def test_float16_and_float32_compile_for_tpu():
    """Mosaic rejects float16 loads on TPU: float16 inputs run the kernels in float32."""
    _compile_flash("v5e", 128, "causal", jnp.float16, seq=128)
    _compile_flash("v5e", 128, "causal", jnp.float32, seq=128)


def _compile_cli(capsys, topology, *overrides, decode=True):
    args = ["compile", "tiny", "--topology", topology, *[f"--set={o}" for o in overrides]]
    status = main(args + ([] if decode else ["--no-decode"]))
    return status, capsys.readouterr()


def test_dense_step_compiles_under_fsdp_and_tensor_on_8_chips(capsys):
    status, out = _compile_cli(
        capsys, "v5p-16", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.vocab_size=128"
    )
    assert status == 0, out.err
    text = out.out
    assert "8 chips of TPU v5p" in text and "'fsdp': 2, 'tensor': 2" in text
    assert "train step (compiled" in text and "decode step (compiled" in text
    assert "verdict: fits" in text
    assert "all-gather" in text  # FSDP gathers each layer's weights where they are used
    # Collectives collapse by kind and group size: one entry each, however many layers.
    train_line = next(line for line in text.splitlines() if "collectives:" in line)
    entries = [entry.split(" x")[0] for entry in train_line.split(": ", 1)[1].split(", ")]
    assert "all-gather (groups of 2)" in entries and len(entries) == len(set(entries))


def test_collectives_are_counted_by_kind_and_group_size():
    from research.aot.compile import collectives

    hlo = """
  %a = bf16[8,256]{1,0} all-gather(bf16[2,256]{1,0} %p), replica_groups=[2,4]<=[8], dimensions={0}
  %b = bf16[8,256]{1,0} all-gather(bf16[2,256]{1,0} %q), replica_groups={{0,1,2,3},{4,5,6,7}}
  %c = bf16[4,256]{1,0} all-gather(bf16[2,256]{1,0} %r), replica_groups=[4,2]<=[8], dimensions={0}
  %d = f32[] all-reduce(f32[] %x), replica_groups={}, to_apply=%add
  %e = (f32[2], bf16[2]) all-reduce((f32[2], bf16[2]) %y), replica_groups=[4,2]<=[2,4]T(1,0)
  %f = f32[4]{0} collective-permute(f32[4]{0} %z), source_target_pairs={{0,1},{1,0}}
  %g = (bf16[2,256], bf16[8,256]) all-gather-start(bf16[2,256] %s), replica_groups=[2,4]<=[8]
  %h = f32[2,32]{1,0} all-reduce(%t), replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}
"""
    assert collectives(hlo) == {
        "all-gather (groups of 4)": (3, 3 * 8 * 256 * 2),
        "all-gather (groups of 2)": (1, 4 * 256 * 2),
        "all-reduce (all devices)": (1, 4),
        "all-reduce (groups of 2)": (2, 2 * 4 + 2 * 2 + 2 * 32 * 4),
        "collective-permute (pairs)": (1, 16),
    }


@pytest.mark.slow  # ~80 s under load on 2 cores; the dense layout's compile is the fast twin
def test_moe_step_compiles_under_expert_layout_on_8_chips(capsys):
    status, out = _compile_cli(
        capsys,
        "v5e-8",
        "mesh.data=2",
        "mesh.expert=4",
        "model.n_experts=4",
        "model.top_k=2",
        "model.vocab_size=128",
        decode=False,
    )
    assert status == 0, out.err
    assert "'expert': 4" in out.out and "verdict: fits" in out.out


def test_a_step_that_does_not_fit_exits_1_with_what_helps(capsys, monkeypatch):
    """The verdict and exit status from the compiler's figures (a real pod-sized compile that
    does not fit takes minutes here: the README's table has those)."""
    from research.aot import compile as aot
    from research.config import load_experiment
    from research.train.memory import MemoryReport

    topology = parse_topology("v5e-4")
    cfg = load_experiment("tiny", [])
    hbm = topology.hbm_bytes
    memory = {"argument": hbm // 4, "output": hbm // 4, "alias": hbm // 4, "temp": hbm,
              "generated_code": 2**20}  # fmt: skip
    report = aot.CompileReport(
        topology=topology,
        mesh={"data": 4, "fsdp": 1, "tensor": 1, "expert": 1},
        steps=[aot.CompiledStep("train step", memory, 1e12, {}, 1.0)],
        estimate=MemoryReport(hbm // 8, hbm // 8, hbm, 4, "none"),
        model_flops_per_device=1e12,
    )
    report.knobs = aot.knobs(report, cfg)
    assert not report.fits
    monkeypatch.setattr(aot, "compile_run", lambda *a, **k: report)
    status, out = _compile_cli(capsys, "v5e-4", decode=False)
    assert status == 1, out.err
    # arguments 4 GiB + outputs 4 - donated 4 + temporaries 16 + code 1 MiB, against 16 GiB
    assert "verdict: does NOT fit (4.00 GiB over per chip)" in out.out
    # Temporaries dominate: activation knobs come first, then sharding the state.
    assert out.out.index("model.remat=full") < out.out.index("mesh.fsdp")


def test_a_program_the_compiler_refuses_is_a_does_not_fit_verdict(capsys, monkeypatch):
    """XLA:TPU refuses a program whose temporaries alone exceed HBM (a compile-time OOM, as for
    a dropless MoE step on v6e-256): the command reports it as does-not-fit, exit 1, with the
    MoE dispatch knob, never a traceback."""
    import jax

    from research.aot import compile as aot
    from research.config import load_experiment

    message = (
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total memory "
        "required for HLO temporaries (346.66G) exceeds available HBM (31.24G)."
    )

    class Lowered:
        def compile(self, **options):
            raise jax.errors.JaxRuntimeError(message)

    step = aot._read("train step", Lowered(), 0.0)
    assert step.refused.startswith("RESOURCE_EXHAUSTED") and step.memory["temp"] > 346 * 2**30
    from research.aot.command import format_report
    from research.train.memory import MemoryReport

    mesh = {"data": 1, "fsdp": 256, "tensor": 1, "expert": 1}
    estimate = MemoryReport(2**30, 2**31, 2**30, 256, "full")
    report = aot.CompileReport(parse_topology("v6e-256"), mesh, [step], estimate, 1e12)
    assert not report.fits
    cfg = load_experiment("tiny", ["model.n_experts=4", "model.moe_dispatch=dropless"])
    report.knobs = aot.knobs(report, cfg)
    assert "model.moe_dispatch=capacity" in report.knobs[0]
    text = format_report(report)
    assert "train step: the TPU compiler refused it: RESOURCE_EXHAUSTED" in text
    assert "verdict: does NOT fit" in text


# Big enough that the compiler's fixed temporaries (~5 MiB) do not dominate, small enough to
# compile in seconds: benchmarks/memory_vs_compiler.py has these and two more layouts.
_ESTIMATE_SHAPE = ("model.d_model=256", "model.n_heads=4", "model.n_kv_heads=4",
                   "model.n_layers=2", "model.seq_len=256", "model.vocab_size=4096",
                   "train.batch_size=32")  # fmt: skip


@pytest.mark.parametrize(
    "layout",
    [
        ("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"),
        pytest.param(  # ~190 s under load 19 on 2 cores (dense: ~110 s)
            ("mesh.data=2", "mesh.expert=4", "model.n_experts=8", "model.top_k=2"),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["dense-fsdp4-tp2", "moe-dp2-ep4-dropless"],
)
def test_memory_estimate_is_within_20_percent_of_the_compiler(layout):
    """research/train/memory.py against the TPU compiler's memory_analysis for the train step
    (arguments + outputs - donated + temporaries; the estimate does not model code)."""
    from research.aot.compile import compile_run
    from research.config import load_experiment

    cfg = load_experiment("tiny", [*_ESTIMATE_SHAPE, *layout])
    report = compile_run(cfg, parse_topology("v5p-16"), decode=False)
    ratio = report.estimate.total_bytes / report.steps[0].data_bytes
    assert 0.8 < ratio < 1.2, (ratio, report.steps[0].memory, report.estimate)


@pytest.mark.slow  # ~15-35 s of compiling at Mixtral's shape; the numbers: test_moe.py
def test_grouped_matmul_backward_compiles_for_v6e_at_mixtral_per_chip_shape():
    """Mixtral-8x7B's expert MLP on one v6e chip (8 sequences of 1024, top-2: 16384 rows)
    forward and backward: ragged_dot's own backward form is refused there (E1001 scoped VMEM,
    a compiler tiling bug); research/models/grouped_matmul.py's compiles."""
    from research.models.grouped_matmul import grouped_matmul

    sharding = SingleDeviceSharding(_device("v6e"))
    rows, d, hidden, experts = 16384, 4096, 14336, 8
    shapes = [(rows, d), (experts, d, hidden), (experts, d, hidden), (experts, hidden, d)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding) for s in shapes]
    sizes = jax.ShapeDtypeStruct((experts,), jnp.int32, sharding=sharding)

    def loss(x, w_gate, w_up, w_down, sizes):
        hidden = jax.nn.silu(grouped_matmul(x, w_gate, sizes)) * grouped_matmul(x, w_up, sizes)
        return jnp.sum(grouped_matmul(hidden, w_down, sizes).astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args, sizes).compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0
