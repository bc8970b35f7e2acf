"""Does an MoE (8 experts, top-2) beat a dense model with the same active parameters, given the
same data, tokens and optimizer? And what does it cost per step?

    research train moe_vs_dense          # the MoE alone
    python experiments/moe_vs_dense.py   # both, then docs/moe_vs_dense.png and a table

Both models: 4 layers, 128 wide, context 128, character-level tinyshakespeare, 600 steps of 16
sequences. The dense SwiGLU is 512 wide; each of the MoE's 8 experts is 256 wide, so a token
passes through the same number of MLP parameters (plus the MoE's 1k-parameter router).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from research.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig, TrainConfig

SHAPE = dict(d_model=128, n_layers=4, n_heads=4, seq_len=128)


def dense_config() -> ExperimentConfig:
    return ExperimentConfig(
        name="moe_vs_dense-dense",
        model=ModelConfig(**SHAPE, mlp_hidden=512),
        data=DataConfig(corpus="tinyshakespeare", tokenizer="char"),
        optim=OptimConfig(lr=3e-3, schedule="wsd", warmup_steps=50, decay_fraction=0.3, b2=0.99),
        train=TrainConfig(
            steps=600,
            batch_size=16,
            eval_every=100,
            checkpoint_every=300,
            log_every=20,
            sample_tokens=0,
        ),
    )


def config() -> ExperimentConfig:
    dense = dense_config()
    return dataclasses.replace(
        dense,
        name="moe_vs_dense-moe",
        model=ModelConfig(
            **SHAPE,
            n_experts=8,
            top_k=2,
            expert_hidden=256,
            router_aux_loss=0.01,
            router_z_loss=0.001,
        ),
    )


def sweep():
    yield "dense", dense_config()
    yield "moe", config()


def _curves(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return {
        "train": [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r],
        "val": [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r],
        "step_ms": [r["perf/step_time_ms"] for r in rows if "perf/step_time_ms" in r][1:],
    }


def main(out: Path = Path("docs/moe_vs_dense.png")) -> None:
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from research import runtime

    runtime.setup()
    from research.run import train

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    print("| model | val loss | median step (ms) | total / active params |")
    print("|---|---|---|---|")
    from research.models.accounting import count_params

    for name, cfg in sweep():
        cfg.train.run_dir = f"runs/moe_vs_dense/{name}"
        cfg.log.progress = False
        result = train(cfg)
        curves = _curves(result.run_dir)
        size = count_params(cfg.model)
        step_ms = statistics.median(curves["step_ms"])
        print(
            f"| {name} | {result.val_loss:.4f} | {step_ms:.1f} | "
            f"{size.total_params / 1e6:.2f}M / {size.active_params / 1e6:.2f}M |"
        )
        left.plot(*zip(*curves["train"], strict=True), label=f"{name} train", alpha=0.6)
        left.plot(*zip(*curves["val"], strict=True), "o-", label=f"{name} val")
        right.bar(name, step_ms)
    left.set_xlabel("step")
    left.set_ylabel("loss (nats/char)")
    left.set_ylim(1.3, 3.0)
    left.legend()
    left.set_title("same data, same tokens, same active parameters")
    right.set_ylabel("median train step (ms)")
    right.set_title("step time on this machine")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/moe_vs_dense.png"))
