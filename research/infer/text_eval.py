"""Loss and bits per byte of any model with its own tokenizer on a corpus' validation text.

For models that come with their own tokenizer (an imported Hugging Face folder, a quantized
copy): the validation text is the same last ``val_fraction`` of the corpus that `prepare`
holds out, so bits per byte compare across tokenizers and with our own runs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.config import DataConfig
from research.data.corpus import read_text, resolve_corpus
from research.models.loss import token_losses


def validation_text(data: DataConfig) -> str:
    text = read_text(resolve_corpus(data.corpus, data.cache_dir), data.doc_separator)
    return text[int(len(text) * (1.0 - data.val_fraction)) :]


def evaluate_text(
    graphdef: nnx.GraphDef,
    params,
    tokenizer,
    text: str,
    seq_len: int,
    rows: int = 8,
    max_batches: int = 0,
) -> tuple[float, float]:
    """(nats per token, bits per byte) over non-overlapping windows of ``seq_len`` tokens of
    ``text`` (the first ``max_batches`` batches of ``rows`` windows when > 0)."""
    tokens = np.asarray(tokenizer.encode(text), np.int32)
    bytes_per_token = len(text.encode("utf-8")) / max(len(tokens), 1)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {seq_len}")
    windows = np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n_windows)])

    @jax.jit
    def batch_loss(params, batch, valid):
        logits = nnx.merge(graphdef, params)(batch[:, :-1])
        losses, _ = token_losses(logits, batch[:, 1:])
        return jnp.sum(jnp.where(valid[:, None], losses, 0.0))

    total, count = 0.0, 0
    for b, start in enumerate(range(0, n_windows, rows)):
        if max_batches and b >= max_batches:
            break
        batch = windows[start : start + rows]
        valid = np.arange(rows) < len(batch)
        batch = np.concatenate([batch, np.zeros((rows - len(batch), seq_len + 1), np.int32)])
        total += float(batch_loss(params, batch, valid))
        count += int(valid.sum()) * seq_len
    loss = total / count
    return loss, loss / math.log(2) / bytes_per_token
