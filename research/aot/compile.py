"""Compile a run's train step (and one decode step) for a TPU slice this machine does not have,
and read what the TPU compiler says: per-device memory, FLOPs, collectives; does it fit.

The run is assembled by the Run builder (``build_run(cfg, "compile", devices=...)``): the same
resolved config, mesh rules, abstract train state and jitted step as ``research train``, with
nothing allocated. The build runs under ``target_backend("tpu")`` so it makes the choices a TPU
run would make (bf16 compute, dropless MoE with ``ragged_dot``, the Mosaic flash kernel).
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from research.aot.topology import Topology
from research.backend import target_backend
from research.config import ExperimentConfig
from research.parallel.mesh import batch_sharding, logical_to_spec, on_mesh
from research.train.memory import MemoryReport, compiled_memory

_COLLECTIVE = re.compile(
    r"=\s*(\([^)]*\)|\S+)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
    r"(-start)?\("
)
_SHAPE = re.compile(r"(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip


@dataclass
class CompiledStep:
    """What the compiler reports for one program, per device."""

    name: str
    memory: dict[str, int]  # argument, output, temp, generated_code, alias (bytes)
    flops: float | None  # XLA's cost analysis, per device
    collectives: dict[str, tuple[int, int]] | None  # op -> (count, result bytes); None:
    # the compiled program could not be printed (some libtpu builds, asynchronous collectives)
    seconds: float  # compile time on this machine
    refused: str = ""  # the compiler's own out-of-memory message, when it refused the program

    @property
    def total_bytes(self) -> int:
        """Peak per device: inputs + outputs (donated ones once) + temporaries + code."""
        m = self.memory
        return m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]

    @property
    def data_bytes(self) -> int:
        """Peak per device without the generated code (what our estimate models: code is
        6-25 MiB on the test shapes, a rounding error on big models)."""
        return self.total_bytes - self.memory["generated_code"]


@dataclass
class CompileReport:
    topology: Topology
    mesh: dict[str, int]
    steps: list[CompiledStep]
    estimate: MemoryReport  # the project's own per-device estimate (research/train/memory.py)
    model_flops_per_device: float  # 6N + attention, per step, divided over the chips
    knobs: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(not s.refused and s.total_bytes <= self.topology.hbm_bytes for s in self.steps)


_MESH_GROUPS = re.compile(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}")
_GROUPS = re.compile(r"replica_groups=(\{\}|\{\{[\d,]*\}|\[(\d+),(\d+)\]<=)")


def _group_size(line: str) -> str:
    """How many devices each instance of a collective spans, from its HLO ``replica_groups``
    (``{{0,1,2,3},...}``, the iota form ``[groups,size]<=[...]`` or the named-mesh form
    ``mesh['axis_0'=4,'axis_1'=2] {'axis_1'}``); ``all`` for ``{}``;
    ``pairs`` for a collective-permute's source-target pairs."""
    if "source_target_pairs" in line:
        return "pairs"
    named = _MESH_GROUPS.search(line)
    if named:  # replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_1'}: over the listed axes
        sizes = {name: int(n) for name, n in re.findall(r"'(\w+)'=(\d+)", named.group(1))}
        over = re.findall(r"'(\w+)'", named.group(2))
        return str(math.prod(sizes[a] for a in over)) if over else "1"
    found = _GROUPS.search(line)
    if not found:
        return "?"
    if found.group(2):
        return found.group(3)
    text = found.group(1)
    return "all" if text == "{}" else str(len(text.strip("{}").split(",")))


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """Collective ops in an optimized HLO module, collapsed by kind and group size:
    "all-gather (groups of 4)" -> (count, bytes of their results). A 70B model's thousands of
    collectives come to a handful of lines."""
    found: dict[str, tuple[int, int]] = {}
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.search(line)
        if not match:
            continue
        shape, op = match.group(1), match.group(2)
        shapes = _SHAPE.findall(shape)
        if match.group(3) and op in ("all-gather", "collective-permute") and len(shapes) > 1:
            shapes = shapes[1:2]  # an asynchronous start's (operand, result, ...): the result
        size = 0
        for dtype, dims in shapes:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            size += n * _BYTES[dtype]
        group = _group_size(line[match.end() :])
        key = f"{op} ({'pairs' if group == 'pairs' else f'groups of {group}'})"
        key = key.replace("groups of all", "all devices")
        count, total = found.get(key, (0, 0))
        found[key] = (count + 1, total + size)
    return found


_HBM_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)G\)")


def _optimized_hlo(compiled, dump: Path) -> str | None:
    """The optimized program's text: ``compiled.as_text()``, or the compiler's own dump where
    that fails (libtpu 0.0.52 cannot turn a program with asynchronous collectives back into
    text through jax 0.10.2, which every big FSDP program has); None if neither works."""
    try:
        return compiled.as_text()
    except jax.errors.JaxRuntimeError:
        dumped = sorted(dump.glob("*.after_optimizations.txt"))
        return dumped[-1].read_text() if dumped else None


