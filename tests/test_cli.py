"""The `arrag` console script: help on every subcommand; planned subcommands fail loudly."""

import subprocess
import sys

import pytest

from arrag.cli import COMMANDS, main


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert COMMANDS[name][1].split()[0] in capsys.readouterr().out


def test_planned_subcommand_says_not_implemented_and_writes_nothing(tmp_path):
    planned = [name for name, (function, *_rest) in COMMANDS.items() if function is None]
    if not planned:
        pytest.skip("every subcommand is implemented")
    result = subprocess.run([sys.executable, "-m", "arrag.cli", planned[0], "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 3
    assert result.stderr.startswith("not implemented yet: ")
    assert list(tmp_path.iterdir()) == []


def test_shapes_world_command_writes_a_split(tmp_path):
    assert main(["shapes-world", "--split", "heldout", "--count", "3", "--out", str(tmp_path / "h")]) == 0
    assert len(list((tmp_path / "h" / "images").iterdir())) == 3
