"""muP: at its base width it is the standard model; the coordinate check is flat in width under
muP and not under the standard parametrisation; Adam's LR shrinks on hidden matrices only."""

import jax
import numpy as np
import pytest
from flax import nnx

from research.config import ConfigError, ModelConfig, load_experiment
from research.models import Transformer
from research.train.coord_check import coordinate_check
from research.train.mup import lr_multipliers


def test_mup_at_its_base_width_is_the_standard_model():
    def logits(base):
        cfg = ModelConfig(
            vocab_size=40, d_model=32, n_layers=1, n_heads=4, seq_len=8, tie_embeddings=False
        )
        cfg.mup_base_width = base
        tokens = jax.numpy.arange(8)[None] % 40
        return Transformer(cfg.resolved(), nnx.Rngs(0))(tokens)

    np.testing.assert_array_equal(logits(0), logits(32))


@pytest.mark.slow  # four models compiled: ~2 min on the loaded 2-core box; the rest is the twin
def test_coordinate_check_is_flat_under_mup_and_grows_under_standard():
    """After two Adam steps at the same LR, how much the last block's output and the logits
    moved: under muP about the same at width 32 and 128, under SP several times larger."""
    kwargs = dict(steps=2, n_layers=1, seq_len=16, batch=4)
    mup = coordinate_check([32, 128], mup_base_width=32, **kwargs)
    standard = coordinate_check([32, 128], mup_base_width=0, **kwargs)
    for metric in ("hidden_change", "logits_change"):
        mup_ratio = mup[128][metric][-1] / mup[32][metric][-1]
        standard_ratio = standard[128][metric][-1] / standard[32][metric][-1]
        assert 0.5 < mup_ratio < 1.5, (metric, mup_ratio)
        assert standard_ratio > 2.5, (metric, standard_ratio)


def test_adam_lr_shrinks_on_hidden_matrices_only():
    cfg = ModelConfig(
        vocab_size=40, d_model=64, n_layers=1, n_heads=4, seq_len=8, tie_embeddings=False
    )
    params = nnx.to_pure_dict(nnx.state(Transformer(cfg.resolved(), nnx.Rngs(0))))
    factors = lr_multipliers(params, 4.0)
    assert factors["blocks"][0]["attn"]["wq"] == factors["blocks"][0]["mlp"]["w_down"] == 0.25
    assert factors["embed"] == factors["lm_head"] == factors["final_norm"]["scale"] == 1.0


def test_mup_with_tied_embeddings_is_a_config_error():
    with pytest.raises(ConfigError, match="tie_embeddings=false"):
        load_experiment("tiny", ["model.mup_base_width=32"]).validate()
