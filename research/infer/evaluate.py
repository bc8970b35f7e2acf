"""Validation loss and bits per byte of a model's parameters over a prepared split."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from research.data.loader import eval_batches
from research.data.packing import DocumentIndex, packed_eval_batches
from research.data.shards import PreparedData
from research.models.loss import packed_targets, token_losses
from research.parallel.distributed import put_global
from research.parallel.mesh import batch_sharding, data_parallel_size, on_mesh

EVAL_TOKENS_PER_BATCH = 8192  # bigger batches than training: no activations kept for backward


def make_eval_step(graphdef: nnx.GraphDef):
    """eval_step(params, batch [B, seq+1], rows) -> (sum of token losses, token count).

    A batch of packed documents (a dict with ``segment_ids``) counts only the targets inside a
    document, so its padding rows need no ``rows``."""

    def eval_step(params, batch, rows):
        if isinstance(batch, dict):
            inputs, targets, segments, weights = packed_targets(batch)
            logits = nnx.merge(graphdef, params)(inputs, segment_ids=segments)
            losses, _ = token_losses(logits, targets)
            return jnp.where(weights, losses, 0.0).sum(), weights.sum()
        logits = nnx.merge(graphdef, params)(batch[:, :-1])
        losses, _ = token_losses(logits, batch[:, 1:])
        valid = (jnp.arange(batch.shape[0]) < rows)[:, None]
        return jnp.where(valid, losses, 0.0).sum(), valid.sum() * (batch.shape[1] - 1)

    return eval_step


class Evaluator:
    """Evaluates parameters on one split; the step is compiled once and reused."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        data: PreparedData,
        mesh: Mesh,
        seq_len: int,
        micro_batch: int,
        max_batches: int = 0,
        split: str = "val",
    ):
        self.data, self.mesh, self.seq_len, self.split = data, mesh, seq_len, split
        self.max_batches = max_batches
        # The windows evaluated depend on the config alone, never on the device count: the rows
        # are padded up to a multiple of the data-parallel size instead.
        self.rows = max(micro_batch, EVAL_TOKENS_PER_BATCH // seq_len)
        batch_shards = data_parallel_size(mesh)
        self.padded_rows = -(-self.rows // batch_shards) * batch_shards
        self.step = jax.jit(on_mesh(make_eval_step(graphdef), mesh))
        # A streamed corpus: its documents packed in order from the memory-mapped shards
        # (bounded memory); otherwise windows over the split's token array.
        stream = getattr(data, "stream", None)
        self.index = None if stream is None else DocumentIndex.of_stream(stream, split)

    def __call__(self, params) -> tuple[float, float]:
        """(loss in nats/token, bits per byte) over the split (or its first max_batches)."""
        sharding = batch_sharding(self.mesh)
        total, count = 0.0, 0
        if self.index is not None:
            batches = packed_eval_batches(
                self.index, self.seq_len, self.rows, self.max_batches, self.padded_rows
            )
        else:
            batches = eval_batches(
                self.data.tokens(self.split),
                self.seq_len,
                self.rows,
                self.max_batches,
                padded_rows=self.padded_rows,
            )
        for batch, valid_rows in batches:
            batch = jax.tree.map(lambda part: put_global(part, sharding), batch)
            loss_sum, n = self.step(params, batch, valid_rows)
            total, count = total + loss_sum, count + n  # summed on device: one sync at the end
        loss = float(total) / int(count)
        return loss, loss / math.log(2) / self.data.bytes_per_token(self.split)
