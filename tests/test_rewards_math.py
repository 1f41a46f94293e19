"""Math accuracy on fixed strings: extraction, equivalence, feedback, bounded time, thread safety."""

import threading
import time

import pytest

from selfdistill.rewards import FEEDBACK_KEY, MathAccuracy, extract_answer, gold_answer, last_boxed

NO_ANSWER = "no final answer found (expected \\boxed{...})"


@pytest.fixture(scope="module")
def accuracy():
    reward = MathAccuracy(timeout_s=2)
    yield reward
    reward.close()


def score(reward, completions, solutions):
    slots = [[] for _ in completions]
    rewards = reward(completions, solution=solutions, **{FEEDBACK_KEY: slots})
    return rewards, [slot[0] if slot else None for slot in slots]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{41} wait, \\boxed{42}", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed {  7 }", "7"),
        ("nested \\boxed{\\boxed{5}}", "5"),
        ("\\boxed{3} then a broken \\boxed{\\frac{1}{2}", "3"),  # the last *well-formed* box
        ("I think...\n**Final answer:** 12.\n", "12"),
        ("Answer: $x = 4$", "x = 4"),
        ("empty \\boxed{} then\nAnswer: 9", "9"),
        ("no answer here", None),
        ("\\boxed{\\frac{1}{2}", None),  # malformed: unbalanced braces, no fallback line
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("17 + 25 = 32.", "32"),  # SmolLM2's plain-sentence answer
        ("The sum is 1,234.", "1234"),
        ("It is -3.5 or so", "-3.5"),
        ("\\boxed{7}, not 8", "7"),  # a box or an "Answer:" line still wins
        ("Answer: 9\nsee 10", "9"),
        ("no digits", None),
    ],
)
def test_extract_answer_last_number_fallback(text, expected):
    assert extract_answer(text, last_number=True) == expected


def test_last_number_option_grades_plain_answers():
    strict, lenient = MathAccuracy(timeout_s=2, workers=1), MathAccuracy(timeout_s=2, workers=1, last_number=True)
    try:
        completions, golds = ["17 + 25 = 42.", "17 + 25 = 32.", "I don't know"], ["42"] * 3
        assert strict(completions, solution=golds) == [0.0, 0.0, 0.0]
        rewards, feedback = score(lenient, completions, golds)
        assert rewards == [1.0, 0.0, 0.0]
        assert feedback == [None, "your final answer 32 is incorrect", NO_ANSWER]
    finally:
        strict.close()
        lenient.close()


def test_extraction_of_a_huge_completion_is_fast():
    text = "\\boxed{" * 200_000 + "x" * 1_000_000  # 2.4 MB of unbalanced boxes: only the last few are tried
    start = time.monotonic()
    assert extract_answer(text) is None and last_boxed(text) is None
    assert time.monotonic() - start < 2


@pytest.mark.parametrize(
    "value, expected",
    [
        ("42", "42"),
        (42, "42"),
        ("$\\frac12$", "\\frac12"),
        ("We add them, so the total is $\\boxed{\\frac{3}{4}}$.", "\\frac{3}{4}"),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("", None),
        (None, None),
        ("\\boxed{}", None),
    ],
)
def test_gold_answer(value, expected):
    assert gold_answer(value) == expected


def test_correct_wrong_and_equivalent_forms(accuracy):
    completions = ["\\boxed{0.5}", "\\boxed{\\frac12}", "\\boxed{\\frac{1}{2}}", "Answer: 1/2", "\\boxed{0.25}"]
    rewards, feedback = score(accuracy, completions, ["1/2"] * 5)
    assert rewards == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert feedback == [None, None, None, None, "your final answer 0.25 is incorrect"]
    # gold given in any form, in the `answer` column too
    assert accuracy(["\\boxed{0.5}"] * 3, answer=["\\frac12", "$0.5$", "#### 1/2"]) == [1.0, 1.0, 1.0]


def test_missing_malformed_and_unicode_answers(accuracy):
    completions = [
        "I am not sure.",  # missing
        "\\boxed{\\frac{1}{2}",  # malformed: unbalanced
        "\\boxed{\\frac{}{}}",  # malformed LaTeX inside a box
        "\\boxed{−42}",  # unicode minus sign
        "\\boxed{π}",
        "\\boxed{½}",  # math-verify does not read vulgar fractions: wrong, but no crash
    ]
    rewards, feedback = score(accuracy, completions, ["1/2", "1/2", "1/2", "-42", "\\pi", "1/2"])
    assert rewards == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert feedback[:3] == [NO_ANSWER, NO_ANSWER, "your final answer \\frac{}{} is incorrect"]
    assert feedback[5] == "your final answer ½ is incorrect"


def test_unparsable_gold_is_skipped_not_zero(accuracy):
    rewards, feedback = score(accuracy, ["\\boxed{1}", "\\boxed{1}", "no answer"], ["\\boxed{}", "", "   "])
    assert rewards == [None, None, None] and feedback == [None, None, None]


def test_reveal_solution(accuracy):
    accuracy.reveal_solution = True
    try:
        rewards, feedback = score(accuracy, ["\\boxed{32}", "hmm", "\\boxed{42}"], ["42"] * 3)
    finally:
        accuracy.reveal_solution = False
    assert rewards == [0.0, 0.0, 1.0]
    assert feedback == [
        "your final answer 32 is incorrect; the correct answer is 42",
        f"{NO_ANSWER}; the correct answer is 42",
        None,
    ]


def test_huge_and_pathological_answers_are_bounded(accuracy):
    completions = ["\\boxed{" + "9" * 1_000_000 + "}", "\\boxed{\\frac{9^{9^{9^9}}}{1}}", "\\boxed{2}"]
    start = time.monotonic()
    rewards, feedback = score(accuracy, completions, ["1", "1", "2"])
    assert time.monotonic() - start < 15  # one 2 s timeout, plus a replacement worker's start
    assert rewards == [0.0, 0.0, 1.0]
    assert feedback[0] == "your final answer is too long to check (1000000 characters)"
    assert feedback[1] == "your final answer \\frac{9^{9^{9^9}}}{1} could not be verified within 2 s"
    # the killed worker was replaced: the reward still works
    assert accuracy(["\\boxed{3}"], solution=["3"]) == [1.0]


def test_a_batch_of_64_is_fast_after_warm_up(accuracy):
    accuracy(["\\boxed{1}"], solution=["1"])  # warm-up: workers started
    completions = [f"The sum is \\boxed{{{i + (i % 3 == 0)}}}" for i in range(64)]
    start = time.monotonic()
    rewards = accuracy(completions, solution=[str(i) for i in range(64)])
    assert time.monotonic() - start < 1.0
    assert rewards == [0.0 if i % 3 == 0 else 1.0 for i in range(64)]


def test_eight_threads_match_serial_results(accuracy):
    completions = [f"\\boxed{{{v}}}" for v in ["1/2", "0.5", "3", "\\frac{2}{4}", "x+1", "7", "-2", "1,000"]] * 4
    solutions = ["1/2", "1/2", "4", "0.5", "1+x", "7.0", "-2", "1000"] * 4
    serial = [score(accuracy, completions, solutions) for _ in range(2)]
    results = {}

    def worker(k):
        results[k] = score(accuracy, completions, solutions)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert time.monotonic() - start < 30
    assert serial[0] == serial[1]
    assert serial[0][0] == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0] * 4
    assert [results[k] for k in range(8)] == [serial[0]] * 8
