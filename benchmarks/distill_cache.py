"""Distillation with the teacher online vs from cached top-k logits: step time and held-out loss.

    python benchmarks/distill_cache.py               # k 32, float16, seed 0
    python benchmarks/distill_cache.py --k 64 --steps 600

The demo of experiments/post_addition.py: its pretrained model (d_model 64) teaches a student
of 1/4 its size (d_model 32) on the teacher's own batches, forward KL at temperature 2 mixed
half and half with the hard labels. The online student runs the teacher in every step; the
cached one reads the teacher's top-k logits, written once by ``write_cache`` (its time is
printed apart). Step time is the median of the logged ``perf/step_time_ms`` (compile and evals
excluded); held-out loss is the run's final val loss. Every run folder resumes or is reused,
so a rerun only measures what is missing (delete runs/post_addition/student_*_cache* to redo).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))
from research import runtime  # noqa: E402

runtime.setup()

import post_addition  # noqa: E402

from research.post.task import write_task  # noqa: E402
from research.run.teacher_logits import write_cache  # noqa: E402


def step_ms(run_dir: str) -> float:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").open()]
    return statistics.median(r["perf/step_time_ms"] for r in rows if "perf/step_time_ms" in r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (post_addition.DATA / "heldout_pairs.jsonl").exists():
        write_task(post_addition.DATA)
    teacher = post_addition.config()
    post_addition._run(teacher)
    online = post_addition.teacher_and_students((args.seed,))[f"student_distilled_seed{args.seed}"]
    tag = f"cache{args.k}_{args.dtype}_seed{args.seed}_{args.steps}"
    online = dataclasses.replace(
        online,
        train=dataclasses.replace(
            online.train,
            steps=args.steps,
            run_dir=str(post_addition.RUNS / f"student_online_{tag}"),
        ),
    )
    cache_dir = post_addition.ROOT / "data" / "post" / f"teacher_{tag}"
    started = time.perf_counter()
    if not cache_dir.exists():
        cache_cfg = dataclasses.replace(online, post=dataclasses.replace(online.post))
        cache_cfg.post.teacher_top_k = args.k
        write_cache(cache_cfg, cache_dir, args.k, args.dtype)
        print(f"cache written in {time.perf_counter() - started:.1f} s")
    size = sum(f.stat().st_size for f in cache_dir.iterdir()) / 2**20
    cached = dataclasses.replace(
        online,
        post=dataclasses.replace(online.post, teacher_logits=str(cache_dir), teacher_top_k=args.k),
        train=dataclasses.replace(
            online.train, run_dir=str(post_addition.RUNS / f"student_cached_{tag}")
        ),
    )
    runs = {"online": online, "cached": cached}
    loss = {name: post_addition._run(cfg) for name, cfg in runs.items()}
    ms = {name: step_ms(cfg.train.run_dir) for name, cfg in runs.items()}
    load = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (at the end)"
    )
    print(f"cache: top {args.k}, {args.dtype}, {args.steps} steps, {size:.0f} MiB")
    print(f"{'student':<8} {'step ms':>8} {'held-out loss':>14}")
    for name in ("online", "cached"):
        print(f"{name:<8} {ms[name]:8.2f} {loss[name]:14.4f}")
    print(
        f"cached / online step time: {ms['cached'] / ms['online']:.2f}x; "
        f"held-out loss cached - online: {loss['cached'] - loss['online']:+.4f}"
    )


if __name__ == "__main__":
    main()
