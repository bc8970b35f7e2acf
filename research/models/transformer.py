"""The decoder-only transformer: embeddings, pre-norm residual blocks, final norm, f32 logits.

Readable top to bottom: Block = x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x)) (SwiGLU or ReLU^2).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.backend import backend
from research.config import ModelConfig
from research.models.attention import Attention, init_kv_cache
from research.models.layers import RMSNorm, document_positions, make_mlp, param, rope_tables
from research.models.moe import MoE
from research.models.stack import layer_of, layer_period, run_blocks, stack_modules


def compute_dtype(name: str):
    if name == "auto":
        return jnp.float32 if backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, index: int = 0):
        pdt = jnp.dtype(cfg.param_dtype)
        # muP: hidden matrices' init std goes as 1/sqrt(fan_in), relative to the base width.
        std = cfg.init_std / math.sqrt(cfg.width_mult)
        # GPT-2's residual scaling: output projections shrink with depth so the stream stays O(1).
        out_std = std / math.sqrt(2 * cfg.n_layers)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.attn = Attention(cfg, pdt, std, out_std, rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        self.is_moe = cfg.is_moe_layer(index)
        if self.is_moe:
            self.mlp = MoE(cfg, std, out_std, pdt, rngs)
        else:
            self.mlp = make_mlp(cfg, std, out_std, pdt, rngs)
        self.dropout = cfg.dropout

    def __call__(
        self, x, positions, rope, cache=None, dropout_key=None, batch_shards=1, segment_ids=None
    ):
        """Returns (x, updated cache, MoE router statistics or None)."""
        attn_out, cache = self.attn(self.attn_norm(x), positions, rope, cache, segment_ids)
        x = x + _dropout(attn_out, self.dropout, dropout_key, 0)
        aux = None
        if self.is_moe:
            mlp_out, aux = self.mlp(self.mlp_norm(x), batch_shards)
        else:
            mlp_out = self.mlp(self.mlp_norm(x))
        x = x + _dropout(mlp_out, self.dropout, dropout_key, 1)
        return x, cache, aux


def _dropout(x, rate: float, key, salt: int):
    if not rate or key is None:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, salt), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if not cfg.vocab_size:
            raise ValueError("model.vocab_size must be resolved (from the tokenizer) before init")
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed = param(
            rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pdt
        )
        blocks = [Block(cfg, rngs, i) for i in range(cfg.n_layers)]
        if cfg.scan_layers:  # stacked once here, so the train step scans without copying
            period = layer_period(cfg)
            self.stacked_blocks = nnx.List(
                [stack_modules(blocks[j::period]) for j in range(period)]
            )
        else:
            self.blocks = nnx.List(blocks)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
        if not cfg.tie_embeddings:
            self.lm_head = param(
                rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pdt
            )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        caches=None,
        dropout_key=None,
        segment_ids: jax.Array | None = None,
    ):
        """tokens [B, T] -> float32 logits [B, T, vocab] (and the updated KV caches if given)."""
        logits, new_caches, _ = self.forward(
            tokens, positions, caches, dropout_key, segment_ids=segment_ids
        )
        return logits if caches is None else (logits, new_caches)

    def forward(
        self,
        tokens,
        positions=None,
        caches=None,
        dropout_key=None,
        batch_shards: int = 1,
        segment_ids=None,
    ):
        """(logits, caches, aux); aux holds MoE router statistics (empty for a dense model):
        losses averaged over the MoE layers and ``expert_load`` as [moe layers, experts].
        ``batch_shards``: how many shards the batch is split over (keeps MoE dispatch local).
        ``segment_ids`` [B, T] (packed documents, no KV cache): attention stays within a
        segment and RoPE positions restart at each one, so each document is computed exactly
        as it would be alone."""
        cfg = self.cfg
        dtype = compute_dtype(cfg.compute_dtype)
        if positions is None:
            positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        embed = self.embed[...]
        x = embed[tokens].astype(dtype)
        rope_positions = positions if segment_ids is None else document_positions(segment_ids)
        llama3 = None
        if cfg.rope_type == "llama3":
            llama3 = (
                cfg.rope_low_freq_factor,
                cfg.rope_high_freq_factor,
                cfg.rope_original_context,
            )
        rope = rope_tables(rope_positions, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, llama3)
        new_caches, router_stats = [], []
        if caches is None:  # training and scoring: remat and scan-over-layers apply here
            blocks = self.stacked_blocks if cfg.scan_layers else self.blocks
            x, router_stats = run_blocks(
                blocks, cfg, x, positions, rope, dropout_key, batch_shards, segment_ids
            )
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids are for packed training/scoring, not a KV cache")
            for i in range(cfg.n_layers):
                block = layer_of(self.stacked_blocks, i) if cfg.scan_layers else self.blocks[i]
                key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
                x, cache, aux = block(x, positions, rope, caches[i], key, batch_shards)
                new_caches.append(cache)
                if aux is not None:
                    router_stats.append(aux)
        x = self.final_norm(x)
        head = embed.T if cfg.tie_embeddings else self.lm_head[...]
        logits = jnp.einsum(
            "btd,dv->btv", x, head.astype(dtype), preferred_element_type=jnp.float32
        )
        if cfg.mup_base_width:  # muP's output multiplier: logits stay O(1) as width grows
            logits = logits / cfg.width_mult
        if cfg.logit_softcap:  # bounded logits: no single token's logit runs away early on
            logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
        return logits, new_caches, _merge_router_stats(router_stats)

    def init_caches(self, batch: int, width: int, dtype=None) -> list[dict]:
        dtype = dtype or compute_dtype(self.cfg.compute_dtype)
        return [init_kv_cache(self.cfg, batch, width, dtype) for _ in range(self.cfg.n_layers)]


def _merge_router_stats(stats: list[dict]) -> dict:
    if not stats:
        return {}
    merged = {k: jnp.mean(jnp.stack([s[k] for s in stats])) for k in stats[0] if k != "expert_load"}
    merged["expert_load"] = jnp.stack([s["expert_load"] for s in stats])
    return merged
