"""Typed experiment configs: one tree, loaded from an experiment file, overridden with --set.

An experiment file (``experiments/NAME.py``) defines ``config() -> ExperimentConfig``. The CLI
applies ``--set model.n_layers=4`` style overrides; an unknown key is an error listing the
valid ones, so a typo never silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


class ResearchError(Exception):
    """Any mistake in what the user asked for (config, data, run folder, command line), with the
    fix in the message. ``research.cli.main`` prints it as ``error: ...`` and exits with status 2,
    without a traceback; anything else escaping is a bug in the code, not in the input."""


class ConfigError(ResearchError, ValueError):
    """A config key, value or experiment name that cannot be used, with the fix in the message."""


class MeshShapeError(ConfigError):
    """A mesh that does not fit the devices or the model; the message names both and the fix."""


class RunDirError(ResearchError, FileNotFoundError):
    """A run folder that is missing, is not a run, or holds no readable checkpoint."""


class HFError(ResearchError, ValueError):
    """A Hugging Face model folder we cannot import or a model we cannot export: unknown
    architecture, missing shard or tensor, mismatched shapes, tokenizer/vocab mismatch."""


# The values each enum-like string field accepts (the modules that use them check the same).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "blockwise", "pallas", "hopper")
ROUTERS = ("softmax", "sigmoid")
MOE_DISPATCHES = ("auto", "capacity", "dropless")
REMAT_POLICIES = ("none", "full", "save-dots")
PARAM_DTYPES = ("float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("auto", *PARAM_DTYPES)
TOKENIZERS = ("char", "bpe")
MLP_ACTIVATIONS = ("swiglu", "relu2")
ROPE_TYPES = ("linear", "llama3")
SCHEDULES = ("cosine", "wsd", "constant")
POST_MODES = ("", "sft", "reward", "dpo", "grpo", "distill")
PREFERENCE_LOSSES = ("dpo", "ipo", "simpo")
OPTIMIZERS = ("adamw", "muon")


class _Checks:
    """Collects one config section's problems; each names the key, the bad value and the fix.

    Comparisons are written as ``not (value >= low)`` so that NaN fails them too."""

    def __init__(self, section: str, node: Any):
        self.section, self.node, self.found = section, node, []

    def _value(self, key: str) -> tuple[str, Any]:
        return f"{self.section}.{key}", getattr(self.node, key)

    def add(self, message: str) -> None:
        self.found.append(message)

    def one_of(self, key: str, options: tuple[str, ...]) -> None:
        name, value = self._value(key)
        if value not in options:
            close = difflib.get_close_matches(str(value), options, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.add(f"{name}={value!r} is not one of {', '.join(options)}{hint}")

    def at_least(self, key: str, low: float, meaning: str = "") -> None:
        name, value = self._value(key)
        if not value >= low:
            self.add(f"{name}={value!r} must be >= {low}{meaning}")

    def positive(self, key: str) -> None:
        name, value = self._value(key)
        if not value > 0:
            self.add(f"{name}={value!r} must be positive")

    def within(self, key: str, low: float, high: float, open_low=False, open_high=False) -> None:
        name, value = self._value(key)
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        if not (above and below):
            bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            self.add(f"{name}={value!r} must be in {bounds}")

    def types(self) -> None:
        """Fields whose value is not of the declared type (an experiment file's typo)."""
        hints = typing.get_type_hints(type(self.node))
        for f in dataclasses.fields(self.node):
            expected, value = hints[f.name], getattr(self.node, f.name)
            ok = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}.get(expected)
            flag = isinstance(value, bool) and expected is not bool  # True is an int too
            if ok and (flag or not isinstance(value, ok)):
                self.add(
                    f"{self.section}.{f.name}={value!r} has type {type(value).__name__}, "
                    f"expected {expected.__name__}"
                )


