"""Hugging Face ``config.json`` <-> ``ModelConfig``, for the architectures we import and export.

Each supported architecture is our transformer with some switches set (QKV bias, QK-norm, a
sliding window, MoE with shared experts): nothing here special-cases the model code. Anything a
config asks for that our model does not compute (another activation, biases on the output
projection, YaRN RoPE, per-layer windows) is refused with the key named, never ignored.
"""

from __future__ import annotations

from typing import Any

from research.config import HFError, ModelConfig

# architectures[0] in config.json -> the family name used below
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
MOE_FAMILIES = ("mixtral", "qwen2_moe")


def family_of(hf: dict[str, Any]) -> str:
    names = hf.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise HFError(
        f"architecture {names or hf.get('model_type')!r} is not supported for import; "
        f"supported: {', '.join(ARCHITECTURES)}"
    )


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes rope_parameters; older configs rope_theta + rope_scaling
    params = dict(hf.get("rope_parameters") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", 10_000.0))
    params.update(hf.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(params["rope_theta"])}
    if kind == "default":
        return out
    if kind == "linear":
        return out | {"rope_scaling": float(params["factor"])}
    if kind == "llama3":
        return out | {
            "rope_type": "llama3",
            "rope_scaling": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_context": int(params["original_max_position_embeddings"]),
        }
    raise HFError(f"rope_type {kind!r} is not supported; supported: default, linear, llama3")


def _refuse(hf: dict[str, Any], key: str, ok, why: str) -> None:
    if key in hf and hf[key] is not None and not ok(hf[key]):
        raise HFError(f"config.json {key}={hf[key]!r} is not supported: {why}")


def model_config_from_hf(
    hf: dict[str, Any], param_dtype: str = "float32", compute_dtype: str = "auto"
) -> ModelConfig:
    """The ModelConfig (resolved) that computes what ``hf`` (a parsed config.json) describes."""
    family = family_of(hf)
    _refuse(hf, "hidden_act", lambda v: v == "silu", "only SwiGLU (silu) MLPs are implemented")
    _refuse(hf, "mlp_bias", lambda v: not v, "MLP biases are not implemented")
    qkv_bias = family in ("qwen2", "qwen2_moe")
    _refuse(
        hf,
        "attention_bias",
        lambda v: not v,
        "biases on all four attention projections (o_proj too) are not implemented",
    )
    _refuse(
        hf, "use_sliding_window", lambda v: not v, "per-layer sliding windows are not implemented"
    )
    window = 0
    if family in ("mistral", "mixtral"):
        window = int(hf.get("sliding_window") or 0)
    n_heads = hf["num_attention_heads"]
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        mlp_hidden=hf["intermediate_size"],
        seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        qk_norm=family == "qwen3",
        attention_window=window,
        param_dtype=param_dtype,
        compute_dtype=compute_dtype,
        **_rope(hf),
    )
    if family == "mixtral":
        fields |= dict(
            n_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            expert_hidden=hf["intermediate_size"],
        )
    elif family == "qwen2_moe":
        _refuse(hf, "mlp_only_layers", lambda v: not v, "use decoder_sparse_step instead")
        expert, shared = hf["moe_intermediate_size"], hf.get("shared_expert_intermediate_size", 0)
        if shared % expert:
            raise HFError(
                f"shared_expert_intermediate_size={shared} is not a multiple of "
                f"moe_intermediate_size={expert}: our shared experts are whole experts"
            )
        fields |= dict(
            n_experts=hf["num_experts"],
            top_k=hf["num_experts_per_tok"],
            expert_hidden=expert,
            n_shared_experts=shared // expert,
            shared_expert_gate=bool(shared),
            router_renormalize=bool(hf.get("norm_topk_prob", False)),
            moe_every=hf.get("decoder_sparse_step", 1),
        )
    if family in MOE_FAMILIES:
        # Inference and fine-tuning compute every token: dropping by capacity would not match.
        fields |= dict(router="softmax", moe_dispatch="dropless", aux_free_bias_rate=0.0)
    cfg = ModelConfig(**fields)
    problems = cfg.problems()
    if problems:
        raise HFError("config.json maps to an invalid model config: " + "; ".join(problems))
    return cfg.resolved()


