"""Quickstart: how low can a character-level model get on tinyshakespeare in seconds of CPU?

`research train` runs this. nanoGPT's CPU shape (4 layers, 4 heads, 128 wide, context 64) with
the speedrun recipe: Muon on the weight matrices (AdamW at 3e-3 on embeddings, head and norms),
QK-norm, logits soft-capped at 15, ReLU^2 MLPs, an untied head, and a short warmup-stable-decay
schedule: 330 steps of 16 sequences, about half the tokens the AdamW recipe needed for a lower
loss: 1.853 and 1.855 for seeds 0 and 1 (300 steps: 1.864 for seed 0, and on an FSDP mesh
1.868 and 1.878, too close to the 1.88 target).
One eval (the whole validation split) and one checkpoint, at the end. The CPU's cores stay
data-parallel replicas: an FSDP mesh would split Muon's Newton-Schulz iterations between them
but was slower per step on a quiet 2-core machine (benchmarks/quickstart_mesh.py). Time
against nanoGPT itself: benchmarks/nanogpt_race.py (figures in the README's "Training recipe"
section).
"""

from research.config import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="shakespeare_char",
        model=ModelConfig(
            d_model=128,
            n_layers=4,
            n_heads=4,
            seq_len=64,
            qk_norm=True,
            logit_softcap=15.0,
            mlp_activation="relu2",
            tie_embeddings=False,
        ),
        data=DataConfig(corpus="tinyshakespeare", tokenizer="char"),
        optim=OptimConfig(
            optimizer="muon",
            muon_lr=0.05,
            lr=3e-3,
            schedule="wsd",
            warmup_steps=50,
            decay_fraction=0.3,
            min_lr_ratio=0.1,
            weight_decay=0.1,
            b2=0.99,
        ),
        train=TrainConfig(
            steps=330,
            batch_size=16,
            eval_every=0,
            checkpoint_every=0,
            log_every=20,
        ),
    )
