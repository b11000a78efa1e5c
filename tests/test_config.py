"""Config loading: YAML files, overrides, and one-line errors for unknown keys and bad values."""

from pathlib import Path

import pytest

from mlplatform.config import ConfigError, config_to_dict, load_config, parse_overrides, read_yaml_mapping
from mlplatform.rl.agent import DQNConfig


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 3\nlearning_rate: 0.001\nhidden_sizes: [32, 32]\n")
    config = load_config(DQNConfig, path, parse_overrides(["seed=7", "prioritized=false"]))
    assert (config.seed, config.learning_rate, config.hidden_sizes, config.prioritized) == (
        7, 0.001, (32, 32), False,
    )
    assert config_to_dict(config)["seed"] == 7


def test_unknown_key_suggests_the_closest_field():
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rat' for DQNConfig \(did you mean 'learning_rate'\?\)"):
        load_config(DQNConfig, overrides={"learning_rat": 0.1})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"env_id": "NoSuchEnv-v9"}, "env_id: unknown gymnasium environment"),
        ({"gamma": 1.5}, "gamma: Input should be less than or equal to 1"),
        ({"batch_size": "many"}, "batch_size: Input should be a valid integer"),
        ({"batch_size": 512, "buffer_size": 100}, "batch_size \\(512\\) cannot exceed buffer_size \\(100\\)"),
        ({"hidden_sizes": []}, "hidden_sizes needs at least one layer"),
    ],
)
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(DQNConfig, overrides=overrides)
    assert "\n" not in str(info.value)


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DQNConfig, tmp_path / "missing.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(DQNConfig, listed)
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(DQNConfig, broken)
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_overrides(["seed"])


CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def config_class(path: Path):
    from mlplatform.emotion.train import EmotionConfig
    from mlplatform.federated.config import FederatedConfig
    from mlplatform.rl.apex.config import ApexConfig

    if path.name.startswith("emotion"):
        return EmotionConfig
    if path.name.startswith("federated"):
        return FederatedConfig
    return {"dqn": DQNConfig, "apex": ApexConfig}[read_yaml_mapping(path)["algorithm"]]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_config_loads(path):
    try:
        import ale_py  # noqa: F401

        has_ale = True
    except ImportError:
        has_ale = False
    if "ALE/" in path.read_text() and not has_ale:
        with pytest.raises(ConfigError, match=r"Atari environments need ale-py: pip install 'mlplatform\[atari\]'"):
            load_config(config_class(path), path)
    else:
        assert load_config(config_class(path), path) is not None
