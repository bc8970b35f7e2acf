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
