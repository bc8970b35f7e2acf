"""Do WSD cooldown branches give the same Chinchilla fit as separate runs, for less compute?

    research sweep wsd_cooldown_shakespeare --dry-run
    research sweep wsd_cooldown_shakespeare          # -> runs/wsd_cooldown_shakespeare
    python benchmarks/wsd_cooldown_fit.py runs/wsd_cooldown_shakespeare

Three sizes (~4k, ~16k, ~55k non-embedding parameters) x four token budgets (0.25M-2M
characters of tinyshakespeare, context 128, batches of 16), trained three ways:

- ``branch``: per size one stable run at constant LR to 80% of the largest budget, and a 20%
  cooldown branch from its checkpoint at 80% of each budget (Hägele et al. 2024);
- ``separate``: each branch's config trained alone from step 0 (the same WSD schedule);
- ``cosine``: each budget trained alone with a cosine schedule (the classic Chinchilla sweep).

The benchmark fits approach 3 to each group and compares their predicted losses, and reports
the compute of the branch way as a fraction of the separate runs'.
"""

from research.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig
from research.scaling.sweep import SweepRun
from research.scaling.wsd import separate_runs, wsd_branches

SIZES = (4e3, 16e3, 55e3)
TOKEN_BUDGETS = (0.25e6, 0.5e6, 1e6, 2e6)
COOLDOWN = 0.2


def base() -> ExperimentConfig:
    return ExperimentConfig(
        name="wsd_cooldown_shakespeare",
        model=ModelConfig(seq_len=128),
        data=DataConfig(corpus="tinyshakespeare", tokenizer="char"),
        # Decay to zero (Hägele et al.); the same warmup for every budget of a size: a branch
        # shares its stable run's warmup.
        optim=OptimConfig(lr=3e-3, warmup_steps=40, min_lr_ratio=0.0, b2=0.99),
        train=TrainConfig(batch_size=16, eval_every=0, log_every=10, sample_tokens=0),
    )


def branches() -> list[SweepRun]:
    return wsd_branches(base(), SIZES, TOKEN_BUDGETS, COOLDOWN, aspect_ratio=32, head_dim=16)


def cosine_runs(runs: list[SweepRun]) -> list[SweepRun]:
    """Each budget alone with a cosine schedule (same warmup, peak and floor)."""
    out = []
    for run in separate_runs(runs, prefix="cos-"):
        run.config.optim.schedule = "cosine"
        run.config.name = run.config.name.replace("-separate", "-cosine")
        run.tags = {"method": "cosine"}
        out.append(run)
    return out


def config() -> ExperimentConfig:
    """The largest branch's config, so `research train wsd_cooldown_shakespeare` runs it alone."""
    return branches()[-1].config


def sweep():
    runs = branches()
    for run in runs:
        run.tags = {"method": "branch"}
    return runs + separate_runs(runs) + cosine_runs(runs)
