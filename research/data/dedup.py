"""Exact and near-duplicate removal for the streaming prepare, in compact memory.

Exact: a document's 16-byte hash (``sources.doc_hash``); the index keeps its first 8 bytes.
Near: MinHash signatures over the document's word 5-grams (FineWeb's and Gopher's shingles; a
word is a run of non-whitespace bytes of the lowercased UTF-8 text, whitespace being ASCII's,
as ``bytes.split()`` has it), cut into LSH bands (datasketch's optimal banding for the
threshold: 5 bands of 11 rows at 0.8 with 64 permutations); each band is hashed to one 64-bit
key, and a document is a near duplicate when any of its band keys was seen in a kept document -
what datasketch's ``MinHashLSH.query`` answers, without its per-document Python objects.

Signatures are computed in numpy over a whole batch, with no Python work per shingle: every
word is hashed once (a polynomial hash over its bytes from one prefix sum, then mixed), a
shingle's hash combines its five words' hashes, and the 64 permutations are datasketch's
``affine32`` form (``a * h + b`` mod 2^32, ``a`` odd: a bijection), each a 1-D pass over
the batch's shingles min-reduced per document. Every constant is fixed arithmetic (no salted
``hash()``, no RNG), so a document has the same signature in every process.

Both indexes are one ``KeySet`` of uint64s in sorted numpy runs: 8 bytes a key (48 bytes per
kept document with near dedup on, against ~1 KB in ``MinHashLSH``), looked up a whole batch at a
time. Signatures and band keys are computed in the tokenizer workers; the parent only looks
keys up.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

NUM_PERM = 64  # MinHash permutations
SCHEME = "affine32"  # the permutation form (datasketch's name), for datasketch's LSH in tests
SHINGLE_WORDS = 5  # FineWeb's and Gopher's near-dedup shingles: lowercase word 5-grams
GROUP_CHARS = 1 << 20  # texts hashed together (a longer text is a group alone)
_PRIME = 0x100000001B3  # FNV-1a's 64-bit prime: odd, so invertible mod 2^64


@functools.lru_cache(maxsize=2)  # by group size rounded up: few sizes; a huge one ages out
def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """PRIME^i and PRIME^-i mod 2^64 for i < n (n a power of two)."""
    inverse = pow(_PRIME, -1, 1 << 64)
    up, down = np.full(n, _PRIME, np.uint64), np.full(n, inverse, np.uint64)
    up[0] = down[0] = 1
    return np.cumprod(up), np.cumprod(down)  # integer products wrap mod 2^64


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash of every word of every text in order, [docs] word counts).

    A word's hash is sum((byte + 1) * PRIME^j) over its bytes j, taken as a difference of one
    prefix sum over the batch (scaled back to position 0), then mixed: no Python loop."""
    encoded = [t.lower().encode() for t in texts]
    data = np.frombuffer(b" ".join(encoded), np.uint8)  # a space between texts: words never span
    doc_starts = np.cumsum([0] + [len(e) + 1 for e in encoded[:-1]])
    inside = np.zeros(len(data) + 2, bool)  # True at a word's bytes, padded with whitespace
    # bytes.split()'s whitespace: space and \t \n \v \f \r (9 to 13; below 9 wraps high)
    np.logical_not((data == 32) | (data - np.uint8(9) <= 4), out=inside[1:-1])
    edges = np.flatnonzero(inside[1:] != inside[:-1])
    first, last = edges[0::2], edges[1::2]  # each word's [first, last) byte range
    up, down = _powers(1 << max(1, len(data)).bit_length())
    prefix = np.zeros(len(data) + 1, np.uint64)
    with np.errstate(over="ignore"):
        np.cumsum((data.astype(np.uint64) + np.uint64(1)) * up[: len(data)], out=prefix[1:])
        hashes = _mix((prefix[last] - prefix[first]) * down[first])
    return hashes, np.diff(np.append(np.searchsorted(first, doc_starts), len(first)))


def shingle_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash of every word 5-gram of every text, [docs] index of each text's first).

    A text of k < 5 words has one shingle of its k words (an empty text, one of none), so every
    text has at least one. A shingle's hash is its words' hashes times distinct odd constants,
    summed (order matters), then mixed."""
    if not texts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    words, counts = word_hashes(texts)
    n, docs = SHINGLE_WORDS, len(texts)
    # Each text's words followed by n zeros, so a window never reaches the next text's words.
    word_starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    block_starts = word_starts + n * np.arange(docs)
    padded = np.zeros(len(words) + n * docs, np.uint64)
    padded[np.repeat(block_starts - word_starts, counts) + np.arange(len(words))] = words
    windows = len(padded) - n + 1
    with np.errstate(over="ignore"):
        combined = np.zeros(windows, np.uint64)
        for k in range(n):
            combined += padded[k : k + windows] * (_mix(np.uint64(2 * k + 1)) | np.uint64(1))
        per_text = np.maximum(counts - n + 1, 1)
        starts = np.concatenate([[0], np.cumsum(per_text)[:-1]])
        at = np.repeat(block_starts - starts, per_text) + np.arange(int(per_text.sum()))
        return _mix(combined[at] + np.uint64(0x9E3779B97F4A7C15)), starts


def minhashes(texts: list[str]) -> np.ndarray:
    """[docs, NUM_PERM] uint32 MinHash signatures of the texts' word 5-grams: numpy passes over
    all the shingles of a group of texts of up to GROUP_CHARS (the per-byte arrays take ~32
    bytes per byte of text, so a batch of long documents is cut up); a text's signature does
    not depend on its batch or group."""
    out = np.empty((len(texts), NUM_PERM), np.uint32)
    first = 0
    while first < len(texts):
        last, size = first + 1, len(texts[first])
        while last < len(texts) and size + len(texts[last]) <= GROUP_CHARS:
            size, last = size + len(texts[last]), last + 1
        out[first:last] = _group_minhashes(texts[first:last])
        first = last
    return out


def _group_minhashes(texts: list[str]) -> np.ndarray:
    a, b = _permutations()
    hashes, starts = shingle_hashes(texts)
    hv = (hashes >> np.uint64(32)).astype(np.uint32)
    out = np.empty((len(texts), NUM_PERM), np.uint32)
    row = np.empty_like(hv)
    for k in range(NUM_PERM):  # a permutation at a time: 1-D numpy passes, one row of memory
        np.multiply(hv, a[k], out=row)  # wraps mod 2^32
        row += b[k]
        out[:, k] = np.minimum.reduceat(row, starts)
    return out


@functools.cache
def _permutations() -> tuple[np.ndarray, np.ndarray]:
    """NUM_PERM (a, b) uint32 pairs, a odd, from splitmix64 of fixed counters."""
    with np.errstate(over="ignore"):
        bits = _mix(np.arange(1, 2 * NUM_PERM + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    pairs = (bits >> np.uint64(32)).astype(np.uint32).reshape(2, NUM_PERM)
    return pairs[0] | np.uint32(1), pairs[1]


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
    return banded_keys(signatures, *band_shape(threshold))


def banded_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``band_keys`` for a known banding (the tokenizer workers get it from the parent, so
    they never import datasketch's banding, and scipy with it)."""
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
