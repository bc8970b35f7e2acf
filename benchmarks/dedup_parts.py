"""The pass across parts at scale: its time beside the prepare's, and its output beside the
single-process prepare's, one run.

    python benchmarks/dedup_parts.py --mb 20 --parts 4

Generates a JSONL corpus (documents of 50 random tinyshakespeare lines) where every 20th
document is an exact copy of a random earlier one and every 20th (offset 10) a near copy (one
line changed: Jaccard ~0.94), so most copies land in another part than their original. Then
prepares it in one part, and in ``--parts`` parts followed by ``dedup_across_parts``, and
compares the train documents (their tokens, in order) and the removed counts. The two can
differ only on a chain (a near copy whose only match is a document an earlier part removed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
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

from research.config import DataConfig  # noqa: E402
from research.data.across_parts import dedup_across_parts  # noqa: E402
from research.data.stream import StreamData, prepare_stream  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def make_corpus(folder: Path, megabytes: float, files: int = 16, seed: int = 0) -> int:
    lines = [ln for ln in SHAKESPEARE.read_text().splitlines() if ln.strip()]
    rng = np.random.default_rng(seed)
    docs: list[str] = []
    while sum(map(len, docs[-1:])) * len(docs) < megabytes * 1e6:
        i = len(docs)
        if i % 20 == 19:
            docs.append(docs[int(rng.integers(i))])  # an exact copy
        elif i % 20 == 9:
            picked = docs[int(rng.integers(i))].split("\n")
            picked[int(rng.integers(len(picked)))] = lines[int(rng.integers(len(lines)))]
            docs.append("\n".join(picked))  # a near copy
        else:
            docs.append("\n".join(lines[j] for j in rng.integers(0, len(lines), 50)))
    per_file = -(-len(docs) // files)
    for f in range(files):  # contiguous slices: later files, later parts
        with open(folder / f"shard-{f:04d}.jsonl", "w") as handle:
            for text in docs[f * per_file : (f + 1) * per_file]:
                handle.write(json.dumps({"text": text}) + "\n")
    return len(docs)


def documents(data: StreamData) -> list[bytes]:
    found = []
    for shard in data.shards("train"):
        tokens, offsets = data.tokens(shard), data.offsets(shard)
        for a, b in zip(offsets[:-1], offsets[1:], strict=True):
            found.append(hashlib.blake2b(tokens[a:b].tobytes(), digest_size=8).digest())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=20, help="corpus size in MB")
    parser.add_argument("--parts", type=int, default=4)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="research-dedup-parts-"))
    try:
        (root / "corpus").mkdir()
        docs = make_corpus(root / "corpus", args.mb)
        base = dict(sources=str(root / "corpus"), tokenizer="bpe", bpe_vocab_size=4096,
                    bpe_sample_bytes=5_000_000, val_fraction=0.01)  # fmt: skip
        start = time.perf_counter()
        one = StreamData.open(prepare_stream(DataConfig(**base, cache_dir=str(root / "one")),
                                             verbose=False))  # fmt: skip
        one_s = time.perf_counter() - start
        cfg = DataConfig(**base, cache_dir=str(root / "parts"))
        start = time.perf_counter()
        for part in range(args.parts):
            prepare_stream(cfg, part, args.parts, verbose=False)
        parts_s = time.perf_counter() - start
        start = time.perf_counter()
        removed = dedup_across_parts(cfg, args.parts, verbose=False)
        pass_s = time.perf_counter() - start
        folder = prepare_stream(cfg, 0, args.parts, verbose=False)
        many = StreamData.open(folder, verify=True)
        ours, reference = documents(many), documents(one)
        rewritten = sum("-d" in s["file"] for s in many.shards("train"))
        counts = [sum(p["removed"]["train"][k] for p in many.parts) for k in ("exact", "near")]
        print(f"corpus: {docs:,} documents, {args.mb:.0f} MB; single-process prepare "
              f"{one_s:.1f} s, removed {one.parts[0]['removed']['train']}")  # fmt: skip
        print(f"{args.parts} parts: {parts_s:.1f} s, then the pass: {pass_s:.2f} s "
              f"({pass_s / parts_s:.1%} of the parts' time), removed {removed} across parts, "
              f"rewrote {rewritten} of {len(many.shards('train'))} shards")  # fmt: skip
        print(
            f"train documents: {len(ours):,} after the pass, {len(reference):,} single-process;"
            f" identical in order: {ours == reference}; removed in all (exact, near): {counts}"
        )
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
