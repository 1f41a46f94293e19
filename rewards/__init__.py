"""TRL-compatible reward functions that also explain themselves (per-rollout feedback).

Every reward here is a TRL reward function, `f(prompts, completions, completion_ids, **columns) -> list[float | None]`
(None skips a row), so plain `trl.GRPOTrainer` takes it unchanged. It also says, per rollout, why it scored what it
did; the self-distillation teacher reads that feedback.

The feedback protocol
---------------------
TRL forwards every column of the local batch to reward functions as one list per column, aligned with
`completions`. The self-distillation trainer adds a column `FEEDBACK_KEY` ("rollout_feedback") holding a fresh,
distinct empty list (a slot) per rollout, so a reward receives `rollout_feedback=[slot_0, slot_1, ...]`.
`add_feedback(kwargs, texts)` appends each non-empty text to its own rollout's slot (lengths must match) and does
nothing when the key is absent (plain `GRPOTrainer`). Several rewards may append; the trainer joins a slot's texts
with "\\n" and gathers them across processes in the same order as TRL gathers rewards. The feedback thus travels
with the call's own arguments: there is no module-level state, so concurrent calls (threads, TRL's async rewards)
cannot mix rollouts, and rollout i's feedback can only land on rollout i.

`add_feedback(kwargs, texts, log_column="feedback_<name>")` also logs the texts to TRL's completions table through
the `log_extra` callback TRL passes to rewards, one column per reward, so plain `GRPOTrainer` users see them too.

A reward of your own adds feedback in a few lines::

    from selfdistill.rewards import add_feedback, completion_text

    def exact_match(completions, solution, **kwargs):
        texts = [completion_text(c).strip() for c in completions]
        add_feedback(kwargs, [None if t == s else f"expected {s}, got {t[:50]}" for t, s in zip(texts, solution)])
        return [float(t == s) for t, s in zip(texts, solution)]

Rewards and their columns
-------------------------
- `MathAccuracy` ("accuracy"): the one final answer (`\\boxed{}` or "Answer:" line) against the gold in column
  `solution` (or `answer`): exact for numeric golds, which demand a number (not an expression); math-verify
  equivalence for symbolic ones, time-bounded in worker processes, safe off the main thread. The rules that keep it
  from being gamed are in `rewards/answers.py`.
- `think_format`, `boxed_format`, `overlong_penalty(max_length, cache_length)`: format and length.
- `CodeTests` ("code"): runs the completion's program against column `tests` (optional `entry_point`,
  `code_prompt`) in a subprocess sandbox with time, memory, process, output and network limits.
- `ToolCallMatch` ("tool_call"), `InstructionFollowing` ("instructions"): the continual-learning tasks' graders
  (`rewards/skills.py`): one exact JSON tool call; IFEval's instruction checkers, hardened.
`get_reward(name, **options)` builds one by name, for recipes (`reward_funcs: [accuracy, think_format]`).
Rewards accept and ignore unknown keyword arguments (TRL's `trainer_state`, `log_extra`, `log_metric`, other columns).
"""

from .code import CodeTests, build_program, extract_code
from .feedback import FEEDBACK_KEY, add_feedback, completion_text
from .format import boxed_format, overlong_penalty, think_format, think_problem
from .answers import Answer, final_answer, gold_answer, last_boxed, number_values
from .math import MathAccuracy, MathVerifier
from .sandbox import Sandbox, SandboxLimits, SandboxResult
from .skills import InstructionFollowing, ToolCallMatch

__all__ = [
    "FEEDBACK_KEY",
    "CodeTests",
    "InstructionFollowing",
    "Answer",
    "MathAccuracy",
    "MathVerifier",
    "Sandbox",
    "SandboxLimits",
    "SandboxResult",
    "ToolCallMatch",
    "add_feedback",
    "boxed_format",
    "build_program",
    "completion_text",
    "final_answer",
    "extract_code",
    "get_reward",
    "gold_answer",
    "last_boxed",
    "number_values",
    "overlong_penalty",
    "think_format",
    "think_problem",
]


def get_reward(name: str, **options):
    """A ready reward function by name: "accuracy" (`MathAccuracy(**options)`), "think_format", "boxed_format",
    "overlong" (`overlong_penalty(**options)`, needs `max_length` and `cache_length`), "code" (`CodeTests(**options)`),
    "tool_call" (`ToolCallMatch`), "instructions" (`InstructionFollowing`).
    """
    builders = {
        "accuracy": MathAccuracy,
        "think_format": lambda: think_format,
        "boxed_format": lambda: boxed_format,
        "overlong": overlong_penalty,
        "code": CodeTests,
        "tool_call": ToolCallMatch,
        "instructions": InstructionFollowing,
    }
    if name not in builders:
        raise ValueError(f"unknown reward {name!r}; choose from {sorted(builders)}")
    return builders[name](**options)
