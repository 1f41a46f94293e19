"""Format rewards: `<think>` structure, a boxed final answer, and DAPO's soft overlong penalty.

Each says what was wrong through the feedback channel (and TRL's completions table, column `feedback_<name>`).
"""

from .feedback import add_feedback, completion_text
from .answers import last_boxed


def think_problem(text: str) -> str | None:
    """What is wrong with the `<think>...</think>` structure of `text`, or None when it is right.

    Right means: the text opens with one `<think>` block (whitespace aside), closes it with `</think>`, has no other
    think tags, and has a non-empty answer after it.
    """
    stripped = text.strip()
    if "<think>" not in stripped:
        return "missing <think>...</think> reasoning block"
    if not stripped.startswith("<think>"):
        return "the response must start with <think>"
    if stripped.count("<think>") > 1 or stripped.count("</think>") > 1:
        return "use exactly one <think>...</think> block"
    if "</think>" not in stripped:
        return "the <think> block is never closed with </think>"
    if not stripped.split("</think>", 1)[1].strip():
        return "no answer after </think>"
    return None


def think_format(completions, **kwargs) -> list[float]:
    """1.0 when the completion is `<think>reasoning</think>answer` (see `think_problem`), else 0.0, with feedback."""
    problems = [think_problem(completion_text(c)) for c in completions]
    add_feedback(kwargs, problems, log_column="feedback_think_format")
    return [0.0 if p else 1.0 for p in problems]


def boxed_format(completions, **kwargs) -> list[float]:
    """1.0 when the completion has a non-empty, well-formed `\\boxed{...}`, else 0.0, with feedback."""
    boxed = [last_boxed(completion_text(c)) for c in completions]
    problems = [None if b and b.strip() else "no \\boxed{...} final answer found" for b in boxed]
    add_feedback(kwargs, problems, log_column="feedback_boxed_format")
    return [0.0 if p else 1.0 for p in problems]


def overlong_penalty(max_length: int, cache_length: int):
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", eq. 13), measured in completion tokens L:

        0                                  if L <= max_length - cache_length
        (max_length - cache_length - L) / cache_length   if max_length - cache_length < L <= max_length
        -1                                 if L > max_length

    Set `max_length` to the trainer's `max_completion_length`. Returns a reward function (named "overlong_penalty")
    that reads `completion_ids`, with feedback on the penalised rollouts.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length} and {max_length}")
    budget = max_length - cache_length

    def overlong_penalty(completions, completion_ids, **kwargs) -> list[float]:
        lengths = [len(ids) for ids in completion_ids]
        rewards = [0.0 if n <= budget else -1.0 if n > max_length else (budget - n) / cache_length for n in lengths]
        feedback = [
            f"your response is {n} tokens long, over the soft limit of {budget}; be more concise" if r < 0 else None
            for n, r in zip(lengths, rewards, strict=True)
        ]
        add_feedback(kwargs, feedback, log_column="feedback_overlong_penalty")
        return rewards

    return overlong_penalty
