"""The training loop: prepare data, build or resume the state, train, evaluate, checkpoint, log.

Re-running the same command resumes from the newest good checkpoint, with the same batches and
the same loss curve as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from research.config import ConfigError, ExperimentConfig, ModelConfig
from research.data.loader import eval_batches, train_dataset
from research.data.shards import PreparedData, prepare
from research.infer.sampling import generate
from research.models import Transformer
from research.parallel.distributed import gather_to_host, initialize, put_global
from research.parallel.memory import check_fits, device_memory_bytes, memory_report
from research.parallel.mesh import batch_sharding, data_parallel_size, make_mesh, on_mesh
from research.parallel.shardings import optimizer_shardings, param_shardings
from research.scaling.accounting import count_params
from research.scaling.ledger import record_energy
from research.scaling.power import PowerMeter
from research.train.checkpoint import Checkpointer
from research.train.metrics import MetricsLogger, peak_flops_per_device
from research.train.optimizer import make_optimizer
from research.train.step import make_eval_step, make_train_step

# Config sections that define what a run computes: changing them under an existing run is an error.
_IDENTITY_KEYS = ("model", "data", "optim", "train.batch_size", "train.seed", "train.z_loss")


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float
    val_loss: float | None
    val_bpb: float | None
    wall_seconds: float
    tokens_per_second: float
    mfu: float
    sample: str
    steps_run: int = 0  # steps trained by this call (0: the run was already complete)


def run_directory(cfg: ExperimentConfig) -> Path:
    return Path(cfg.train.run_dir or f"runs/{cfg.name}")


def build_model(model_cfg: ModelConfig, seed: int, mesh) -> tuple[nnx.GraphDef, dict]:
    """Initialise parameters directly into their shardings (no full copy on one device first)."""
    graphdef, shardings = param_shardings(model_cfg, mesh)

    @jax.jit
    def init():
        return nnx.to_pure_dict(nnx.state(Transformer(model_cfg, nnx.Rngs(seed))))

    params = jax.jit(init, out_shardings=shardings)()
    return graphdef, params


def init_train_state(cfg: ExperimentConfig, mesh):
    """Fresh train state (params, optimizer state, step, RNG key) for a resolved config."""
    graphdef, params = build_model(cfg.model, cfg.train.seed, mesh)
    tx, schedule = make_optimizer(cfg.optim, cfg.train.steps)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": jax.jit(tx.init, out_shardings=optimizer_shardings(tx, params, mesh))(params),
        "rng": jax.random.key_data(jax.random.key(cfg.train.seed + 1)),
    }
    # Scalars (step, optimizer counts, RNG key) live replicated on the mesh beside the params.
    replicated = NamedSharding(mesh, PartitionSpec())
    state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
        state,
    )
    return graphdef, state, tx, schedule


def abstract_like(tree):
    """Shapes, dtypes and shardings of a tree: the target orbax restores into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_same_run(run_dir: Path, cfg_dict: dict) -> None:
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return
    old, new = _flatten(json.loads(saved_path.read_text())), _flatten(cfg_dict)
    changed = [
        k
        for k in sorted(set(old) | set(new))
        if k.startswith(_IDENTITY_KEYS) and old.get(k) != new.get(k)
    ]
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:6])
        raise ConfigError(
            f"{run_dir} holds a run with a different config ({details}). Resuming it would mix "
            "two experiments: use a new --set train.run_dir=..., or delete the old run."
        )


