"""Config validation: defaults equal the FlowerTune baseline, bad values name their key."""

import tomllib
from pathlib import Path

import pytest

from fedcoder.config import ConfigError, RunConfig, default_flat_config

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _app_config() -> dict:
    """pyproject's [tool.flwr.app.config], flattened the way Flower flattens it."""

    def flatten(table: dict, prefix: str = "") -> dict:
        flat = {}
        for key, value in table.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f"{prefix}{key}."))
            else:
                flat[f"{prefix}{key}"] = value
        return flat

    return flatten(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])


def test_pyproject_declares_exactly_the_code_defaults():
    assert _app_config() == default_flat_config()


def test_defaults_are_the_baseline_recipe():
    config = RunConfig.from_flat(_app_config())
    assert config.model.name == "microsoft/Phi-4-mini-instruct"
    assert config.model.quantization == 4
    assert (config.model.lora.r, config.model.lora.alpha) == (16, 64)
    assert config.model.lora.use_dora and config.model.lora.dropout == 0.075
    assert config.model.lora.target_modules == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    assert (config.train.batch_size, config.train.max_steps, config.train.seq_length) == (
        16,
        10,
        512,
    )
    assert config.train.optim == "adamw_8bit" and config.train.bf16  # same update as paged
    assert (config.train.learning_rate_max, config.train.learning_rate_min) == (5e-5, 5e-6)
    assert config.num_server_rounds == 10 and config.strategy.fraction_train == 0.2
    assert config.train.save_every_round == 5 and config.train.dynamic_data_seed
    assert config.data.name == "flwrlabs/code-alpaca-20k"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.learning-rate-max", -1e-5, "must be a finite number > 0"),
        ("strategy.fraction-train", 1.5, "must be in (0, 1]"),
        ("strategy.fraction-train", 0.0, "must be in (0, 1]"),
        ("model.lora.peft-lora-r", 0, "must be a finite number > 0"),
        ("model.quantization", 3, "must be one of [0, 4, 8]"),
        ("model.compile", "max-autotune", "must be one of"),
        ("train.training-arguments.optim", "sgd", "must be one of"),
        ("train.seq-length", "long", "expected int"),
        ("model.lora.peft-use-dora", 1, "expected bool"),
        ("model.lora.target-modules", "qkv_proj,,o_proj", "comma-separated"),
        ("results.run-name", "../escape", "plain name"),
    ],
)
def test_bad_value_names_its_key(key, value, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat({key: value})
    assert f"'{key}'" in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="unknown config key 'train.learning-rate'"):
        RunConfig.from_flat({"train.learning-rate": 1e-4})


def test_min_lr_above_max_is_refused():
    with pytest.raises(ConfigError, match="train.learning-rate-min"):
        RunConfig.from_flat({"train.learning-rate-min": 1e-3})


def test_fingerprint_changes_with_any_setting():
    base = RunConfig.from_flat({})
    assert base.fingerprint() == RunConfig.from_flat({}).fingerprint()
    assert base.fingerprint() != RunConfig.from_flat({"train.seed": 7}).fingerprint()
