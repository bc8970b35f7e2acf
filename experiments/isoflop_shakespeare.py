"""A tiny IsoFLOP sweep that runs on any CPU in a few minutes: does the sweep -> fit -> plot
pipeline work end to end, and do even these small models show a compute-optimal size?

    research sweep isoflop_shakespeare && research fit runs/isoflop_shakespeare

Three budgets (1e11, 2e11, 4e11 FLOPs) x four sizes (~4k to ~40k non-embedding parameters),
character-level tinyshakespeare, context 64, batches of 16; the notebook runs this one. The
budgets are x2 apart because the CPU sweep found N_opt growing ~C^0.8 at these sizes: four
sizes over 8x then bracket every budget's optimum.
"""

from research.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig
from research.scaling.sweep import isoflop_grid

BUDGETS = (1e11, 2e11, 4e11)
SIZES = (4e3, 8e3, 16e3, 32e3)


def base() -> ExperimentConfig:
    return ExperimentConfig(
        name="isoflop_shakespeare",
        model=ModelConfig(seq_len=64),
        data=DataConfig(corpus="tinyshakespeare", tokenizer="char"),
        optim=OptimConfig(lr=3e-3, schedule="cosine", min_lr_ratio=0.1, b2=0.99),
        train=TrainConfig(
            batch_size=16, eval_every=0, eval_batches=8, log_every=10, sample_tokens=0
        ),
    )


def config() -> ExperimentConfig:
    return sweep()[0].config


def sweep():
    return isoflop_grid(base(), BUDGETS, sizes=SIZES, aspect_ratio=16, head_dim=8, min_steps=30)
