"""Post-training losses, each a small pure function of logits or log-probabilities.

Every function here is checked against a hand computation on tiny tensors in
tests/test_post_losses.py. Shapes: B sequences of T tokens, V the vocabulary; ``mask`` [B, T]
is 1 where a target token counts (an assistant's token, a completion's token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PREFERENCE_LOSSES = ("dpo", "ipo", "simpo")


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per token [B, T] from logits [B, T, V] (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sft_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy over the masked (assistant) tokens only; prompt tokens add nothing."""
    return masked_mean(-token_logprobs(logits, targets), mask)


def sequence_logprobs(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of log p over each sequence's masked tokens: log pi(response | prompt), [B]."""
    return jnp.sum(token_logprobs(logits, targets) * mask, axis=-1)


def bradley_terry_loss(chosen: jax.Array, rejected: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-log sigmoid(r_chosen - r_rejected), averaged, and the pair accuracy (r_c > r_r)."""
    margin = chosen - rejected
    return -jnp.mean(jax.nn.log_sigmoid(margin)), jnp.mean((margin > 0).astype(jnp.float32))


def preference_loss(
    kind: str,
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    beta: float,
    chosen_tokens: jax.Array | None = None,
    rejected_tokens: jax.Array | None = None,
    simpo_gamma: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPO, IPO or SimPO on summed sequence log-probs [B]; (loss, metrics).

    - dpo (Rafailov et al. 2023): -log sigmoid(beta * (log-ratio chosen - log-ratio rejected))
    - ipo (Azar et al. 2023): (log-ratio chosen - log-ratio rejected - 1 / (2 beta))^2
    - simpo (Meng et al. 2024): no reference; -log sigmoid(beta * (mean log p chosen - mean
      log p rejected) - gamma), log-probs averaged over each response's tokens.
    Metrics: implicit rewards beta * log-ratio (SimPO: beta * mean log p), their margin and
    accuracy, and ``kl``: the mean log-ratio policy/reference over both responses, an
    estimate of KL(policy || reference) on the pairs' responses (not on policy samples)."""
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"preference loss {kind!r} is not one of {PREFERENCE_LOSSES}")
    ratio_c, ratio_r = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if kind == "simpo":
        reward_c = beta * policy_chosen / chosen_tokens
        reward_r = beta * policy_rejected / rejected_tokens
        losses = -jax.nn.log_sigmoid(reward_c - reward_r - simpo_gamma)
    else:
        reward_c, reward_r = beta * ratio_c, beta * ratio_r
        if kind == "dpo":
            losses = -jax.nn.log_sigmoid(reward_c - reward_r)
        else:
            losses = (ratio_c - ratio_r - 1.0 / (2.0 * beta)) ** 2
    margin = reward_c - reward_r
    metrics = {
        "rewards/chosen": jnp.mean(reward_c),
        "rewards/rejected": jnp.mean(reward_r),
        "rewards/margin": jnp.mean(margin),
        "rewards/accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
        "kl": jnp.mean(0.5 * (ratio_c + ratio_r)),
    }
    return jnp.mean(losses), metrics


def group_advantages(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
    """GRPO's advantages: each reward minus its group's mean, over the group's standard
    deviation (population std, as DeepSeekMath). rewards [groups, samples per group]."""
    mean = jnp.mean(rewards, axis=-1, keepdims=True)
    std = jnp.std(rewards, axis=-1, keepdims=True)
    return (rewards - mean) / (std + eps)


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float,
    kl_coef: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO's objective (Shao et al. 2024) per completion token [B, T], negated as a loss.

    PPO's clipped surrogate min(r A, clip(r, 1 - eps, 1 + eps) A) with r = pi / pi_old and A
    the sequence's advantage [B], minus kl_coef times the unbiased k3 estimate of
    KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1. Averaged over each completion's
    tokens, then over completions."""
    ratio = jnp.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    log_ref_ratio = ref_logp - logp
    kl = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
    per_token = -(surrogate - kl_coef * kl)
    mask = mask.astype(jnp.float32)
    per_sequence = jnp.sum(per_token * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)
    clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)
    metrics = {
        "kl": jnp.mean(jnp.sum(kl * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)),
        "clip_fraction": masked_mean(clipped, mask),
    }
    return jnp.mean(per_sequence), metrics


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None,
    temperature: float,
    alpha: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, hard labels).

    Forward KL at temperature T (Hinton et al. 2015); the T^2 keeps its gradients on the
    scale of the hard-label loss as T changes. Per token, averaged over the mask."""
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"teacher vocabulary {teacher_logits.shape[-1]} != student {student_logits.shape[-1]}"
        )
    if mask is None:
        mask = jnp.ones(targets.shape, jnp.float32)
    t_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, -1)
    s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), -1)
    kd = temperature**2 * masked_mean(kl, mask)
    ce = masked_mean(-token_logprobs(student_logits, targets), mask)
    return alpha * kd + (1 - alpha) * ce, {"distill/kl": kd, "distill/ce": ce}


def topk_distillation_loss(
    student_logits: jax.Array,
    teacher_values: jax.Array,
    teacher_ids: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None,
    temperature: float,
    alpha: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``distillation_loss`` with the teacher known only by its k largest logits per position
    (``teacher_values`` [B, T, k] raw logits, ``teacher_ids`` [B, T, k] their token ids).

    The teacher's distribution is renormalised on its top-k support: p = softmax(values / T)
    over the k ids. The student keeps its full-vocabulary softmax at T, so the KL term is
    sum_{i in top-k} p_i (log p_i - log q_i): zero only when the student puts all its mass on
    the teacher's top k in the teacher's proportions, never negative (q sums to at most 1 on
    the support), and exactly ``distillation_loss``'s KL when k is the whole vocabulary.
    Renormalising (rather than a tail bucket) needs nothing but the stored logits, so one
    cache serves every temperature."""
    if mask is None:
        mask = jnp.ones(targets.shape, jnp.float32)
    t_logp = jax.nn.log_softmax(teacher_values.astype(jnp.float32) / temperature, -1)
    s_all = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
    s_logp = jnp.take_along_axis(s_all, teacher_ids, axis=-1)
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), -1)
    kd = temperature**2 * masked_mean(kl, mask)
    ce = masked_mean(-token_logprobs(student_logits, targets), mask)
    return alpha * kd + (1 - alpha) * ce, {"distill/kl": kd, "distill/ce": ce}
