"""Quickstart: how low can a character-level model get on tinyshakespeare in under a minute of CPU?

`research train` runs this. The recipe (shape, optimizer, schedule) is tuned for a 2-core CPU:
see benchmarks/quickstart_recipe.py and the README's benchmark section for what it reaches.
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
        model=ModelConfig(d_model=128, n_layers=4, n_heads=4, seq_len=64),
        data=DataConfig(corpus="tinyshakespeare", tokenizer="char"),
        optim=OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=100, weight_decay=0.1),
        train=TrainConfig(steps=2000, batch_size=12, eval_every=500, checkpoint_every=500),
    )
