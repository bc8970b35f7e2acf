"""Assemble a run once: resolve and check the config, prepare the data, build the mesh, the
state and the step functions.

Every command (train, eval, generate, info, sweep), the benchmarks and the notebook start from
``build_run``, so the config is resolved in one place, every mistake is caught before any
allocation, and eval/generate never allocate optimizer moments. The caller's config is never
changed: the run holds a resolved copy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from research.config import (
    ConfigError,
    DataConfig,
    ExperimentConfig,
    MeshConfig,
    flatten,
    validate,
)
from research.config import load_run_config as read_run_config
from research.data.corpus import resolve_corpus
from research.data.shards import PreparedData, prepare
from research.models.accounting import ModelSize, count_params
from research.parallel.distributed import initialize
from research.parallel.mesh import batch_sharding, data_parallel_size, make_mesh, on_mesh
from research.run.restart import prepare_run_dir
from research.storage import check_writable, run_path
from research.train.checkpoint import Checkpointer
from research.train.memory import MemoryReport, check_fits, device_memory_bytes, memory_report
from research.train.optimizer import make_optimizer
from research.train.shardings import abstract_params, param_shardings
from research.train.state import abstract_like, abstract_train_state, init_train_state
from research.train.step import make_train_step
from research.train.zero import update_shardings

PURPOSES = ("train", "eval", "generate", "info", "compile")
# Config sections that define what a run computes: changing them under an existing run is an error.
_IDENTITY_KEYS = (
    "model",
    "data",
    "optim",
    "train.batch_size",
    "train.seed",
    "train.z_loss",
    "post",
)


@dataclass
class Run:
    """Everything a command needs, built once. ``state`` is the whole train state for training,
    ``{"params": ...}`` for eval and generate, and None for info (nothing allocated)."""

    config: ExperimentConfig  # resolved: every derived value filled in
    purpose: str
    run_dir: epath.Path  # local, or a gs:// URL (research/storage.py)
    data: PreparedData
    mesh: Mesh
    graphdef: nnx.GraphDef
    size: ModelSize
    memory: MemoryReport
    state: Any = None
    step: int = 0  # the step restored from a checkpoint (0: a fresh run)
    data_state: dict | None = None  # the loader's position to resume from
    tx: Any = None
    schedule: Any = None
    checkpointer: Checkpointer | None = None
    train_step: Any = None

    @property
    def micro_batch(self) -> int:
        return self.config.train.batch_size // self.config.optim.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.batch_size * self.config.model.seq_len

    @property
    def flops_per_step(self) -> float:
        return self.size.flops_per_token * self.tokens_per_step


def run_directory(cfg: ExperimentConfig) -> epath.Path:
    """The run's directory: a local path or a gs:// URL (an ``epath.Path`` either way)."""
    return run_path(cfg.train.run_dir or f"runs/{cfg.name}")


@functools.lru_cache(maxsize=16)
def _prepared(data_json: str, corpus_stat: str, cache: str) -> PreparedData:
    return prepare(DataConfig(**json.loads(data_json)), verbose=jax.process_index() == 0)


