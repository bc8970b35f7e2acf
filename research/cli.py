"""The `research` command: prepare | train | eval | generate | info | sweep | fit | forecast |
compile."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from research.aot.command import add_compile_command
from research.cli_post import add_post_commands
from research.cli_types import non_negative_float, non_negative_int, positive_int, unit_fraction
from research.config import ConfigError, ExperimentConfig, ResearchError, load_experiment
from research.scaling.commands import add_scaling_commands

DEFAULT_EXPERIMENT = "shakespeare_char"


def _add_experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "experiment",
        nargs="?",
        default=DEFAULT_EXPERIMENT,
        help=f"experiment name under experiments/ or a path to one (default: {DEFAULT_EXPERIMENT})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set model.n_layers=6 (repeatable)",
    )


def _load(args) -> ExperimentConfig:
    return load_experiment(args.experiment, args.overrides)


def cmd_prepare(args) -> None:
    cfg = _load(args)
    if args.dedup_parts and not cfg.data.sources:
        raise ConfigError("--dedup-parts needs a streamed corpus in parts: set data.sources")
    if cfg.data.sources and args.engine == "datatrove":  # every part, as datatrove tasks
        from research.data.engine import prepare_with_datatrove

        logs = Path(args.engine_logs or "runs/prepare-logs")
        path = prepare_with_datatrove(cfg.data, args.num_shards, args.parallel, logs)
        print(f"prepared {args.num_shards} parts in {path} (datatrove logs in {logs})")
        if not args.dedup_parts:
            return
    if args.dedup_parts:  # after every part: research/data/across_parts.py
        from research.data.across_parts import dedup_across_parts

        dedup_across_parts(cfg.data, args.num_shards)
        return
    if cfg.data.sources:  # many files, streamed: research/data/stream.py
        from research.data.stream import prepare_stream

        path = prepare_stream(cfg.data, args.shard_index, args.num_shards)
        print(f"prepared part {args.shard_index} of {args.num_shards} in {path}")
        return
    if args.num_shards != 1:
        raise ConfigError("--num-shards needs a streamed corpus: set data.sources")
    from research.data.shards import prepare

    data = prepare(cfg.data)
    print(json.dumps({"path": str(data.path), **data.meta}, indent=2))


def cmd_train(args) -> None:
    from research.run import train

    result = train(_load(args), resume=not args.restart)
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    if not result.steps_run:
        print(
            f"{result.run_dir} is already complete at step {result.step}: val loss {val} "
            "(use --set train.steps=N to train further, or --restart)"
        )
        print("--- sample ---\n" + result.sample if result.sample else "", end="\n")
        return
    mfu = "n/a (peak unknown)" if math.isnan(result.mfu) else f"{100 * result.mfu:.1f}%"
    print(
        f"done: step {result.step}, train loss {result.train_loss:.4f}, val loss {val}, "
        f"{result.tokens_per_second:,.0f} tokens/s, MFU {mfu}, "
        f"compile {result.compile_seconds:.1f} s, {result.wall_seconds:.1f} s -> {result.run_dir}"
    )
    if result.sample:
        print("--- sample ---")
        print(result.sample)


def _saved_run(run_dir: str, purpose: str):
    """A trained run's parameters (only: no optimizer state), read-only."""
    from research.run import build_run, load_run_config

    return build_run(load_run_config(run_dir), purpose)  # a path or a gs:// URL


def _hf_model(path: str):
    """An imported Hugging Face folder, or None when ``path`` is not one."""
    from research.hf import is_hf_folder, load_hf

    return load_hf(path) if is_hf_folder(path) else None


def cmd_eval(args) -> None:
    from research.infer.evaluate import Evaluator

    if (hf := _hf_model(args.run_dir)) is not None:
        from research.config import DataConfig
        from research.infer.text_eval import evaluate_text, validation_text

        text = validation_text(DataConfig(corpus=args.corpus))
        seq_len = min(args.seq_len, hf.config.seq_len)
        loss, bpb = evaluate_text(
            hf.graphdef, hf.params, hf.tokenizer, text, seq_len, max_batches=args.max_batches
        )
        print(json.dumps({"corpus": args.corpus, "val_loss": loss, "val_bpb": bpb}))
        return
    run = _saved_run(args.run_dir, "eval")
    cfg = run.config
    evaluator = Evaluator(
        run.graphdef, run.data, run.mesh, cfg.model.seq_len, run.micro_batch, cfg.train.eval_batches
    )
    val_loss, bpb = evaluator(run.state["params"])
    print(json.dumps({"step": run.step, "val_loss": val_loss, "val_bpb": bpb}))


