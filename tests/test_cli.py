"""The `selfdistill` CLI (train/eval/plot and --help), its checks of bad input, and every recipe, on the tiny fixture
models."""

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml
from datasets import Dataset

from selfdistill import cli
from selfdistill.tasks import arithmetic

RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes")
RECIPES = sorted(glob.glob(os.path.join(RECIPES_DIR, "**", "*.yaml"), recursive=True))
# accelerate/: launch configs; continual/: `selfdistill continual` plans (test_continual_recipes_parse_every_stage)
TRAIN_RECIPES = [r for r in RECIPES if not any(os.sep + d + os.sep in r for d in ("accelerate", "continual"))]
CONTINUAL_RECIPES = [r for r in RECIPES if os.sep + "continual" + os.sep in r]


def test_train_runs_a_two_step_config_and_eval_and_plot_work(student_dir, tmp_path, capsys):
    config = {
        "method": "sdpo", "model_name_or_path": student_dir, "dataset_name": "arithmetic", "train_size": 8,
        "eval_tasks": ["arithmetic"], "eval_size": 4, "reward_funcs": ["accuracy"],
        "reward_options": {"accuracy": {"reveal_solution": True}}, "output_dir": str(tmp_path / "run"),
        "max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 8,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "bf16": False, "use_cpu": True,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli.main(["train", "--config", str(path), "--objective", "sampled_token"])
    run_dir = tmp_path / "run" / "sdpo"
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]
    assert json.loads((run_dir / "eval.json").read_text())["arithmetic"][-1]["step"] == 2
    assert "| before | arithmetic |" in capsys.readouterr().out

    cli.main(["eval", "--model", str(run_dir), "--task", "arithmetic", "--n", "4", "--max_new_tokens", "8",
              "--output", str(tmp_path / "eval.json")])
    out = capsys.readouterr().out
    assert "| model | task | pass@1 | mean reward | n |" in out and f"| {run_dir} | arithmetic |" in out
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["arithmetic"]["n"] == 4

    cli.main(["plot", str(run_dir)])
    import matplotlib.image

    image = matplotlib.image.imread(run_dir / "curves.png")
    assert image.shape[0] > 100 and image.shape[1] > 400


