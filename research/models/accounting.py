"""Parameter and FLOP counts derived from a model config (no model needs to be built)."""

from __future__ import annotations

from dataclasses import dataclass

from research.config import ModelConfig


@dataclass(frozen=True)
class ModelSize:
    total_params: int
    embedding_params: int
    non_embedding_params: int
    active_params: int  # parameters a token passes through (MoE: router, top-k and shared experts)
    flops_per_token: float  # training (forward + backward) FLOPs per token, see below


def count_params(cfg: ModelConfig) -> ModelSize:
    """Counts for a resolved config.

    FLOPs per token follow the PaLM appendix: 6 x (matmul parameters a token uses, the output
    head included) + 12 x n_layers x n_heads x head_dim x seq_len for attention scores and values
    (counted in full, as nanoGPT's estimate_mfu does, so MFU figures are comparable with it).
    For MoE layers only the router and the top-k (and shared) experts count: active FLOPs.
    """
    d, hd, h, kv = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    dense_mlp = 3 * d * cfg.mlp_hidden
    total_mlp = active_mlp = 0
    for layer in range(cfg.n_layers):
        if cfg.is_moe_layer(layer):
            expert = 3 * d * cfg.expert_hidden
            shared = cfg.n_shared_experts * expert
            router = d * cfg.n_experts
            total_mlp += router + cfg.n_experts * expert + shared
            active_mlp += router + cfg.top_k * expert + shared
        else:
            total_mlp += dense_mlp
            active_mlp += dense_mlp
    norms = cfg.n_layers * 2 * d + d
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    non_embedding = cfg.n_layers * attn + total_mlp + norms + head
    active_matmul = cfg.n_layers * attn + active_mlp + d * cfg.vocab_size
    attention_flops = 12 * cfg.n_layers * h * hd * cfg.seq_len
    return ModelSize(
        total_params=embedding + non_embedding,
        embedding_params=embedding,
        non_embedding_params=non_embedding,
        active_params=embedding + cfg.n_layers * attn + active_mlp + norms + head,
        flops_per_token=6.0 * active_matmul + attention_flops,
    )
