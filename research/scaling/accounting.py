"""Parameter and FLOP counts derived from a model config (no model needs to be built)."""

from __future__ import annotations

from dataclasses import dataclass

from research.config import ModelConfig


@dataclass(frozen=True)
class ModelSize:
    total_params: int
    embedding_params: int
    non_embedding_params: int
    flops_per_token: float  # training (forward + backward) FLOPs per token, see below


def count_params(cfg: ModelConfig) -> ModelSize:
    """Counts for a resolved config.

    FLOPs per token follow the PaLM appendix: 6 x (matmul parameters, the output head included)
    + 12 x n_layers x n_heads x head_dim x seq_len for the attention scores and values (counted
    in full, as nanoGPT's estimate_mfu does, so MFU figures are comparable with it).
    """
    d, hd, h, kv, hidden = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_hidden
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    mlp = 3 * d * hidden
    per_layer = attn + mlp + 2 * d
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    non_embedding = cfg.n_layers * per_layer + d + head
    matmul_params = cfg.n_layers * (attn + mlp) + d * cfg.vocab_size
    attention_flops = 12 * cfg.n_layers * h * hd * cfg.seq_len
    return ModelSize(
        total_params=embedding + non_embedding,
        embedding_params=embedding,
        non_embedding_params=non_embedding,
        flops_per_token=6.0 * matmul_params + attention_flops,
    )
