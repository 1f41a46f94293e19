"""The `selfdistill` CLI (train/eval/plot) and every recipe, on the tiny fixture models."""

import glob
import json
import os

import pytest
import yaml
from datasets import Dataset

from selfdistill import cli

RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes")
RECIPES = sorted(glob.glob(os.path.join(RECIPES_DIR, "**", "*.yaml"), recursive=True))
TRAIN_RECIPES = [r for r in RECIPES if os.sep + "accelerate" + os.sep not in r]


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
            "--bf16", "false", "--use_vllm", "false", "--gradient_checkpointing", "false", "--use_cpu", "true",
            "--max_completion_length", "8", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1",
            "--num_generations", "4"]
    method, _ = cli.peek_method(argv)
    if method == "opd":
        argv += ["--teacher_model_name_or_path", teacher_dir]
    run, config = cli.parse_train_args(argv, method, use_demo=False)
    assert run.method == method and config.output_dir == str(tmp_path)
    trainer = cli.build_trainer(method, run, config, run.model_name_or_path, _tiny_dataset())
    assert type(trainer).__name__ == {"opd": "OnPolicyDistillTrainer", "grpo": "GRPOTrainer"}.get(
        method, "SelfDistillTrainer")
    if method in ("sdpo", "sdft", "opsd"):
        assert trainer.args.mode == method


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
