"""The `arrag` console script: help on every subcommand, defaults from the config schema, clear errors."""

import subprocess
import sys

import pytest
import yaml

from arrag.cli import build_parser, command_module, commands, main
from arrag.config import SCHEMA_PATH


def schema_default(key: str):
    node = yaml.safe_load(SCHEMA_PATH.read_text())
    for part in key.split("."):
        node = node["properties"][part]
    return node["default"]


@pytest.mark.parametrize("name", list(commands()))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert commands()[name][1].split()[0] in capsys.readouterr().out


def test_every_subcommand_lives_in_its_stage_module():
    assert command_module("train-vq") == "arrag.cli.models"
    assert command_module("generate") == "arrag.cli.generate"
    assert command_module("merge-index") == "arrag.cli.index"
    assert {command_module(name).rsplit(".", 1)[1] for name in commands()} == {
        "data", "models", "index", "finetune", "generate", "results"}


@pytest.mark.parametrize(("argv", "option", "key"), [
    (["generate", "--images", "i", "--record", "r"], "maskgit_steps", "showo.sampling.steps"),
    (["generate", "--images", "i", "--record", "r"], "guidance_scale", "showo.sampling.guidance_scale"),
    (["generate", "--images", "i", "--record", "r"], "daid_k", "daid.k"),
    (["generate", "--images", "i", "--record", "r"], "ablation_subset", "benchmarks.mjhq.ablation_subset"),
    (["train-vq", "--images", "i", "--out", "o", "--checkpoint", "c"], "steps", "shapes_models.vq.steps"),
    (["train-vq", "--images", "i", "--out", "o", "--checkpoint", "c"], "min_heldout_psnr",
     "shapes_models.vq.min_heldout_psnr"),
    (["train-showo", "--images", "i", "--vq", "v", "--out", "o", "--checkpoint", "c"], "steps", "showo.train.steps"),
    (["train-lm", "--images", "i", "--vq", "v", "--out", "o", "--checkpoint", "c"], "steps", "shapes_models.lm.steps"),
    (["train-index", "--out", "o", "s"], "type", "index.type"),
    (["retrieval-analysis", "--index", "x", "--vq", "v", "--images", "i", "--csv", "c", "--png", "p"], "limit",
     "index.analysis_images"),
])
def test_an_option_that_mirrors_a_config_key_takes_the_schemas_default(argv, option, key):
    """One place for a default: a command run by hand behaves as the workflow's rule with an unset config key
    (the Show-o sampling steps once defaulted to 50 here and to 12 in the schema)."""
    assert getattr(build_parser().parse_args(argv), option) == schema_default(key)
    assert schema_default("showo.train.steps") != schema_default("shapes_models.lm.steps")  # the two differ


def test_building_the_parser_imports_no_heavy_package():
    """Every workflow job starts a command, so the parser's imports are paid hundreds of times a run: importing torch
    there (through a defaults dataclass) once cost 10 s of CPU per job and made the CI run 7 minutes longer."""
    heavy = "('torch', 'transformers', 'jsonschema', 'matplotlib', 'numpy')"
    code = ("import sys; from arrag.cli import build_parser; build_parser(); "
            f"print(sorted(m for m in {heavy} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_cli_reads_the_schema_the_config_is_validated_against():
    from arrag.cli.options import SCHEMA_PATH as cli_schema

    assert cli_schema.resolve() == SCHEMA_PATH.resolve() and cli_schema.is_file()


def test_tables_on_a_missing_run_folder_fails_with_a_message(tmp_path):
    result = subprocess.run([sys.executable, "-m", "arrag.cli", "tables", "--run-dir", str(tmp_path / "nope"),
                             "--out-dir", str(tmp_path / "tables"), "--scale", "shapes"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert f"no run folder {tmp_path / 'nope'}" in result.stderr and "--run-dir results/<run_name>" in result.stderr
    assert not (tmp_path / "tables").exists()


def test_shapes_world_command_writes_a_split(tmp_path):
    assert main(["shapes-world", "--split", "heldout", "--count", "3", "--out", str(tmp_path / "h")]) == 0
    assert len(list((tmp_path / "h" / "images").iterdir())) == 3
