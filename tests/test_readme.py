"""Every code block of the README runs, or at least builds its objects.

- ```python blocks run with the hub ids replaced by the tiny fixture models (`teacher_model="Qwen/..."` by the fixture
  teacher, every other `"Qwen/..."` by the fixture student) and CPU settings added to each `...Config(` call
  (`use_cpu=True, bf16=False, report_to="none"`: the blocks are written for a GPU, and bf16 is refused on CPU). Each
  block's `trainer.train()` is replaced by a build-only check: the block must have built `trainer`, a
  `transformers.Trainer` with a training dataset. The blocks run in a temporary folder (their output dirs are
  relative).
- ```bash blocks: each `selfdistill ...` command (after joining `\\` continuations and dropping comments) is parsed
  exactly as the command would parse it, and nothing is run: `train` through `cli.parse_train_args` (with
  `--use_cpu true` appended, so a bf16 recipe parses on a CPU machine), `eval` (`speculative.parse_args` with
  `--draft`), `plot`, `generate` and `continual` through their modules' `parse_args`, `--help` through `cli.main`
  (exit 0). Other commands (make, pip) are not checked.
"""

import re
import shlex
from pathlib import Path

import pytest
from transformers import Trainer

from selfdistill import cli, continual, evaluate, generate, plot, speculative

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
BASH = [code for lang, code in BLOCKS if lang == "bash"]


def _train(argv):
    method, config_yaml = cli.peek_method(argv)
    run, config = cli.parse_train_args(argv + ["--use_cpu", "true"], method, use_demo=config_yaml is None)
    assert run.method == method
    return config


def _eval(argv):
    return (speculative.parse_args if "--draft" in argv else evaluate.parse_args)(argv)  # as evaluate.main dispatches


PARSERS = {"train": _train, "eval": _eval, "plot": plot.parse_args, "generate": generate.parse_args,
           "continual": continual.parse_args}


def selfdistill_commands() -> list[list[str]]:
    commands = []
    for code in BASH:
        for line in code.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "selfdistill":
                commands.append(argv[1:])
    return commands


def test_the_readme_has_the_blocks_this_test_checks():
    assert len(PYTHON) >= 3 and all("trainer.train()" in code for code in PYTHON)
    assert set(PARSERS) == set(cli.COMMANDS)  # a new subcommand needs its parse check here
    assert {argv[0] for argv in selfdistill_commands() if argv[0] in cli.COMMANDS} == set(cli.COMMANDS)


def trainer_class(code: str) -> str:
    """The name of the trainer class the block builds (`trainer = XTrainer(`)."""
    return re.search(r"trainer = (\w+)\(", code).group(1)


@pytest.mark.parametrize("code", PYTHON, ids=trainer_class)
def test_python_block_builds_its_trainer(code, student_dir, teacher_dir, tmp_path, monkeypatch):
    code = re.sub(r'(teacher_model\s*=\s*)"Qwen/[^"]+"', lambda m: f"{m.group(1)}{teacher_dir!r}", code)
    code = re.sub(r'"Qwen/[^"]+"', repr(student_dir), code)
    assert "Qwen/" not in code
    code = re.sub(r"\b(\w+Config)\(", r'\1(use_cpu=True, bf16=False, report_to="none", ', code)
    code = code.replace("trainer.train()", "")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert isinstance(trainer, Trainer) and len(trainer.train_dataset) > 0
    assert type(trainer).__name__ == trainer_class(code)


@pytest.mark.parametrize("argv", selfdistill_commands(), ids=shlex.join)
def test_bash_block_command_parses(argv, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # recipes are given relative to the repository
    if "--help" in argv:
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: selfdistill")
        return
    assert argv and argv[0] in cli.COMMANDS, f"unknown subcommand in the README: {argv}"
    PARSERS[argv[0]](argv[1:])
