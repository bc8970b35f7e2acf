"""Packed-document loader: tokens/s at seq 2048 beside the unpacked random-window loader.

    python benchmarks/loader_throughput.py            # 32M tokens in 8 shards, seq 2048

Writes synthetic shards (uint16 tokens, document lengths log-normal around 600 tokens, in the
format ``research prepare`` writes) to a temporary folder, memory-maps them, and times
``PackedBatches`` (grain index shuffle, greedy packing, segment ids) over global batches of 8
rows of 2049 tokens, after one warm-up epoch's worth of page cache. The reference is the loader
the character-level path uses (``research.data.loader.train_dataset``: grain random windows over
one token array, no document boundaries) at the same shape, in the same run. Target: >= 1M
tokens/s per host (an H100 trains GPT-2-124M at ~0.6M tokens/s).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research.data.loader import train_dataset  # noqa: E402
from research.data.packing import DocumentIndex, PackedBatches  # noqa: E402


def write_shards(folder: Path, tokens: int, shards: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays, offsets = [], []
    for i in range(shards):
        lengths = np.maximum(2, rng.lognormal(np.log(600), 0.8, tokens // shards // 600))
        ends = np.cumsum(lengths.astype(np.int64))
        ends = ends[ends <= tokens // shards]
        np.save(folder / f"s{i}.npy", rng.integers(0, 50000, ends[-1], dtype=np.uint16))
        np.save(folder / f"s{i}.idx.npy", np.concatenate([[0], ends]))
        arrays.append(np.load(folder / f"s{i}.npy", mmap_mode="r"))
        offsets.append(np.load(folder / f"s{i}.idx.npy"))
    return arrays, offsets


def timed(iterator, batches: int, tokens_per_batch: int) -> float:
    next(iterator)  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * tokens_per_batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32_000_000)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="research-loader-bench-"))
    try:
        arrays, offsets = write_shards(folder, args.tokens, 8)
        for a in arrays:  # page cache warm, as in a long run
            a.sum()
        index = DocumentIndex(arrays, offsets)
        per_batch = args.batch * args.seq
        packed = timed(PackedBatches(index, args.seq, args.batch, seed=0), args.batches, per_batch)
        batch = next(PackedBatches(index, args.seq, args.batch, seed=1))
        fill = (batch["segment_ids"] > 0).mean()
        flat = np.concatenate([np.asarray(a) for a in arrays])
        windows = iter(train_dataset(flat, args.seq, args.batch, seed=0))
        reference = timed(windows, args.batches, per_batch)
        print(f"{len(index):,} documents, {args.tokens / 1e6:.0f}M tokens, 8 memory-mapped shards")
        print(f"packed documents (ours): {packed:,.0f} tokens/s "
              f"({packed / args.seq / args.batch:,.0f} batches/s of {args.batch} x {args.seq}; "
              f"{100 * fill:.1f}% of positions hold tokens)")  # fmt: skip
        print(f"random windows (reference, grain): {reference:,.0f} tokens/s")
        print(f"ratio: {packed / reference:.2f}x; target >= 1M tokens/s: "
              f"{'met' if packed >= 1e6 else 'not met'}")  # fmt: skip
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
