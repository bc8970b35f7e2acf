"""Speculative decoding: greedy output is the target's own greedy output whatever the draft,
and the accept/reject rule emits tokens distributed exactly as the target's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.stats import chisquare

from research.config import REPO_ROOT
from research.hf import load_hf
from research.infer.speculative import accept_tokens, speculative_generate

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "hf"


@pytest.mark.slow
def test_greedy_speculative_equals_target_greedy_for_a_partly_agreeing_draft():
    """(--runslow: ~20 s of compiles on 2 cores; the rule itself is tested below.)
    The draft is the target with noise on its weights: it agrees on some tokens, not all,
    so rounds accept partial prefixes and caches roll back. The target's greedy output is
    transformers' (the fixture), which our own greedy decoding reproduces (test_hf.py)."""
    imported = load_hf(FIXTURES / "mistral")  # sliding window 8: rollback across the window
    target = imported.model()
    noisy = jax.tree.map(
        lambda x: x + 0.1 * jnp.std(x) * jax.random.normal(jax.random.key(1), x.shape),
        imported.params,
    )
    draft = nnx.merge(imported.graphdef, noisy)
    ref = np.load(FIXTURES / "mistral" / "reference.npz")
    out, stats = speculative_generate(target, draft, ref["input_ids"].tolist(), 32, k=3)
    assert out == ref["greedy"].tolist()
    assert 0.0 < stats.acceptance_rate < 1.0


def test_accept_reject_rule_preserves_the_target_distribution(seed=0):
    """Vocabulary of 5, 2 drafted tokens, 40,000 trials: the first emitted token follows p[0],
    and the second, when the first draft was accepted, follows p[1] (chi-square)."""
    key_p, key_q, key_run = jax.random.split(jax.random.key(seed), 3)
    p = jax.nn.softmax(2 * jax.random.normal(key_p, (3, 5)))
    q = jax.nn.softmax(2 * jax.random.normal(key_q, (2, 5)))
    n = 40_000

    def trial(key):
        draft_key, rule_key = jax.random.split(key)
        drafted = jax.random.categorical(draft_key, jnp.log(q)).astype(jnp.int32)
        accepted, nxt = accept_tokens(p, q, drafted, rule_key)
        first = jnp.where(accepted >= 1, drafted[0], nxt)
        second = jnp.where(accepted >= 2, drafted[1], nxt)
        return first, second, accepted

    first, second, accepted = map(
        np.asarray, jax.jit(jax.vmap(trial))(jax.random.split(key_run, n))
    )
    target = np.asarray(p, np.float64) / np.asarray(p, np.float64).sum(-1, keepdims=True)
    counts = np.bincount(first, minlength=5)
    assert chisquare(counts, target[0] * n).pvalue > 1e-3
    given = second[accepted >= 1]
    counts = np.bincount(given, minlength=5)
    assert chisquare(counts, target[1] * len(given)).pvalue > 1e-3
    # and the rule is not trivially "always reject": drafts are accepted at the expected rate
    expected = float(jnp.sum(jnp.minimum(p[0], q[0])))
    assert abs(np.mean(accepted >= 1) - expected) < 0.01
