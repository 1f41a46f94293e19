"""Code reward: run the program in a completion against the row's tests, in the sandbox (`sandbox.py`)."""

import re

from .feedback import add_feedback, completion_text
from .sandbox import Sandbox, SandboxLimits

# A fenced block: its language tag and its body; an unclosed fence (a truncated generation) runs to the end.
_FENCE = re.compile(r"```([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PYTHON_TAGS = {"python", "py", "python3"}


def extract_code(text: str) -> str:
    """The program in a completion: the last ```python fenced block, else the last fenced block, else the whole text."""
    blocks = _FENCE.findall(text)
    python = [body for tag, body in blocks if tag.lower() in _PYTHON_TAGS]
    if python or blocks:
        return (python or [body for _, body in blocks])[-1]
    return text


def build_program(code: str, entry_point: str | None, code_prompt: str | None) -> str:
    """The program to test. Rule: when the row names an `entry_point` that `code` does not define (`def`/`class`
    at any indentation), `code` is taken as the continuation of the problem's code prompt (HumanEval-style body
    completion) and the program is `code_prompt + code`; otherwise it is `code` alone."""
    if not (entry_point and code_prompt):
        return code
    defines = rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(entry_point)}\b"
    return code if re.search(defines, code, re.M) else code_prompt + code


class CodeTests:
    """Reward 1.0 when the completion's program passes the row's tests in the sandbox, 0.0 when not, None when the
    row has no tests.

    Columns: `tests` (Python run after the program, e.g. HumanEval's `check` plus `check(entry_point)`, or asserts),
    optional `entry_point` and `code_prompt` (see `build_program`; without a `code_prompt` column a plain-text prompt
    is used). Feedback on failure: the first failing test line and a truncated traceback, or the limit that was hit
    (timeout, memory, output), plus the end of stderr; it goes to the feedback channel and to TRL's completions
    table as column `feedback_<name>`. Runs go through one `Sandbox` (at most `max_workers` at once);
    `sandbox_options` go to it.
    """

    def __init__(
        self,
        limits: SandboxLimits = SandboxLimits(),
        max_workers: int | None = None,
        name: str = "code",
        **sandbox_options,
    ):
        self.__name__ = name  # TRL names a reward after its `__name__`
        self.sandbox = Sandbox(limits, max_workers=max_workers, **sandbox_options)

    def __call__(
        self, completions, tests=None, entry_point=None, code_prompt=None, prompts=None, **kwargs
    ) -> list[float | None]:
        if tests is None:
            raise ValueError(f"the {self.__name__} reward needs a `tests` dataset column")
        n = len(completions)
        entry_points = entry_point or [None] * n
        code_prompts = code_prompt or [p if isinstance(p, str) else None for p in (prompts or [None] * n)]
        programs = [
            build_program(extract_code(completion_text(c)), e, p)
            for c, e, p in zip(completions, entry_points, code_prompts, strict=True)
        ]
        todo = [i for i in range(n) if tests[i]]
        results = self.sandbox.run_many([(programs[i], tests[i]) for i in todo])
        rewards, feedback = [None] * n, [None] * n
        for i, result in zip(todo, results, strict=True):
            rewards[i] = 1.0 if result.passed else 0.0
            feedback[i] = result.feedback
        add_feedback(kwargs, feedback, log_column=f"feedback_{self.__name__}")
        return rewards
