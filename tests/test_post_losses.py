"""Post-training losses (research/post/losses.py) against hand computations with Python floats
on tiny tensors: each reference is written from the paper's formula, element by element."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from research.post import losses

LOGITS = np.array(
    [
        [[1.0, 2.0, 0.5], [0.1, -1.0, 2.0], [3.0, 0.0, 0.0]],
        [[0.0, 0.0, 0.0], [2.0, 1.0, -2.0], [1.0, 1.5, 0.2]],
    ]
)
TARGETS = np.array([[1, 2, 0], [0, 0, 2]])
MASK = np.array([[0, 1, 1], [0, 0, 1]])


def log_softmax_at(row, index, temperature=1.0):
    scaled = [x / temperature for x in row]
    top = max(scaled)
    log_z = top + math.log(sum(math.exp(x - top) for x in scaled))
    return scaled[index] - log_z


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_sft_loss_counts_only_masked_tokens():
    picked = [
        -log_softmax_at(LOGITS[b, t], TARGETS[b, t])
        for b in range(2)
        for t in range(3)
        if MASK[b, t]
    ]
    want = sum(picked) / len(picked)
    got = losses.sft_loss(jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.asarray(MASK))
    assert float(got) == pytest.approx(want, rel=1e-6)
    # A prompt token's logits never matter: change them wildly, the loss stays the same.
    changed = LOGITS.copy()
    changed[0, 0] = [50.0, -50.0, 7.0]
    changed[1, :2] = -30.0
    again = losses.sft_loss(jnp.asarray(changed), jnp.asarray(TARGETS), jnp.asarray(MASK))
    assert float(again) == pytest.approx(want, rel=1e-6)


def test_sequence_logprobs_sum_over_the_response():
    want = [
        sum(log_softmax_at(LOGITS[b, t], TARGETS[b, t]) for t in range(3) if MASK[b, t])
        for b in range(2)
    ]
    got = losses.sequence_logprobs(jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.asarray(MASK))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_bradley_terry():
    chosen, rejected = [1.0, 0.2, -0.5], [0.0, 0.7, -1.5]
    want = -sum(log_sigmoid(c - r) for c, r in zip(chosen, rejected, strict=True)) / 3
    loss, accuracy = losses.bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected))
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(accuracy) == pytest.approx(2 / 3)


PC, PR, RC, RR = [-3.0, -5.0], [-4.0, -2.5], [-3.5, -4.0], [-3.8, -3.0]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_and_ipo(beta):
    args = [jnp.asarray(x) for x in (PC, PR, RC, RR)]
    dpo, metrics = losses.preference_loss("dpo", *args, beta=beta)
    ipo, _ = losses.preference_loss("ipo", *args, beta=beta)
    d = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True)]
    assert float(dpo) == pytest.approx(-sum(log_sigmoid(beta * x) for x in d) / 2, rel=1e-6)
    assert float(ipo) == pytest.approx(sum((x - 1 / (2 * beta)) ** 2 for x in d) / 2, rel=1e-6)
    chosen = [beta * (pc - rc) for pc, rc in zip(PC, RC, strict=True)]
    rejected = [beta * (pr - rr) for pr, rr in zip(PR, RR, strict=True)]
    assert float(metrics["rewards/chosen"]) == pytest.approx(sum(chosen) / 2, rel=1e-6)
    assert float(metrics["rewards/rejected"]) == pytest.approx(sum(rejected) / 2, rel=1e-6)
    assert float(metrics["rewards/accuracy"]) == 0.5  # pair 1 prefers chosen, pair 2 not
    kl = sum((pc - rc + pr - rr) / 2 for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True)) / 2
    assert float(metrics["kl"]) == pytest.approx(kl, rel=1e-6)


def test_simpo_uses_length_normalised_logprobs_and_no_reference():
    beta, gamma, lc, lr = 2.0, 0.5, [2.0, 4.0], [3.0, 1.0]
    want = (
        -sum(
            log_sigmoid(beta * pc / a - beta * pr / b - gamma)
            for pc, pr, a, b in zip(PC, PR, lc, lr, strict=True)
        )
        / 2
    )
    args = [jnp.asarray(x) for x in (PC, PR, RC, RR)]
    got, _ = losses.preference_loss(
        "simpo",
        *args,
        beta=beta,
        chosen_tokens=jnp.asarray(lc),
        rejected_tokens=jnp.asarray(lr),
        simpo_gamma=gamma,
    )
    assert float(got) == pytest.approx(want, rel=1e-6)
    other_ref = [jnp.asarray(x) for x in (PC, PR, [0.0, 0.0], [9.0, 9.0])]
    again, _ = losses.preference_loss(
        "simpo",
        *other_ref,
        beta=beta,
        chosen_tokens=jnp.asarray(lc),
        rejected_tokens=jnp.asarray(lr),
        simpo_gamma=gamma,
    )
    assert float(again) == pytest.approx(want, rel=1e-6)


def test_group_advantages():
    rewards = [[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]]
    want = []
    for group in rewards:
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 4)
        want.append([(r - mean) / (std + 1e-6) for r in group])
    got = losses.group_advantages(jnp.asarray(rewards))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    assert float(jnp.abs(losses.group_advantages(jnp.ones((1, 4)))).max()) == 0.0  # all equal


def test_grpo_clips_the_ratio_and_adds_the_k3_kl():
    eps, kl_coef = 0.2, 0.1
    logp = [[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]]
    old = [[-1.5, -0.45, -2.0], [-0.1, -1.2, -1.0]]  # ratios e^0.5 (clipped), e^-0.05, ...
    ref = [[-1.2, -0.6, -1.0], [-0.3, -1.0, -0.2]]
    adv = [1.5, -0.8]
    mask = [[1, 1, 0], [1, 1, 1]]
    per_seq, kls, clipped, count = [], [], 0, 0
    for b in range(2):
        terms, seq_kl = [], []
        for t in range(3):
            if not mask[b][t]:
                continue
            r = math.exp(logp[b][t] - old[b][t])
            surrogate = min(r * adv[b], max(min(r, 1 + eps), 1 - eps) * adv[b])
            x = ref[b][t] - logp[b][t]
            kl = math.exp(x) - x - 1
            terms.append(-(surrogate - kl_coef * kl))
            seq_kl.append(kl)
            clipped += abs(r - 1) > eps
            count += 1
        per_seq.append(sum(terms) / len(terms))
        kls.append(sum(seq_kl) / len(seq_kl))
    loss, metrics = losses.grpo_loss(
        *(jnp.asarray(x) for x in (logp, old, ref, adv, mask)), clip_eps=eps, kl_coef=kl_coef
    )
    assert float(loss) == pytest.approx(sum(per_seq) / 2, rel=1e-6)
    assert float(metrics["kl"]) == pytest.approx(sum(kls) / 2, rel=1e-6)
    assert float(metrics["clip_fraction"]) == pytest.approx(clipped / count)
    assert clipped >= 2  # the example does exercise the clipping


@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (2.0, 0.7), (0.5, 0.0)])
def test_distillation_forward_kl_at_temperature_mixed_with_hard_labels(temperature, alpha):
    teacher = LOGITS[::-1] * 1.3 + 0.2
    kls, ces = [], []
    for b in range(2):
        for t in range(3):
            if not MASK[b, t]:
                continue
            p = [math.exp(log_softmax_at(teacher[b, t], v, temperature)) for v in range(3)]
            kl = sum(
                p[v]
                * (
                    log_softmax_at(teacher[b, t], v, temperature)
                    - log_softmax_at(LOGITS[b, t], v, temperature)
                )
                for v in range(3)
            )
            kls.append(kl)
            ces.append(-log_softmax_at(LOGITS[b, t], TARGETS[b, t]))
    kd, ce = temperature**2 * sum(kls) / len(kls), sum(ces) / len(ces)
    got, metrics = losses.distillation_loss(
        jnp.asarray(LOGITS),
        jnp.asarray(teacher),
        jnp.asarray(TARGETS),
        jnp.asarray(MASK),
        temperature,
        alpha,
    )
    assert float(got) == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-5)
    assert float(metrics["distill/kl"]) == pytest.approx(kd, rel=1e-5)


@pytest.mark.parametrize("k,temperature,alpha", [(2, 1.0, 1.0), (2, 2.0, 0.7), (1, 0.5, 1.0)])
def test_topk_distillation_renormalises_the_teacher_on_its_top_k(k, temperature, alpha):
    """The teacher's k largest logits, renormalised over those k ids; the student's
    full-vocabulary log-probs at those ids."""
    teacher = LOGITS[::-1] * 1.3 + 0.2
    kls, ces = [], []
    for b in range(2):
        for t in range(3):
            if not MASK[b, t]:
                continue
            row = list(teacher[b, t])
            top = sorted(range(3), key=lambda v: -row[v])[:k]
            z = sum(math.exp(row[v] / temperature) for v in top)
            kl = 0.0
            for v in top:
                p = math.exp(row[v] / temperature) / z
                kl += p * (math.log(p) - log_softmax_at(LOGITS[b, t], v, temperature))
            kls.append(kl)
            ces.append(-log_softmax_at(LOGITS[b, t], TARGETS[b, t]))
    kd, ce = temperature**2 * sum(kls) / len(kls), sum(ces) / len(ces)
    order = np.argsort(-teacher, axis=-1)[..., :k]
    got, metrics = losses.topk_distillation_loss(
        jnp.asarray(LOGITS),
        jnp.asarray(np.take_along_axis(teacher, order, -1)),
        jnp.asarray(order),
        jnp.asarray(TARGETS),
        jnp.asarray(MASK),
        temperature,
        alpha,
    )
    assert float(metrics["distill/kl"]) == pytest.approx(kd, rel=1e-5)
    assert float(got) == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-5)


def test_topk_distillation_over_the_whole_vocabulary_is_the_full_kl():
    teacher = LOGITS[::-1] * 1.3 + 0.2
    order = np.argsort(-teacher, axis=-1)
    args = (jnp.asarray(TARGETS), jnp.asarray(MASK), 2.0, 0.6)
    full, _ = losses.distillation_loss(jnp.asarray(LOGITS), jnp.asarray(teacher), *args)
    top, _ = losses.topk_distillation_loss(
        jnp.asarray(LOGITS),
        jnp.asarray(np.take_along_axis(teacher, order, -1)),
        jnp.asarray(order),
        *args,
    )
    assert float(top) == pytest.approx(float(full), rel=1e-6)