@dataclass(unsafe_hash=True)  # hashable: modules keep it as static graph metadata
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer at train time
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (multi-head); fewer: grouped-query attention
    head_dim: int = 0  # 0: d_model // n_heads
    mlp_hidden: int = 0  # 0: 8/3 * d_model (swiglu) or 4 * d_model (relu2), a multiple of 64
    mlp_activation: str = "swiglu"  # swiglu | relu2 (relu(x)^2, ungated: modded-nanogpt's MLP)
    seq_len: int = 64
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    rope_scaling: float = 1.0  # > 1: linear position interpolation for contexts longer than trained
    # linear: positions / rope_scaling; llama3: Llama 3.1's per-frequency scaling by rope_scaling
    # (low frequencies divided, high kept, a smooth ramp between; the three below set it)
    rope_type: str = "linear"
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    norm_eps: float = 1e-6
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3, OLMo2)
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap) (Gemma 2); 0: off
    dropout: float = 0.0
    init_std: float = 0.02
    # > 0: muP (Yang et al. 2022) relative to a model this wide: hidden matrices' init std and
    # Adam LR shrink with d_model / mup_base_width, the head's logits are divided by it, and
    # attention scores go as 1/head_dim (research/train/mup.py). 0: standard parametrisation.
    mup_base_width: int = 0
    attention: str = "auto"  # auto | xla | cudnn | blockwise | pallas | hopper
    attention_window: int = 0  # > 0: sliding-window (local) attention over the last W positions
    param_dtype: str = "float32"
    compute_dtype: str = "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    # Mixture of experts (n_experts = 0: a dense model).
    n_experts: int = 0
    top_k: int = 2
    expert_hidden: int = 0  # 0: mlp_hidden
    expert_granularity: int = 1  # > 1: fine-grained, each expert split into this many smaller
    n_shared_experts: int = 0  # experts every token uses, beside the routed ones
    shared_expert_gate: bool = False  # shared experts' output scaled by sigmoid(x w) (Qwen2-MoE)
    moe_every: int = 1  # an MoE block in every k-th layer (the others dense)
    router: str = "softmax"  # softmax | sigmoid
    router_renormalize: bool = True  # selected experts' weights sum to 1
    moe_dispatch: str = "auto"  # auto | capacity | dropless
    capacity_factor: float = 1.25
    router_aux_loss: float = 0.01  # Switch/GShard load-balancing loss coefficient (0: off)
    router_z_loss: float = 0.001  # router logit z-loss coefficient (0: off)
    aux_free_bias_rate: float = 0.0  # > 0: DeepSeek-V3 auxiliary-loss-free bias update speed
    # Memory and compile time (research/models/stack.py).
    remat: str = "none"  # none | full | save-dots: what each block keeps for the backward pass
    # Blocks' params stacked (a leading layer axis; another checkpoint layout) and one block
    # scanned over them: compile time grows with one block, not with the depth (README).
    scan_layers: bool = False

    def resolved(self, vocab_size: int | None = None) -> ModelConfig:
        """A copy with every 0 ("derive it") replaced by its derived value."""
        n_kv = self.n_kv_heads or self.n_heads
        head_dim = self.head_dim or self.d_model // self.n_heads
        default_hidden = (
            4 * self.d_model if self.mlp_activation == "relu2" else 8 * self.d_model // 3
        )
        hidden = self.mlp_hidden or 64 * -(-default_hidden // 64)
        vocab = self.vocab_size or (vocab_size or 0)
        if self.n_heads % n_kv:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={n_kv}; "
                "grouped-query attention needs whole groups of query heads per KV head"
            )
        if not self.head_dim and self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "set model.head_dim explicitly or change one of them"
            )
        if self.attention_window < 0:
            raise ConfigError(
                f"model.attention_window={self.attention_window}: use 0 (full causal attention) "
                "or a positive window width in tokens"
            )
        if self.remat not in ("none", "full", "save-dots"):
            raise ConfigError(f"model.remat='{self.remat}': use none, full or save-dots")
        if self.scan_layers and self.n_experts and self.n_layers % self.moe_every:
            raise ConfigError(
                f"model.scan_layers scans over groups of model.moe_every={self.moe_every} layers "
                f"(one MoE block each), which model.n_layers={self.n_layers} is not a multiple "
                "of; change one of them or set model.scan_layers=false"
            )
        moe = {}
        if self.n_experts:
            if self.router not in ("softmax", "sigmoid"):
                raise ConfigError(f"model.router='{self.router}': use softmax or sigmoid")
            if self.moe_dispatch not in ("auto", "capacity", "dropless"):
                raise ConfigError(
                    f"model.moe_dispatch='{self.moe_dispatch}': use auto, capacity or dropless"
                )
            m = self.expert_granularity
            expert_hidden = (self.expert_hidden or hidden) // m
            n_experts, top_k = self.n_experts * m, self.top_k * m
            if not 1 <= top_k <= n_experts:
                raise ConfigError(
                    f"model.top_k={self.top_k} must be between 1 and model.n_experts="
                    f"{self.n_experts}"
                )
            moe = dict(
                n_experts=n_experts, top_k=top_k, expert_hidden=expert_hidden, expert_granularity=1
            )
        return dataclasses.replace(
            self, n_kv_heads=n_kv, head_dim=head_dim, mlp_hidden=hidden, vocab_size=vocab, **moe
        )

    def problems(self) -> list[str]:
        """Every value this model cannot be built with (see ``validate``)."""
        c = _Checks("model", self)
        c.types()
        if c.found:
            return c.found
        for key in ("d_model", "n_layers", "n_heads", "seq_len"):
            c.positive(key)
        zero_means = " (0: derive it)"
        for key in ("vocab_size", "n_kv_heads", "head_dim", "mlp_hidden", "expert_hidden"):
            c.at_least(key, 0, zero_means)
        c.at_least("attention_window", 0, " (0: full causal attention)")
        for key in ("rope_theta", "rope_scaling", "init_std", "norm_eps"):
            c.positive(key)
        c.within("dropout", 0.0, 1.0, open_high=True)
        c.one_of("attention", ATTENTION_IMPLEMENTATIONS)
        c.one_of("mlp_activation", MLP_ACTIVATIONS)
        c.one_of("rope_type", ROPE_TYPES)
        if self.rope_type == "llama3":
            c.positive("rope_original_context")
            if not self.rope_high_freq_factor > self.rope_low_freq_factor > 0:
                c.add(
                    "model.rope_high_freq_factor must be > model.rope_low_freq_factor > 0 "
                    f"(got {self.rope_high_freq_factor} and {self.rope_low_freq_factor})"
                )
        c.at_least("logit_softcap", 0.0, " (0: off)")
        c.at_least("mup_base_width", 0, " (0: standard parametrisation)")
        if self.mup_base_width and self.tie_embeddings:
            c.add(
                "model.mup_base_width needs an untied head (its logits are scaled apart from the "
                "embedding's): set model.tie_embeddings=false"
            )
        c.one_of("param_dtype", PARAM_DTYPES)
        c.one_of("compute_dtype", COMPUTE_DTYPES)
        c.one_of("remat", REMAT_POLICIES)
        c.one_of("router", ROUTERS)
        c.one_of("moe_dispatch", MOE_DISPATCHES)
        c.at_least("n_experts", 0, " (0: a dense model)")
        c.at_least("n_shared_experts", 0)
        c.at_least("expert_granularity", 1)
        c.at_least("moe_every", 1)
        c.positive("capacity_factor")
        for key in ("router_aux_loss", "router_z_loss", "aux_free_bias_rate"):
            c.at_least(key, 0.0, " (0: off)")
        if c.found:
            return c.found  # the checks below divide by these sizes
        n_kv = self.n_kv_heads or self.n_heads
        if self.n_heads % n_kv:
            c.add(
                f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={n_kv}; "
                "grouped-query attention needs whole groups of query heads per KV head"
            )
        if not self.head_dim and self.d_model % self.n_heads:
            c.add(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "set model.head_dim explicitly or change one of them"
            )
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            c.add(
                f"model.top_k={self.top_k} must be between 1 and model.n_experts={self.n_experts}"
            )
        if self.scan_layers and self.n_experts and self.n_layers % self.moe_every:
            c.add(
                f"model.n_layers={self.n_layers} is not a multiple of model.moe_every="
                f"{self.moe_every}, which model.scan_layers needs (it scans over groups of "
                "moe_every layers); change one of them or set model.scan_layers=false"
            )
        return c.found

    @property
    def width_mult(self) -> float:
        """muP's width multiplier d_model / mup_base_width (1 without muP)."""
        return self.d_model / self.mup_base_width if self.mup_base_width else 1.0

    def is_moe_layer(self, index: int) -> bool:
        return self.n_experts > 0 and index % self.moe_every == self.moe_every - 1

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]


