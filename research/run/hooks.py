"""The standard training hooks. Each is a small callable registered on the Trainer at an interval;
add a concern by adding a hook (``trainer.add_hook(fn, every=N)``), not by editing the loop."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax

from research.infer.evaluate import Evaluator
from research.run.builder import Run
from research.train.accounting import Peak
from research.train.loop import Trainer, TrainingDiverged
from research.train.metrics import MetricsLogger


@dataclass
class Progress:
    """What the hooks learnt that the caller reports at the end."""

    train_loss: float = float("nan")
    val_loss: float | None = None
    val_bpb: float | None = None
    tokens_per_second: float = 0.0
    mfu: float = 0.0


def nan_guard(run: Run):
    """Stop at a non-finite loss, naming the last durable checkpoint to resume from."""

    def check(trainer: Trainer) -> None:
        loss = float(trainer.host_metrics()["loss"])
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss} at step {trainer.step}; stopped. The last good checkpoint is "
                f"step {run.checkpointer.durable_step} in {run.checkpointer.directory}. Lower "
                "optim.lr, raise optim.warmup_steps or enable train.z_loss, then re-run to "
                "resume from it."
            )

    return check


@dataclass
class LogScalars:
    """Loss, learning rate, norms, router statistics and throughput over the window since the
    last call, measured on the training clock (eval, checkpoint saves and compilation excluded)."""

    run: Run
    logger: MetricsLogger
    peak: Peak
    progress: Progress
    bar: object = None
    _last: tuple[int, float] = field(default=(0, 0.0))

    def __call__(self, trainer: Trainer) -> None:
        metrics = trainer.host_metrics()
        steps, seconds = trainer.step - self._last[0], trainer.clock.seconds - self._last[1]
        first = self._last[0] == 0
        if first:  # the first step compiled: its time is not on the clock
            steps = trainer.step - trainer.start_step - 1
        self._last = (trainer.step, trainer.clock.seconds)
        p = self.progress
        p.train_loss = float(metrics["loss"])
        scalars = {
            "train/loss": p.train_loss,
            **{f"train/{k}": float(metrics[k]) for k in ("grad_norm", "lr") if k in metrics},
        }
        if seconds > 0 and steps > 0:
            p.tokens_per_second = steps * self.run.tokens_per_step / seconds
            p.mfu = self.peak.mfu(steps * self.run.flops_per_step, seconds)  # NaN: peak unknown
            scalars.update(
                {
                    "perf/tokens_per_second": p.tokens_per_second,
                    "perf/step_time_ms": 1e3 * seconds / steps,
                    **({"perf/mfu": p.mfu} if self.peak.total else {}),
                }
            )
        if first and self.peak.total:  # the MFU denominator, once per call
            scalars["perf/peak_flops"] = self.peak.total
        scalars.update(_router_scalars(metrics))
        scalars.update({k: float(v) for k, v in metrics.items() if k.startswith("norms/")})
        scalars.update({k: float(v) for k, v in metrics.items() if k.startswith("post/")})
        tokens = trainer.step * self.run.tokens_per_step
        self.logger.scalars(trainer.step, scalars, tokens=tokens)
        if "moe/expert_load" in metrics:  # the heat map costs a plot: at eval cadence only
            every = self.run.config.train.eval_every
            self.logger.expert_load(
                trainer.step,
                metrics["moe/expert_load"],
                self.run.config.model.moe_layers,
                image=trainer.is_last or bool(every and trainer.step % every == 0),
            )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{p.train_loss:.4f}", tok_s=f"{p.tokens_per_second:,.0f}")


def evaluate_hook(run: Run, logger: MetricsLogger, progress: Progress, bar=None):
    """Validation loss and bits per byte on the held-out split."""
    cfg = run.config
    evaluator = Evaluator(
        run.graphdef, run.data, run.mesh, cfg.model.seq_len, run.micro_batch, cfg.train.eval_batches
    )

    def evaluate(trainer: Trainer) -> None:
        progress.val_loss, progress.val_bpb = evaluator(trainer.state["params"])
        logger.scalars(
            trainer.step,
            {"val/loss": progress.val_loss, "val/bpb": progress.val_bpb},
            tokens=trainer.step * run.tokens_per_step,
        )
        line = (
            f"step {trainer.step}: train loss {progress.train_loss:.4f}, val loss "
            f"{progress.val_loss:.4f}, val bpb {progress.val_bpb:.4f}"
        )
        bar.write(line) if bar is not None else print(line)

    return evaluate, evaluator


def save_checkpoint(run: Run, batches):
    """An async orbax save of the state and the loader's position."""

    def save(trainer: Trainer) -> None:
        run.checkpointer.save(trainer.step, trainer.state, batches.get_state())

    return save


def poll_checkpoint(run: Run):
    """Every step: a background save that failed stops the run here, not one interval later."""

    def poll(trainer: Trainer) -> None:
        run.checkpointer.poll()

    return poll


def bounded_queue():
    """Several CPU devices share one thread pool: with a deep queue of steps, a device can wait in
    the gradient all-reduce for a peer that gets no thread (an XLA rendezvous timeout). Waiting
    for the previous step keeps one step in flight."""
    previous = {"loss": None}

    def wait(trainer: Trainer) -> None:
        jax.block_until_ready(previous["loss"])
        previous["loss"] = trainer.metrics["loss"]

    return wait


def profiler(run: Run, steps: str):
    """``log.profile_steps=A:B`` traces the steps after A up to B for TensorBoard's profile tab."""
    first, last = (int(x) for x in steps.split(":"))
    trace_dir = str(run.run_dir)

    def profile(trainer: Trainer) -> None:
        if trainer.step == first:
            jax.profiler.start_trace(trace_dir)
        elif trainer.step == last or (trainer.is_last and first < trainer.step < last):
            jax.block_until_ready(trainer.metrics)
            jax.profiler.stop_trace()
            print(f"profile of steps {first + 1}-{trainer.step} written under {trace_dir}")

    return profile


def progress_bar(run: Run, enabled: bool):
    from tqdm.auto import tqdm

    bar = tqdm(
        total=run.config.train.steps,
        initial=run.step,
        disable=not (enabled and jax.process_index() == 0),
        dynamic_ncols=True,
        desc="train",
        unit="step",
    )

    def advance(trainer: Trainer) -> None:
        bar.update(trainer.step - bar.n)

    return bar, advance


def _router_scalars(metrics: dict) -> dict[str, float]:
    """MoE statistics for TensorBoard; max_load is the busiest expert's share x n_experts."""
    scalars = {k: float(v) for k, v in metrics.items() if k.startswith("moe/") and v.ndim == 0}
    if "moe/expert_load" in metrics:
        load = metrics["moe/expert_load"]
        scalars["moe/max_load"] = float(load.max() * load.shape[-1])
    return scalars
