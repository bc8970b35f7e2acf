"""Post-training objectives for the standard train step (research/train/step.py ``objective``):
each maps (model, microbatch, key) to (loss, metrics). Metrics named ``post/...`` reach
TensorBoard and metrics.jsonl through the log hook; ``loss`` is what train/loss shows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from research.models.loss import packed_targets
from research.post import losses


def _post(metrics: dict) -> dict:
    return {f"post/{k}": v for k, v in metrics.items()}


def preference_objective(kind: str, beta: float, simpo_gamma: float, rpo_alpha: float = 0.0):
    """DPO / IPO / SimPO on a batch of pairs with precomputed reference log-probs.
    ``rpo_alpha`` > 0 adds the chosen responses' mean per-token NLL (RPO, Pang et al. 2024):
    plain DPO can lower the chosen answers' likelihood along with the rejected ones'."""

    def objective(model, batch, key):
        both = jnp.concatenate([batch["chosen"], batch["rejected"]])
        mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])[:, 1:]
        logprobs = losses.sequence_logprobs(model(both[:, :-1]), both[:, 1:], mask)
        n = batch["chosen"].shape[0]
        lengths = jnp.sum(mask, axis=-1).astype(jnp.float32)
        loss, metrics = losses.preference_loss(
            kind,
            logprobs[:n],
            logprobs[n:],
            batch["ref_chosen"],
            batch["ref_rejected"],
            beta,
            lengths[:n],
            lengths[n:],
            simpo_gamma,
        )
        metrics["chosen_nll"] = -jnp.mean(logprobs[:n] / lengths[:n])
        if rpo_alpha:
            loss = loss + rpo_alpha * metrics["chosen_nll"]
        return loss, {"loss": loss, **_post(metrics)}

    return objective


def response_rewards(model, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """The reward model's scalar per sequence [B]: the logit of token 0 where the model has
    read the whole response (the position of its last token before the closing one). The LM
    head's row for token 0 is the scalar head's weights; the whole transformer trains."""
    logits = model(tokens[:, :-1])
    last = jnp.max(jnp.arange(mask.shape[-1]) * (mask > 0), axis=-1) - 1
    return jnp.take_along_axis(logits[..., 0], last[:, None], axis=-1)[:, 0]


def reward_objective():
    """Bradley-Terry on pairs: -log sigmoid(r(chosen) - r(rejected))."""

    def objective(model, batch, key):
        r_c = response_rewards(model, batch["chosen"], batch["chosen_mask"])
        r_r = response_rewards(model, batch["rejected"], batch["rejected_mask"])
        loss, accuracy = losses.bradley_terry_loss(r_c, r_r)
        metrics = {"rewards/accuracy": accuracy, "rewards/margin": jnp.mean(r_c - r_r)}
        return loss, {"loss": loss, **_post(metrics)}

    return objective


def grpo_objective(clip_eps: float, kl_coef: float):
    """GRPO on sampled completions: one update per batch of samples (on-policy), so the old
    policy is the current one with its gradient stopped (ratio 1, clipping inactive at the
    first and only step; the clipped form is kept so more updates per batch stay correct)."""

    def objective(model, batch, key):
        tokens = batch["tokens"]
        logp = losses.token_logprobs(model(tokens[:, :-1]), tokens[:, 1:])
        loss, metrics = losses.grpo_loss(
            logp,
            jax.lax.stop_gradient(logp),
            batch["ref_logp"],
            batch["advantages"],
            batch["mask"][:, 1:],
            clip_eps,
            kl_coef,
        )
        metrics["reward"] = jnp.mean(batch["reward"])
        return loss, {"loss": loss, **_post(metrics)}

    return objective


def distill_objective(teacher_graphdef: nnx.GraphDef, teacher_params, temperature, alpha):
    """Forward KL to a teacher's logits computed on the fly, mixed with the hard labels.
    ``loss`` is the hard-label cross-entropy, comparable with a student trained without it."""

    def objective(model, batch, key):
        inputs, targets, segment_ids, weights = packed_targets(batch)
        logits = model(inputs, segment_ids=segment_ids)
        teacher = nnx.merge(teacher_graphdef, teacher_params)
        teacher_logits = jax.lax.stop_gradient(teacher(inputs, segment_ids=segment_ids))
        loss, metrics = losses.distillation_loss(
            logits, teacher_logits, targets, weights, temperature, alpha
        )
        return loss, {"loss": metrics["distill/ce"], **_post(metrics)}

    return objective


def cached_distill_objective(temperature, alpha):
    """``distill_objective`` reading the teacher's cached top-k logits from the batch
    (research/post/teacher_cache.py) instead of running the teacher."""
    from research.post.teacher_cache import student_batch

    def objective(model, batch, key):
        inputs, targets, segment_ids, weights = packed_targets(student_batch(batch))
        logits = model(inputs, segment_ids=segment_ids)
        loss, metrics = losses.topk_distillation_loss(
            logits,
            batch["teacher_values"],
            batch["teacher_ids"],
            targets,
            weights,
            temperature,
            alpha,
        )
        return loss, {"loss": metrics["distill/ce"], **_post(metrics)}

    return objective