@dataclass
class DataConfig:
    corpus: str = "tinyshakespeare"  # a known corpus name or a path to a file / folder of .txt
    tokenizer: str = "char"  # char | bpe
    bpe_vocab_size: int = 8192
    val_fraction: float = 0.1  # the last fraction of the text, as nanoGPT splits it
    doc_separator: str = "\n\n"  # documents for exact-duplicate removal
    cache_dir: str = ""  # "": $RESEARCH_CACHE or ~/.cache/research
    # Many-file corpora (research/data/stream.py), used when `sources` is set: "PATH[*WEIGHT],..."
    # files, folders, globs or URLs (gs://, s3://) of .txt/.jsonl(.gz/.zst)/.parquet, or hf:NAME.
    sources: str = ""
    text_key: str = "text"  # the JSON field / Parquet column holding the text
    tokenizer_file: str = ""  # an existing tokenizer.json (e.g. GPT-2's); "": train BPE
    bpe_sample_bytes: int = 100_000_000  # BPE is trained on this much text from the start
    bos_token: str = "auto"  # prepended to each document: a token name, auto, or "" for none
    eos_token: str = "auto"  # appended to each document
    shard_tokens: int = 1 << 24  # tokens per shard file (whole documents: a shard may run over)
    near_dedup: bool = True  # MinHash-LSH near-duplicate removal (data/dedup.py)
    near_dedup_threshold: float = 0.8  # estimated Jaccard similarity of word 5-grams
    skip_bad_files: bool = False  # skip (and count) corrupt / non-UTF-8 files instead of stopping
    workers: int = 0  # tokenizer processes; 0: one per CPU core

    def problems(self) -> list[str]:
        c = _Checks("data", self)
        c.types()
        if c.found:
            return c.found
        if not self.corpus.strip():
            c.add("data.corpus is empty: name a corpus (e.g. tinyshakespeare) or give a path")
        c.one_of("tokenizer", TOKENIZERS)
        if self.tokenizer == "bpe":
            c.at_least("bpe_vocab_size", 257, " (the 256 byte tokens and <|endoftext|>)")
        c.within("val_fraction", 0.0, 1.0, open_low=True, open_high=True)
        if not self.doc_separator:
            c.add('data.doc_separator is empty: documents need a separator, e.g. "\\n\\n"')
        if self.sources and self.tokenizer == "char" and not self.tokenizer_file:
            c.add(
                "data.sources streams the corpus, which a char tokenizer cannot (its vocabulary "
                "needs all the text first): set data.tokenizer=bpe or data.tokenizer_file"
            )
        if self.sources:
            c.at_least("bpe_sample_bytes", 1)
            c.at_least("shard_tokens", 1)
            c.at_least("workers", 0, " (0: one per CPU core)")
            c.within("near_dedup_threshold", 0.0, 1.0, open_low=True, open_high=True)
        return c.found