def _read(name: str, lowered, started: float) -> CompiledStep:
    with tempfile.TemporaryDirectory(prefix="research-hlo-") as dump:
        try:
            compiled = lowered.compile(
                compiler_options={"xla_dump_to": dump, "xla_dump_hlo_as_text": True}
            )
        except jax.errors.JaxRuntimeError as error:
            # XLA:TPU refuses a program whose temporaries alone exceed HBM: that is a verdict
            # (does not fit), not a crash. Its message gives the temporaries in GiB.
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            found = _HBM_OOM.search(str(error))
            temp = int(float(found.group(1)) * 2**30) if found else 0
            memory = {"argument": 0, "output": 0, "alias": 0, "temp": temp, "generated_code": 0}
            message = str(error).splitlines()[0]
            return CompiledStep(name, memory, None, {}, time.perf_counter() - started, message)
        seconds = time.perf_counter() - started
        text = _optimized_hlo(compiled, Path(dump))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    found = collectives(text) if text is not None else None
    return CompiledStep(name, compiled_memory(compiled), flops, found, seconds)


def compile_train_step(run) -> CompiledStep:
    """Lower and compile ``run.train_step`` against its abstract state and one batch."""
    cfg = run.config
    accum = cfg.optim.grad_accum
    batch = jax.ShapeDtypeStruct(
        (accum, cfg.train.batch_size // accum, cfg.model.seq_len + 1),
        jnp.int32,
        sharding=batch_sharding(run.mesh, leading_dims=1),
    )
    started = time.perf_counter()
    return _read("train step", run.train_step.lower(run.state, batch), started)


def compile_decode_step(run, batch: int) -> CompiledStep:
    """One generated token for ``batch`` sequences against a full KV cache (the model's window
    or context): what ``research generate`` runs per token, with parameters as trained."""
    from flax import nnx

    cfg, mesh = run.config, run.mesh
    width = cfg.model.attention_window or cfg.model.seq_len
    params = run.state["params"]

    def caches_of(params):
        return nnx.merge(run.graphdef, params).init_caches(batch, width)

    shapes = jax.eval_shape(caches_of, params)

    def shard(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        axes = ("batch", None, "kv", None) if name in ("k", "v") else (None,) * x.ndim
        if x.ndim != len(axes):  # stacked layers (scan): a leading layer axis
            axes = ("layers", *axes)
        spec = logical_to_spec(axes, x.shape, mesh, name)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    caches = jax.tree_util.tree_map_with_path(shard, shapes)
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=batch_sharding(mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    position = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=replicated)

    def decode(params, tokens, position, caches):
        logits, caches = nnx.merge(run.graphdef, params)(tokens, position, caches)
        return logits[:, -1], caches

    step = jax.jit(on_mesh(decode, mesh), donate_argnums=3)
    started = time.perf_counter()
    return _read("decode step", step.lower(params, tokens, position, caches), started)


def compile_run(
    cfg: ExperimentConfig, topology: Topology, decode: bool = True, decode_batch: int = 0
) -> CompileReport:
    """Build ``cfg`` for ``topology`` with the Run builder and compile its steps there."""
    from research.run import build_run

    devices = topology.devices()
    with target_backend("tpu"):
        run = build_run(cfg, "compile", devices=devices)
        steps = [compile_train_step(run)]
        if decode:
            batch = decode_batch or run.micro_batch
            steps.append(compile_decode_step(run, batch))
    report = CompileReport(
        topology=topology,
        mesh=dict(run.mesh.shape),
        steps=steps,
        estimate=run.memory,
        model_flops_per_device=run.flops_per_step / topology.chips,
    )
    report.knobs = knobs(report, run.config)
    return report


def knobs(report: CompileReport, cfg: ExperimentConfig) -> list[str]:
    """Settings that would shrink the train step's per-device memory, biggest part first."""
    if report.fits:
        return []
    train = report.steps[0].memory
    mesh, found = report.mesh, []
    temp_first = train["temp"] >= train["argument"]
    activation = []
    if cfg.model.n_experts and cfg.model.moe_dispatch in ("auto", "dropless"):
        activation.append(
            "--set model.moe_dispatch=capacity (fixed per-sequence expert buffers instead of "
            "dropless sorting; with mesh.expert > 1 dropless gathers the expert group's tokens)"
        )
    if cfg.model.remat != "full":
        activation.append("--set model.remat=full (recompute each block in the backward pass)")
    activation.append(
        f"a larger --set optim.grad_accum (now {cfg.optim.grad_accum}: the same batch in "
        "smaller microbatches), or a smaller train.batch_size"
    )
    state = [
        f"a larger mesh.fsdp (now {mesh['fsdp']}: shards parameters and optimizer state)",
        f"a larger mesh.tensor (now {mesh['tensor']}: shards weights and activations per head)",
        "a larger slice (more chips share the state)",
    ]
    found.extend(activation + state if temp_first else state + activation)
    return found
