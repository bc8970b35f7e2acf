"""A tiny model for tests and smoke runs: does the whole pipeline work end to end in seconds?"""

from research.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> ExperimentConfig:
    return ExperimentConfig(
        name="tiny",
        model=ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=32),
        data=DataConfig(corpus="tinyshakespeare", tokenizer="char"),
        optim=OptimConfig(lr=3e-3, warmup_steps=10),
        train=TrainConfig(
            steps=50,
            batch_size=8,
            eval_every=25,
            eval_batches=4,
            checkpoint_every=25,
            log_every=5,
            sample_tokens=40,
        ),
    )
