"""IsoFLOP sweep sized for a 2-core CPU (~30 min idle): where is the compute-optimal model size
for character-level tinyshakespeare, and how well does a Chinchilla fit predict a bigger run?

    research sweep isoflop_cpu --dry-run        # the runs, their FLOPs and estimated time
    research sweep isoflop_cpu                  # train them (skips finished, resumes cut ones)
    research fit runs/isoflop_cpu               # the three Chinchilla approaches + plots

Three budgets (2.67e11, 8e11, 2.4e12 FLOPs, x3 apart), five sizes each, log-spaced over a 16x
range around N0 = sqrt(C / (6 x 100)): 100 tokens per parameter, not Chinchilla's 20, because
the tiny sweep put these small character-level models' optimum several times below the
20-token size. Shapes from scaling/shapes.py (aspect ratio 32, head size 16). One more run at
4x the largest budget is held out of the fits: its size is N0 at that budget, chosen before any
fit, and `research fit` reports how far the fitted laws' prediction of its loss lands from what
it reached.
"""

from research.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig
from research.scaling.sweep import isoflop_with_holdout

BUDGETS = (2.67e11, 8e11, 2.4e12)
TOKENS_PER_PARAM = 100


def base() -> ExperimentConfig:
    return ExperimentConfig(
        name="isoflop_cpu",
        model=ModelConfig(seq_len=128),
        data=DataConfig(corpus="tinyshakespeare", tokenizer="char"),
        optim=OptimConfig(lr=3e-3, schedule="cosine", min_lr_ratio=0.1, b2=0.99),
        train=TrainConfig(batch_size=16, eval_every=0, log_every=10, sample_tokens=0),
    )


def config() -> ExperimentConfig:
    """The held-out run, so `research train isoflop_cpu` trains it on its own."""
    return sweep()[-1].config


def sweep():
    return isoflop_with_holdout(
        base(), BUDGETS, tokens_per_param=TOKENS_PER_PARAM, n_sizes=5, spread=4.0
    )
