"""optax AdamW (or Muon + AdamW) with weight-decay masking, warmup + cosine / WSD schedules and
clipping."""

from __future__ import annotations

import jax
import optax

from research.config import OptimConfig
from research.train.muon import make_muon
from research.train.mup import scale_hidden_updates


def wsd_decay_steps(total_steps: int, decay_fraction: float) -> int:
    """Steps a WSD run of ``total_steps`` spends decaying (the last ones). Cooldown branches
    (research/scaling/wsd.py) start at ``total_steps`` minus this, so both agree by construction."""
    return max(1, int(total_steps * decay_fraction))


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end_value=floor
        )
    if cfg.schedule == "wsd":
        # Warmup, a long stable phase at the peak, then a linear decay over the last fraction.
        decay = wsd_decay_steps(total_steps, cfg.decay_fraction)
        stable = max(0, total_steps - warmup - decay)
        return optax.join_schedules(
            [
                optax.linear_schedule(0.0, cfg.lr, warmup),
                optax.constant_schedule(cfg.lr),
                optax.linear_schedule(cfg.lr, floor, decay),
            ],
            boundaries=[warmup, warmup + stable],
        )
    if cfg.schedule == "constant":
        # optax's warmup_constant_schedule with 0 warmup steps stays at its initial value, 0.
        if not warmup:
            return optax.constant_schedule(cfg.lr)
        return optax.warmup_constant_schedule(0.0, cfg.lr, warmup)
    raise ValueError(f"optim.schedule='{cfg.schedule}' is unknown; use cosine, wsd or constant")


def decay_mask(params, cfg: OptimConfig):
    """True where weight decay applies: matrices, but not norms or embeddings unless configured."""

    def decide(path, leaf) -> bool:
        names = [str(getattr(p, "key", getattr(p, "idx", ""))) for p in path]
        if leaf.ndim < 2:
            return cfg.decay_norms
        if "embed" in names or "lm_head" in names:
            return cfg.decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(
    cfg: OptimConfig, total_steps: int, width_mult: float = 1.0
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer and its LR schedule. ``width_mult`` != 1 (muP, ``model.width_mult``):
    Adam's steps on hidden matrices are divided by it."""
    schedule = learning_rate_schedule(cfg, total_steps)
    tx = optax.adamw(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda params: decay_mask(params, cfg),
    )
    if width_mult != 1.0:
        tx = optax.chain(tx, scale_hidden_updates(width_mult))
    if cfg.optimizer == "muon":
        # The matrices follow the same schedule shape, scaled to their own peak.
        ratio = cfg.muon_lr / cfg.lr
        tx = make_muon(
            lambda step: schedule(step) * ratio,
            tx,
            cfg.muon_momentum,
            cfg.weight_decay,
            cfg.muon_group_matrices,
        )
    chain = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    return optax.chain(*chain, tx), schedule
