"""Quickstart: how low can a character-level model get on tinyshakespeare in seconds of CPU?

`research train` runs this. The speedrun recipe on a model smaller than nanoGPT's CPU shape
(2 layers instead of 4, ReLU^2 MLPs 256 wide instead of 4 x 128; 128 wide, 4 heads, context
64): Muon on the weight matrices, orthogonalised in same-shape groups split over the
data-parallel replicas (AdamW at 5e-3 on embeddings, head and norms), QK-norm, logits
soft-capped at 15, an untied head, and a short warmup-stable-decay schedule (20 warmup steps,
the last half decaying): 360 steps of 16 sequences. Val loss on the whole split: 1.8597,
1.8691 and 1.8623 for seeds 0, 1 and 2 (330 steps: 1.8791 and 1.8840 for seeds 0 and 1).
One eval (the whole validation split) and one checkpoint, at the end. The CPU's cores stay
data-parallel replicas: an FSDP mesh was slower per step on a quiet 2-core machine
(benchmarks/quickstart_mesh.py). Time against nanoGPT itself: benchmarks/nanogpt_race.py
(figures and the recipe search in the README's "Training recipe" section).
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
            n_layers=2,
            n_heads=4,
            seq_len=64,
            qk_norm=True,
            logit_softcap=15.0,
            mlp_activation="relu2",
            mlp_hidden=256,
            tie_embeddings=False,
        ),
        data=DataConfig(corpus="tinyshakespeare", tokenizer="char"),
        optim=OptimConfig(
            optimizer="muon",
            muon_lr=0.05,
            lr=5e-3,
            schedule="wsd",
            warmup_steps=20,
            decay_fraction=0.5,
            min_lr_ratio=0.1,
            weight_decay=0.1,
            b2=0.99,
            muon_group_matrices=True,
        ),
        train=TrainConfig(
            steps=360,
            batch_size=16,
            eval_every=0,
            checkpoint_every=0,
            log_every=20,
        ),
    )
