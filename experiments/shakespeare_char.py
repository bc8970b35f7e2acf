"""Quickstart: how low can a character-level model get on tinyshakespeare in under a minute of CPU?

`research train` runs this. Same shape as nanoGPT's CPU recipe (4 layers, 4 heads, 128 wide,
context 64, batch 12), with our architecture (RoPE, RMSNorm, SwiGLU) and a shorter, hotter
schedule: 800 steps at lr 3e-3 with a warmup-stable-decay schedule. On a 2-core CPU it reaches
val loss ~1.85 in ~40 s, where nanoGPT's 2000 steps reach 1.886 in ~100 s
(benchmarks/train_throughput.py prints both).
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
        optim=OptimConfig(
            lr=3e-3,
            schedule="wsd",
            warmup_steps=50,
            decay_fraction=0.3,
            min_lr_ratio=0.1,
            weight_decay=0.1,
            b2=0.99,
        ),
        train=TrainConfig(
            steps=800,
            batch_size=12,
            eval_every=400,
            checkpoint_every=400,
            log_every=20,
        ),
    )
