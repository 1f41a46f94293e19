"""Math accuracy on fixed strings: extraction, equivalence, feedback, bounded time, thread safety."""

import threading
import time

import pytest

from selfdistill.rewards import FEEDBACK_KEY, MathAccuracy, final_answer, gold_answer, last_boxed

NO_ANSWER = "no final answer found (expected \\boxed{...})"


@pytest.fixture(scope="module")
def accuracy():
    reward = MathAccuracy(timeout_s=2)
    yield reward
    reward.close()


def score(reward, completions, solutions, problem=None):
    slots = [[] for _ in completions]
    prompts = None if problem is None else [[{"role": "user", "content": problem}]] * len(completions)
    rewards = reward(completions, solution=solutions, prompts=prompts, **{FEEDBACK_KEY: slots})
    return rewards, [slot[0] if slot else None for slot in slots]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed {  7 }", "7"),
        ("nested \\boxed{\\boxed{5}}", "5"),
        ("\\boxed{3} then a broken \\boxed{\\frac{1}{2}", "3"),  # the last *well-formed* box
        ("\\boxed{42}, so \\boxed{42.0}", "42"),  # the same value twice is one answer
        ("I think...\n**Final answer:** 12.\n", "12"),
        ("Answer: $x = 4$", "x = 4"),
        ("no answer here", None),
        ("\\boxed{\\frac{1}{2}", None),  # malformed: unbalanced braces, no fallback line
    ],
)
def test_final_answer(text, expected):
    assert final_answer(text).text == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("17 + 25 = 32.", "32"),  # SmolLM2's plain-sentence answer
        ("The sum is 1,234.", "1234"),
        ("It is -3.5, I think", "-3.5"),
        ("The sum of 17 and 25 is 42.", "42"),  # the question's own numbers are discounted
        ("17 + 25 = 42. So 17 + 25 = 42.", "42"),
        ("\\boxed{7}, not 8", "7"),  # a box or an "Answer:" line still wins
        ("Answer: 9\nsee 10", "9"),
        ("no digits", None),
    ],
)
def test_final_answer_last_number_mode(text, expected):
    assert final_answer(text, "What is 17 + 25?", last_number=True).text == expected


def test_last_number_option_grades_plain_answers():
    strict, lenient = MathAccuracy(timeout_s=2, workers=1), MathAccuracy(timeout_s=2, workers=1, last_number=True)
    try:
        completions, golds = ["17 + 25 = 42.", "17 + 25 = 32.", "I don't know"], ["42"] * 3
        assert strict(completions, solution=golds) == [0.0, 0.0, 0.0]
        rewards, feedback = score(lenient, completions, golds)
        assert rewards == [1.0, 0.0, 0.0]
        assert feedback == [None, "your final answer 32 is incorrect", "no final answer found (expected one number)"]
    finally:
        strict.close()
        lenient.close()


def test_extraction_of_a_huge_completion_is_fast():
    text = "\\boxed{" * 200_000 + "x" * 1_000_000  # 2.4 MB of unbalanced boxes: only the last few are tried
    start = time.monotonic()
    assert final_answer(text).text is None and last_boxed(text) is None
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
    assert feedback[:3] == [NO_ANSWER, NO_ANSWER, "your answer \\frac{}{} is not a number"]
    assert feedback[5] == "your answer ½ is not a number"


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
    # A symbolic gold (\\sqrt{2}) sends the tower to math-verify; a numeric one would reject it without parsing.
    rewards, feedback = score(accuracy, completions, ["1", "\\sqrt{2}", "2"])
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
    assert serial[0][0] == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0] * 4  # 2/4 is not in lowest terms
    assert [results[k] for k in range(8)] == [serial[0]] * 8


# Hostile answers: each is what a policy finds when the grader lets it through. Every one must score 0 with feedback
# that says why. The prompts are the built-in arithmetic task's.
SUM_PROMPT = "What is 964 + 494? Answer with just the number."
HOSTILE_BOXED = [  # (completion, feedback), gold 1458, default (boxed) mode
    ("\\boxed{964 + 494}", "your answer 964 + 494 is an expression, not a number"),
    ("The answer is \\boxed{964+494}.", "your answer 964+494 is an expression, not a number"),
    ("It is \\boxed{1457} or \\boxed{1458}.",
     "your answer gives several candidates (1457, 1458); give exactly one final answer"),
    ("Answer: 1458 or 1459", "your answer gives several candidates (1458 or 1459); give exactly one final answer"),
    ("\\boxed{}", "your \\boxed{} is empty"),
    ("\\boxed{١٤٥٨}", "your answer ١٤٥٨ is not a number"),  # Arabic-Indic digits: int() reads them, we do not
    ("\\boxed{１４５８}", "your answer １４５８ is not a number"),  # fullwidth digits
    ("\\boxed{\\frac{2916}{2}}", "your answer \\frac{2916}{2} is an expression, not a number"),  # evaluates to 1458
    ("\\boxed{" + ", ".join(map(str, range(201))) + "}",
     "your answer gives several candidates (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, "
     "21, 22, 23, 24, 25, 26,...); give exactly one final answer"),
    ("we need 964 + 494.", NO_ANSWER),  # no box, no "Answer:" line
    ("", NO_ANSWER),
    ("9" * 100_000, NO_ANSWER),
]
HOSTILE_LAST_NUMBER = [  # gold 1458, last-number mode (the README demo's grader)
    ("964 + 494", "your answer only restates the question's expression 964 + 494 instead of evaluating it"),
    ("… 964 + 494 = ", "your answer only restates the question's expression 964 + 494 instead of evaluating it"),
    ("we need 964 + 494.", "your answer only restates the question's expression 964 + 494 instead of evaluating it"),
    ("Sure, here's a revised version of the answer: 964 +494",
     "your answer only restates the question's expression 964 + 494 instead of evaluating it"),
    ("1458 or 1459", "your answer gives several candidates (1458, 1459); give exactly one final answer"),
    ("the answer is 1458 … no, 1459", "your answer gives several candidates (1458, 1459); give exactly one final answer"),
    ("the answer is 1459 … no, 1458", "your answer gives several candidates (1459, 1458); give exactly one final answer"),
    (" ".join(map(str, range(201))), "your answer gives several candidates (0, 1, 2, 3, 4, ...); give exactly one final answer"),
    (" ".join(map(str, range(2000))), "your answer gives several candidates (0, 1, 2, 3, 4, ...); give exactly one final answer"),
    ("\\boxed{}", "your \\boxed{} is empty"),
    ("١٤٥٨", "no final answer found (expected one number)"),
    ("", "no final answer found (expected one number)"),
    ("x" * 1_000_000, "no final answer found (expected one number)"),
    ("\\boxed{964 + 494}", "your answer 964 + 494 is an expression, not a number"),
]


