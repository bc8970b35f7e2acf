"""Muon vs AdamW: steps and training time to the same validation loss, at two model sizes.

    python benchmarks/muon_vs_adamw.py                 # 64 wide x 2 layers and 128 wide x 4
    python benchmarks/muon_vs_adamw.py --steps 600 --eval-every 50

Each size trains twice on tinyshakespeare (char), everything equal but the optimizer: the
quickstart's architecture and WSD schedule, AdamW on every parameter at its tuned LR against
Muon on the weight matrices (AdamW on the rest, same LR). The target is AdamW's final
validation loss; the table gives the first eval step where each run is at or below it and the
training time to that step (the training clock: compile and evals excluded, each optimizer's
own step cost included). Validation on --eval-batches batches of the split, the same for all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from research import runtime  # noqa: E402

runtime.setup()

from research.config import load_experiment  # noqa: E402
from research.run import train  # noqa: E402

SIZES = {"64x2": ("model.d_model=64", "model.n_layers=2"), "128x4": ()}
OPTIMIZERS = {"adamw": ("optim.optimizer=adamw",), "muon": ("optim.optimizer=muon",)}


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, val loss, training seconds up to that step) at every eval."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    clock, last, seconds_at = 0.0, 0, {}
    for row in rows:
        if "perf/step_time_ms" in row:
            clock += row["perf/step_time_ms"] / 1000 * (row["step"] - last)
            last = row["step"]
        seconds_at[row["step"]] = clock
    return [(r["step"], r["val/loss"], seconds_at[r["step"]]) for r in rows if "val/loss" in r]


def run(overrides: list[str]) -> list[tuple[int, float, float]]:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_experiment("shakespeare_char", [*overrides, f"train.run_dir={run_dir}"])
        train(cfg)
        return curve(Path(run_dir))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=16)
    args = parser.parse_args()
    common = [
        f"train.steps={args.steps}",
        f"train.eval_every={args.eval_every}",
        f"train.eval_batches={args.eval_batches}",
        "train.checkpoint_every=0",
        "train.sample_tokens=0",
        "train.log_every=5",
        "log.progress=false",
        "log.tensorboard=false",
    ]
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows = []
    for size, size_overrides in SIZES.items():
        curves = {name: run([*common, *size_overrides, *opt]) for name, opt in OPTIMIZERS.items()}
        target = curves["adamw"][-1][1]
        for name, points in curves.items():
            hit = next(((s, v, t) for s, v, t in points if v <= target), None)
            rows.append((size, name, target, hit, points[-1]))
    print(f"load average after: {os.getloadavg()}")
    print(f"{'size':<7}{'optimizer':<10}{'target':>8}{'steps':>7}{'train s':>9}{'final':>8}")
    for size, name, target, hit, final in rows:
        steps, seconds = (f"{hit[0]}", f"{hit[2]:.1f}") if hit else ("never", "-")
        print(f"{size:<7}{name:<10}{target:8.4f}{steps:>7}{seconds:>9}{final[1]:8.4f}")
    for size in SIZES:
        adamw, muon = (r for r in rows if r[0] == size)
        if muon[3]:
            print(
                f"{size}: muon reaches AdamW's final loss in {muon[3][0] / adamw[3][0]:.2f}x "
                f"the steps and {muon[3][2] / adamw[3][2]:.2f}x the training time"
            )


if __name__ == "__main__":
    main()
