"""Wall-clock race to a validation loss: `research train` (the quickstart) against karpathy/nanoGPT.

    python benchmarks/nanogpt_race.py --nanogpt /tmp/nanogpt --python /work/venv-hf/bin/python

Both run as fresh processes, one after the other, on this machine. The clock starts at process
launch and stops when the process prints a validation loss <= --target (ours: "val loss" in the
progress line, on the whole validation split; nanoGPT: its eval line every eval_interval,
eval_iters=20 batches); the time to exit is printed too, and when set-up ended (the first line:
imports, data check, model init) and, for ours, the train step's compile. Ours runs with the XLA
compile cache cold (a fresh, empty folder) and then warm (the same folder again, a fresh run
directory).

nanoGPT is not vendored: --nanogpt is a checkout (``git clone
https://github.com/karpathy/nanoGPT``) whose data/shakespeare_char holds train.bin / val.bin
(run its prepare.py; put tinyshakespeare's input.txt beside it to skip the download), and
--python an interpreter with torch. Its recipe is the README's CPU command, which contains
the flags issue 17 lists: ``config/train_shakespeare_char.py --device=cpu --compile=False
--eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
--n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``. nanoGPT may not reach
--target; then the ratio uses the time to its best eval, and says so.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
MODEL_LINE = re.compile(r"^(model:|number of parameters)")  # ours / nanoGPT: set-up done
COMPILE = re.compile(r"compile ([\d.]+) s")  # ours: the train step's first call, in "done:"
NANOGPT_FLAGS = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]


def machine() -> str:
    model = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {os.cpu_count()} cores"


def race(command: list[str], target: float, cwd: Path, env: dict) -> dict:
    """Launch, timestamp every eval line, return the evals and the time to the target."""
    start = time.perf_counter()
    evals, ready, compile_seconds = [], None, None
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        bufsize=1,
    ) as proc:
        for line in proc.stdout:
            if ready is None and MODEL_LINE.search(line):
                ready = time.perf_counter() - start
            if line.startswith("done:") and (found := COMPILE.search(line)):
                compile_seconds = float(found.group(1))
            found = EVAL_LINE.search(line)
            if found:
                step, val = int(found.group(1)), float(found.group(3))
                evals.append((time.perf_counter() - start, step, val))
    if proc.returncode:
        raise SystemExit(f"{command[:3]} failed with exit status {proc.returncode}")
    reached = [(t, step, val) for t, step, val in evals if val <= target]
    best = min(evals, key=lambda e: e[2]) if evals else None
    return {
        "exit_seconds": time.perf_counter() - start,
        "evals": evals,
        "reached": reached[0] if reached else None,
        "best": best,
        "ready_seconds": ready,  # imports, data check, model init: the first line printed
        "compile_seconds": compile_seconds,
    }


def ours(target: float, cache: Path, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env["RESEARCH_COMPILE_CACHE"] = str(cache)
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, "-m", "research.cli", "train", f"--set=train.run_dir={run_dir}"]
        command += ["--set=log.progress=false", *[f"--set={o}" for o in extra]]
        return race(command, target, REPO, env)


def nanogpt(path: Path, python: str, target: float) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        command = [python, "train.py", *NANOGPT_FLAGS, f"--out_dir={out_dir}"]
        return race(command, target, path, {**os.environ, "PYTHONUNBUFFERED": "1"})


def describe(name: str, result: dict) -> str:
    hit = result["reached"]
    t, step, val = hit if hit else result["best"]
    what = f"reached {val:.4f} at step {step}" if hit else f"best {val:.4f} at step {step}"
    phases = f"exit {result['exit_seconds']:.1f} s"
    if result["ready_seconds"] is not None:
        phases += f"; set-up done at {result['ready_seconds']:.1f} s"
    if result["compile_seconds"] is not None:
        phases += f"; train-step compile {result['compile_seconds']:.1f} s"
    return f"{name:<26} {what:<30} {t:7.1f} s  ({phases})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nanogpt", type=Path, required=True, help="a nanoGPT checkout")
    parser.add_argument("--python", default=sys.executable, help="an interpreter with torch")
    parser.add_argument("--target", type=float, default=1.88)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    if not (args.nanogpt / "data" / "shakespeare_char" / "val.bin").exists():
        raise SystemExit(f"{args.nanogpt}/data/shakespeare_char/val.bin missing: run prepare.py")

    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    print(f"machine: {machine()}; load average before: {os.getloadavg()}; commit {commit}")
    with tempfile.TemporaryDirectory() as cache:  # each printed as it ends: runs are long
        cold = ours(args.target, Path(cache), args.overrides)
        print(describe("ours, compile cache cold", cold), flush=True)
        warm = ours(args.target, Path(cache), args.overrides)
        print(describe("ours, compile cache warm", warm), flush=True)
    ref = nanogpt(args.nanogpt, args.python, args.target)
    print(describe("nanoGPT (torch eager, CPU)", ref))
    print(f"load average after: {os.getloadavg()}")
    ref_time = (ref["reached"] or ref["best"])[0]
    basis = "reaching the target" if ref["reached"] else "reaching its best (not the target)"
    for name, result in (("cold", cold), ("warm", warm)):
        if result["reached"] is None:
            print(f"ours ({name}) never reached {args.target}")
            continue
        ratio = result["reached"][0] / ref_time
        print(f"ratio ours ({name}) / nanoGPT ({basis}): {ratio:.2f}x")


if __name__ == "__main__":
    main()