def prepared_data(cfg: ExperimentConfig) -> PreparedData:
    """Prepared data for a config, hashed and read once per process while the corpus files
    (their sizes and mtimes) stay the same: a sweep of many shapes prepares once."""
    if cfg.data.sources:  # many files, streamed and packed (research/data/stream.py)
        from research.data.stream import prepared_stream

        first = jax.process_index() == 0
        return prepared_stream(cfg.data, verbose=first, may_prepare=jax.process_count() == 1)
    files = resolve_corpus(cfg.data.corpus, cfg.data.cache_dir)
    corpus_stat = json.dumps([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    data_json = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True)
    return _prepared(data_json, corpus_stat, os.environ.get("RESEARCH_CACHE", ""))


def resolve_config(cfg: ExperimentConfig) -> tuple[ExperimentConfig, PreparedData]:
    """A resolved copy of ``cfg`` (vocabulary from the tokenizer, every 0 derived) and its data."""
    resolved = ExperimentConfig.from_dict(cfg.to_dict())
    data = prepared_data(resolved)
    resolved.model = resolved.model.resolved(vocab_size=data.vocab_size)
    if resolved.model.vocab_size < data.vocab_size:
        raise ConfigError(
            f"model.vocab_size={resolved.model.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({data.vocab_size}); set it to 0 (take the tokenizer's) or at least "
            f"{data.vocab_size}"
        )
    return resolved, data


def load_run_config(run_dir: Path | str) -> ExperimentConfig:
    """The config saved in a run directory (validated), with the mesh reset to this machine's
    devices: eval and generate run data-parallel on whatever is here."""
    cfg = read_run_config(run_dir)
    cfg.mesh = MeshConfig()
    cfg.train.run_dir = str(run_dir)
    return cfg


def build_run(
    cfg: ExperimentConfig, purpose: str = "train", resume: bool = True, devices=None
) -> Run:
    """Resolve, check and assemble ``cfg`` for ``purpose`` (train | eval | generate | info |
    compile). ``compile``: abstract train state (shapes and shardings, nothing allocated) and
    the jitted step, on ``devices`` (default: this machine's; compile-only TPU devices for
    ``research compile``), whose compiler, not the estimate, says whether it fits."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, not {purpose!r}")
    validate(cfg)  # every mistake in the config, before any work
    if purpose == "train":  # a bucket that cannot be written: one line now, not after the data
        check_writable(run_directory(cfg))
    initialize(cfg.mesh)  # multi-process runs join up before JAX touches a device
    cfg, data = resolve_config(cfg)
    batch_size, accum = cfg.train.batch_size, cfg.optim.grad_accum
    mesh = make_mesh(cfg.mesh, devices=devices, batch_size=batch_size // accum)
    batch_shards = data_parallel_size(mesh)
    if batch_size % (accum * batch_shards):
        raise ConfigError(
            f"train.batch_size={batch_size} must divide into optim.grad_accum={accum} microbatches "
            f"split over {batch_shards} data-parallel devices; use a multiple of "
            f"{accum * batch_shards}"
        )
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps, cfg.model.width_mult)
    memory = memory_report(
        cfg.model, mesh, tx, batch_size // accum, cfg.train.shard_optimizer_update
    )
    if purpose != "compile":
        check_fits(memory, device_memory_bytes(mesh.devices.flat[0], cfg.log.device_memory_gb))
    graphdef, _ = param_shardings(cfg.model, mesh)
    run = Run(
        config=cfg,
        purpose=purpose,
        run_dir=run_directory(cfg),
        data=data,
        mesh=mesh,
        graphdef=graphdef,
        size=count_params(cfg.model),
        memory=memory,
        tx=tx,
        schedule=schedule,
    )
    if purpose == "train":
        _assemble_training(run, resume)
    elif purpose in ("eval", "generate"):
        _restore_params(run)
    elif purpose == "compile":
        run.state = abstract_train_state(cfg, mesh, tx)
        run.train_step = _jit_train_step(run, jax.tree.map(lambda x: x.sharding, run.state))
    return run


def _assemble_training(run: Run, resume: bool) -> None:
    cfg = run.config
    if cfg.post.mode or cfg.post.eval_data:  # its data and starting runs, before any work
        from research.post.setup import check_inputs

        check_inputs(cfg)
    if cfg.post.lora_rank:  # the adapters' targets exist in this model, before any work
        from research.post import lora

        lora.check(cfg)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    _check_same_run(run.run_dir, cfg.to_dict())
    prepare_run_dir(run.run_dir, restart=not resume)  # --restart, or finish an interrupted one
    run.graphdef, run.state, run.tx, run.schedule = init_train_state(cfg, run.mesh)
    if cfg.post.lora_rank:  # frozen base, adapters and their optimizer state
        run.state = lora.train_state(cfg, run.state, run.tx, run.mesh)
        run.memory = lora.memory(run.memory, run.state)
        if jax.process_index() == 0:
            print(lora.summary(run.state))
    run.checkpointer = Checkpointer(run.run_dir / "checkpoints", cfg.train.keep_checkpoints)
    if resume:
        restored = run.checkpointer.restore_latest(abstract_like(run.state))
        if restored is not None:
            run.step, run.state, run.data_state = restored.step, restored.state, restored.data_state
            print(f"resumed {run.run_dir} from step {run.step}")
    objective = None
    if cfg.post.mode:  # post-training: another start and objective, the same step and loop
        from research.post import setup as post

        if run.step == 0 and cfg.post.init_from:
            run.state["params"] = post.start_params(run)
            if cfg.post.lora_rank:
                run.state = lora.start_from(run.state, run.state["params"], lora.scale_of(cfg.post))
        objective = post.objective(run)
    run.train_step = _jit_train_step(run, jax.tree.map(lambda x: x.sharding, run.state), objective)


def _jit_train_step(run: Run, shardings, objective=None):
    cfg = run.config
    params_view = None
    if cfg.post.lora_rank and run.purpose == "train":
        from research.post.lora import merge, scale_of

        params_view = functools.partial(merge, scale=scale_of(cfg.post))
    zero = None
    if cfg.train.shard_optimizer_update:  # ZeRO-1: the update runs sliced over data
        zero = (update_shardings(run.state["params"], run.mesh), shardings["params"])
    step_fn = make_train_step(
        run.graphdef,
        run.tx,
        run.schedule,
        cfg.model,
        cfg.train.z_loss,
        data_parallel_size(run.mesh),
        objective,
        params_view,
        zero,
    )
    return jax.jit(
        on_mesh(step_fn, run.mesh),
        in_shardings=(shardings, batch_sharding(run.mesh, leading_dims=1)),  # [accum, B, T+1]
        out_shardings=(shardings, NamedSharding(run.mesh, PartitionSpec())),  # any host reads
        donate_argnums=0,
    )


def _restore_params(run: Run) -> None:
    """Parameters only, read-only: nothing is moved or written, no optimizer state allocated."""
    checkpointer = Checkpointer(run.run_dir / "checkpoints", read_only=True)
    restored = checkpointer.restore_latest(
        {"params": abstract_params(run.config.model, run.mesh)}, params_only=True
    )
    checkpointer.close()
    if restored is None:
        raise ConfigError(f"{run.run_dir} has no readable checkpoint yet; train it first")
    run.state, run.step = {"params": restored.state["params"]}, restored.step


def _check_same_run(run_dir: Path, cfg_dict: dict) -> None:
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return
    old, new = flatten(json.loads(saved_path.read_text())), flatten(cfg_dict)
    # A key added to the config since the run was saved reads as its default there.
    defaults = flatten(ExperimentConfig().to_dict())
    changed = [
        k
        for k in sorted(set(old) | set(new))
        if k.startswith(_IDENTITY_KEYS) and old.get(k, defaults.get(k)) != new.get(k)
    ]
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise ConfigError(
            f"{run_dir} holds a run with a different config ({details}). Resuming it would mix "
            "two experiments: use a new --set train.run_dir=..., or delete the old run."
        )