def evaluate(
    eval_step, params, data: PreparedData, cfg: ExperimentConfig, mesh
) -> tuple[float, float]:
    """Validation loss (nats/token) and bits per byte over the whole split (or eval_batches)."""
    dp = data_parallel_size(mesh)
    micro_batch = cfg.train.batch_size // cfg.optim.grad_accum
    # Bigger batches than training where they are cheap (no activations kept for backward).
    rows = max(micro_batch, 8192 // cfg.model.seq_len) // dp * dp or dp
    sharding = batch_sharding(mesh)
    total, count = 0.0, 0
    batches = eval_batches(data.tokens("val"), cfg.model.seq_len, rows, cfg.train.eval_batches)
    for batch, valid_rows in batches:
        loss_sum, n = eval_step(params, put_global(batch, sharding), valid_rows)
        total, count = total + loss_sum, count + n  # summed on device: one sync at the end
    val_loss = float(total) / int(count)
    return val_loss, val_loss / math.log(2) / data.bytes_per_token("val")


def sample_text(
    graphdef,
    params,
    data: PreparedData,
    prompt: str,
    n_tokens: int,
    seed: int,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 0.95,
) -> str:
    tokenizer = data.tokenizer()
    model = nnx.merge(graphdef, jax.device_get(params))
    prompt_ids = tokenizer.encode(prompt)[None, :]
    new = generate(
        model,
        prompt_ids,
        n_tokens,
        jax.random.key(seed),
        temperature,
        top_k,
        top_p,
        tokenizer.vocab_size,
    )
    return prompt + tokenizer.decode(np.asarray(new[0]))


def _update_ledger(run_dir: Path, tokens: int, flops: float, seconds: float, mesh) -> dict:
    """Add this call's tokens, FLOPs and time to ledger.json (a resumed run keeps adding).

    device_seconds counts accelerator chips; a CPU host counts once, whatever number of XLA
    devices it was split into."""
    path = run_dir / "ledger.json"
    if jax.process_index() != 0:  # one writer; the others' time is the same wall time
        return {"wall_seconds": seconds}
    ledger = (
        json.loads(path.read_text())
        if path.exists()
        else {
            "tokens": 0,
            "flops": 0.0,
            "wall_seconds": 0.0,
            "device_seconds": 0.0,
        }
    )
    ledger["tokens"] += tokens
    ledger["flops"] += flops
    ledger["wall_seconds"] += seconds
    device = mesh.devices.flat[0]
    chips = 1 if device.platform == "cpu" else mesh.devices.size
    ledger["device_seconds"] += seconds * chips
    ledger["device_kind"] = device.device_kind
    ledger["device_count"] = chips
    path.write_text(json.dumps(ledger, indent=2))
    return ledger


def train(cfg: ExperimentConfig, resume: bool = True) -> TrainResult:
    """Train (or resume) the experiment; returns the final metrics and a sample of text."""
    initialize(cfg.mesh)  # multi-process runs join up before JAX touches a device
    meter = PowerMeter(cfg.energy)  # NVML samples or a TDP estimate, for ledger.json
    run_dir = run_directory(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare(cfg.data, verbose=jax.process_index() == 0)
    model_cfg = cfg.model.resolved(vocab_size=data.vocab_size)
    if model_cfg.vocab_size < data.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({data.vocab_size}); set it to 0 (take the tokenizer's) or at least {data.vocab_size}"
        )
    cfg.model = model_cfg
    _check_same_run(run_dir, cfg.to_dict())

    accum, batch_size = cfg.optim.grad_accum, cfg.train.batch_size
    mesh = make_mesh(cfg.mesh, batch_size=batch_size // accum)
    dp = data_parallel_size(mesh)
    if batch_size % (accum * dp):
        raise ConfigError(
            f"train.batch_size={batch_size} must divide into optim.grad_accum={accum} microbatches "
            f"split over {dp} data-parallel devices; use a multiple of {accum * dp}"
        )
    size = count_params(model_cfg)
    tokens_per_step = batch_size * model_cfg.seq_len
    flops_per_step = size.flops_per_token * tokens_per_step
    peak = peak_flops_per_device(cfg.log.peak_flops) * (
        1 if mesh.devices.flat[0].platform == "cpu" else mesh.devices.size
    )  # a CPU's measured ceiling already covers all its cores, however many devices it shows

    tx_shapes = make_optimizer(cfg.optim, cfg.train.steps)[0]  # for the estimate, before allocating
    memory = memory_report(model_cfg, mesh, tx_shapes, batch_size // accum)
    check_fits(memory, device_memory_bytes(mesh.devices.flat[0], cfg.log.device_memory_gb))
    if jax.process_index() == 0:  # after the checks: a refused config does not claim the folder
        (run_dir / "config.json").write_text(cfg.to_json())
    if not resume:
        _set_aside_previous_run(run_dir)
    graphdef, state, tx, schedule = init_train_state(cfg, mesh)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.train.keep_checkpoints)
    dataset = train_dataset(
        data.tokens("train"),
        model_cfg.seq_len,
        batch_size // jax.process_count(),
        seed=cfg.train.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    batches = iter(dataset)
    start_step = 0
    if resume:
        restored = checkpointer.restore_latest(abstract_like(state))
        if restored is not None:
            start_step, state, data_state = restored
            batches.set_state(data_state)
            print(f"resumed {run_dir} from step {start_step}")

    train_sharding = batch_sharding(mesh, leading_dims=1)  # [accum, batch, seq + 1]
    step_fn = on_mesh(
        make_train_step(graphdef, tx, schedule, model_cfg, cfg.train.z_loss, dp), mesh
    )
    train_step = jax.jit(
        step_fn,
        in_shardings=(state_shardings, train_sharding),
        out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),  # any host reads
        donate_argnums=0,
    )
    eval_step = jax.jit(on_mesh(make_eval_step(graphdef), mesh))
    logger = MetricsLogger(run_dir, cfg.log.tensorboard)
    logger.text("config", f"```\n{cfg.to_json()}\n```")
    if start_step == 0:
        active = f", {size.active_params / 1e6:.2f}M active" if model_cfg.n_experts else ""
        print(
            f"model: {size.total_params / 1e6:.2f}M params ({size.non_embedding_params / 1e6:.2f}M "
            f"non-embedding{active}), {size.flops_per_token / 1e6:.1f} MFLOP/token; "
            f"mesh {dict(mesh.shape)}"
        )
    if jax.process_index() == 0:
        (run_dir / "memory.json").write_text(json.dumps(memory.to_dict(), indent=2))
        print(memory.summary())

    ledger_step = start_step

    def account(steps: int, reading) -> dict:
        """Add ``steps`` steps and their time and energy to ledger.json (process 0 writes)."""
        tokens, flops = steps * tokens_per_step, steps * flops_per_step
        ledger = _update_ledger(run_dir, tokens, flops, reading.seconds, mesh)
        return record_energy(run_dir, cfg.energy, reading) if jax.process_index() == 0 else ledger

    local_batch_shape = (accum, batch_size // accum // jax.process_count(), model_cfg.seq_len + 1)
    progress = _progress_bar(cfg, start_step)
    train_loss, val_loss, val_bpb = float("nan"), None, None
    window_start, window_steps = time.perf_counter(), 0
    tokens_per_second = mfu = 0.0
    last_good_step = checkpointer.latest_step()
    loop_start = time.perf_counter()
    step = start_step
    bounded_queue = mesh.devices.flat[0].platform == "cpu" and mesh.devices.size > 1
    previous_loss = None
    for step in range(start_step + 1, cfg.train.steps + 1):
        local = next(batches).reshape(local_batch_shape)
        batch = jax.make_array_from_process_local_data(train_sharding, local)
        state, metrics = train_step(state, batch)
        if bounded_queue:
            # Several CPU devices share one thread pool: with a deep queue of steps, a device
            # can wait in the gradient all-reduce for a peer that gets no thread (seen as an
            # XLA rendezvous timeout). Waiting for the previous step keeps one step in flight.
            jax.block_until_ready(previous_loss)
            previous_loss = metrics["loss"]
        window_steps += 1
        is_last = step == cfg.train.steps
        checkpoint_now = is_last or (
            cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
        )
        if step % cfg.train.log_every == 0 or checkpoint_now:
            metrics = jax.device_get(metrics)
            train_loss = float(metrics["loss"])
            if not math.isfinite(train_loss):
                checkpointer.close()
                raise TrainingDiverged(
                    f"loss became {train_loss} at step {step}; stopped. The last good checkpoint "
                    f"is step {last_good_step} in {checkpointer.directory}. Lower optim.lr, raise "
                    "optim.warmup_steps or enable train.z_loss, then re-run to resume from it."
                )
            elapsed = time.perf_counter() - window_start
            tokens_per_second = window_steps * tokens_per_step / elapsed
            mfu = window_steps * flops_per_step / elapsed / peak
            logger.scalars(
                step,
                {
                    "train/loss": train_loss,
                    "train/grad_norm": float(metrics["grad_norm"]),
                    "train/lr": float(metrics["lr"]),
                    "perf/tokens_per_second": tokens_per_second,
                    "perf/step_time_ms": 1e3 * elapsed / window_steps,
                    "perf/mfu": mfu,
                    **_router_scalars(metrics),
                },
            )
            if "moe/expert_load" in metrics:
                logger.histogram(step, "moe/expert_load", metrics["moe/expert_load"].mean(0))
            progress.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_second:,.0f}")
            window_start, window_steps = time.perf_counter(), 0
        if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or is_last:
            val_loss, val_bpb = evaluate(eval_step, state["params"], data, cfg, mesh)
            logger.scalars(step, {"val/loss": val_loss, "val/bpb": val_bpb})
            progress.write(
                f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                f"val bpb {val_bpb:.4f}"
            )
            window_start = time.perf_counter()  # eval time is not training throughput
        if checkpoint_now:
            checkpointer.save(step, state, batches.get_state())
            last_good_step = step
            if not is_last:  # a killed run's checkpointed work stays in the ledger
                account(step - ledger_step, meter.take())
                ledger_step = step
        progress.update(1)
    progress.close()
    checkpointer.close()
    train_seconds = time.perf_counter() - loop_start
    steps_done = step - start_step
    # meter.stop() on every process: it ends the NVML sampling thread.
    ledger = account(step - ledger_step, meter.stop())

    sample = ""
    if cfg.train.sample_tokens:
        params = gather_to_host(state["params"])  # a collective: every process takes part
    if cfg.train.sample_tokens and jax.process_index() == 0:
        sample = sample_text(
            graphdef,
            params,
            data,
            cfg.train.sample_prompt,
            cfg.train.sample_tokens,
            cfg.train.seed,
        )
    logger.close()
    if val_loss is None and steps_done == 0 and start_step:
        val_loss, val_bpb = evaluate(eval_step, state["params"], data, cfg, mesh)
    return TrainResult(
        run_dir=run_dir,
        step=int(state["step"]),
        train_loss=train_loss,
        val_loss=val_loss,
        val_bpb=val_bpb,
        wall_seconds=ledger["wall_seconds"],
        tokens_per_second=tokens_per_second
        or (steps_done * tokens_per_step / max(train_seconds, 1e-9)),
        mfu=mfu,
        sample=sample,
        steps_run=steps_done,
    )


def _set_aside_previous_run(run_dir: Path) -> None:
    """--restart keeps the old checkpoints and metrics (renamed), never deletes them."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in ("checkpoints", "metrics.jsonl", "tensorboard", "ledger.json"):
        old = run_dir / name
        if old.exists() and jax.process_index() == 0:
            old.rename(run_dir / f"{old.stem}.before-restart-{stamp}{old.suffix}")
            print(f"restart: kept the previous {name} as {old.stem}.before-restart-{stamp}")


def _router_scalars(metrics: dict) -> dict[str, float]:
    """MoE statistics for TensorBoard; max_load is the busiest expert's share x n_experts."""
    scalars = {k: float(v) for k, v in metrics.items() if k.startswith("moe/") and v.ndim == 0}
    if "moe/expert_load" in metrics:
        load = metrics["moe/expert_load"]
        scalars["moe/max_load"] = float(load.max() * load.shape[-1])
    return scalars


def _progress_bar(cfg: ExperimentConfig, start: int):
    from tqdm.auto import tqdm

    enabled = cfg.log.progress and jax.process_index() == 0
    return tqdm(
        total=cfg.train.steps,
        initial=start,
        disable=not enabled,
        dynamic_ncols=True,
        desc="train",
        unit="step",
    )
