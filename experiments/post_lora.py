"""Does LoRA fine-tuning reach full fine-tuning's accuracy at a fraction of the trainable
parameters and optimizer memory? SFT of the addition model (experiments/post_addition.py: 2
layers, d_model 64, pretrained on raw sums) to answer in the chat format, once with every
weight trained and once with the base frozen and rank-8 adapters on every attention and MLP
projection; the same data and batches, for 300 steps (post_addition's SFT) and for 1500.
Prints and writes docs/post/lora.json: exact-match accuracy on the 500 held-out problems,
trainable parameters, the optimizer state's bytes (read from each run's restored train
state) and wall time (ledger.json).

``python experiments/post_lora.py`` (the pretraining stage is post_addition's, run if missing).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax

from research.config import load_module

pa = load_module(Path(__file__).with_name("post_addition.py"))  # its stages and helpers


STEPS = (300, 1500)  # post_addition's SFT length, and 5x it


def variant(stage: str, steps: int):
    """post_addition's ``stage`` trained for ``steps`` steps (its own run folder past 300)."""
    cfg = pa.stage(stage)
    if steps == cfg.train.steps:
        return stage, cfg
    name = f"{stage}_{steps}"
    train = dataclasses.replace(cfg.train, steps=steps, run_dir=str(pa.RUNS / name))
    return name, dataclasses.replace(cfg, train=train)


def _optimizer_figures(cfg) -> dict:
    """Trainable parameters and optimizer bytes of a finished run's restored train state."""
    from research.post import lora
    from research.run import build_run

    state = build_run(cfg, "train").state
    trained = state["adapters"] if "adapters" in state else state["params"]
    return {
        "trainable_params": lora.count(trained),
        "total_params": lora.count(state["params"]),
        "optimizer_bytes": lora.nbytes(state["opt_state"]),
    }


def main(argv: list[str]) -> None:
    from research import runtime
    from research.post.task import write_task

    runtime.setup()
    if not (pa.DATA / "heldout_pairs.jsonl").exists():
        write_task(pa.DATA)
    pa._run(pa.config())  # the pretraining stage (skipped when complete)
    results = {}
    for steps in STEPS:
        for stage in ("sft", "sft_lora"):
            name, cfg = variant(stage, steps)
            pa._run(cfg)
            results[name] = {
                "steps": steps,
                "task_accuracy": pa._accuracy(cfg.train.run_dir),
                **_optimizer_figures(cfg),
                **pa._ledger(cfg.train.run_dir),
            }
            print(f"{name}: {results[name]}")
    out = pa.ROOT / "docs" / "post"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora.json").write_text(json.dumps(results, indent=2))
    print(f"devices: {jax.devices()}")


if __name__ == "__main__":
    main(sys.argv[1:])
