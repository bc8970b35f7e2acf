"""Does post-training work on a task a CPU can learn? Pretrain a small model on raw sums
(``047+385=432``), fine-tune it to answer in a chat format (SFT), then DPO and GRPO from the SFT
model; measure exact-match accuracy on held-out problems after each stage. Also: distil a
larger teacher into a student of 1/4 its size vs the same student on hard labels only.

``research train post_addition`` runs the pretraining stage alone; ``python
experiments/post_addition.py`` runs the whole pipeline (data, every stage, accuracy, ledgers,
plots in docs/post/, numbers in docs/post/results.json). Each stage is a run folder under
runs/post_addition/ and resumes like any run.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from research.config import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    PostConfig,
    TrainConfig,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "post" / "addition"
RUNS = Path("runs/post_addition")


def config() -> ExperimentConfig:
    """The pretraining stage: raw sums, next-token loss."""
    return ExperimentConfig(
        name="post_addition",
        model=ModelConfig(d_model=64, n_layers=2, n_heads=4, seq_len=32),
        data=DataConfig(corpus=str(DATA / "corpus.txt"), tokenizer="char", doc_separator="\n\n"),
        optim=OptimConfig(lr=3e-3, warmup_steps=50, weight_decay=0.0),
        train=TrainConfig(
            steps=1500,
            batch_size=32,
            eval_every=500,
            eval_batches=8,
            checkpoint_every=500,
            log_every=50,
            sample_tokens=0,
            run_dir=str(RUNS / "pretrain"),
        ),
        post=PostConfig(eval_data=str(DATA / "heldout.jsonl"), eval_problems=200),
    )


def stage(name: str, base: ExperimentConfig | None = None) -> ExperimentConfig:
    """One post-training stage's config, from the pretraining one: sft | sft_more (the SFT
    run continued for as many steps as DPO: the control that DPO's extra steps must beat) |
    dpo | grpo | reward | sft_lora (SFT with the base frozen and rank-8 adapters on every
    projection: experiments/post_lora.py compares it with full SFT)."""
    cfg = base or config()
    post = dataclasses.replace(cfg.post, init_from=cfg.train.run_dir)
    train = dataclasses.replace(cfg.train, run_dir=str(RUNS / name), eval_every=100)
    optim = dataclasses.replace(cfg.optim, warmup_steps=10)
    after_sft = dict(init_from=str(RUNS / "sft"))
    # Past SFT: a small constant learning rate (at 3e-4 DPO and GRPO both lost accuracy).
    tuned = dataclasses.replace(optim, lr=5e-5, schedule="constant")
    if name == "sft":
        post = dataclasses.replace(post, mode="sft", data=str(DATA / "sft.jsonl"))
        train = dataclasses.replace(train, steps=300)
        optim = dataclasses.replace(optim, lr=1e-3)
    elif name == "sft_lora":  # the same data and steps as sft; adapters take a larger lr
        post = dataclasses.replace(
            post, mode="sft", data=str(DATA / "sft.jsonl"), lora_rank=8, lora_alpha=16.0
        )
        train = dataclasses.replace(train, steps=300)
        optim = dataclasses.replace(optim, lr=3e-3)
    elif name == "sft_more":
        post = dataclasses.replace(post, mode="sft", data=str(DATA / "sft.jsonl"), **after_sft)
        train, optim = dataclasses.replace(train, steps=200), tuned
    elif name == "dpo":
        post = dataclasses.replace(
            post,
            mode="dpo",
            data=str(DATA / "pairs.jsonl"),
            beta=0.1,
            rpo_alpha=1.0,  # without it, DPO lowered the chosen answers too: 62% -> 50%
            **after_sft,
        )
        train, optim = dataclasses.replace(train, steps=200), tuned
    elif name == "reward":  # a reward model from the SFT model: Bradley-Terry on the pairs
        post = dataclasses.replace(
            post,
            mode="reward",
            data=str(DATA / "pairs.jsonl"),
            eval_data=str(DATA / "heldout_pairs.jsonl"),
            **after_sft,
        )
        train, optim = dataclasses.replace(train, steps=300), dataclasses.replace(tuned, lr=3e-4)
    elif name == "grpo":
        post = dataclasses.replace(
            post, mode="grpo", data=str(DATA / "problems.jsonl"), **after_sft
        )
        train = dataclasses.replace(train, steps=600, batch_size=64, eval_every=200)
        optim = tuned
    else:
        raise ValueError(f"unknown stage {name!r}")
    return dataclasses.replace(
        cfg, name=f"post_addition_{name}", post=post, train=train, optim=optim
    )


def teacher_and_students(seeds: tuple[int, ...] = (0, 1)) -> dict[str, ExperimentConfig]:
    """Distillation: the pretrained model (d_model 64) teaches a student of 1/4 its
    non-embedding parameters (d_model 32), trained on the same tokens as the teacher (1500
    steps) with hard labels only or with the teacher's logits (forward KL at temperature 2,
    half and half); two seeds each, since a student's loss drops when it starts to get the
    sums right, which happens at a different step in each run."""
    cfg = config()
    runs = {}
    for seed in seeds:
        student = dataclasses.replace(
            cfg,
            # 26.8k non-embedding parameters, 1/4 of the teacher's 106.8k (SwiGLU 96 wide).
            model=dataclasses.replace(cfg.model, d_model=32, mlp_hidden=96),
            train=dataclasses.replace(cfg.train, seed=seed, eval_batches=0, eval_every=250),
            post=dataclasses.replace(cfg.post, eval_data=""),
        )
        tail = f"_seed{seed}"
        runs[f"student_hard{tail}"] = dataclasses.replace(
            student,
            name=f"post_addition_student_hard{tail}",
            train=dataclasses.replace(student.train, run_dir=str(RUNS / f"student_hard{tail}")),
        )
        runs[f"student_distilled{tail}"] = dataclasses.replace(
            student,
            name=f"post_addition_student_distilled{tail}",
            train=dataclasses.replace(
                student.train, run_dir=str(RUNS / f"student_distilled{tail}")
            ),
            post=dataclasses.replace(
                student.post,
                mode="distill",
                teacher=cfg.train.run_dir,
                distill_temperature=2.0,
                distill_alpha=0.5,
            ),
        )
    return runs


def _accuracy(run_dir: str) -> float:
    from research.post.data import load_problems
    from research.post.evaluate import task_accuracy
    from research.run import build_run, load_run_config

    run = build_run(load_run_config(Path(run_dir)), "eval")
    problems = load_problems(str(DATA / "heldout.jsonl"), run.config.post.task_digits)
    return task_accuracy(
        run.graphdef, run.state["params"], run.data.tokenizer(), problems, 5, batch=250
    )


def _finished_val_loss(cfg: ExperimentConfig) -> float | None:
    """The final val loss of a stage that already ran to the end, else None. A finished stage
    is not called again: each call of a complete run adds its evaluation time to its ledger."""
    import json

    path = Path(cfg.train.run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if '"val/loss"' in line]
    last = [r for r in rows if r["step"] == cfg.train.steps]
    return last[-1]["val/loss"] if last else None


def _logged(cfg: ExperimentConfig, tag: str) -> list:
    """(step, value) of every row of ``tag`` in the stage's metrics.jsonl."""
    import json

    path = Path(cfg.train.run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if f'"{tag}"' in line]
    return [(r["step"], r[tag]) for r in rows]


