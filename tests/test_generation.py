"""Batched generation (research/infer/generation.py): ragged prompts left-padded into one batch
give each request exactly what it gets alone, greedy and sampled, with stop tokens and
per-request limits; the KV-cache path reproduces transformers' greedy continuation."""

import json

import numpy as np
import pytest

from research.config import REPO_ROOT
from research.hf import load_hf
from research.infer.generation import GenerationConfig, generate

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "hf" / "mistral"  # sliding window 8, GQA


@pytest.fixture(scope="module")
def model():
    return load_hf(FIXTURE).model()


def test_greedy_kv_cache_generation_matches_transformers(model):
    ref = np.load(FIXTURE / "reference.npz")
    config = GenerationConfig(max_new_tokens=32, bucket=32)
    assert generate(model, [ref["input_ids"].tolist()], config)[0] == ref["greedy"].tolist()


PROMPTS = [[5, 17, 3], list(range(40, 56)), [9, 1, 70, 22, 8, 8, 31, 2, 64], [11]]
LIMITS = [20, 5, 12, 32]


SAMPLED = GenerationConfig(
    bucket=32, temperature=0.9, top_k=20, top_p=0.9, seed=3, stop_tokens=(1, 45)
)


def test_batched_equals_one_at_a_time(model, config=SAMPLED):
    """Sampled with stop tokens and per-request limits (greedy, one sequence: above)."""
    batched = generate(model, PROMPTS, config, max_new_tokens=LIMITS)
    alone = [
        generate(model, [p], config, max_new_tokens=[n], seeds=[config.seed + i])[0]
        for i, (p, n) in enumerate(zip(PROMPTS, LIMITS, strict=True))
    ]
    assert batched == alone
    for out, limit in zip(batched, LIMITS, strict=True):
        stopped = [t for t in out if t in config.stop_tokens]
        assert len(out) == limit or (stopped == [out[-1]])  # a limit or one final stop token
    assert len(set(map(tuple, batched))) == len(batched)


def test_sampling_is_seeded(model):
    """Same seeds, same tokens; other seeds, other tokens (same shapes: no new compile)."""
    config = SAMPLED
    first = generate(model, PROMPTS, config, max_new_tokens=LIMITS)
    assert generate(model, PROMPTS, config, max_new_tokens=LIMITS) == first
    other = generate(model, PROMPTS, config, max_new_tokens=LIMITS, seeds=[100, 101, 102, 103])
    assert other != first


def test_inference_ledger_counts_prefill_and_decode_apart(model, tmp_path):
    from research.infer.ledger import InferenceLedger

    ledger = InferenceLedger(path=tmp_path / "inference_ledger.json")
    config = SAMPLED  # compiled above: no new compile
    outs = generate(model, PROMPTS, config, max_new_tokens=LIMITS, ledger=ledger)
    generate(model, PROMPTS, config, max_new_tokens=LIMITS, ledger=ledger)  # adds up
    saved = json.loads((tmp_path / "inference_ledger.json").read_text())
    assert saved["prefill"]["tokens"] == 2 * sum(map(len, PROMPTS))
    assert saved["decode"]["tokens"] == 2 * sum(map(len, outs))
    for phase in saved.values():
        assert phase["device_seconds"] > 0 and phase["energy_method"] == "tdp-estimate"
        joules = phase["energy_device_joules"]
        assert phase["joules_per_1k_tokens"] == pytest.approx(joules / phase["tokens"] * 1000)
        assert phase["energy_kwh"] == pytest.approx(joules / 3.6e6 * phase["pue"])


def test_int8_kv_cache_stores_each_head_vector_within_half_a_step_and_tracks_float_logits(model):
    """int8 cache: every cached K/V head vector dequantizes to within half its absmax step,
    takes head_dim + 4 bytes (float32: 4 head_dim), and the logits stay close to the float
    cache's (same greedy choice here)."""
    import jax.numpy as jnp

    from research.infer.generation import init_caches, prefill

    tokens = jnp.asarray([list(range(3, 27))], jnp.int32)
    pads = jnp.zeros((1,), jnp.int32)
    runs = {}
    for dtype in (jnp.float32, jnp.int8):
        runs[dtype] = prefill(model, tokens, pads, init_caches(model, 1, 32, dtype))
    (ref_logits, ref_caches), (q_logits, q_caches) = runs[jnp.float32], runs[jnp.int8]
    ref, quant = ref_caches[0], q_caches[0]  # layer 0: the same inputs in both runs
    for name in ("k", "v"):
        scale = quant[f"{name}_scale"][..., None]
        restored = quant[name].astype(jnp.float32) * scale
        assert np.all(np.abs(restored - ref[name]) <= scale / 2 + 1e-6)
        assert float(jnp.max(jnp.abs(restored - ref[name]))) > 0  # really quantized
    # one int8 per value plus a float32 scale per head vector, against 4 bytes per value
    nbytes = [
        sum(x.nbytes for c in caches for k, x in c.items() if k != "pos")
        for caches in (ref_caches, q_caches)
    ]
    head_dim = model.cfg.head_dim
    assert nbytes[1] / nbytes[0] == pytest.approx((head_dim + 4) / (4 * head_dim))
    spread = float(jnp.std(ref_logits))
    assert float(jnp.max(jnp.abs(q_logits - ref_logits))) < 0.05 * spread
    assert int(jnp.argmax(q_logits)) == int(jnp.argmax(ref_logits))
    int8 = GenerationConfig(max_new_tokens=8, bucket=16, cache_dtype="int8")
    assert len(generate(model, [[5, 17, 3]], int8)[0]) == 8  # the whole decode loop runs
