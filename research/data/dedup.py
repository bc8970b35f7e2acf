"""Exact and near-duplicate removal for the streaming prepare, in compact memory.

Exact: a document's 16-byte hash (``sources.doc_hash``); the index keeps its first 8 bytes.
Near: MinHash signatures (datasketch's ``affine32`` scheme over crc32 hashes of lowercase word
5-grams, FineWeb's and Gopher's shingles) cut into LSH bands (datasketch's optimal banding for
the threshold: 5 bands of 11 rows at 0.8 with 64 permutations); each band is hashed to one
64-bit key, and a document is a near duplicate when any of its band keys was seen in a kept
document - what datasketch's ``MinHashLSH.query`` answers, without its per-document Python
objects.

Both indexes are one ``KeySet`` of uint64s in sorted numpy runs: 8 bytes a key (48 bytes per
kept document with near dedup on, against ~1 KB in ``MinHashLSH``), looked up a whole batch at a
time. Signatures and band keys are computed in the tokenizer workers, vectorised over all the
shingles of a batch; the parent only looks keys up.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field

import numpy as np

NUM_PERM = 64  # MinHash permutations
SCHEME = "affine32"  # datasketch 2.0's default for 32-bit hashes; named, since keys are stored
SHINGLE_WORDS = 5  # FineWeb's and Gopher's near-dedup shingles: lowercase word 5-grams
CHUNK = 1 << 15  # shingles per vectorised step: [NUM_PERM, CHUNK] uint32 = 8 MB


def shingles(text: str) -> list[bytes]:
    words = text.lower().split()
    n = SHINGLE_WORDS
    return [" ".join(words[i : i + n]).encode() for i in range(max(1, len(words) - n + 1))]


def minhashes(texts: list[str]) -> np.ndarray:
    """[docs, NUM_PERM] uint32 MinHash signatures, equal to datasketch's ``MinHash.bulk`` with
    ``hashfunc=zlib.crc32`` (the same in every process, unlike Python's salted hash()), but one
    numpy pass over all the batch's shingles instead of an object per document."""
    from datasketch.minhash import _fmix

    a, b = _permutations()
    hashes, starts = [], []
    for text in texts:
        starts.append(len(hashes))
        hashes += [zlib.crc32(s) for s in shingles(text)]
    hv = _fmix(np.asarray(hashes, np.uint32), 32)
    starts = np.asarray(starts, np.int64)
    out = np.empty((len(texts), NUM_PERM), np.uint32)
    # Documents in groups of about CHUNK shingles: the [shingles, NUM_PERM] product stays small.
    first = 0
    while first < len(texts):
        last = int(np.searchsorted(starts, starts[first] + CHUNK, side="right"))
        last = max(last, first + 1)
        lo, hi = starts[first], starts[last] if last < len(texts) else len(hv)
        permuted = a[:, None] * hv[None, lo:hi] + b[:, None]  # wraps mod 2^32, as datasketch's
        out[first:last] = np.minimum.reduceat(permuted, starts[first:last] - lo, axis=1).T
        first = last
    return out


@functools.cache
def _permutations() -> tuple[np.ndarray, np.ndarray]:
    from datasketch.minhash import MinHash

    a, b = MinHash(NUM_PERM, scheme=SCHEME).permutations
    return a, b


@functools.cache
def band_shape(threshold: float) -> tuple[int, int]:
    """(bands, rows) that datasketch's ``MinHashLSH`` would use for ``threshold``."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, NUM_PERM, 0.5, 0.5)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: an avalanching bijection on uint64 (multiplication wraps)."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def band_keys(signatures: np.ndarray, threshold: float) -> np.ndarray:
    """[docs, bands] uint64: each LSH band of each signature hashed with its band number, so
    the keys of all bands share one index."""
    bands, rows = band_shape(threshold)
    cut = signatures[:, : bands * rows].reshape(len(signatures), bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = np.broadcast_to(_mix(np.arange(1, bands + 1, dtype=np.uint64)), cut.shape[:2])
        for row in range(rows):
            h = _mix(h ^ cut[:, :, row] + np.uint64(0x9E3779B97F4A7C15))
    return h


def exact_keys(digests: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(d[:8] for d in digests), np.uint64)


class KeySet:
    """A growing set of uint64 keys as sorted runs, merged like a binary counter (a run is
    merged into the one before it while that one is no bigger): at most log2(keys) runs, each
    key re-sorted O(log keys) times, 8 bytes a key."""

    def __init__(self):
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        found = np.zeros(keys.shape, bool)
        for run in self.runs:
            at = np.searchsorted(run, keys).clip(max=len(run) - 1)
            found |= run[at] == keys
        return found

    def add(self, keys: np.ndarray) -> None:
        if not keys.size:
            return
        run = np.sort(keys.ravel())
        while self.runs and len(self.runs[-1]) <= len(run):
            run = np.sort(np.concatenate([self.runs.pop(), run]), kind="stable")  # 2 sorted runs
        self.runs.append(run)


@dataclass
class Dedup:
    """Exact and near-duplicate state over a stream, and what each removed."""

    near: bool
    threshold: float = 0.8
    seen: KeySet = field(default_factory=KeySet)
    bands: KeySet = field(default_factory=KeySet)
    counts: dict = field(default_factory=lambda: {"exact": 0, "near": 0})

    def exact_dups(self, digests: list[bytes]) -> np.ndarray:
        """Which documents of a batch repeat an earlier one (in this batch or before); records
        the rest."""
        keys = exact_keys(digests)
        _, first = np.unique(keys, return_index=True)
        dup = self.seen.contains(keys)
        dup[np.setdiff1d(np.arange(len(keys)), first)] = True  # repeats within the batch
        self.seen.add(keys[~dup])
        self.counts["exact"] += int(dup.sum())
        return dup

    def near_dups(self, keys: np.ndarray | None) -> np.ndarray:
        """Which documents of a batch ([docs, bands] band keys, in stream order) share a band
        with a kept document; records the kept ones' bands."""
        if keys is None:
            return np.zeros(0, bool)
        dup = self.bands.contains(keys).any(axis=1)
        local: set[int] = set()  # kept earlier in this batch
        for j in np.flatnonzero(~dup):
            row = keys[j].tolist()
            if local.intersection(row):
                dup[j] = True
            else:
                local.update(row)
        self.bands.add(keys[~dup])
        self.counts["near"] += int(dup.sum())
        return dup

    def load(self, digests: np.ndarray, keys: np.ndarray | None) -> None:
        """Kept documents of a finished shard (a resume): [docs, 16] uint8 digests and their
        band keys."""
        self.seen.add(np.ascontiguousarray(digests[:, :8]).view(np.uint64).ravel())
        if keys is not None:
            self.bands.add(keys)
