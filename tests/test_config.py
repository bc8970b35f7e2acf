import pytest

from research.config import ConfigError, ExperimentConfig, apply_overrides, load_experiment


def test_override_sets_typed_values():
    cfg = apply_overrides(
        ExperimentConfig(),
        ["model.n_layers=6", "optim.lr=3e-4", "model.tie_embeddings=false", "data.corpus=x"],
    )
    assert cfg.model.n_layers == 6 and isinstance(cfg.model.n_layers, int)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.tie_embeddings is False
    assert cfg.data.corpus == "x"


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as error:
        apply_overrides(ExperimentConfig(), ["model.n_layer=4"])
    message = str(error.value)
    assert "model.n_layer" in message and "Did you mean 'n_layers'" in message
    assert "model.d_model" in message  # the valid keys are listed


def test_unknown_section_and_bad_value():
    with pytest.raises(ConfigError, match="Unknown config key 'modle'"):
        apply_overrides(ExperimentConfig(), ["modle.n_layers=4"])
    with pytest.raises(ConfigError, match="expected a value of type int"):
        apply_overrides(ExperimentConfig(), ["model.n_layers=four"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(ExperimentConfig(), ["model.n_layers"])


def test_round_trip_through_dict():
    cfg = load_experiment("tiny", ["model.d_model=48"])
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_rejects_unknown_keys():
    data = ExperimentConfig().to_dict()
    data["train"]["stepz"] = 3
    with pytest.raises(ConfigError, match="train.stepz"):
        ExperimentConfig.from_dict(data)


def test_missing_experiment_lists_known_ones():
    with pytest.raises(ConfigError, match="shakespeare_char"):
        load_experiment("no_such_experiment")


def test_gqa_head_counts_must_divide():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_experiment("tiny", ["model.n_kv_heads=3"]).model.resolved(65)


def test_negative_attention_window_is_refused():
    with pytest.raises(ConfigError, match="attention_window=-4"):
        load_experiment("tiny", ["model.attention_window=-4"]).model.resolved(65)
