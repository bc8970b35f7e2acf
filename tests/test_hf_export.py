"""Export to a Hugging Face folder: transformers loads what we write and computes our logits
(fixtures recorded by tools/make_hf_fixtures.py from transformers itself)."""

import jax
import numpy as np
import pytest
from flax import nnx
from hf_models import EXPORTS, export_model

from research.config import REPO_ROOT, HFError, ModelConfig
from research.hf.export import export_hf
from research.hf.load import SafetensorsFolder

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "hf"


@pytest.mark.parametrize("name", ["export_dense", "export_moe"])
def test_transformers_computes_our_logits_from_our_export(name, tmp_path):
    """Our export today is tensor for tensor the folder transformers loaded for the fixture,
    and our logits and greedy choices are the ones transformers computed from it."""
    graphdef, params = export_model(name)
    export_hf(EXPORTS[name].resolved(), params, tmp_path, dtype="bfloat16")
    ours, theirs = SafetensorsFolder(tmp_path), SafetensorsFolder(FIXTURES / name)
    assert set(ours.weight_map) == set(theirs.weight_map)
    for tensor in theirs.weight_map:
        np.testing.assert_array_equal(ours.read(tensor, ()), theirs.read(tensor, ()))
    ref = dict(np.load(FIXTURES / name / "reference.npz"))
    prompt, greedy = ref["input_ids"], ref["greedy"]
    tokens = np.concatenate([prompt, greedy])[None]
    logits = np.asarray(jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)[0])
    assert np.abs(logits[: len(prompt)] - ref["logits"]).max() <= 1e-4
    np.testing.assert_array_equal(logits[len(prompt) - 1 : -1].argmax(-1), greedy)


@pytest.mark.parametrize(
    "change, problem",
    [
        (dict(mlp_activation="relu2"), "mlp_activation='relu2'"),
        (dict(logit_softcap=30.0), "logit_softcap=30.0"),
        (dict(n_experts=4, router="sigmoid"), "router='sigmoid'"),
        (dict(n_experts=4, n_shared_experts=1), "without model.shared_expert_gate"),
    ],
)
def test_models_no_hf_architecture_computes_are_refused(change, problem, tmp_path):
    cfg = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, **change).resolved()
    with pytest.raises(HFError, match=problem):
        export_hf(cfg, {}, tmp_path)
