"""Step time of the quickstart on the CPU cores as an FSDP mesh against data-parallel replicas.

    python benchmarks/quickstart_mesh.py             # the quickstart as configured
    python benchmarks/quickstart_mesh.py --set optim.optimizer=adamw

With data-parallel replicas every core runs the whole optimizer update, Muon's Newton-Schulz
iterations included (at the quickstart's size about as many FLOPs as the forward and backward
passes); an FSDP mesh splits it between the cores. Both train steps are built and compiled in
one process, then timed in alternating rounds (so a change in the machine's load hits both),
each round a few steps after a warm-up; prints the median step time of each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from research import runtime  # noqa: E402

runtime.setup()

import jax  # noqa: E402

from research.config import load_experiment  # noqa: E402
from research.run.builder import build_run  # noqa: E402
from research.run.training import _batches  # noqa: E402

MESHES = {"fsdp": ["mesh.data=1", "mesh.fsdp=-1"], "data-parallel": ["mesh.data=-1", "mesh.fsdp=1"]}


def time_variants(variants: dict[str, list[str]], overrides: list[str], rounds: int, steps: int):
    """Median seconds per train step of each variant (extra ``--set`` overrides on the
    quickstart): all built and compiled first, then timed in alternating rounds."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in variants.items():
            cfg_overrides = [*overrides, *extra, f"train.run_dir={tmp}/{name}"]
            cfg = load_experiment("shakespeare_char", cfg_overrides)
            run = build_run(cfg, "train", resume=False)
            batches = _batches(run)
            state, metrics = run.train_step(run.state, next(batches))  # compile, warm up
            state, metrics = run.train_step(state, next(batches))
            jax.block_until_ready(metrics)
            runs[name] = [run, batches, state, []]
        for _ in range(rounds):
            for entry in runs.values():
                run, batches, state, times = entry
                start = time.perf_counter()
                for _ in range(steps):
                    state, metrics = run.train_step(state, next(batches))
                jax.block_until_ready(metrics)
                times.append((time.perf_counter() - start) / steps)
                entry[2] = state
        for run, *_ in runs.values():
            run.checkpointer.close()
    return {name: statistics.median(entry[3]) for name, entry in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per round")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(f"{len(jax.devices())} CPU devices; load average before: {os.getloadavg()}", flush=True)
    median = time_variants(MESHES, args.overrides, args.rounds, args.steps)
    for name, seconds in median.items():
        print(f"{name:<14} {1e3 * seconds:7.1f} ms/step (median of {args.rounds} rounds)")
    print(f"fsdp / data-parallel step time: {median['fsdp'] / median['data-parallel']:.2f}x")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