@dataclass
class OptimConfig:
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2  # wsd: the last fraction of steps spent decaying
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    decay_norms: bool = False
    clip_norm: float = 1.0  # 0 disables clipping
    grad_accum: int = 1
    # muon: Newton-Schulz orthogonalised momentum for the weight matrices (research/train/muon.py),
    # AdamW at ``lr`` for embeddings, head, norms and biases.
    optimizer: str = "adamw"  # adamw | muon
    muon_lr: float = 0.02  # peak LR of the matrices under muon (same schedule shape as lr)
    muon_momentum: float = 0.95
    # Orthogonalise same-shape matrices as one batch, split over data-parallel replicas: the
    # same update in another float order, faster on CPU (research/train/muon_groups.py).
    muon_group_matrices: bool = False

    def problems(self) -> list[str]:
        c = _Checks("optim", self)
        c.types()
        if c.found:
            return c.found
        c.positive("lr")
        c.one_of("schedule", SCHEDULES)
        c.one_of("optimizer", OPTIMIZERS)
        c.positive("muon_lr")
        c.within("muon_momentum", 0.0, 1.0, open_high=True)
        c.at_least("warmup_steps", 0)
        c.within("min_lr_ratio", 0.0, 1.0)
        c.within("decay_fraction", 0.0, 1.0)
        c.within("b1", 0.0, 1.0, open_high=True)
        c.within("b2", 0.0, 1.0, open_high=True)
        c.at_least("eps", 0.0)
        c.at_least("weight_decay", 0.0)
        c.at_least("clip_norm", 0.0, " (0: no clipping)")
        c.at_least("grad_accum", 1)
        return c.found


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 12  # global, summed over devices and accumulation microbatches
    seed: int = 0
    z_loss: float = 0.0
    eval_every: int = 250  # 0: only at the end
    eval_batches: int = 0  # 0: the whole validation split
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 3
    log_every: int = 10
    run_dir: str = ""  # "": runs/<experiment name>
    sample_tokens: int = 300  # printed at the end of training; 0 disables
    sample_prompt: str = "\n"
    # ZeRO-1: each data-parallel replica updates (and keeps optimizer state for) one slice of
    # every parameter, then the slices are gathered (research/train/zero.py).
    shard_optimizer_update: bool = False

    def problems(self) -> list[str]:
        c = _Checks("train", self)
        c.types()
        if c.found:
            return c.found
        c.at_least("steps", 0)
        c.at_least("batch_size", 1)
        c.at_least("z_loss", 0.0, " (0: off)")
        c.at_least("eval_every", 0, " (0: only at the end)")
        c.at_least("eval_batches", 0, " (0: the whole validation split)")
        c.at_least("checkpoint_every", 0, " (0: only at the end)")
        c.at_least("keep_checkpoints", 1)
        c.at_least("log_every", 1)
        c.at_least("sample_tokens", 0, " (0: no sample)")
        return c.found