def _tiny_dataset():
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1? Put the final answer in \\boxed{{}}."}],
             "solution": str(i + 1), "demonstration": f"\\boxed{{{i + 1}}}",
             "tests": f"assert True  # {i}", "entry_point": "f", "code_prompt": "def f():\n"} for i in range(4)]
    return Dataset.from_list(rows)


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: os.path.relpath(p, RECIPES_DIR))
def test_every_recipe_builds_its_trainer(recipe, student_dir, teacher_dir, tmp_path):
    """Parse the recipe as the CLI does, substitute the tiny models and data, and build the trainer."""
    argv = ["--config", recipe, "--model_name_or_path", student_dir, "--output_dir", str(tmp_path),
            "--bf16", "false", "--gradient_checkpointing", "false", "--use_cpu", "true",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"]
    method, _ = cli.peek_method(argv)
    if method != "sft":  # GRPO's generation fields
        argv += ["--use_vllm", "false", "--max_completion_length", "8", "--num_generations", "4"]
    if method == "opd":
        argv += ["--teacher_model_name_or_path", teacher_dir]
    run, config = cli.parse_train_args(argv, method, use_demo=False)
    assert run.method == method and config.output_dir == str(tmp_path)
    trainer = cli.build_trainer(method, run, config, run.model_name_or_path, _tiny_dataset(), cli.load_rewards(run))
    assert type(trainer).__name__ == {"opd": "OnPolicyDistillTrainer", "grpo": "GRPOTrainer",
                                      "sft": "SFTKLTrainer"}.get(method, "SelfDistillTrainer")
    if method in ("sdpo", "sdft", "opsd"):
        assert trainer.args.mode == method


@pytest.mark.parametrize("recipe", CONTINUAL_RECIPES, ids=os.path.basename)
def test_continual_recipes_parse_every_stage(recipe, student_dir, tmp_path):
    """Each (seed, arm, stage) of a continual plan parses and is checked as `selfdistill continual` does before any
    model loads (the tiny student in place of SmolLM2)."""
    from selfdistill import continual

    plan = continual.load_plan(recipe, output_dir=str(tmp_path))
    for arm in plan["arms"]:
        for k in range(1, len(plan["stages"]) + 1):
            method, run, config, dataset = continual.prepare_stage(
                continual.stage_fields(plan, arm, plan["seeds"][0], k, student_dir))
            assert method == run.method and len(dataset) > 0


@pytest.mark.parametrize("name", ["ddp", "zero3", "fsdp2"])
def test_accelerate_configs_parse(name):
    with open(os.path.join(RECIPES_DIR, "accelerate", f"{name}.yaml")) as f:
        config = yaml.safe_load(f)
    assert config["distributed_type"] in ("MULTI_GPU", "DEEPSPEED", "FSDP")


def test_cpu_demo_recipe_is_the_embedded_demo():
    with open(os.path.join(RECIPES_DIR, "cpu", "sdpo_arithmetic.yaml")) as f:
        recipe = yaml.safe_load(f)
    assert {**recipe, "output_dir": None} == {**cli.DEMO, "output_dir": None}


def test_plot_comparison_of_a_method_and_its_baseline(tmp_path):
    from selfdistill.plot import plot_comparison

    for method, reward in (("sdpo", 0.5), ("grpo", 0.25)):
        run_dir = tmp_path / method
        run_dir.mkdir()
        history = [{"step": s, "reward": reward * s} for s in (1, 2)]
        (run_dir / "trainer_state.json").write_text(json.dumps({"log_history": history}))
        (run_dir / "eval.json").write_text(json.dumps({"arithmetic": [{"step": 0, "pass@1": 0.2},
                                                                      {"step": 2, "pass@1": reward}]}))
    import matplotlib.image

    image = matplotlib.image.imread(plot_comparison(str(tmp_path), ["sdpo", "grpo"]))
    assert image.shape[0] > 100 and image.shape[1] > 400


# --- the command answers ---------------------------------------------------------------------------------------------

SELFDISTILL = os.path.join(os.path.dirname(sys.executable), "selfdistill")  # the installed entry point


@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_help_answers_in_a_subprocess(command):
    """`selfdistill --help` and `selfdistill COMMAND --help`, run as a user would: exit 0, a usage line, a description."""
    argv = [SELFDISTILL] + ([command] if command else []) + ["--help"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    prog = "selfdistill" + (f" {command}" if command else "")
    assert result.stdout.startswith(f"usage: {prog} ")
    assert len(result.stdout.split("\n\n")[1].strip()) > 40  # the paragraph after the usage: a description
    if command is None:  # the top level lists every subcommand with its description
        assert all(f"{name:<7} {text}" in result.stdout for name, (_, text) in cli.COMMANDS.items())


@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_short_help_flag(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(([command] if command else []) + ["-h"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: selfdistill" + (f" {command}" if command else ""))


@pytest.mark.parametrize("argv", [["tran"], []], ids=["wrong", "missing"])
def test_a_wrong_or_missing_command_exits_non_zero_naming_the_valid_ones(argv):
    result = subprocess.run([SELFDISTILL, *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"usage: selfdistill {{{','.join(cli.COMMANDS)}}}" in result.stderr
    if argv:
        assert f"invalid choice: 'tran' (choose from {', '.join(map(repr, cli.COMMANDS))})" in result.stderr


def test_plot_of_a_missing_run_folder_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plot", str(tmp_path / "nowhere")])
    assert exit_.value.code == 2 and "no run folder" in capsys.readouterr().err


# --- bad input: a clear error before any model is loaded --------------------------------------------------------------

def _write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


BAD_INPUTS = {  # case: (extra argv, or a function of tmp_path giving it; the message expected)
    "unknown method": (["--method", "sdpx"], "unknown method 'sdpx'; choose from opd, sdpo, sdft, opsd, grpo, sft"),
    "unknown reward": (["--reward_funcs", "acuracy"], "unknown reward 'acuracy'; choose from ['accuracy', "),
    "unknown dotted reward": (["--reward_funcs", "selfdistill.rewards.math_accuracy"],
                              "cannot import 'math_accuracy' from 'selfdistill.rewards'"),
    "unknown dataset": (["--dataset_name", "arithmetik"], "unknown dataset 'arithmetik'; choose from arithmetic, "),
    "unknown eval task": (["--eval_tasks", "arithmetik"], "unknown eval_tasks ['arithmetik']; choose from arithmetic"),
    "accuracy without solution": (
        lambda tmp: ["--train_file", _write_rows(tmp / "q.jsonl", [{"prompt": "What is 2 + 2?"}])],
        "reward 'accuracy' needs a dataset column 'solution' or 'answer'; the dataset has ['prompt']"),
    "code without tests": (["--reward_funcs", "code"], "reward 'code' needs a dataset column 'tests'"),
    "no prompt": (lambda tmp: ["--train_file", _write_rows(tmp / "s.jsonl", [{"question": "2 + 2?", "solution": "4"}])],
                  "method 'sdpo' needs a 'prompt' column"),
    "sdft without demonstrations": (["--method", "sdft"],
                                    "context_sources ['demonstration'] read the column(s) ['demonstration']"),
    "sft without completions": (["--method", "sft"], "an SFT dataset needs columns prompt + completion"),
    "train_size 0": (["--train_size", "0"], "the training data is empty: dataset 'arithmetic' with train_size=0"),
    "empty file": (lambda tmp: ["--train_file", _write_rows(tmp / "empty.jsonl", [])], "is an empty file"),
    "missing file": (["--train_file", "/nonexistent/rows.jsonl"], "train_file '/nonexistent/rows.jsonl' does not exist"),
    "num_generations not dividing the batch": (
        ["--per_device_train_batch_size", "6", "--num_generations", "4"],
        "generation_batch_size (6) must be divisible by num_generations (4). Each prompt's num_generations rollouts "
        "must fit whole in a generation batch, which is per_device_train_batch_size"),
    "reward_options not JSON": (["--reward_options", "{accuracy: 1}"], "--reward_options must be a JSON object"),
    "dataset_options not an object": (["--dataset_options", "[2]"], "--dataset_options must be a JSON object"),
    "opd without a teacher": (["--method", "opd"], "method 'opd' needs teacher_model_name_or_path"),
    "a field the method lacks": (["--method", "sft", "--num_generations", "8"],
                                 "Some specified arguments are not used by the HfArgumentParser: ['--num_generations'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_before_any_compute(case, tmp_path, capsys):
    """Each bad input exits with status 2 and a message naming the cause (and the valid choices), before anything is
    loaded or written: the model path does not exist, so reaching the model would fail differently, and the output
    folder is never created."""
    extra, message = BAD_INPUTS[case]
    extra = extra(tmp_path) if callable(extra) else extra
    base = {"method": "sdpo", "model_name_or_path": str(tmp_path / "no-model"), "dataset_name": "arithmetic",
            "train_size": 8, "reward_funcs": ["accuracy"], "output_dir": str(tmp_path / "run"), "max_steps": 1,
            "per_device_train_batch_size": 8, "report_to": "none", "bf16": False, "use_cpu": True}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(base))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--config", str(config), *extra])
    assert exit_.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar of datasets
    assert last_line.startswith("selfdistill train: error: ") and message in last_line, last_line
    assert not (tmp_path / "run").exists()


def test_the_reward_column_table_names_registered_rewards():
    from selfdistill.rewards import get_reward

    for name in cli.REWARD_COLUMNS:
        assert callable(get_reward(name))


# --- eval grades a run as the run did ----------------------------------------------------------------------------------

def test_eval_of_a_run_folder_reproduces_the_pass_at_1_the_run_recorded(student_dir, tmp_path, capsys):
    """An SFT run teaches the fixture to answer "3" to one-digit additions (plain text, no \\boxed{}), graded with
    the run's `last_number` option on its own held-out problems (difficulty 1, 20 of them, generation length 4).
    `selfdistill eval --model RUN_DIR`, in a subprocess, reads run_args.json and gets the pass@1 the run recorded;
    an explicit --reward_options wins (strict grading: 0, since "3" is not boxed)."""
    instruction = "Answer with just the number."
    prompts = arithmetic(32, seed=0, difficulty=1, instruction=instruction)["prompt"]
    rows = _write_rows(tmp_path / "generated.jsonl", [
        {"prompt": p, "completion": "3", "reward": 1.0, "pass_rate": 1.0, "teacher": "constant"} for p in prompts])
    config = {
        "method": "sft", "model_name_or_path": student_dir, "train_file": rows, "dataset_name": "arithmetic",
        "dataset_options": {"difficulty": 1, "instruction": instruction}, "eval_tasks": ["arithmetic"],
        "eval_size": 20, "eval_max_new_tokens": 4, "reward_options": {"accuracy": {"last_number": True}},
        "output_dir": str(tmp_path / "run"), "max_steps": 16, "learning_rate": 1e-2, "per_device_train_batch_size": 8,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "bf16": False, "use_cpu": True,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    table = cli.train(["--config", str(path)])
    run_dir = tmp_path / "run" / "sft"
    recorded = json.loads((run_dir / "eval.json").read_text())["arithmetic"][-1]
    assert recorded["step"] == 16 and recorded["pass@1"] >= 0.2, recorded  # it learned: a comparison that can fail
    assert table["after sft"]["arithmetic"]["pass@1"] == recorded["pass@1"]
    assert json.loads((run_dir / "run_args.json").read_text())["evaluation"]["reward_options"] == {
        "accuracy": {"last_number": True}}
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 17))
    assert (run_dir / "curves.png").exists()  # plot_run copes with an SFT log history

    result = subprocess.run([SELFDISTILL, "eval", "--model", str(run_dir), "--output", str(tmp_path / "eval.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["results"]["arithmetic"] == {k: recorded[k] for k in ("pass@1", "mean_reward", "n")}
    assert evaluated["options"]["max_new_tokens"] == 4 and evaluated["options"]["n"] == 20

    capsys.readouterr()
    cli.main(["eval", "--model", str(run_dir), "--reward_options", "{}"])
    assert "| arithmetic | 0.000 | 0.000 | 20 |" in capsys.readouterr().out


def test_the_demo_baseline_belongs_to_the_demo_method():
    """With no --config the demo's values are the defaults; its GRPO baseline only for its own method (SDPO): an SFT
    run on the demo's defaults must not also train GRPO."""
    assert cli.parse_train_args(["--use_cpu", "true"], "sdpo", use_demo=True)[0].baseline == "grpo"
    for method in ("sft", "grpo"):
        run, _ = cli.parse_train_args(["--method", method, "--use_cpu", "true"], method, use_demo=True)
        assert run.method == method and run.baseline is None


def test_training_rows_come_from_a_jsonl_file_a_saved_folder_or_the_demonstrations_task(tmp_path):
    """`train_file` reads JSONL and `save_to_disk` folders (a Dataset or a DatasetDict's train split), cut to
    `train_size` with the seed; `dataset_name: demonstrations` reads a local JSONL. Each passes the SFT input check."""
    from datasets import DatasetDict

    rows = [{"prompt": f"What is {i} + 1?", "completion": f" {i + 1}", "reward": 1.0} for i in range(6)]
    jsonl = _write_rows(tmp_path / "rows.jsonl", rows)
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved_dict"))
    demos = _write_rows(tmp_path / "demos.jsonl", [{"prompt": r["prompt"], "demonstration": r["completion"]}
                                                   for r in rows])
    base = ["--method", "sft", "--output_dir", str(tmp_path / "run"), "--use_cpu", "true"]
    for extra, size in ((["--train_file", jsonl], 6), (["--train_file", str(tmp_path / "saved")], 6),
                        (["--train_file", str(tmp_path / "saved_dict"), "--train_size", "4"], 4),
                        (["--dataset_name", "demonstrations", "--dataset_options",
                          json.dumps({"path": "json", "data_files": demos})], 6)):
        run, config = cli.parse_train_args(base + extra, "sft", use_demo=False)
        dataset = cli.load_train_data(run, config)
        assert len(dataset) == size and "prompt" in dataset.column_names
        assert {"completion", "demonstration"} & set(dataset.column_names)
        cli.check_inputs("sft", run, config, dataset)
