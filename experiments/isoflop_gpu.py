"""IsoFLOP sweep sized for one H100 in about 15 minutes: does the compute-optimal size keep
growing with compute the way the CPU sweep found, over a 100x larger range of budgets?

    research sweep isoflop_gpu --dry-run        # runs, FLOPs, estimated time on this device
    research sweep isoflop_gpu && research fit runs/isoflop_gpu

Three budgets (1e13, 3e13, 1e14 FLOPs), five sizes each around 100 tokens per parameter (as
isoflop_cpu), shapes with aspect ratio 48 and head size 32, context 256, batches of 64
sequences, bfloat16 compute; plus one held-out run at 4x the largest budget: 1.1e15 FLOPs and
~400M tokens in all. The ~15 minutes is an estimate (small models at a few million tokens/s,
plus a compilation per run), not yet measured: the first finished runs make `--dry-run`'s
estimate a measured one.

Character-level tinyshakespeare is small (1M characters): the longest run (the smallest model
at the largest budget) repeats it ~95 times. Point the sweep at a bigger text folder for a
cleaner law: ``--set data.corpus=/path/to/texts``.
"""

from research.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig
from research.scaling.sweep import isoflop_with_holdout

BUDGETS = (1e13, 3e13, 1e14)
TOKENS_PER_PARAM = 100
SHAPE = dict(aspect_ratio=48, head_dim=32)


def base() -> ExperimentConfig:
    return ExperimentConfig(
        name="isoflop_gpu",
        model=ModelConfig(seq_len=256),
        data=DataConfig(corpus="tinyshakespeare", tokenizer="char"),
        optim=OptimConfig(lr=2e-3, schedule="cosine", min_lr_ratio=0.1, b2=0.99),
        train=TrainConfig(batch_size=64, eval_every=0, log_every=25, sample_tokens=0),
    )


def config() -> ExperimentConfig:
    """The held-out run, so `research train isoflop_gpu` trains it on its own."""
    return sweep()[-1].config


def sweep():
    return isoflop_with_holdout(
        base(), BUDGETS, tokens_per_param=TOKENS_PER_PARAM, n_sizes=5, spread=4.0, **SHAPE
    )
