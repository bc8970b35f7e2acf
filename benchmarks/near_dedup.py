"""Near-duplicate detection: ours (research/data/dedup.py) beside datasketch's objects, one run.

    python benchmarks/near_dedup.py --docs 20000

Documents of ~1.35 KB (40 random tinyshakespeare lines; every 10th is a copy of an earlier one
with one line changed). The reference is datasketch as the prepare used it before: per-document
string shingles (lowercase word 5-grams) hashed with crc32, ``MinHash.bulk`` signatures, then
``MinHashLSH`` query and insert in stream order. Ours: ``minhashes`` (words hashed once in numpy,
shingles and permutations vectorised over a batch) + ``band_keys`` + ``Dedup.near_dups`` in
batches of 256. The two use different hash functions, so they may differ on a borderline
document: the script counts the planted copies each catches and the documents they disagree
on. Memory is the index alone, holding the kept documents, traced by tracemalloc in a second
pass (numpy arrays are traced too). Single process: in the prepare, the MinHash half runs in
the tokenizer workers.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research.data.dedup import (  # noqa: E402
    NUM_PERM,
    SCHEME,
    SHINGLE_WORDS,
    Dedup,
    band_keys,
    minhashes,
)

SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def shingles(text: str) -> list[bytes]:
    """The string shingles the prepare hashed before (datasketch's input)."""
    words = text.lower().split()
    n = SHINGLE_WORDS
    return [" ".join(words[i : i + n]).encode() for i in range(max(1, len(words) - n + 1))]


def documents(n: int, seed: int = 0) -> list[str]:
    lines = [ln for ln in SHAKESPEARE.read_text().splitlines() if ln.strip()]
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        if i % 10 == 9:
            picked = docs[int(rng.integers(len(docs)))].split("\n")
            picked[int(rng.integers(len(picked)))] = lines[int(rng.integers(len(lines)))]
            docs.append("\n".join(picked))
        else:
            docs.append("\n".join(lines[j] for j in rng.integers(0, len(lines), 40)))
    return docs


def reference(docs: list[str]) -> tuple[list[bool], float]:
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    start = time.perf_counter()
    lsh, flags = MinHashLSH(threshold=0.8, num_perm=NUM_PERM), []
    for first in range(0, len(docs), 256):
        batch = [shingles(t) for t in docs[first : first + 256]]
        found = MinHash.bulk(batch, num_perm=NUM_PERM, hashfunc=zlib.crc32, scheme=SCHEME)
        for i, m in enumerate(found):
            lean = LeanMinHash(m)
            flags.append(bool(lsh.query(lean)))
            if not flags[-1]:
                lsh.insert(first + i, lean)
    return flags, time.perf_counter() - start


def ours(docs: list[str]) -> tuple[list[bool], float]:
    start = time.perf_counter()
    state, flags = Dedup(near=True), []
    for first in range(0, len(docs), 256):
        keys = band_keys(minhashes(docs[first : first + 256]), 0.8)
        flags += state.near_dups(keys).tolist()
    return flags, time.perf_counter() - start


def index_bytes(signatures: np.ndarray, flags: list[bool]) -> tuple[int, int]:
    """Traced bytes of each index holding the kept documents (signatures precomputed)."""
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    kept = signatures[~np.asarray(flags)]
    sizes = []
    for build in ("datasketch", "ours"):
        tracemalloc.start()
        if build == "datasketch":
            index = MinHashLSH(threshold=0.8, num_perm=NUM_PERM)
            for i, sig in enumerate(kept):
                index.insert(i, LeanMinHash(MinHash(NUM_PERM, hashvalues=sig, scheme=SCHEME)))
        else:
            index = Dedup(near=True)
            for first in range(0, len(kept), 256):
                index.bands.add(band_keys(kept[first : first + 256], 0.8))
        sizes.append(tracemalloc.get_traced_memory()[0])
        tracemalloc.stop()
        del index
    return sizes[0], sizes[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=20000)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip
    docs = documents(args.docs)
    mb = sum(len(d) for d in docs) / 1e6
    ref_flags, ref_s = reference(docs)
    our_flags, our_s = ours(docs)
    ref_mem, our_mem = index_bytes(minhashes(docs), our_flags)
    planted = np.arange(len(docs)) % 10 == 9
    kept = len(docs) - sum(our_flags)
    print(f"{len(docs):,} documents ({mb:.1f} MB), {planted.sum():,} planted near copies")
    for name, flags, seconds, mem in (
        ("datasketch MinHash.bulk + MinHashLSH", ref_flags, ref_s, ref_mem),
        ("ours", our_flags, our_s, our_mem),
    ):
        flags = np.asarray(flags)
        print(f"{name}: {len(docs) / seconds:,.0f} docs/s, index {mem / kept:,.0f} bytes per "
              f"kept document; flagged {flags[planted].sum():,} planted copies and "
              f"{flags[~planted].sum():,} others")  # fmt: skip
    disagree = int((np.asarray(our_flags) != np.asarray(ref_flags)).sum())
    print(f"speed ratio (ours / datasketch): {ref_s / our_s:.2f}x; memory ratio: "
          f"{our_mem / ref_mem:.3f}x; documents flagged differently: {disagree}; load average "
          f"at end {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
