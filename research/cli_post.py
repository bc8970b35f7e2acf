"""`research post-data | post-eval`: make the CPU task's data, measure a run's task accuracy.

Post-training itself is `research train EXPERIMENT --set post.mode=sft|dpo|grpo|distill ...`:
the same command, run folders, checkpoints, TensorBoard metrics and ledger as pretraining.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from research.cli_types import positive_int

FMT = argparse.RawDescriptionHelpFormatter


def cmd_post_data(args) -> None:
    from research.post.task import write_task

    for name, path in write_task(Path(args.out), args.digits, seed=args.seed).items():
        print(f"{name}: {path}")


def cmd_post_eval(args) -> None:
    from research.post.data import load_problems
    from research.post.evaluate import task_accuracy
    from research.run import build_run, load_run_config

    run = build_run(load_run_config(Path(args.run_dir)), "eval")
    post = run.config.post
    problems = load_problems(args.problems, post.task_digits)[: args.limit or None]
    from research.post.init import post_tokenizer
    from research.post.setup import chat_template

    tokenizer = post_tokenizer(run.config, run.data.tokenizer)
    accuracy = task_accuracy(
        run.graphdef,
        run.state["params"],
        tokenizer,
        problems,
        post.max_new_tokens,
        template=chat_template(run.config),
    )
    print(json.dumps({"step": run.step, "problems": len(problems), "accuracy": accuracy}))


def cmd_post_teacher_logits(args) -> None:
    from research.config import load_experiment
    from research.run.teacher_logits import write_cache

    cfg = load_experiment(args.experiment, args.overrides)
    out = write_cache(cfg, Path(args.out), args.k or cfg.post.teacher_top_k, args.dtype)
    print(f"wrote {out}: set post.teacher_logits={out}")


def add_post_commands(sub) -> None:
    p = sub.add_parser(
        "post-data",
        help="write the addition task: pretraining text, chat demonstrations, preference "
        "pairs, RL problems, held-out problems",
        formatter_class=FMT,
        epilog="example:\n  research post-data --out data/post/addition --digits 2\n"
        "  research train post_addition --set post.mode=sft --set post.data=... (see README)",
    )
    p.add_argument("--out", default="data/post/addition")
    p.add_argument("--digits", type=positive_int, default=2, help="operand width")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_post_data)

    p = sub.add_parser(
        "post-eval",
        help="exact-match accuracy of a run's greedy answers to held-out problems",
        formatter_class=FMT,
        epilog="example:\n  research post-eval runs/post_addition/sft "
        "--problems data/post/addition/heldout.jsonl",
    )
    p.add_argument("run_dir")
    p.add_argument("--problems", required=True, help="JSONL of problems ('a', 'b' per line)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N")
    p.set_defaults(func=cmd_post_eval)

    p = sub.add_parser(
        "post-teacher-logits",
        help="run a distillation config's teacher once over the student's batches and cache "
        "its top-k logits on disk (then train with --set post.teacher_logits=FOLDER)",
        formatter_class=FMT,
        epilog="example:\n  research post-teacher-logits post_addition --set post.mode=distill "
        "--set post.teacher=runs/post_addition/pretrain --out data/post/teacher_top32 --k 32",
    )
    p.add_argument("experiment", help="the distillation run's experiment (name or path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True, help="the cache folder to write (must not exist)")
    p.add_argument("--k", type=positive_int, default=None, help="default: post.teacher_top_k")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.set_defaults(func=cmd_post_teacher_logits)
