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
    head included) + 12 x n_layers x n_heads x head_dim x keys per query for attention scores
    and values, with keys per query from ``attention_keys_per_query`` (the whole context, as
    nanoGPT's estimate_mfu counts it, so MFU figures are comparable with it; min(W, context)
    for a sliding window of W).
    For MoE layers only the router and the top-k (and shared) experts count: active FLOPs.
    """
    d, hd, h, kv = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    attn_extra = (h + 2 * kv) * hd * cfg.qkv_bias + 2 * hd * cfg.qk_norm  # not matmul weights
    dense_mlp = (2 if cfg.mlp_activation == "relu2" else 3) * d * cfg.mlp_hidden
    total_mlp = active_mlp = 0
    for layer in range(cfg.n_layers):
        if cfg.is_moe_layer(layer):
            expert = 3 * d * cfg.expert_hidden
            shared = cfg.n_shared_experts * expert
            shared += d * (cfg.n_shared_experts > 0 and cfg.shared_expert_gate)
            router = d * cfg.n_experts
            total_mlp += router + cfg.n_experts * expert + shared
            active_mlp += router + cfg.top_k * expert + shared
        else:
            total_mlp += dense_mlp
            active_mlp += dense_mlp
    norms = cfg.n_layers * (2 * d + attn_extra) + d
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    non_embedding = cfg.n_layers * attn + total_mlp + norms + head
    active_matmul = cfg.n_layers * attn + active_mlp + d * cfg.vocab_size
    keys = attention_keys_per_query(cfg.seq_len, cfg.attention_window)
    attention_flops = 12 * cfg.n_layers * h * hd * keys
    return ModelSize(
        total_params=embedding + non_embedding,
        embedding_params=embedding,
        non_embedding_params=non_embedding,
        active_params=embedding + cfg.n_layers * attn + active_mlp + norms + head,
        flops_per_token=6.0 * active_matmul + attention_flops,
    )


def attention_keys_per_query(seq_len: int, window: int = 0, causal_exact: bool = False) -> float:
    """Keys each query's scores and values are counted over, on average.

    By default the convention of the FLOP counts above: every key a query could reach
    backwards, min(window, seq_len) (window 0: the whole context), not halved for causality,
    so a window of W >= seq_len counts exactly as no window. ``causal_exact``: the keys a causal
    query really sees, averaged over the sequence: query i sees min(i + 1, W) of them (the
    visibility rule of ``models/attention.py``), (seq_len + 1) / 2 without a window.
    """
    if window < 0:
        raise ValueError(f"window={window}: use 0 (full causal attention) or a width >= 1")
    width = min(window, seq_len) if window else seq_len
    if not causal_exact:
        return float(width)
    # sum over i of min(i + 1, width): a triangle up to width, then width per query
    seen = width * (width + 1) // 2 + (seq_len - width) * width
    return seen / seq_len