@dataclass
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    # Multi-process (research/parallel/distributed.py); env RESEARCH_COORDINATOR etc. also work.
    coordinator: str = ""  # host:port of process 0; "auto": let JAX detect it (Cloud TPU, SLURM)
    num_processes: int = 0  # 0: from $RESEARCH_NUM_PROCESSES or auto-detected

    def problems(self) -> list[str]:
        c = _Checks("mesh", self)
        c.types()
        if c.found:
            return c.found
        axes = ("data", "fsdp", "tensor", "expert")
        for axis in axes:
            size = getattr(self, axis)
            if size != -1 and size < 1:
                c.add(f"mesh.{axis}={size} must be -1 (all the devices left) or a size >= 1")
        rest = [axis for axis in axes if getattr(self, axis) == -1]
        if len(rest) > 1:
            c.add(
                f"only one mesh axis may be -1 (the rest), got {', '.join(rest)}; give the "
                "others a size, e.g. --set mesh.data=1 --set mesh.fsdp=-1"
            )
        c.at_least("num_processes", 0, " (0: detect it)")
        return c.found


@dataclass
class LogConfig:
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float = 0.0  # per chip; 0: train/accounting.py's table, or on CPU measured once
    profile_steps: str = ""  # "A:B": a trace of steps A+1..B for TensorBoard's profile tab
    # GiB per device the memory estimate must fit in; 0: the device's own limit where it reports
    # one (GPU, TPU), no check on CPU (research/train/memory.py check_fits).
    device_memory_gb: float = 0.0

    def problems(self) -> list[str]:
        c = _Checks("log", self)
        c.types()
        if c.found:
            return c.found
        c.at_least("peak_flops", 0.0, " (0: look it up or measure it)")
        c.at_least("device_memory_gb", 0.0, " (0: ask the device)")
        steps = self.profile_steps.split(":")
        if self.profile_steps and not (
            len(steps) == 2 and all(s.isdigit() for s in steps) and int(steps[0]) < int(steps[1])
        ):
            c.add(
                f"log.profile_steps='{self.profile_steps}': use 'A:B' with whole steps A < B "
                "(traces steps A+1..B), or '' for no trace"
            )
        return c.found


@dataclass
class EnergyConfig:
    """How a run's energy, CO2 and cost are measured or estimated (research/train/ledger.py)."""

    hardware: str = "auto"  # auto: from the device kind; else a name in train/accounting.py
    measure: bool = True  # sample power with NVML where the device reports it
    device_power_w: float = 0.0  # > 0: use this per-device draw instead of TDP x utilisation
    utilisation: float = 1.0  # fraction of TDP drawn, for estimates (1.0: an upper bound)
    pue: float = 1.1  # data-centre overhead: facility energy / IT energy
    grid_kg_co2_per_kwh: float = 0.4  # set your grid's; BLOOM used 0.057, GPT-3's paper 0.429
    price_per_device_hour: float = 0.0  # USD; 0: the hardware table's indicative price

    def problems(self) -> list[str]:
        c = _Checks("energy", self)
        c.types()
        if c.found:
            return c.found
        c.at_least("device_power_w", 0.0, " (0: TDP x utilisation)")
        c.within("utilisation", 0.0, 1.0, open_low=True)
        c.at_least("pue", 1.0, " (facility energy / IT energy; 1.0: no overhead)")
        c.at_least("grid_kg_co2_per_kwh", 0.0)
        c.at_least("price_per_device_hour", 0.0, " (0: the hardware table's price)")
        return c.found


