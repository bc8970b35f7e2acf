"""The training loop: a jitted step in a short loop, and hooks around it.

Logging, evaluation, checkpointing, the ledger, sampling, the NaN guard and the profiler are
hooks registered at an interval (research/run/hooks.py); a new concern is a new hook, not an
edit of the loop. The loop keeps a training clock that stops while hooks that are not training
(eval, checkpoint saves) run, and times the first step (compilation) on its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax


class TrainingDiverged(RuntimeError):
    pass


class Clock:
    """Seconds of training: wall time with the non-training hooks (and compilation) left out."""

    def __init__(self):
        self._total, self._since = 0.0, None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        if self._since is not None:
            self._total += time.perf_counter() - self._since
            self._since = None

    @property
    def seconds(self) -> float:
        running = time.perf_counter() - self._since if self._since is not None else 0.0
        return self._total + running


@dataclass
class Hook:
    fn: Callable[[Trainer], None]
    every: tuple[int, ...]  # due when step % e == 0 for any e > 0, and always at the last step
    training: bool  # True: its time counts as training (cheap, per-step work)
    name: str

    def due(self, step: int, last: bool) -> bool:
        return last or any(e and step % e == 0 for e in self.every)


@dataclass
class Trainer:
    """Runs ``train_step`` from ``start_step + 1`` to ``total_steps`` and calls the hooks."""

    train_step: Callable[[Any, Any], tuple[Any, dict]]
    state: Any
    batches: Iterator
    start_step: int
    total_steps: int
    hooks: list[Hook] = field(default_factory=list)
    clock: Clock = field(default_factory=Clock)
    step: int = 0
    metrics: dict = field(default_factory=dict)
    compile_seconds: float = 0.0
    _host_metrics: tuple[int, dict] | None = None

    def add_hook(
        self,
        fn: Callable[[Trainer], None],
        every: int | Sequence[int] = 1,
        training: bool = False,
        name: str = "",
    ) -> None:
        """Call ``fn(trainer)`` every ``every`` steps (0: only at the last step)."""
        every = (every,) if isinstance(every, int) else tuple(every)
        self.hooks.append(Hook(fn, every, training, name or fn.__name__))

    @property
    def is_last(self) -> bool:
        return self.step == self.total_steps

    def host_metrics(self) -> dict:
        """This step's metrics on the host (fetched once, whichever hook asks first)."""
        if self._host_metrics is None or self._host_metrics[0] != self.step:
            self._host_metrics = (self.step, jax.device_get(self.metrics))
        return self._host_metrics[1]

    def run(self) -> Trainer:
        self.step, started = self.start_step, time.perf_counter()
        for step in range(self.start_step + 1, self.total_steps + 1):
            self.step = step
            self.state, self.metrics = self.train_step(self.state, next(self.batches))
            if self.step == self.start_step + 1:
                self._time_first_step(started)
            for hook in self.hooks:
                if hook.due(self.step, self.is_last):
                    self._call(hook)
        self.clock.stop()
        return self

    def _time_first_step(self, started: float) -> None:
        """The first call compiles: its time is reported apart and kept out of throughput."""
        jax.block_until_ready(self.metrics)
        self.compile_seconds = time.perf_counter() - started
        self.clock.start()

    def _call(self, hook: Hook) -> None:
        if hook.training:
            hook.fn(self)
            return
        jax.block_until_ready(self.metrics)  # the steps queued so far are training time
        self.clock.stop()
        try:
            hook.fn(self)
        finally:
            self.clock.start()
