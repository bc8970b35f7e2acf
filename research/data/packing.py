"""Packed batches of whole documents for training on a streamed corpus (research/data/stream.py).

Each epoch visits every document once, in a seeded order (grain's index shuffle: O(1) memory
whatever the document count). Documents are packed greedily into rows of ``seq_len + 1`` tokens:
a document that does not fit in what is left of a row starts the next row (the rest is padding,
segment 0); one longer than a whole row is split over rows, each piece its own segment. Rows
carry ``segment_ids`` (1, 2, ... per piece), from which the model masks attention within a
document and restarts RoPE positions, and the loss counts only targets inside a document.

Every process plans the same global batch from the documents' lengths (cheap: no token is read)
and reads the tokens of its own rows only, so a process touches only the shards its rows come
from. The iterator's state is the global position (epoch, next document, tokens of it already
used) after the last global batch: the same on every process and independent of the process
count, so a run checkpointed on N processes resumes on M with the same global batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import grain
import numpy as np


class DocumentIndex:
    """Random access to a split's documents across its shards, by global document number."""

    def __init__(self, tokens: Sequence[np.ndarray], offsets: Sequence[np.ndarray]):
        self._tokens, self._offsets = list(tokens), list(offsets)
        counts = [len(o) - 1 for o in self._offsets]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @classmethod
    def of_stream(cls, data, split: str) -> DocumentIndex:
        """Memory-mapped shards of a ``StreamData``: nothing is read until a row needs it."""
        shards = data.shards(split)
        return cls([data.tokens(s) for s in shards], [data.offsets(s) for s in shards])

    @classmethod
    def of_documents(cls, docs: Sequence[Sequence[int]]) -> DocumentIndex:
        lengths = [len(d) for d in docs]
        flat = np.concatenate([np.asarray(d, np.int32) for d in docs]) if docs else np.zeros(0)
        return cls([flat], [np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)])

    def __len__(self) -> int:
        return int(self._first[-1])

    def _locate(self, doc: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self._first, doc, side="right")) - 1
        return shard, doc - int(self._first[shard])

    def length(self, doc: int) -> int:
        shard, local = self._locate(doc)
        offsets = self._offsets[shard]
        return int(offsets[local + 1] - offsets[local])

    def tokens(self, doc: int, start: int, end: int) -> np.ndarray:
        shard, local = self._locate(doc)
        first = int(self._offsets[shard][local])
        return self._tokens[shard][first + start : first + end]


class PackedBatches:
    """This process' rows of each global batch: ``{"tokens", "segment_ids"}``, each
    [global_batch // process_count, seq_len + 1] int32."""

    def __init__(
        self,
        index: DocumentIndex,
        seq_len: int,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if not len(index):
            raise ValueError("the split holds no documents")
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} does not split over {process_count}")
        self.index, self.row, self.global_batch, self.seed = index, seq_len + 1, global_batch, seed
        rows = global_batch // process_count
        self.mine = range(process_index * rows, (process_index + 1) * rows)
        self.state = {"epoch": 0, "cursor": 0, "offset": 0}
        self._order_epoch, self._order = -1, None

    def get_state(self) -> dict:
        return dict(self.state)

    def set_state(self, state: dict) -> None:
        self.state = {k: int(state[k]) for k in ("epoch", "cursor", "offset")}

    def __iter__(self):
        return self

    def _doc(self, epoch: int, cursor: int) -> int:
        if epoch != self._order_epoch:  # each epoch its own permutation
            ds = grain.MapDataset.range(len(self.index)).shuffle(seed=self.seed + epoch)
            self._order_epoch, self._order = epoch, ds
        return int(self._order[cursor])

    def plan(self) -> list[list[tuple[int, int, int]]]:
        """The next global batch as rows of (document, start, end) pieces; advances the state."""
        epoch, cursor, offset = self.state["epoch"], self.state["cursor"], self.state["offset"]
        n, rows = len(self.index), []
        for _ in range(self.global_batch):
            pieces, room = [], self.row
            while room:
                doc = self._doc(epoch, cursor)
                left = self.index.length(doc) - offset
                if left <= room or not pieces:  # fits, or a row of its own (split if too long)
                    take = min(left, room)
                    pieces.append((doc, offset, offset + take))
                    room -= take
                    offset += take
                    if offset == self.index.length(doc):
                        cursor, offset = cursor + 1, 0
                        if cursor == n:
                            epoch, cursor = epoch + 1, 0
                else:  # does not fit what is left: it starts the next row
                    break
            rows.append(pieces)
        self.state = {"epoch": epoch, "cursor": cursor, "offset": offset}
        return rows

    def __next__(self) -> dict[str, np.ndarray]:
        rows = self.plan()
        tokens = np.zeros((len(self.mine), self.row), np.int32)
        segments = np.zeros((len(self.mine), self.row), np.int32)
        for out, r in enumerate(self.mine):
            at = 0
            for segment, (doc, start, end) in enumerate(rows[r], 1):
                tokens[out, at : at + end - start] = self.index.tokens(doc, start, end)
                segments[out, at : at + end - start] = segment
                at += end - start
        return {"tokens": tokens, "segment_ids": segments}


def rows_in_order(index: DocumentIndex, seq_len: int) -> Iterator[list[tuple[int, int, int]]]:
    """One pass over the documents in stored order, packed by ``PackedBatches``' rule (a
    document that does not fit what is left of a row starts the next one; one longer than a
    row is split): rows of (document, start, end) pieces. Evaluation uses it: the same rows
    every time, whatever the seed."""
    row, pieces, room = seq_len + 1, [], seq_len + 1
    for doc in range(len(index)):
        length, offset = index.length(doc), 0
        while offset < length:
            if length - offset > room and pieces:  # does not fit: close this row
                yield pieces
                pieces, room = [], row
            take = min(length - offset, room)
            pieces.append((doc, offset, offset + take))
            offset, room = offset + take, room - take
            if not room:
                yield pieces
                pieces, room = [], row
    if pieces:
        yield pieces


def packed_eval_batches(
    index: DocumentIndex, seq_len: int, batch_size: int, max_batches: int = 0, padded_rows: int = 0
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """The split's packed rows in order (or the first ``max_batches`` batches), read from the
    memory-mapped shards a batch at a time: memory is one batch, not the split.

    Yields (``{"tokens", "segment_ids"}`` [max(batch_size, padded_rows), seq_len + 1], rows),
    zero-padded (segment 0, which no loss counts) like ``loader.eval_batches``."""
    size = max(batch_size, padded_rows)
    rows = rows_in_order(index, seq_len)
    for count in itertools.count(1):
        chunk = list(itertools.islice(rows, batch_size))
        if not chunk:
            return
        batch = {k: np.zeros((size, seq_len + 1), np.int32) for k in ("tokens", "segment_ids")}
        for out, pieces in enumerate(chunk):
            at = 0
            for segment, (doc, start, end) in enumerate(pieces, 1):
                batch["tokens"][out, at : at + end - start] = index.tokens(doc, start, end)
                batch["segment_ids"][out, at : at + end - start] = segment
                at += end - start
        yield batch, len(chunk)
        if max_batches and count >= max_batches:
            return
