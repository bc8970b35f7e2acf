"""Compile time against step time of the quickstart's train step at XLA's CPU optimisation levels.

    python benchmarks/train_step_compile.py                  # levels default, 0, 1, 2
    python benchmarks/train_step_compile.py --levels 1 --set model.n_layers=4

A cold `research train` spends seconds compiling its train step; this asks whether LLVM's
optimisation level (``xla_backend_optimization_level``, which parameter init and the sample
already drop to 0: research/runtime.py) buys compile time without costing step time. Each
level is compiled from the same lowered program with the persistent compile cache off, then
timed over a fixed number of steps after a warm-up; prints both beside the default's, as ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["RESEARCH_COMPILE_CACHE"] = ""  # every compile here must be a real one
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from research import runtime  # noqa: E402

runtime.setup()

import jax  # noqa: E402

from research.config import load_experiment  # noqa: E402
from research.run.builder import build_run  # noqa: E402
from research.run.training import _batches  # noqa: E402
from research.train.accounting import cpu_model  # noqa: E402


def time_level(run, batch, level: int | None, steps: int) -> tuple[float, float]:
    """(compile seconds, ms per step) of the train step compiled at ``level`` (None: default)."""
    options = {} if level is None else {"xla_backend_optimization_level": level}
    lowered = run.train_step.lower(run.state, batch)
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options=options)
    compile_s = time.perf_counter() - start
    state = jax.tree.map(lambda x: x.copy(), run.state)  # the step donates its state
    for _ in range(3):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return compile_s, (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default="shakespeare_char")
    parser.add_argument("--levels", default="0,1,2", help="levels beside the default")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_experiment(args.experiment, [f"train.run_dir={run_dir}", *args.overrides])
        run = build_run(cfg, "train", resume=False)
        batch = next(_batches(run))
        print(
            f"machine: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()};"
            f" jax {jax.__version__}"
        )
        base_compile, base_step = time_level(run, batch, None, args.steps)
        print(f"default  compile {base_compile:5.2f} s, step {base_step:6.1f} ms")
        for level in [int(x) for x in args.levels.split(",") if x]:
            compile_s, step_ms = time_level(run, batch, level, args.steps)
            print(
                f"level {level}  compile {compile_s:5.2f} s ({compile_s / base_compile:.2f}x),"
                f" step {step_ms:6.1f} ms ({step_ms / base_step:.2f}x)"
            )
        print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