def _generate_hf(hf, args) -> None:
    """Batched: every sample of the prompt decoded at once, one seed each."""
    from research.infer.generation import GenerationConfig, generate

    if hf.tokenizer is None:
        raise ResearchError(f"{args.run_dir} has no tokenizer.json to encode the prompt with")
    prompt = hf.tokenizer.encode(args.prompt).tolist()
    config = GenerationConfig(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    outs = generate(hf.model(), [prompt] * args.num_samples, config)
    print("\n---\n".join(args.prompt + hf.tokenizer.decode(out) for out in outs))


def cmd_generate(args) -> None:
    from research.infer.sampling import sample_text

    if (hf := _hf_model(args.run_dir)) is not None:
        return _generate_hf(hf, args)
    run = _saved_run(args.run_dir, "generate")
    tokenizer = run.data.tokenizer()
    for index in range(args.num_samples):
        text = sample_text(
            run.graphdef,
            run.state["params"],
            tokenizer,
            args.prompt,
            args.max_tokens,
            args.seed + index,
            args.temperature,
            args.top_k,
            args.top_p,
        )
        print(text)
        if index + 1 < args.num_samples:
            print("---")


def cmd_export(args) -> None:
    from research.hf.export import export_hf

    source = Path(args.source)
    if (source / "config.json").is_file():
        run = _saved_run(args.source, "generate")
    else:
        from research.run import build_run

        cfg = load_experiment(args.source, args.overrides)
        run = build_run(cfg, "generate")  # the experiment's run directory
    out = export_hf(
        run.config.model, run.state["params"], args.out_dir, run.data.tokenizer(), args.dtype
    )
    print(f"exported {run.run_dir} (step {run.step}) to {out}")


def cmd_info(args) -> None:
    from research.run import build_run

    run = build_run(_load(args), "info")  # resolves and checks everything, allocates nothing
    size = run.size
    print(run.config.to_json())
    print(
        f"params {size.total_params:,} (non-embedding {size.non_embedding_params:,}, active "
        f"{size.active_params:,}); {size.flops_per_token / 1e6:.2f} MFLOP per training token"
    )
    print(f"{run.memory.summary()}; mesh {dict(run.mesh.shape)}")


class UsageError(ResearchError):
    """A command line argparse cannot parse: reported like every other mistake (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake raises UsageError (sub-commands inherit the class)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="research",
        description="Train and study dense transformer language models in JAX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  research train\n  research train gpt2_small --set train.steps=100\n"
        "  research generate runs/shakespeare_char --prompt 'ROMEO:'",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "prepare",
        help="deduplicate, tokenize and shard an experiment's corpus",
        epilog="examples:\n  research prepare shakespeare_char\n"
        "  research prepare gpt2_small --set data.sources=gs://bucket/fineweb/ "
        "--num-shards 64 --shard-index 3\n"
        "  research prepare gpt2_small --set data.sources=... --num-shards 64 --dedup-parts",
        formatter_class=fmt,
    )
    _add_experiment_args(p)
    p.add_argument(
        "--num-shards", type=positive_int, default=1, help="split the files into N parts"
    )
    p.add_argument(
        "--shard-index", type=non_negative_int, default=0, help="prepare part I (0-based) only"
    )
    p.add_argument(
        "--engine",
        choices=("local", "datatrove"),
        default="local",
        help="local: this process prepares part --shard-index; datatrove: every part, as tasks",
    )
    p.add_argument("--parallel", type=positive_int, default=1, help="datatrove tasks at a time")
    p.add_argument("--engine-logs", default="", help="datatrove's logging folder")
    p.add_argument(
        "--dedup-parts",
        action="store_true",
        help="once every one of the --num-shards parts is prepared: remove documents that repeat "
        "or nearly repeat one in an earlier part (rewrites only the shards that lose some)",
    )
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "train",
        help="train an experiment (re-running resumes it)",
        formatter_class=fmt,
        epilog="examples:\n  research train                      # the quickstart\n"
        "  research train tiny --set train.steps=200 --set model.n_layers=3",
    )
    _add_experiment_args(p)
    p.add_argument(
        "--restart",
        action="store_true",
        help="start from step 0; the previous checkpoints and metrics are kept, renamed",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="validation loss and bits per byte of a run's checkpoint",
        epilog="example: research eval runs/shakespeare_char",
        formatter_class=fmt,
    )
    p.add_argument("run_dir", help="a run directory, or a Hugging Face model folder")
    p.add_argument("--corpus", default="tinyshakespeare", help="HF folders: text to score")
    p.add_argument("--seq-len", type=positive_int, default=1024, help="HF folders: window")
    p.add_argument("--max-batches", type=non_negative_int, default=0, help="0: all")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "generate",
        help="sample text from a run's latest checkpoint",
        formatter_class=fmt,
        epilog="example: research generate runs/shakespeare_char --prompt 'ROMEO:' --top-k 20",
    )
    p.add_argument("run_dir", help="a run directory, or a Hugging Face model folder")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-tokens", type=non_negative_int, default=300)
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0: no top-k filtering")
    p.add_argument("--top-p", type=unit_fraction, default=0.95, help="1.0: no nucleus filtering")
    p.add_argument("--num-samples", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "export",
        help="export a run's parameters to a Hugging Face folder transformers loads",
        formatter_class=fmt,
        epilog="example: research export runs/shakespeare_char hf/shakespeare_char",
    )
    p.add_argument("source", help="a run directory, or an experiment (its run directory)")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser(
        "info",
        help="print the resolved config, parameter and FLOP counts",
        epilog="example: research info gpt2_small",
        formatter_class=fmt,
    )
    _add_experiment_args(p)
    p.set_defaults(func=cmd_info)

    add_scaling_commands(sub, _add_experiment_args)  # sweep | fit | forecast
    add_post_commands(sub)  # post-data | post-eval (post-training runs are `research train`)
    add_compile_command(sub, _add_experiment_args)  # compile (for a TPU slice)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; a mistake in the input (ResearchError) is one ``error: ...`` line on
    stderr and exit status 2, never a traceback."""
    try:
        args = build_parser().parse_args(argv)
        from research import runtime

        runtime.setup()
        status = args.func(args)  # None: success; compile returns 1 for does-not-fit
    except (ResearchError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
