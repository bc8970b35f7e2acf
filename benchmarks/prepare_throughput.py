"""Streaming prepare: tokens/s of the whole prepare beside the bare tokenizer, and peak memory.

    python benchmarks/prepare_throughput.py --mb 100             # throughput, near dedup off and on
    python benchmarks/prepare_throughput.py --mb 500 --rss --near off   # peak RSS only

Generates a multi-file JSONL corpus (documents of tinyshakespeare lines drawn at random, so none
repeat) under a temporary folder, which it deletes afterwards. The reference is the same
tokenizer's ``encode_batch`` (HF tokenizers, Rust threads on every core) over the same documents,
already in memory: no reading, no dedup, no writing. Ours is the whole ``prepare_stream`` with
that tokenizer loaded from a file (no BPE training), on the same cores, in the same run. Peak
RSS is sampled every 0.1 s over the prepare's process and its workers, summed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research.config import DataConfig  # noqa: E402
from research.data.stream import StreamData, prepare_stream  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def make_corpus(folder: Path, megabytes: float, files: int = 16, seed: int = 0) -> int:
    """JSONL files of ~2 KB documents of random tinyshakespeare lines; returns the documents."""
    lines = [ln for ln in SHAKESPEARE.read_text().splitlines() if ln.strip()]
    rng = np.random.default_rng(seed)
    target, written, docs = megabytes * 1e6, 0, 0
    handles = [open(folder / f"shard-{i:04d}.jsonl", "w") for i in range(files)]
    while written < target:
        picks = rng.integers(0, len(lines), size=(1000, 50))
        for row in picks:
            text = "\n".join(lines[i] for i in row)
            record = json.dumps({"text": text, "id": docs}) + "\n"
            handles[docs % files].write(record)
            written += len(record)
            docs += 1
    for handle in handles:
        handle.close()
    return docs


class PeakRSS:
    """Peak of the summed resident memory of this process and its children."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def bare_tokens_per_second(tokenizer_file: Path, corpus: Path) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    texts = [json.loads(ln)["text"] for f in sorted(corpus.glob("*.jsonl")) for ln in open(f)]
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), 1000):
        tokens += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + 1000]))
    return tokens / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=50, help="corpus size in MB")
    parser.add_argument("--rss", action="store_true", help="peak RSS only: no bare reference")
    parser.add_argument("--near", choices=("off", "on", "both"), default="both")
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    cores = os.cpu_count()
    print(f"machine: {platform.processor() or platform.machine()}, {cores} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="research-prepare-bench-"))
    try:
        corpus = root / "corpus"
        corpus.mkdir()
        start = time.perf_counter()
        docs = make_corpus(corpus, args.mb)
        size = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6
        print(f"corpus: {docs:,} documents, {size:,.0f} MB in 16 JSONL files "
              f"(made in {time.perf_counter() - start:.0f} s)")  # fmt: skip
        # The tokenizer both sides use: BPE trained once on a 5 MB sample of the documents.
        from research.data.tokenizer import BPETokenizer

        sample, taken = [], 0
        for line in open(corpus / "shard-0000.jsonl"):
            sample.append(json.loads(line)["text"])
            taken += len(sample[-1])
            if taken > 5e6:
                break
        tokenizer_file = root / "tokenizer.json"
        BPETokenizer.train(iter(sample), 8192).save(tokenizer_file)
        base = dict(sources=str(corpus), tokenizer="bpe", workers=args.workers, val_fraction=0.01)
        results = {}
        settings = {"off": (False,), "on": (True,), "both": (False, True)}[args.near]
        for near in settings:
            cfg = DataConfig(**base, tokenizer_file=str(tokenizer_file), near_dedup=near,
                             cache_dir=str(root / f"cache-{near}"))  # fmt: skip
            with PeakRSS() as rss:
                start = time.perf_counter()
                out = prepare_stream(cfg, verbose=False)
                seconds = time.perf_counter() - start
            data = StreamData.open(out)
            tokens = sum(s["tokens"] for sp in ("train", "val") for s in data.shards(sp))
            results[near] = (tokens / seconds, rss.peak, data.parts[0]["removed"])
            print(f"prepare (near dedup {'on' if near else 'off'}): {tokens:,} tokens in "
                  f"{seconds:.1f} s = {tokens / seconds:,.0f} tokens/s, peak RSS "
                  f"{rss.peak / 2**30:.2f} GiB (process tree)")  # fmt: skip
            print(f"  removed: {results[near][2]}")
            shutil.rmtree(out)
        if not args.rss:
            bare, bare_tokens = bare_tokens_per_second(tokenizer_file, corpus)
            print(f"bare encode_batch (same tokenizer, documents in memory): {bare_tokens:,} "
                  f"tokens at {bare:,.0f} tokens/s")  # fmt: skip
            for near in settings:
                ratio = results[near][0] / bare
                print(f"ratio, near dedup {'on' if near else 'off'}: {ratio:.2f}x (target >= 0.8x)")
        print(f"load average at end: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
