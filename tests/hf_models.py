"""Models of ours with seeded random weights for the export fixtures (tools/make_hf_fixtures.py
exports them; tests/test_hf_export.py rebuilds them and compares with what transformers
computed from the export)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.config import ModelConfig
from research.models import Transformer

EXPORTS = {
    # Llama: grouped-query attention, tied embeddings, Llama 3 RoPE scaling
    "export_dense": ModelConfig(
        vocab_size=80,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        mlp_hidden=32,
        seq_len=64,
        rope_type="llama3",
        rope_scaling=8.0,
        rope_original_context=32,
        norm_eps=1e-5,
    ),
    # Qwen2-MoE: QKV bias, a dense first layer, 8 experts top 2, a gated shared expert
    "export_moe": ModelConfig(
        vocab_size=80,
        d_model=32,
        n_layers=2,
        n_heads=4,
        mlp_hidden=32,
        seq_len=64,
        tie_embeddings=False,
        qkv_bias=True,
        n_experts=8,
        top_k=2,
        expert_hidden=16,
        n_shared_experts=1,
        shared_expert_gate=True,
        router_renormalize=False,
        moe_every=2,
        moe_dispatch="dropless",
    ),
}


def export_model(name: str) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, params): every parameter drawn from a seeded normal (numpy's generator: the
    same on every machine) large enough to spread the logits (norm scales around 1), rounded
    to bfloat16 values so a bf16 export is exact."""
    cfg = EXPORTS[name].resolved()
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))
    rng = np.random.default_rng(1234)
    new = []
    for path, leaf in leaves:
        name_ = "/".join(str(getattr(p, "key", p)) for p in path)
        last = name_.split("/")[-1]
        noise = rng.standard_normal(leaf.shape)
        if last == "router_bias":
            value = np.zeros(leaf.shape)
        elif last == "scale":
            value = 1.0 + 0.2 * noise
        elif last in ("bq", "bk", "bv"):
            value = 0.3 * noise
        elif name_ == "embed":
            value = 0.1 * noise if cfg.tie_embeddings else noise
        else:  # weights [in..., out] (experts [n, in, out]; wo [heads, head_dim, out])
            fan_in = np.prod(leaf.shape[:-1]) if last == "wo" else leaf.shape[-2]
            value = noise / fan_in**0.5
        value = jnp.asarray(value, jnp.float32).astype(jnp.bfloat16).astype(leaf.dtype)
        new.append(value)
    return graphdef, jax.tree_util.tree_unflatten(treedef, new)
