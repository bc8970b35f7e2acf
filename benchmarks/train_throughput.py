"""Training throughput and MFU of ours beside the reference, measured in one run on one machine.

    python benchmarks/train_throughput.py                       # the quickstart shape, CPU
    python benchmarks/train_throughput.py --recipe              # + time-to-val-loss race
    python benchmarks/train_throughput.py --experiment gpt2_small --steps 60   # on a GPU

1. Measures the device's ceiling first: on CPU the jitted float32 matmul rate (the MFU
   denominator there), on accelerators the data-sheet bf16 peak.
2. Trains our model for --steps steps and takes the steady-state tokens/s (compile excluded).
3. Trains the reference at the same shape for the same steps: a nanoGPT-architecture GPT in
   PyTorch eager (benchmarks/torch_reference.py), when torch is installed; otherwise prints the
   published nanoGPT figure for a 2-core CPU (37 ms/iteration, ~20k tokens/s).
4. With --recipe: the wall-clock race to validation loss. Our quickstart (`research train`,
   a fresh process, everything included) against the reference's full 2000-iteration recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from research import runtime  # noqa: E402

runtime.setup()

import jax  # noqa: E402

from research.config import load_experiment  # noqa: E402
from research.data.shards import prepare  # noqa: E402
from research.models.accounting import count_params  # noqa: E402
from research.run import train  # noqa: E402
from research.train.accounting import job_peak, measure_matmul_peak  # noqa: E402

PUBLISHED_NANOGPT_CPU = {
    "ms_per_step": 37.0,
    "tokens_per_second": 20_000,
    "val_loss": 1.886,
    "wall_seconds": 102.0,
}


def machine_name() -> str:
    device = jax.devices()[0]
    if device.platform != "cpu":
        return f"{device.device_kind} ({jax.device_count()} device(s)), jax {jax.__version__}"
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = f"{os.cpu_count()} cores, {jax.device_count()} XLA CPU devices"
    return f"{model}, {cores}, jax {jax.__version__}"


def ours(experiment: str, steps: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_experiment(
            experiment,
            [
                f"train.steps={steps}",
                f"train.run_dir={run_dir}",
                "train.eval_every=0",
                "train.checkpoint_every=0",
                "train.sample_tokens=0",
                "log.progress=false",
                "train.eval_batches=1",
                "train.log_every=10",
                *overrides,
            ],
        )
        result = train(cfg)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").open()]
    windows = [r["perf/tokens_per_second"] for r in rows if "perf/tokens_per_second" in r]
    steady = statistics.median(windows[1:] if len(windows) > 1 else windows)  # skip compile
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    return {
        "tokens_per_second": steady,
        "ms_per_step": 1e3 * tokens_per_step / steady,
        "flops_per_token": count_params(cfg.model).flops_per_token,
        "loss": result.train_loss,
        "config": cfg,
    }


def reference(cfg, steps: int, eval_every: int = 0) -> dict | None:
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    from torch_reference import run_reference

    data = prepare(cfg.data, verbose=False)
    return run_reference(
        data.tokens("train"),
        data.tokens("val"),
        data.vocab_size,
        steps,
        batch=cfg.train.batch_size,
        seq_len=cfg.model.seq_len,
        n_layers=cfg.model.n_layers,
        n_heads=cfg.model.n_heads,
        d_model=cfg.model.d_model,
        eval_every=eval_every,
    )


def quickstart_race() -> dict:
    """`research train` in a fresh process, timed from launch to exit: evals, compile, all."""
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "research.cli",
                "train",
                "shakespeare_char",
                f"--set=train.run_dir={run_dir}",
                "--set=log.progress=false",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").open()]
    val = [r["val/loss"] for r in rows if "val/loss" in r][-1]
    return {"wall_seconds": wall, "val_loss": val, "stdout_tail": out.strip().splitlines()[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="shakespeare_char")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--recipe",
        action="store_true",
        help="also race to val loss: our quickstart vs the 2000-step reference",
    )
    parser.add_argument("--no-reference", action="store_true")
    args = parser.parse_args()

    print(f"machine: {machine_name()}")
    on_cpu = jax.devices()[0].platform == "cpu"
    if on_cpu:  # measured now, under this run's load (the trainer uses its cached figure)
        peak = measure_matmul_peak()
        print(
            f"ceiling: jitted f32 matmul (1024^3) {peak / 1e9:.0f} GFLOP/s "
            "(the MFU denominator on CPU)"
        )
    else:
        accelerator = job_peak()  # data-sheet peak per chip x chips; warns where unknown
        peak = accelerator.total or float("nan")
        print(f"ceiling: {accelerator.describe()}")

    mine = ours(args.experiment, args.steps, args.overrides)
    cfg = mine["config"]
    m = cfg.model
    print(
        f"shape: {m.n_layers} layers, {m.n_heads} heads, {m.d_model} wide, context {m.seq_len}, "
        f"batch {cfg.train.batch_size}; {mine['flops_per_token'] / 1e6:.2f} MFLOP/token"
    )
    mfu = mine["tokens_per_second"] * mine["flops_per_token"] / peak
    print(
        f"ours:      {mine['ms_per_step']:7.2f} ms/step  {mine['tokens_per_second']:10,.0f} "
        f"tokens/s  MFU {100 * mfu:5.1f}%"
    )

    ref = None if args.no_reference or not on_cpu else reference(cfg, args.steps)
    source = "PyTorch eager, nanoGPT architecture, measured now"
    if ref is None and on_cpu:
        ref, source = PUBLISHED_NANOGPT_CPU, "nanoGPT published figure (not measured here)"
    if ref is not None:
        print(
            f"reference: {ref['ms_per_step']:7.2f} ms/step  {ref['tokens_per_second']:10,.0f} "
            f"tokens/s  ({source})"
        )
        ratio = mine["tokens_per_second"] / ref["tokens_per_second"]
        print(f"ratio (ours / reference tokens/s): {ratio:.2f}x")

    if args.recipe:
        race = quickstart_race()
        print(
            f"race, ours: `research train` reached val loss {race['val_loss']:.4f} in "
            f"{race['wall_seconds']:.1f} s wall (fresh process, evals and compile included)"
        )
        full = None if args.no_reference else reference(cfg, 2000, eval_every=250)
        if full is None:
            full, source = PUBLISHED_NANOGPT_CPU, "published"
        else:
            source = "measured now, evals every 250 steps included"
        print(
            f"race, reference (2000 iterations): val loss {full['val_loss']:.4f} in "
            f"{full['wall_seconds']:.1f} s wall ({source})"
        )
        ratio = full["wall_seconds"] / race["wall_seconds"]
        print(f"race ratio (reference wall / ours): {ratio:.2f}x")


if __name__ == "__main__":
    main()
