"""Held-out evaluation grades with the run's reward options (no model needed: generation is stubbed), and
`selfdistill eval` takes its settings from the flags, then the run folder, then the defaults."""

import json

import pytest
import torch

from selfdistill import evaluate as evaluation
from selfdistill.tasks import arithmetic


def test_evaluate_grades_with_the_reward_options(monkeypatch):
    golds = arithmetic(4, seed=0, split="test")["solution"]
    answers = [f"The sum is {gold}." for gold in golds[:3]] + ["I don't know."]  # plain sentences, no \boxed{}
    modes = []

    def generate(model, tokenizer, prompts, **kwargs):
        modes.append(model.training)
        return answers[: len(prompts)]

    monkeypatch.setattr(evaluation, "generate", generate)
    model = torch.nn.Linear(1, 1)  # in training mode, as a model just out of trainer.train()
    strict = evaluation.evaluate(model, None, ["arithmetic"], n=4)
    lenient = evaluation.evaluate(model, None, ["arithmetic"], n=4,
                                  reward_options={"accuracy": {"last_number": True, "reveal_solution": True}})
    assert strict["arithmetic"] == {"pass@1": 0.0, "mean_reward": 0.0, "n": 4}
    assert lenient["arithmetic"] == {"pass@1": 0.75, "mean_reward": 0.75, "n": 4}
    assert modes == [False, False] and model.training  # generated in eval mode, training mode restored


def test_evaluate_keeps_each_answer_with_its_grade_and_feedback(monkeypatch):
    golds = arithmetic(3, seed=0, split="test")["solution"]
    texts = [f"The sum is {golds[0]}.", f"The sum is {int(golds[1]) + 1}.", ""]
    monkeypatch.setattr(evaluation, "generate", lambda model, tokenizer, prompts, **kwargs: texts)
    result = evaluation.evaluate(torch.nn.Linear(1, 1), None, ["arithmetic"], n=3, answers=True,
                                 reward_options={"accuracy": {"last_number": True, "reveal_solution": True}})
    answers = result["arithmetic"]["answers"]
    assert [a["completion"] for a in answers] == texts and [a["solution"] for a in answers] == golds
    assert [a["reward"] for a in answers] == [1.0, 0.0, 0.0] and result["arithmetic"]["pass@1"] == 1 / 3
    assert answers[0]["feedback"] is None  # a right answer gets no feedback; a wrong one is told why
    assert f"correct answer is {golds[1]}" in answers[1]["feedback"] and answers[2]["feedback"]
    assert "answers" not in evaluation.evaluate(torch.nn.Linear(1, 1), None, ["arithmetic"], n=3)["arithmetic"]


def test_eval_settings_come_from_the_flags_then_the_run_then_the_defaults(tmp_path):
    """`selfdistill eval --model RUN_DIR` takes the run's evaluation settings (run_args.json); a flag given wins."""
    run = {"tasks": ["arithmetic"], "n": 20, "seed": 7, "max_new_tokens": 4,
           "task_options": {"arithmetic": {"difficulty": 1}}, "reward_options": {"accuracy": {"last_number": True}}}
    (tmp_path / "run_args.json").write_text(json.dumps({"run": {}, "config": {}, "evaluation": run}))
    assert evaluation.settings(evaluation.parse_args(["--model", str(tmp_path)])) == run
    flags = evaluation.parse_args(["--model", str(tmp_path), "--n", "5", "--reward_options", "{}",
                                   "--task_options", '{"arithmetic": {"difficulty": 3}}'])
    assert evaluation.settings(flags) == {**run, "n": 5, "reward_options": {},
                                          "task_options": {"arithmetic": {"difficulty": 3}}}
    plain = evaluation.parse_args(["--model", str(tmp_path / "checkpoint"), "--task", "arithmetic"])
    assert evaluation.settings(plain) == {"tasks": ["arithmetic"], "n": 50, "seed": 0,
                                          "max_new_tokens": evaluation.MAX_NEW_TOKENS, "task_options": {},
                                          "reward_options": {}}


def test_eval_without_tasks_or_with_options_that_are_not_json_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluation.settings(evaluation.parse_args(["--model", str(tmp_path)]))
    assert exit_.value.code == 2 and "give --task" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        evaluation.parse_args(["--model", str(tmp_path), "--task", "arithmetic", "--reward_options", "[1]"])
    assert exit_.value.code == 2 and "expected a JSON object" in capsys.readouterr().err
