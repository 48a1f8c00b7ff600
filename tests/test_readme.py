"""The README stays true: its selfcorrect commands run, and `make demo` runs the pipeline command it shows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from selfcorrect.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("selfcorrect "):
                commands.append(line)
    return commands


DEMO = "selfcorrect pipeline configs/pipelines/quickstart.yaml"
TRAINING = [c for c in bash_commands() if c.split()[1] in ("sft", "reward", "ppo")]
RUNNABLE = [c for c in bash_commands() if "[" not in c and c not in TRAINING and c != DEMO]


def test_readme_shows_commands():
    assert len(RUNNABLE) >= 5


@pytest.mark.parametrize("command", RUNNABLE)
def test_readme_command_runs(command, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert main(shlex.split(command)[1:]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out


def test_make_demo_runs_the_readme_pipeline_command():
    assert DEMO in bash_commands()
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*?\n((?:\t.*\n)+)", makefile, flags=re.M).group(1)
    recipe = " ".join(recipe.replace("\\\n", " ").split())
    assert recipe.endswith(DEMO.replace("selfcorrect", "$(VENV)/bin/selfcorrect", 1))


def test_readme_training_commands_are_the_quickstart_test():
    """The training commands are run, in this order and on this config, by tests/test_quickstart.py."""
    assert [c.split()[1:] for c in TRAINING] == [
        [s, "configs/pipelines/quickstart.yaml"] for s in ("sft", "reward", "ppo")
    ]
    test = (ROOT / "tests" / "test_quickstart.py").read_text()
    assert (
        'main(["sft", str(path)])' in test
        and 'main(["reward", str(path)])' in test
        and 'main(["ppo", str(path)])' in test
    )


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in README
