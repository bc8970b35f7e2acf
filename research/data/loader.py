"""Grain input pipelines over token shards.

Training draws random windows (like nanoGPT's random offsets, but as a seeded permutation, so the
order is reproducible) and shards them by process. The global order is a function of the seed
and the epoch only (each epoch its own permutation); each process reads its rows of every
global batch, so any process count sees the same global batches. The iterator's state is a small
dict saved in every checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np


class TokenWindows:
    """Random-access source: item i is tokens[i : i + seq_len + 1] (inputs plus next-token)."""

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if len(tokens) <= seq_len + 1:
            raise ValueError(
                f"the split has {len(tokens)} tokens, too few for one window of seq_len={seq_len}; "
                "use a shorter model.seq_len or a bigger corpus"
            )
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return len(self.tokens) - self.seq_len - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return np.asarray(self.tokens[index : index + self.seq_len + 1], dtype=np.int32)


def train_dataset(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Endless, seeded batches [batch_size, seq_len + 1] for this process.

    The windows form one endless stream (epoch e is the permutation grain derives from seed + e);
    global step g is the stream's next process_count x batch_size windows, and this process
    reads rows process_index x batch_size onwards of it. Slicing the windows per process before
    repeating would make the order after the first epoch depend on process_count whenever the
    windows do not divide evenly.
    """
    ds = grain.MapDataset.source(TokenWindows(tokens, seq_len)).shuffle(seed=seed).repeat(None)
    ds = ds.batch(batch_size, drop_remainder=True)[process_index::process_count]
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int = 0, padded_rows: int = 0
) -> Iterator[tuple[np.ndarray, int]]:
    """Non-overlapping windows over the whole split (or the first max_batches batches).

    Yields (batch [max(batch_size, padded_rows), seq_len + 1], rows): batches are zero-padded to
    full size so one compiled eval step serves them all (and to ``padded_rows``, e.g. a multiple
    of the device count, without changing which windows are evaluated); only the first ``rows``
    rows count.
    """
    n_windows = (len(tokens) - 1) // seq_len
    starts = np.arange(n_windows) * seq_len
    count = 0
    for first in range(0, n_windows, batch_size):
        chunk = starts[first : first + batch_size]
        batch = np.zeros((max(batch_size, padded_rows), seq_len + 1), np.int32)
        for row, start in enumerate(chunk):
            batch[row] = tokens[start : start + seq_len + 1]
        yield batch, len(chunk)
        count += 1
        if max_batches and count >= max_batches:
            return
