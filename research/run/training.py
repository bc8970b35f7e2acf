"""`research train`: build the run, register the hooks, run the loop, report.

Re-running the same command resumes from the newest good checkpoint, with the same batches and
the same loss curve as an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
from dataclasses import dataclass
from pathlib import Path

import jax

from research.config import ExperimentConfig, ResearchError, flatten
from research.data.loader import train_dataset
from research.infer.sampling import sample_text
from research.parallel.distributed import gather_to_host, initialize
from research.parallel.mesh import batch_sharding
from research.run import hooks
from research.run.builder import Run, build_run
from research.storage import StorageError, write_text_atomic
from research.train.accounting import Peak, job_peak
from research.train.ledger import (
    commit_pending,
    record_energy,
    record_pending,
    record_work,
    rewind,
)
from research.train.loop import Trainer
from research.train.metrics import MetricsLogger
from research.train.power import PowerMeter
from research.train.run_info import run_metadata

STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)


class RunStorageError(ResearchError):
    """Writing the run's logs failed (a full disk, a storage error): the message names the last
    durable checkpoint, which the same command resumes from."""


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
    compile_seconds: float = 0.0


def train(cfg: ExperimentConfig, resume: bool = True) -> TrainResult:
    """Train (or resume) the experiment; returns the final metrics and a sample of text."""
    initialize(cfg.mesh)  # multi-process runs join up before anything touches a device
    meter = PowerMeter(cfg.energy)  # NVML samples or a TDP estimate, for ledger.json
    run = build_run(cfg, "train", resume=resume)
    logger = MetricsLogger(run.run_dir, run.config.log.tensorboard)
    peak = job_peak(run.config.log.peak_flops, list(run.mesh.devices.flat))  # a CPU host: 1 chip
    _record_start(run, logger, peak)
    ledger = _Ledger(run, meter, peak)

    def on_durable(step: int) -> None:
        ledger.commit(step)  # the ledger counts only durable work
        logger.flush()  # a gs:// run directory gets metrics.jsonl and the events whole, now

    run.checkpointer.on_durable = on_durable
    run.checkpointer.on_save = ledger.set_pending
    batches = _batches(run)
    trainer = Trainer(run.train_step, run.state, batches, run.step, run.config.train.steps)
    if hasattr(batches, "bind"):  # GRPO samples from the current policy
        batches.bind(trainer)
    progress = hooks.Progress()
    bar, evaluator = _add_standard_hooks(trainer, run, batches, logger, peak, progress)
    if run.config.post.eval_data:
        from research.post.setup import task_accuracy_hook

        trainer.add_hook(task_accuracy_hook(run, logger, bar), every=run.config.train.eval_every)
    try:
        try:
            trainer.run()
        except OSError as error:
            run.checkpointer.close(quiet=True)
            if error.errno not in STORAGE_ERRNOS:
                raise
            # metrics.jsonl or TensorBoard could not be written: the run stops like a failed save
            raise RunStorageError(
                f"writing to {run.run_dir} failed ({error}). The last durable checkpoint is "
                f"step {run.checkpointer.durable_step}; free space or fix the storage, then "
                "re-run the same command to resume from it."
            ) from error
        except StorageError as error:  # a bucket write failed for good (research/storage.py)
            run.checkpointer.close(quiet=True)
            durable = run.checkpointer.durable_step
            raise RunStorageError(f"{error} (step {durable})") from error
        except BaseException:
            run.checkpointer.close(quiet=True)  # let a save in flight finish; keep this error
            raise
        run.checkpointer.close()  # waits for the final save; CheckpointSaveError if it failed
    finally:
        bar.close()
        reading = meter.stop()  # on every process: it ends the NVML sampling thread
    totals = ledger.add(0, reading)  # time after the last durable save (sampling, closing)
    logger.scalars(trainer.step, {"perf/compile_seconds": trainer.compile_seconds})
    sample = _sample(run, trainer.state["params"]) if run.config.train.sample_tokens else ""
    logger.close()
    steps_run = trainer.step - run.step
    if progress.val_loss is None and steps_run == 0 and run.step:  # already complete
        progress.val_loss, progress.val_bpb = evaluator(trainer.state["params"])
    return TrainResult(
        run_dir=run.run_dir,
        step=int(trainer.state["step"]),
        train_loss=progress.train_loss,
        val_loss=progress.val_loss,
        val_bpb=progress.val_bpb,
        wall_seconds=totals["wall_seconds"],
        tokens_per_second=progress.tokens_per_second,
        mfu=progress.mfu,
        sample=sample,
        steps_run=steps_run,
        compile_seconds=trainer.compile_seconds,
    )


def _record_start(run: Run, logger: MetricsLogger, peak: Peak) -> None:
    """config.json (with the run's metadata), memory.json, the console lines and the run's
    TensorBoard texts, HParams and the peak FLOP/s MFU is measured against."""
    cfg = run.config
    info = run_metadata(dict(run.mesh.shape))  # git SHA, command, versions, devices, mesh
    if jax.process_index() == 0:
        saved = {**cfg.to_dict(), "run": info}  # load_run_config reads the config part back
        write_text_atomic(run.run_dir / "config.json", json.dumps(saved, indent=2, sort_keys=True))
        write_text_atomic(run.run_dir / "memory.json", json.dumps(run.memory.to_dict(), indent=2))
        if run.step == 0:
            print(_model_line(run))
        print(run.memory.summary())
    logger.text("config", f"```\n{cfg.to_json()}\n```")
    logger.run_info(info)
    if run.step == 0:  # one HParams session per run, written when it starts
        logger.hparams(flatten(cfg.to_dict()))
    logger.text("perf/peak_flops", peak.describe())  # the MFU denominator, once per call


def _add_standard_hooks(trainer: Trainer, run: Run, batches, logger, peak, progress):
    """Register the standard hooks in the order they run after a step; returns the progress
    bar and the evaluator (the caller closes the one and may reuse the other)."""
    train_cfg = run.config.train
    bar, advance = hooks.progress_bar(run, run.config.log.progress)
    if _is_multi_device_cpu(run):
        trainer.add_hook(hooks.bounded_queue(), every=1, training=True)
    trainer.add_hook(hooks.poll_checkpoint(run), every=1, training=True)
    trainer.add_hook(hooks.nan_guard(run), every=(train_cfg.log_every, train_cfg.checkpoint_every))
    log = hooks.LogScalars(run, logger, peak, progress, bar)
    trainer.add_hook(log, every=train_cfg.log_every, training=True, name="log")
    evaluate, evaluator = hooks.evaluate_hook(run, logger, progress, bar)
    trainer.add_hook(evaluate, every=train_cfg.eval_every)
    trainer.add_hook(hooks.save_checkpoint(run, batches), every=train_cfg.checkpoint_every)
    if run.config.log.profile_steps:
        trainer.add_hook(hooks.profiler(run, run.config.log.profile_steps), every=1, training=True)
    trainer.add_hook(advance, every=1, training=True)
    return bar, evaluator


def _batches(run: Run):
    """This process' batches, reshaped to [accum, micro_batch, seq + 1] global arrays."""
    if run.config.post.mode:
        from research.post.setup import batches, with_teacher_logits

        if (post_batches := batches(run)) is not None:
            return post_batches
        return with_teacher_logits(run, _standard_batches(run))  # distillation
    return _standard_batches(run)


def _standard_batches(run: Run):
    """The corpus' batches (pretraining, distillation)."""
    cfg, processes = run.config, jax.process_count()
    shape = (cfg.optim.grad_accum, run.micro_batch // processes, cfg.model.seq_len + 1)
    sharding = batch_sharding(run.mesh, leading_dims=1)
    if cfg.data.sources:  # packed whole documents with segment ids
        from research.data.packing import DocumentIndex, PackedBatches

        packed = PackedBatches(
            DocumentIndex.of_stream(run.data.stream, "train"),
            cfg.model.seq_len,
            cfg.train.batch_size,
            seed=cfg.train.seed,
            process_index=jax.process_index(),
            process_count=processes,
        )
        if run.data_state is not None:
            packed.set_state(run.data_state)
        return _GlobalBatches(packed, shape, sharding)
    dataset = train_dataset(
        run.data.tokens("train"),
        cfg.model.seq_len,
        cfg.train.batch_size // processes,
        seed=cfg.train.seed,
        process_index=jax.process_index(),
        process_count=processes,
    )
    iterator = iter(dataset)
    if run.data_state is not None:
        iterator.set_state(run.data_state)
    return _GlobalBatches(iterator, shape, sharding)


class _GlobalBatches:
    """The loader's iterator, yielding global arrays; its state is the loader's."""

    def __init__(self, iterator, shape, sharding):
        self.iterator, self.shape, self.sharding = iterator, shape, sharding

    def __next__(self):
        return jax.tree.map(  # a token array, or a dict of tokens and segment ids
            lambda local: jax.make_array_from_process_local_data(
                self.sharding, local.reshape(self.shape)
            ),
            next(self.iterator),
        )

    def get_state(self) -> dict:
        return self.iterator.get_state()


def _sample(run: Run, params) -> str:
    params = gather_to_host(params)  # a collective: every process takes part
    if jax.process_index():
        return ""
    cfg = run.config.train
    tokenizer, prompt = run.data.tokenizer(), cfg.sample_prompt
    return sample_text(
        run.graphdef, params, tokenizer, prompt, cfg.sample_tokens, cfg.seed, once=True
    )


def _model_line(run: Run) -> str:
    size, model = run.size, run.config.model
    active = f", {size.active_params / 1e6:.2f}M active" if model.n_experts else ""
    return (
        f"model: {size.total_params / 1e6:.2f}M params ({size.non_embedding_params / 1e6:.2f}M "
        f"non-embedding{active}), {size.flops_per_token / 1e6:.1f} MFLOP/token; "
        f"mesh {dict(run.mesh.shape)}"
    )


def _is_multi_device_cpu(run: Run) -> bool:
    return run.mesh.devices.flat[0].platform == "cpu" and run.mesh.devices.size > 1


class _Ledger:
    """Adds tokens, FLOPs, time and energy to ledger.json as checkpoints become durable: each
    interval is stored as pending when its save starts and counted when the save is durable
    (research/train/ledger.py), so a kill between the two is settled when the run resumes."""

    def __init__(self, run: Run, meter: PowerMeter, peak: Peak):
        self.run, self.meter, self.peak, self.pending_step = run, meter, peak, run.step
        # Killed after orbax finalised the checkpoint just restored, before it was counted?
        self.commit(run.step)
        rewind(run.run_dir, run.step, run.tokens_per_step, run.flops_per_step)  # newer: corrupt

    def set_pending(self, step: int) -> None:
        """The steps since the previous save and this process' reading of their time."""
        steps, self.pending_step = step - self.pending_step, step
        run = self.run
        tokens, flops = steps * run.tokens_per_step, steps * run.flops_per_step
        record_pending(run.run_dir, step, tokens, flops, self.meter.take())

    def commit(self, step: int) -> None:
        run = self.run
        commit_pending(run.run_dir, step, run.config.energy, run.mesh, self.peak)

    def add(self, steps: int, reading) -> dict:
        run = self.run
        ledger = record_work(
            run.run_dir,
            steps * run.tokens_per_step,
            steps * run.flops_per_step,
            reading.seconds,
            run.mesh,
            self.peak,
        )
        if jax.process_index() != 0:
            return ledger
        return record_energy(run.run_dir, run.config.energy, reading)