def _run(cfg: ExperimentConfig) -> float | None:
    from research.run import train

    cfg.log.progress = False
    done = _finished_val_loss(cfg)
    return done if done is not None else train(cfg).val_loss


def _ledger(run_dir: str) -> dict:
    import json

    ledger = json.loads((Path(run_dir) / "ledger.json").read_text())
    return {k: ledger.get(k) for k in ("wall_seconds", "energy_kwh", "tokens", "energy_method")}


def main(argv: list[str]) -> None:
    """Every stage in order (each resumes or is skipped if already complete), then the table,
    docs/post/results.json and the plots."""
    import json

    from research import runtime
    from research.post.task import write_task

    runtime.setup()
    if not (DATA / "heldout_pairs.jsonl").exists():
        write_task(DATA)  # the same seed writes the same files
    stages = {"pretrain": config(), **{n: stage(n) for n in ("sft", "sft_more", "dpo", "grpo")}}
    results = {}
    for name, cfg in stages.items():
        val_loss = _run(cfg)
        results[name] = {
            "task_accuracy": _accuracy(cfg.train.run_dir),
            "val_loss": val_loss,
            **_ledger(cfg.train.run_dir),
        }
        print(f"{name}: {results[name]}")
    reward = stage("reward")
    _run(reward)
    results["reward"] = {
        "heldout_pair_accuracy": _logged(reward, "post/heldout_pair_accuracy"),
        **_ledger(reward.train.run_dir),
    }
    print(f"reward: {results['reward']}")
    for name, cfg in teacher_and_students().items():
        results[name] = {"val_loss": _run(cfg), **_ledger(cfg.train.run_dir)}
        print(f"{name}: {results[name]}")
    out = ROOT / "docs" / "post"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(results, out)


def _plot(results: dict, out: Path) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = ["pretrain", "sft", "sft_more", "dpo", "grpo"]
    accuracy = [100 * results[n]["task_accuracy"] for n in names]
    labels = ["base", "SFT", "SFT +200\n(control)", "SFT +DPO\n(+RPO)", "SFT +GRPO"]
    axes[0].bar(labels, accuracy, color=["C7", "C0", "C7", "C1", "C2"])
    axes[0].tick_params(axis="x", labelsize=8)
    for i, a in enumerate(accuracy):
        axes[0].text(i, a + 1, f"{a:.1f}%", ha="center")
    axes[0].set_ylabel("exact-match accuracy, 500 held-out sums (%)")
    axes[0].set_ylim(0, 105)
    axes[0].set_title("task accuracy after each stage")
    for seed, style in ((0, "o-"), (1, "s--")):
        for kind, color in (("hard", "C0"), ("distilled", "C1")):
            name = f"student_{kind}_seed{seed}"
            rows = [
                json.loads(line)
                for line in (RUNS / name / "metrics.jsonl").read_text().splitlines()
                if "val/loss" in line
            ]
            steps, losses = [r["step"] for r in rows], [r["val/loss"] for r in rows]
            axes[1].plot(steps, losses, style, color=color, label=f"{kind}, seed {seed}")
    axes[1].set_xlabel("step (same tokens for both)")
    axes[1].set_ylabel("held-out loss (nats/token)")
    axes[1].set_title("student of 1/4 the teacher's size")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "pipeline.png", dpi=150)


if __name__ == "__main__":
    main(sys.argv[1:])
