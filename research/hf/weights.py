"""Which Hugging Face tensor each of our parameters is, and how its layout differs.

HF linear layers store [out, in]; ours are [in, out] with the head axes split out
([d, heads, head_dim] for q/k/v, [heads, head_dim, d] for o) and experts stacked on a leading
axis. A ``Source`` names the HF tensor(s) of one parameter and converts either way, and reads
only the part of the HF tensor that one shard of our parameter needs (``read``), so an import
never holds more than one tensor's shard per device in host memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from research.config import ModelConfig

# reader(hf_name, block index) -> that block of the HF tensor, as stored (HF layout)
Reader = Callable[[str, tuple[slice, ...]], np.ndarray]


@dataclass(frozen=True)
class Source:
    names: tuple[str, ...]  # one HF tensor, or one per expert (stacked on our axis 0)
    kind: str  # copy | linear | linear_in | bias
    split: tuple[int, ...] = ()  # how HF's flat out (or in, for linear_in) axis splits
    fill: float | None = None  # no HF tensor: our parameter is this constant (router bias)
    stacked: bool = False  # one HF tensor per expert, stacked on our leading axis

    def to_hf(self, ours: np.ndarray) -> list[np.ndarray]:
        """Our full array -> the HF tensor(s), in ``names`` order."""
        parts = list(ours) if self.stacked else [ours]
        return [self._one_to_hf(p) for p in parts]

    def _one_to_hf(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "copy":
            return x
        if self.kind == "bias":
            return x.reshape(-1)
        if self.kind == "linear":  # ours [in, *split] -> HF [out, in]
            return x.reshape(x.shape[0], -1).T
        return x.reshape(-1, x.shape[-1]).T  # linear_in: ours [*split, out] -> HF [out, in]

    def read(self, reader: Reader, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
        """Our array's block ``index`` (of full ``shape``), reading only what it needs."""
        index = tuple(_full(s, n) for s, n in zip(index, shape, strict=True))
        if not self.stacked:
            return self._read_one(reader, self.names[0], index, shape)
        experts = range(*index[0].indices(shape[0]))
        parts = [self._read_one(reader, self.names[e], index[1:], shape[1:]) for e in experts]
        return np.stack(parts) if parts else np.zeros((0, *shape[1:]), np.float32)

    def _read_one(self, reader: Reader, name: str, index, shape) -> np.ndarray:
        if self.kind == "copy":
            return reader(name, index)
        if self.kind == "bias":  # ours [heads, head_dim] from HF [heads * head_dim]
            rows, inner = _flat_rows(index[0], shape[1])
            return reader(name, (rows,)).reshape(-1, shape[1])[:, index[1]]
        if self.kind == "linear":  # ours [in, heads?, hd?] from HF [out, in]
            inner = int(np.prod(shape[2:], dtype=int)) if len(shape) > 2 else 1
            rows, _ = _flat_rows(index[1], inner)
            block = reader(name, (rows, index[0])).T  # [in block, out rows]
            block = block.reshape(block.shape[0], -1, *shape[2:])
            return block[(slice(None), slice(None), *index[2:])]
        # linear_in: ours [heads?, hd?, out] from HF [out, in]
        inner = int(np.prod(shape[1:-1], dtype=int)) if len(shape) > 2 else 1
        cols, _ = _flat_rows(index[0], inner)
        block = reader(name, (index[-1], cols)).T  # [in cols, out block]
        block = block.reshape(-1, *shape[1:-1], block.shape[-1])
        return block[(slice(None), *index[1:-1], slice(None))]


def _full(s: slice, n: int) -> slice:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError("shards are contiguous blocks")
    return slice(start, stop)


def _flat_rows(outer: slice, inner: int) -> tuple[slice, int]:
    """The rows of a flattened [outer * inner] axis that an ``outer`` slice covers."""
    return slice(outer.start * inner, outer.stop * inner), inner


def sources(cfg: ModelConfig, family: str) -> dict[str, Source]:
    """Our parameter path ("blocks/0/attn/wq") -> its HF source, for a resolved config."""
    h, kv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out: dict[str, Source] = {"embed": Source(("model.embed_tokens.weight",), "copy")}
    for i in range(cfg.n_layers):
        ours, hf = f"blocks/{i}", f"model.layers.{i}"
        att = f"{hf}.self_attn"
        out |= {
            f"{ours}/attn_norm/scale": Source((f"{hf}.input_layernorm.weight",), "copy"),
            f"{ours}/mlp_norm/scale": Source((f"{hf}.post_attention_layernorm.weight",), "copy"),
            f"{ours}/attn/wq": Source((f"{att}.q_proj.weight",), "linear", (h, hd)),
            f"{ours}/attn/wk": Source((f"{att}.k_proj.weight",), "linear", (kv, hd)),
            f"{ours}/attn/wv": Source((f"{att}.v_proj.weight",), "linear", (kv, hd)),
            f"{ours}/attn/wo": Source((f"{att}.o_proj.weight",), "linear_in", (h, hd)),
        }
        if cfg.qkv_bias:
            for ours_name, proj, heads in (("bq", "q", h), ("bk", "k", kv), ("bv", "v", kv)):
                out[f"{ours}/attn/{ours_name}"] = Source(
                    (f"{att}.{proj}_proj.bias",), "bias", (heads, hd)
                )
        if cfg.qk_norm:
            out[f"{ours}/attn/q_norm/scale"] = Source((f"{att}.q_norm.weight",), "copy")
            out[f"{ours}/attn/k_norm/scale"] = Source((f"{att}.k_norm.weight",), "copy")
        out |= _mlp_sources(cfg, family, i, f"{ours}/mlp", hf)
    out["final_norm/scale"] = Source(("model.norm.weight",), "copy")
    if not cfg.tie_embeddings:
        out["lm_head"] = Source(("lm_head.weight",), "linear")
    return out


def _mlp_sources(cfg: ModelConfig, family: str, i: int, ours: str, hf: str) -> dict[str, Source]:
    def swiglu(prefix: str, gate: str, up: str, down: str) -> dict[str, Source]:
        return {
            f"{ours}/{prefix}w_gate": Source((gate,), "linear"),
            f"{ours}/{prefix}w_up": Source((up,), "linear"),
            f"{ours}/{prefix}w_down": Source((down,), "linear"),
        }

    if not cfg.is_moe_layer(i):
        return swiglu(
            "",
            f"{hf}.mlp.gate_proj.weight",
            f"{hf}.mlp.up_proj.weight",
            f"{hf}.mlp.down_proj.weight",
        )
    n = cfg.n_experts
    if family == "mixtral":
        moe = f"{hf}.block_sparse_moe"
        names = {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}
    else:
        moe = f"{hf}.mlp"
        names = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
    out = {
        f"{ours}/router": Source((f"{moe}.gate.weight",), "linear"),
        f"{ours}/router_bias": Source((), "copy", fill=0.0),
    }
    for mine, theirs in names.items():
        per_expert = tuple(f"{moe}.experts.{e}.{theirs}.weight" for e in range(n))
        out[f"{ours}/{mine}"] = Source(per_expert, "linear", stacked=True)
    if cfg.n_shared_experts:
        shared = f"{moe}.shared_expert"
        out |= swiglu(
            "shared/",
            f"{shared}.gate_proj.weight",
            f"{shared}.up_proj.weight",
            f"{shared}.down_proj.weight",
        )
        if cfg.shared_expert_gate:
            out[f"{ours}/shared_gate"] = Source((f"{moe}.shared_expert_gate.weight",), "linear")
    return out


# Tensors some checkpoints carry that are derived, not learned: skipped, not an error.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
