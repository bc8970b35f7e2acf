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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


class ResearchError(Exception):
    """The project's own error: bad input or state, with the fix in the message. The CLI prints
    it as ``error: ...`` and exits with status 2 instead of showing a traceback."""


class ConfigError(ResearchError, ValueError):
    """A config key, value or experiment name that cannot be used, with the fix in the message."""


@dataclass(unsafe_hash=True)  # hashable: modules keep it as static graph metadata
class ModelConfig:
    vocab_size: int = 0  # 0: taken from the tokenizer at train time
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (multi-head); fewer: grouped-query attention
    head_dim: int = 0  # 0: d_model // n_heads
    mlp_hidden: int = 0  # 0: SwiGLU default, 8/3 * d_model rounded up to a multiple of 64
    seq_len: int = 64
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    rope_scaling: float = 1.0  # > 1: linear position interpolation for contexts longer than trained
    norm_eps: float = 1e-6
    dropout: float = 0.0
    init_std: float = 0.02
    attention: str = "auto"  # auto | xla | cudnn | blockwise | pallas
    attention_window: int = 0  # > 0: sliding-window (local) attention over the last W positions
    param_dtype: str = "float32"
    compute_dtype: str = "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    # Mixture of experts (n_experts = 0: a dense model).
    n_experts: int = 0
    top_k: int = 2
    expert_hidden: int = 0  # 0: mlp_hidden
    expert_granularity: int = 1  # > 1: fine-grained, each expert split into this many smaller
    n_shared_experts: int = 0  # experts every token uses, beside the routed ones
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
    # scanned over them: 16 layers compile in 2.8 s against 4.7 s unrolled on CPU (README).
    scan_layers: bool = False

    def resolved(self, vocab_size: int | None = None) -> ModelConfig:
        """A copy with every 0 ("derive it") replaced by its derived value."""
        n_kv = self.n_kv_heads or self.n_heads
        head_dim = self.head_dim or self.d_model // self.n_heads
        hidden = self.mlp_hidden or 64 * -(-(8 * self.d_model // 3) // 64)
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


@dataclass
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    # Multi-process (research/parallel/distributed.py); env RESEARCH_COORDINATOR etc. also work.
    coordinator: str = ""  # host:port of process 0; "auto": let JAX detect it (Cloud TPU, SLURM)
    num_processes: int = 0  # 0: from $RESEARCH_NUM_PROCESSES or auto-detected


@dataclass
class LogConfig:
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float = 0.0  # per chip; 0: train/accounting.py's table, or on CPU measured once
    profile_steps: str = ""  # "A:B": a trace of steps A+1..B for TensorBoard's profile tab


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        return _from_dict(cls, data, prefix="")


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
    """Load an experiment file's config() and apply --set overrides."""
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
    return apply_overrides(config, overrides or [])