@pytest.mark.parametrize("completion, expected_feedback", HOSTILE_BOXED, ids=range(len(HOSTILE_BOXED)))
def test_hostile_answers_score_zero(accuracy, completion, expected_feedback):
    rewards, feedback = score(accuracy, [completion], ["1458"], SUM_PROMPT)
    assert rewards == [0.0] and feedback == [expected_feedback]


@pytest.mark.parametrize("completion, expected_feedback", HOSTILE_LAST_NUMBER, ids=range(len(HOSTILE_LAST_NUMBER)))
def test_hostile_answers_score_zero_in_last_number_mode(completion, expected_feedback):
    reward = MathAccuracy(last_number=True, workers=1)
    try:
        start = time.monotonic()
        rewards, feedback = score(reward, [completion], ["1458"], SUM_PROMPT)
        assert time.monotonic() - start < 2
    finally:
        reward.close()
    assert rewards == [0.0] and feedback == [expected_feedback]


def test_math_verify_alone_is_fooled_by_these_answers():
    """Why the rules exist: math-verify itself evaluates the restated question and credits it (ARCHITECTURE.md)."""
    from math_verify import parse, verify

    gold = parse("\\boxed{1458}", parsing_timeout=None)
    assert verify(gold, parse("\\boxed{964 + 494}", parsing_timeout=None), timeout_seconds=None)
    assert verify(gold, parse("\\boxed{\\frac{2916}{2}}", parsing_timeout=None), timeout_seconds=None)


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{1458}", "1458"),
        ("964 + 494 = 1458.", "1458"),  # the whole point of last-number mode: a plain sentence with the question
        ("\\boxed{1,458}", "1458"),
        ("\\boxed{1{,}458}", "1458"),
        ("\\boxed{1458.0}", "1458"),
        ("\\boxed{0.5}", "\\frac12"),
        ("\\boxed{\\frac12}", "0.5"),
        ("\\boxed{\\dfrac{1}{2}}", "1/2"),
        ("\\boxed{-\\frac{3}{4}}", "-0.75"),
        ("\\boxed{−7}", "-7"),
        ("\\boxed{+7}", "7"),
        ("\\boxed{50\\%}", "50"),
        ("\\boxed{50\\%}", "0.5"),
        ("\\boxed{\\$18}", "18"),
        ("\\boxed{90^\\circ}", "90"),
        ("\\boxed{12 \\text{ cm}}", "12"),
        ("Answer: 72", "#### 72"),
    ],
)
def test_equivalent_forms_still_pass(completion, gold):
    reward = MathAccuracy(last_number=True, workers=1)
    try:
        assert score(reward, [completion], [gold], SUM_PROMPT)[0] == [1.0]
    finally:
        reward.close()


def test_symbolic_gold_rejects_the_problem_restated(accuracy):
    problem = "Simplify $\\frac{(x+1)^2}{x+1}$."
    completions = ["\\boxed{\\frac{(x+1)^2}{x+1}}", "\\boxed{x + 1}", "\\boxed{1+x}", "\\boxed{x+2}"]
    rewards, feedback = score(accuracy, completions, ["x+1"] * 4, problem)
    assert rewards == [0.0, 1.0, 1.0, 0.0]
    assert feedback[0] == "your answer \\frac{(x+1)^2}{x+1} restates the problem instead of solving it"
    rewards, _ = score(accuracy, ["\\boxed{\\frac{\\sqrt{2}}{2}}", "\\boxed{\\sin(\\pi/4)}"], ["\\sqrt{2}/2"] * 2,
                       "What is $\\sin(\\pi/4)$?")
    assert rewards == [1.0, 0.0]


def test_numeric_golds_start_no_math_verify_process():
    reward = MathAccuracy(workers=1)
    assert reward(["\\boxed{3}", "\\boxed{1+2}"], solution=["3", "3"]) == [1.0, 0.0]
    assert reward.verifier._pool == []  # exact rational comparison, no sympy
    reward.close()