@dataclass
class PostConfig:
    """Post-training (research/post/): what this run optimises instead of next-token loss."""

    mode: str = ""  # "": pretraining; sft | reward | dpo | grpo | distill
    init_from: str = ""  # a run folder whose newest parameters start this run (params only)
    data: str = ""  # sft: chat JSONL; reward, dpo: preference pairs JSONL; grpo: problems JSONL
    # Held-out problems JSONL: task accuracy at eval time (reward: held-out pairs, pair
    # accuracy); "": none.
    eval_data: str = ""
    eval_problems: int = 200  # how many of them (greedy answers)
    # sft, reward, dpo: "" our plain template (research/post/chat.py); "tokenizer": the Jinja
    # chat_template of post.init_from's HF folder; or a tokenizer folder holding one
    chat_template: str = ""
    task_digits: int = 2  # the addition task's operand width (research/post/task.py)
    preference_loss: str = "dpo"  # dpo | ipo | simpo
    beta: float = 0.1  # DPO/IPO/SimPO strength
    simpo_gamma: float = 0.5  # SimPO's target margin
    rpo_alpha: float = 0.0  # > 0: add this x the chosen responses' per-token NLL (RPO)
    group_size: int = 8  # GRPO: samples per prompt
    clip_eps: float = 0.2  # GRPO: ratio clipping
    kl_coef: float = 0.04  # GRPO: weight of the KL to the reference (the init_from model)
    temperature: float = 1.0  # GRPO: sampling temperature
    max_new_tokens: int = 5  # GRPO and eval: answer length limit
    teacher: str = ""  # distill: the teacher's run folder (same tokenizer)
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5  # weight of the teacher's KL; 1 - alpha: the hard-label loss
    # LoRA (research/post/lora.py): rank 0 trains every weight; > 0 freezes the base and
    # trains adapters W + (alpha / rank) A B on the projections lora_targets names
    lora_rank: int = 0
    lora_alpha: float = 16.0
    # comma-separated: all | attn | mlp | q | k | v | o, or regexes over parameter paths
    # such as blocks/[01]/attn/wq (chosen layers)
    lora_targets: str = "all"
    # regexes of parameters trained whole beside the adapters (PEFT's modules_to_save), such
    # as embed (new template tokens); "": none
    lora_full: str = ""
    # distill: "online" (the teacher runs in every step) or a folder of cached top-k logits
    # written by `research post-teacher-logits` (research/post/teacher_cache.py)
    teacher_logits: str = "online"
    teacher_top_k: int = 32  # how many of the teacher's logits per position a cache keeps

    def problems(self) -> list[str]:
        c = _Checks("post", self)
        c.types()
        if c.found:
            return c.found
        c.one_of("mode", POST_MODES)
        c.one_of("preference_loss", PREFERENCE_LOSSES)
        for key in ("beta", "temperature", "distill_temperature"):
            c.positive(key)
        c.at_least("group_size", 2, " (GRPO compares samples within a group)")
        c.within("clip_eps", 0.0, 1.0, open_low=True, open_high=True)
        c.within("distill_alpha", 0.0, 1.0)
        for key in ("kl_coef", "simpo_gamma", "eval_problems", "rpo_alpha"):
            c.at_least(key, 0)
        for key in ("task_digits", "max_new_tokens", "teacher_top_k"):
            c.positive(key)
        if self.mode in ("sft", "reward", "dpo", "grpo") and not self.data:
            c.add(
                f"post.mode={self.mode} needs post.data (a JSONL file; see research/post/task.py)"
            )
        if self.mode in ("dpo", "grpo") and not self.init_from:
            c.add(
                f"post.mode={self.mode} needs post.init_from (the SFT run it starts from and "
                "keeps as its reference)"
            )
        if self.mode == "distill" and not self.teacher and self.teacher_logits == "online":
            c.add(
                "post.mode=distill needs post.teacher (the teacher's run folder) or "
                "post.teacher_logits (a folder of its cached logits)"
            )
        c.at_least("lora_rank", 0, " (0: no adapters, every weight trains)")
        if self.lora_rank:
            c.positive("lora_alpha")
            for key, may_be_empty in (("lora_targets", False), ("lora_full", True)):
                items = [t.strip() for t in getattr(self, key).split(",") if t.strip()]
                if not items and not may_be_empty:
                    c.add(f"post.{key} is empty; use all, or some of attn, mlp, q, k, v, o")
                for item in items:  # aliases are regexes too (research/post/lora.py)
                    try:
                        re.compile(item)
                    except re.error as error:
                        c.add(f"post.{key}: {item!r} is not a regex ({error})")
        return c.found


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    log: LogConfig = field(default_factory=LogConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    post: PostConfig = field(default_factory=PostConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        return _from_dict(cls, data, prefix="")

    def validate(self) -> ExperimentConfig:
        """Raise one ConfigError listing every problem (see ``validate``); returns self."""
        return validate(self)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Check a whole config before any work: enums, sizes, divisibility, mesh, energy figures.

    Each section checks its own fields (``problems()``), then the sizes that span sections.
    Every problem is reported at once, each naming the key, the bad value and the fix."""
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"expected an ExperimentConfig, got {type(cfg).__name__}")
    found = []
    for section in ("model", "data", "optim", "train", "mesh", "log", "energy", "post"):
        node = getattr(cfg, section)
        expected = typing.get_type_hints(ExperimentConfig)[section]
        if not isinstance(node, expected):
            found.append(f"{section} is a {type(node).__name__}, expected {expected.__name__}")
        else:
            found += node.problems()
    batch, accum = cfg.train.batch_size, cfg.optim.grad_accum
    if not found and batch % accum:
        found.append(
            f"train.batch_size={batch} is not a multiple of optim.grad_accum={accum}; the batch "
            f"is split into {accum} equal microbatches: use a multiple of {accum}"
        )
    if cfg.train.shard_optimizer_update is True and cfg.post.lora_rank:
        found.append(
            f"train.shard_optimizer_update=true shards the update of the full parameters, but "
            f"post.lora_rank={cfg.post.lora_rank} trains small adapters instead; set "
            "train.shard_optimizer_update=false"
        )
    kind = ConfigError
    if not found:
        found, kind = _mesh_problems(cfg), MeshShapeError
    if len(found) == 1:
        raise kind(f"{found[0]} (config of {cfg.name})")
    if found:
        listing = "\n  ".join(found)
        raise kind(f"{len(found)} problems in the config of {cfg.name}:\n  {listing}")
    return cfg


def _mesh_problems(cfg: ExperimentConfig) -> list[str]:
    """Sizes that must divide over fixed mesh axes: the microbatch, and the model's dims."""
    found = []
    mesh, model = cfg.mesh, cfg.model
    micro = cfg.train.batch_size // cfg.optim.grad_accum
    ways = mesh.data * mesh.fsdp * mesh.expert
    if -1 not in (mesh.data, mesh.fsdp, mesh.expert) and micro % ways:
        found.append(
            f"the microbatch of {micro} sequences (train.batch_size / optim.grad_accum) "
            f"does not divide over mesh data x fsdp x expert = {ways} devices; use a "
            f"train.batch_size that is a multiple of {ways * cfg.optim.grad_accum}"
        )
    n_kv = model.n_kv_heads or model.n_heads
    hidden = model.mlp_hidden or 64 * -(-(8 * model.d_model // 3) // 64)
    sizes = {"tensor": {"model.n_heads": model.n_heads, "model.n_kv_heads": n_kv}}
    sizes["tensor"]["model.mlp_hidden"] = hidden
    sizes["fsdp"] = {"model.d_model": model.d_model}
    if model.n_experts:
        sizes["expert"] = {"model.n_experts": model.n_experts * model.expert_granularity}
    for axis, dims in sizes.items():
        split = getattr(mesh, axis)
        for key, dim in dims.items():
            if split > 1 and dim % split:
                found.append(
                    f"{key}={dim} does not divide over mesh.{axis}={split}; change the "
                    f"mesh or the model size"
                )
    return found


def load_run_config(run_dir: str | Path) -> ExperimentConfig:
    """The validated config saved in a run folder (``config.json``), local or a gs:// URL."""
    from etils import epath  # research/storage.py's path type (local, or gs:// via gcsfs)

    path = epath.Path(run_dir) / "config.json"
    if not path.is_file():
        what = "does not exist" if not epath.Path(run_dir).exists() else "is not a run folder"
        raise RunDirError(
            f"{run_dir} {what} (no config.json); give the folder `research train` wrote, "
            "e.g. runs/shakespeare_char"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(
            f"{path} is not a readable config ({error}); restore it or train the run again"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not a config object")
    data.pop("run", None)  # run metadata (git SHA, command, versions) is a record, not config
    return validate(ExperimentConfig.from_dict(data))


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(_unknown_key_message(prefix + key, cls))
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{prefix}{name}' is {value!r}, not a mapping")
            value = _from_dict(hints[name], value, prefix=f"{prefix}{name}.")
        kwargs[name] = value
    return cls(**kwargs)


def _unknown_key_message(key: str, cls: type) -> str:
    valid = [f.name for f in dataclasses.fields(cls)]
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    listing = ", ".join(section + v for v in valid)
    return f"Unknown config key '{key}'.{hint} Valid keys here: {listing}"


def _parse_value(raw: str, target: Any, key: str) -> Any:
    """Turn the text of a --set value into the field's declared type."""
    origin = typing.get_origin(target)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(target) if t is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        target = options[0]
    try:
        if target is bool:
            lowered = raw.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(raw)
        if target is int:
            return int(float(raw)) if "e" in raw.lower() else int(raw)
        if target is float:
            return float(raw)
        if target is str:
            return raw.encode().decode("unicode_escape") if "\\" in raw else raw
    except ValueError:
        raise ConfigError(
            f"--set {key}={raw}: expected a value of type {target.__name__}"
        ) from None
    raise ConfigError(f"--set {key}: fields of type {target} cannot be set from the command line")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"model": {"d_model": 64}} -> {"model.d_model": 64}, as ``--set`` spells the keys."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def apply_overrides(config: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply ``section.key=value`` overrides, returning a new config; unknown keys are errors."""
    config = _deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. model.n_layers=4), got '{item}'")
        key, raw = item.split("=", 1)
        key = key.strip()
        node: Any = config
        parts = key.split(".")
        for depth, part in enumerate(parts):
            names = {f.name for f in dataclasses.fields(node)}
            if part not in names:
                raise ConfigError(_unknown_key_message(".".join(parts[: depth + 1]), type(node)))
            hint = typing.get_type_hints(type(node))[part]
            if depth == len(parts) - 1:
                if dataclasses.is_dataclass(hint):
                    raise ConfigError(f"'{key}' is a section; set one of its keys, e.g. {key}.X=1")
                setattr(node, part, _parse_value(raw, hint, key))
            else:
                node = getattr(node, part)
                if not dataclasses.is_dataclass(node):
                    raise ConfigError(f"'{'.'.join(parts[: depth + 1])}' is not a config section")
    return config


def _deepcopy(config: ExperimentConfig) -> ExperimentConfig:
    return ExperimentConfig.from_dict(config.to_dict())


def experiment_search_paths() -> list[Path]:
    return [Path.cwd() / "experiments", REPO_ROOT / "experiments"]


def find_experiment(name_or_path: str) -> Path:
    """An experiment file by path, or by name under ./experiments or the checkout's experiments/."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".py" and candidate.exists():
        return candidate
    for folder in experiment_search_paths():
        path = folder / f"{name_or_path}.py"
        if path.exists():
            return path
    known = sorted(
        {p.stem for d in experiment_search_paths() if d.is_dir() for p in d.glob("*.py")}
        - {"__init__"}
    )
    raise ConfigError(
        f"No experiment named '{name_or_path}'. Known experiments: {', '.join(known) or 'none'}; "
        "or pass the path to a .py file that defines config()."
    )


def load_module(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_experiment(name_or_path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load an experiment file's config(), apply --set overrides and ``validate`` the result."""
    path = find_experiment(name_or_path)
    module = load_module(path)
    if not hasattr(module, "config"):
        raise ConfigError(f"{path} defines no config() function returning an ExperimentConfig")
    config = module.config()
    if not isinstance(config, ExperimentConfig):
        raise ConfigError(
            f"{path}: config() returned {type(config).__name__}, not ExperimentConfig"
        )
    if config.name == "experiment":
        config.name = path.stem
    return validate(apply_overrides(config, overrides or []))
