"""Format rewards on fixed strings, with their feedback; the reward registry."""

import time

import pytest

from selfdistill.rewards import (
    FEEDBACK_KEY,
    CodeTests,
    MathAccuracy,
    boxed_format,
    completion_text,
    get_reward,
    overlong_penalty,
    think_format,
)


def run(reward, completions, **columns):
    slots = [[] for _ in completions]
    rewards = reward(completions, **columns, **{FEEDBACK_KEY: slots})
    return rewards, [slot[0] if slot else None for slot in slots]


def test_think_format():
    completions = [
        "<think>17 + 25 = 42</think> The answer is \\boxed{42}.",
        "  \n<think>\nok\n</think>\n42",
        "The answer is 42.",
        "Sure. <think>x</think> 42",
        "<think>a</think><think>b</think> 42",
        "<think>still thinking about 17 + 25",
        "<think>done</think>   ",
        "<think>ünïcödé ✓</think> 答案是 42",
    ]
    rewards, feedback = run(think_format, completions)
    assert rewards == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert feedback == [
        None,
        None,
        "missing <think>...</think> reasoning block",
        "the response must start with <think>",
        "use exactly one <think>...</think> block",
        "the <think> block is never closed with </think>",
        "no answer after </think>",
        None,
    ]


def test_boxed_format_on_chat_completions():
    completions = [
        [{"role": "assistant", "content": "so \\boxed{42}"}],
        [{"role": "assistant", "content": "so 42"}],
        [{"role": "assistant", "content": "\\boxed{}"}],
        [{"role": "assistant", "content": "\\boxed{\\frac{1}{2}"}],  # malformed: never closed
        [{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{7}"}]}],  # content parts
    ]
    rewards, feedback = run(boxed_format, completions)
    assert rewards == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert feedback == [None] + ["no \\boxed{...} final answer found"] * 3 + [None]


def test_overlong_penalty_follows_dapo():
    reward = overlong_penalty(max_length=100, cache_length=20)
    lengths = [10, 80, 90, 100, 120]
    rewards, feedback = run(reward, ["x"] * 5, completion_ids=[[0] * n for n in lengths])
    assert rewards == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert feedback[:2] == [None, None]
    assert feedback[2] == "your response is 90 tokens long, over the soft limit of 80; be more concise"
    assert reward.__name__ == "overlong_penalty"
    with pytest.raises(ValueError):
        overlong_penalty(max_length=10, cache_length=20)


def test_completion_text():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "ab"
    parts = [{"type": "text", "text": "x"}, {"type": "image"}, {"type": "text", "text": "y"}]
    assert completion_text([{"role": "assistant", "content": parts}]) == "xy"


def test_rewards_ignore_unknown_kwargs():
    extra = {"trainer_state": object(), "log_metric": lambda *a: None, "prompts": ["p"], "task_id": ["t"]}
    assert think_format(["<think>a</think> b"], **extra) == [1.0]
    assert boxed_format(["\\boxed{1}"], **extra) == [1.0]


def test_registry():
    assert get_reward("think_format") is think_format
    assert get_reward("boxed_format") is boxed_format
    assert get_reward("overlong", max_length=10, cache_length=5).__name__ == "overlong_penalty"
    accuracy = get_reward("accuracy", reveal_solution=True)
    assert isinstance(accuracy, MathAccuracy) and accuracy.__name__ == "accuracy" and accuracy.reveal_solution
    assert isinstance(get_reward("code"), CodeTests)
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("nope")


def test_format_rewards_on_a_huge_completion():
    text = "<think>" + "x" * 1_000_000 + "</think> \\boxed{" + "9" * 1_000_000 + "}"
    start = time.monotonic()
    assert think_format([text, text[:-1]]) == [1.0, 1.0]
    assert boxed_format([text, text[:-1]]) == [1.0, 0.0]  # the second box is never closed
    assert time.monotonic() - start < 1.0
