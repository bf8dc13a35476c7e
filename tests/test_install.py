"""The conda environment of the rules lists exactly the package's dependencies (no drift from pyproject.toml)."""

import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_main_conda_env_mirrors_pyproject():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((REPO / "workflow" / "envs" / "main.yaml").read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    assert pip == dependencies
    assert "python=3.11" in env["dependencies"]


def test_top_level_environment_installs_the_package():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip = next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))
    assert any(line.startswith("-e .") for line in pip)
