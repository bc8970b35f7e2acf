"""Step time of the quickstart on the CPU cores with the optimizer update sharded over the
data-parallel replicas (``train.shard_optimizer_update``, ZeRO-1) against the usual replicated
update.

    python benchmarks/quickstart_zero.py                      # the quickstart as configured
    python benchmarks/quickstart_zero.py --set optim.optimizer=adamw
    python benchmarks/quickstart_zero.py --set model.scan_layers=true

With replicated updates each core runs all of Muon's Newton-Schulz iterations (~2.5 GFLOP a
step at the quickstart's size); sharded, each core orthogonalises its slice and the new
parameters are gathered. ``optim.muon_group_matrices`` batches Muon's same-shape matrices (one
chain of batched matmuls per shape instead of one per matrix; research/train/muon_groups.py)
and splits the batches over the replicas. All train steps are built and compiled in one
process, then timed in alternating rounds (quickstart_mesh.py's ``time_variants``), so a change
in the machine's load hits all; prints each one's median step time, its ratio to the
replicated update's, and the load.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from research import runtime  # noqa: E402

runtime.setup()  # before JAX starts: one XLA device per core

import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quickstart_mesh import time_variants  # noqa: E402

ZERO, GROUPED = "train.shard_optimizer_update=true", "optim.muon_group_matrices=true"
VARIANTS = {
    "replicated": [],
    "sharded": [ZERO],
    "grouped": [GROUPED],  # Muon's matrices batched by shape, the batches split over data
    "sharded+grouped": [ZERO, GROUPED],
    "adamw (floor)": ["optim.optimizer=adamw"],  # no Muon at all: what the Muon part costs
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps timed per round")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(f"{len(jax.devices())} CPU devices; load average before: {os.getloadavg()}", flush=True)
    variants = VARIANTS
    if "optim.optimizer=adamw" in args.overrides:  # grouping is Muon's; no floor to show
        variants = {name: VARIANTS[name] for name in ("replicated", "sharded")}
    median = time_variants(variants, args.overrides, args.rounds, args.steps)
    base = median["replicated"]
    for name, seconds in median.items():
        print(
            f"{name:<16} {1e3 * seconds:7.1f} ms/step (median of {args.rounds} rounds), "
            f"{seconds / base:.2f}x the replicated update's"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