def hf_config_from_model(cfg: ModelConfig, dtype: str = "float32") -> tuple[str, dict[str, Any]]:
    """(family, config.json dict) of the HF architecture that computes what ``cfg`` does."""
    family = _export_family(cfg)
    architecture = next(a for a, f in ARCHITECTURES.items() if f == family)
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_type == "llama3":
        rope |= dict(
            rope_type="llama3",
            factor=cfg.rope_scaling,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_context,
        )
    elif cfg.rope_scaling != 1.0:
        rope |= dict(rope_type="linear", factor=cfg.rope_scaling)
    hf: dict[str, Any] = dict(
        architectures=[architecture],
        model_type=family,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_theta,
        rope_parameters=rope,
        rope_scaling=None if rope["rope_type"] == "default" else rope,
        attention_bias=False,
        attention_dropout=0.0,
        dtype=dtype,
        torch_dtype=dtype,
        use_cache=True,
    )
    if family == "mistral":
        hf["sliding_window"] = cfg.attention_window
    elif family == "mixtral":
        hf |= dict(
            num_local_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            intermediate_size=cfg.expert_hidden,
            sliding_window=cfg.attention_window or None,
            router_jitter_noise=0.0,
        )
    elif family == "qwen2_moe":
        hf |= dict(
            num_experts=cfg.n_experts,
            num_experts_per_tok=cfg.top_k,
            moe_intermediate_size=cfg.expert_hidden,
            shared_expert_intermediate_size=cfg.n_shared_experts * cfg.expert_hidden,
            norm_topk_prob=cfg.router_renormalize,
            decoder_sparse_step=cfg.moe_every,
            mlp_only_layers=[],
            qkv_bias=True,
            use_sliding_window=False,
        )
    else:
        hf["use_sliding_window"] = False
    return family, hf


def _export_family(cfg: ModelConfig) -> str:
    problems = []
    if cfg.mlp_activation != "swiglu":
        problems.append(f"model.mlp_activation={cfg.mlp_activation!r} (HF models use swiglu)")
    if cfg.logit_softcap:
        problems.append(f"model.logit_softcap={cfg.logit_softcap} (none of these architectures)")
    if cfg.n_experts and cfg.router != "softmax":
        problems.append(f"model.router={cfg.router!r} (Mixtral and Qwen2-MoE route by softmax)")
    if cfg.n_experts and cfg.aux_free_bias_rate:
        problems.append("model.aux_free_bias_rate > 0 (a selection bias HF models lack)")
    if cfg.attention_window and (cfg.qkv_bias or cfg.qk_norm or cfg.n_shared_experts):
        problems.append("a sliding window with QKV bias, QK-norm or shared experts")
    if cfg.qk_norm and (cfg.qkv_bias or cfg.n_experts):
        problems.append("QK-norm with QKV bias or experts (Qwen3 is dense without biases)")
    if cfg.n_experts and not cfg.n_shared_experts:
        if cfg.qkv_bias or not cfg.router_renormalize or cfg.moe_every != 1:
            problems.append(
                "experts without shared ones export as Mixtral: no QKV bias, "
                "model.router_renormalize=true, model.moe_every=1"
            )
    if cfg.n_shared_experts and not cfg.shared_expert_gate:
        problems.append("shared experts without model.shared_expert_gate (Qwen2-MoE gates them)")
    if problems:
        raise HFError(
            "this model has no Hugging Face architecture that computes the same function: "
            + "; ".join(problems)
        )
    if cfg.n_experts:
        return "qwen2_moe" if cfg.n_shared_experts else "mixtral"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.attention_window else "llama"
