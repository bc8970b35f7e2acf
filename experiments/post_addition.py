"""Does post-training work on a task a CPU can learn? Pretrain a small model on raw sums
(``047+385=432``), fine-tune it to answer in a chat format (SFT), then DPO and GRPO from the SFT
model; measure exact-match accuracy on held-out problems after each stage. Also: distil a
larger teacher into a student of 1/4 its size vs the same student on hard labels only.

``research train post_addition`` runs the pretraining stage alone; ``python
experiments/post_addition.py`` runs the whole pipeline (data, every stage, accuracy, ledgers,
plots in docs/post/, numbers in docs/post/results.json). Each stage is a run folder under
runs/post_addition/ and resumes like any run.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from research.config import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    PostConfig,
    TrainConfig,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "post" / "addition"
RUNS = Path("runs/post_addition")


def config() -> ExperimentConfig:
    """The pretraining stage: raw sums, next-token loss."""
    return ExperimentConfig(
        name="post_addition",
        model=ModelConfig(d_model=64, n_layers=2, n_heads=4, seq_len=32),
        data=DataConfig(corpus=str(DATA / "corpus.txt"), tokenizer="char", doc_separator="\n\n"),
        optim=OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.0),
        train=TrainConfig(
            steps=1500,
            batch_size=32,
            eval_every=500,
            eval_batches=8,
            checkpoint_every=500,
            log_every=50,
            sample_tokens=0,
            run_dir=str(RUNS / "pretrain"),
        ),
        post=PostConfig(eval_data=str(DATA / "heldout.jsonl"), eval_problems=200),
    )


def stage(name: str, base: ExperimentConfig | None = None) -> ExperimentConfig:
    """The config of one post-training stage (sft | dpo | ipo | grpo), from the pretraining one."""
    cfg = base or config()
    post = dataclasses.replace(cfg.post, init_from=cfg.train.run_dir)
    train = dataclasses.replace(cfg.train, run_dir=str(RUNS / name), eval_every=100)
    optim = dataclasses.replace(cfg.optim, warmup_steps=10)
    if name == "sft":
        post = dataclasses.replace(post, mode="sft", data=str(DATA / "sft.jsonl"))
        train = dataclasses.replace(train, steps=300)
        optim = dataclasses.replace(optim, lr=1e-3)
    elif name in ("dpo", "ipo"):
        post = dataclasses.replace(
            post,
            mode="dpo",
            preference_loss=name,
            init_from=str(RUNS / "sft"),
            data=str(DATA / "pairs.jsonl"),
            beta=0.1,
        )
        train = dataclasses.replace(train, steps=200)
        optim = dataclasses.replace(optim, lr=3e-4, schedule="constant")
    elif name == "grpo":
        post = dataclasses.replace(
            post, mode="grpo", init_from=str(RUNS / "sft"), data=str(DATA / "problems.jsonl")
        )
        train = dataclasses.replace(train, steps=200, batch_size=64)
        optim = dataclasses.replace(optim, lr=3e-4, schedule="constant")
    else:
        raise ValueError(f"unknown stage {name!r}")
    return dataclasses.replace(
        cfg, name=f"post_addition_{name}", post=post, train=train, optim=optim
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from experiments.post_pipeline import main

    main(sys.argv[1:])
