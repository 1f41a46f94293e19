"""Held-out evaluation grades with the run's reward options (no model needed: generation is stubbed)."""

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
