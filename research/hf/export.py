"""Export our parameters to a Hugging Face model folder that `transformers` loads.

The architecture is the one that computes our function (Llama, Mistral, Qwen2, Qwen3, Mixtral,
Qwen2-MoE: see config_map.hf_config_from_model); a model none of them computes is refused.
Tensors are gathered one at a time and written in safetensors shards of at most
``max_shard_bytes``, with the index file transformers expects when there is more than one.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from research.config import HFError, ModelConfig
from research.hf.config_map import hf_config_from_model
from research.hf.weights import sources

DTYPES = ("float32", "bfloat16", "float16")


def _leaf(params: dict, path: str):
    node = params
    for key in path.split("/"):
        node = node[int(key)] if key.isdigit() and int(key) in node else node[key]
    return node


def hf_tensors(cfg: ModelConfig, params: dict, family: str):
    """(HF name, host array) pairs, one parameter gathered at a time."""
    for path, source in sources(cfg, family).items():
        if source.fill is not None:
            value = np.asarray(jax.device_get(_leaf(params, path)))
            if np.any(value != source.fill):
                raise HFError(
                    f"{path} is not {source.fill} everywhere: HF models have no such part"
                )
            continue
        value = np.asarray(jax.device_get(_leaf(params, path)))
        yield from zip(source.names, source.to_hf(value), strict=True)
    if family == "qwen2_moe" and not cfg.qkv_bias:  # Qwen2-MoE always has q/k/v biases
        for i in range(cfg.n_layers):
            for proj, heads in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
                name = f"model.layers.{i}.self_attn.{proj}_proj.bias"
                yield name, np.zeros(heads * cfg.head_dim, np.float32)


def export_hf(
    cfg: ModelConfig,
    params: dict,
    out_dir: str | Path,
    tokenizer=None,
    dtype: str = "float32",
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """Write ``out_dir``: config.json, model*.safetensors (+ index), tokenizer.json."""
    from safetensors.flax import save_file

    if dtype not in DTYPES:
        raise HFError(f"export dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    family, hf_config = hf_config_from_model(cfg, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, jax.Array]] = [{}]
    size = 0
    for name, value in hf_tensors(cfg, params, family):
        array = jnp.asarray(value, dtype)
        if size and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    total = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = (
            "model.safetensors" if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        )
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        weight_map |= {name: filename for name in shard}
    if total > 1:
        total_size = sum(a.nbytes for s in shards for a in s.values())
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer is not None:
        save_tokenizer(tokenizer, out / "tokenizer.json")
    return out


def save_tokenizer(tokenizer, path: Path) -> None:
    """tokenizer.json for HF `tokenizers`: ours is one (BPE), or the character table becomes a
    word-level model over single characters."""
    if getattr(tokenizer, "kind", "") == "bpe":
        tokenizer.save(path)
        return
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(tokenizer.chars)}
    # WordLevel needs an unknown token; ours refuses unknown characters instead
    hf = Tokenizer(models.WordLevel(vocab, unk_token=tokenizer.chars[0]))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.save(str(path))
