"""Config validation: every shipped config is valid; errors name the key and what is allowed."""

from pathlib import Path

import pytest
import yaml

from arrag.config import ConfigError, config_hash, load, validate

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    config = load(path)
    assert config["seed"] == 0 and "sampling" in config


def test_defaults_are_filled_in():
    config = validate({"run_name": "x", "scale": "shapes"})
    assert config["shapes"]["splits"] == {"database": 20000, "train": 8000, "heldout": 1000}
    assert config["daid"]["grid"]["lam"] == [0.1, 0.3, 0.5]
    assert config["methods"] == ["vanilla", "racm3", "daid", "faid"]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"run_name": "x", "scale": "shapes", "shapes": {"splits": {"databse": 3}}},
         r"unknown key\(s\) \['databse'\] in 'shapes.splits'; allowed keys: database, heldout, train"),
        ({"run_name": "x", "scale": "big"}, r"'scale' = 'big' is not allowed; allowed values: \['shapes', 'paper'\]"),
        ({"run_name": "x", "scale": "shapes", "index": {"hops": "one"}}, r"'index.hops': 'one' does not match"),
        ({"run_name": "x", "scale": "shapes", "daid": {"lam": 1.5}}, r"'daid.lam': 1.5 is greater than"),
        ({"run_name": "x", "scale": "shapes", "methods": ["vanilla", "ragx"]}, r"'methods.1' = 'ragx'"),
        ({"scale": "shapes"}, r"missing key: 'run_name' is a required property"),
        ({"run_name": "x", "scale": "shapes", "extra": 1}, r"unknown key\(s\) \['extra'\]; allowed keys: backbone"),
    ],
)
def test_errors_name_the_key(config, message):
    with pytest.raises(ConfigError, match=message):
        validate(config)


def test_load_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"run_name": "x", "scale": "shapes", "sampling": {"micro_batch": 0}}))
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid config: 'sampling.micro_batch': 0 is less than"):
        load(path)


def test_config_hash_changes_with_content():
    a = validate({"run_name": "x", "scale": "shapes"})
    b = validate({"run_name": "x", "scale": "shapes", "seed": 1})
    assert config_hash(a) != config_hash(b)
    assert config_hash(a) == config_hash(validate({"run_name": "x", "scale": "shapes"}))
