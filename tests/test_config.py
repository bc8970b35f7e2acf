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


def test_every_experiment_and_sweep_run_validates():
    from research.config import experiment_search_paths, load_module, validate

    folder = experiment_search_paths()[1]
    for path in sorted(folder.glob("*.py")):
        module = load_module(path)
        if hasattr(module, "config"):
            load_experiment(path.stem)  # validates
        for run in getattr(module, "sweep", list)():
            validate(run.config if hasattr(run, "config") else run[1])


def test_enum_lists_match_the_modules_that_use_them():
    from research.config import ATTENTION_IMPLEMENTATIONS, SCHEDULES
    from research.models.attention import IMPLEMENTATIONS
    from research.train.optimizer import learning_rate_schedule

    assert ATTENTION_IMPLEMENTATIONS == IMPLEMENTATIONS
    for schedule in SCHEDULES:  # each one the config accepts builds a schedule
        from research.config import OptimConfig

        assert callable(learning_rate_schedule(OptimConfig(schedule=schedule), 10))


def test_validate_lists_every_problem_with_key_value_and_fix():
    cfg = apply_overrides(
        ExperimentConfig(),
        ["model.attention=flsh", "train.steps=-1", "optim.lr=nan", "mesh.expert=0"],
    )
    with pytest.raises(ConfigError) as error:
        cfg.validate()
    message = str(error.value)
    assert message.startswith("4 problems")
    assert "model.attention='flsh' is not one of auto, xla, cudnn, blockwise, pallas" in message
    assert "train.steps=-1 must be >= 0" in message
    assert "optim.lr=nan must be positive" in message  # NaN fails every comparison
    assert "mesh.expert=0 must be -1" in message


def test_validate_checks_sizes_across_sections():
    from research.config import validate

    with pytest.raises(ConfigError, match="multiple of optim.grad_accum=5"):
        validate(apply_overrides(ExperimentConfig(), ["optim.grad_accum=5"]))
    with pytest.raises(ConfigError, match="does not divide over mesh data x fsdp x expert = 5"):
        validate(apply_overrides(ExperimentConfig(), ["mesh.data=5"]))
    with pytest.raises(ConfigError, match="model.n_experts=6 does not divide over mesh.expert=4"):
        validate(
            apply_overrides(
                ExperimentConfig(),
                ["model.n_experts=6", "mesh.expert=4", "mesh.data=1", "train.batch_size=8"],
            )
        )
    assert validate(apply_overrides(ExperimentConfig(), ["mesh.data=4", "train.batch_size=8"]))


def test_validate_names_a_wrongly_typed_field_from_an_experiment_file():
    from research.config import ModelConfig, validate

    cfg = ExperimentConfig(model=ModelConfig(d_model="128", scan_layers=1))
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert "model.d_model='128' has type str, expected int" in str(error.value)
    assert "model.scan_layers=1 has type int, expected bool" in str(error.value)


def test_config_errors_are_research_errors_and_value_errors():
    from research.config import ResearchError
    from research.data.corpus import CorpusNotFoundError, DataError

    assert issubclass(ConfigError, ResearchError) and issubclass(ConfigError, ValueError)
    assert issubclass(DataError, ResearchError)
    assert issubclass(CorpusNotFoundError, DataError)
    assert issubclass(CorpusNotFoundError, FileNotFoundError)
