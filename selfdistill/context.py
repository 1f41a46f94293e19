"""Teacher contexts for self-distillation: the same prompt, rewritten to show privileged information.

Pure functions, no trainer state. Sources, per rollout:
1. `feedback`: the environment's feedback on this very rollout (from the rewards' feedback channel);
2. `sibling`: a successful sibling rollout of the same prompt (reward ≥ threshold, never the rollout itself);
3. `solution`: the dataset's reference solution (OPSD);
4. `demonstration`: the dataset's demonstration (SDFT, its own template);
5. `privileged_context`: any other dataset text, shown like feedback.

Default templates are the SDPO paper code's (lasgroup/SDPO, also `trl.experimental.sdpo`) and the SDFT paper's.
The student's completion is never re-tokenised: the trainer appends its token ids to the tokenised teacher prompt.
"""

import re
from dataclasses import dataclass

REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n"
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}\n\n"
FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n"
DEMONSTRATION_TEMPLATE = (
    "{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
    "Now answer with a response of your own, including the thinking process."
)
# Context first and the question last, as the last thing the teacher reads: it then answers the question itself, in
# the student's own format. The default reprompt ends "Correctly solve the original question.", which invites a
# revision: SmolLM2 shown it began "Sure, here's a revised version of the answer", and its students copied that
# phrase into their own answers (benchmarks/sdpo_vs_grpo.py --diagnose measures what a template makes the teacher say).
QUESTION_LAST_REPROMPT_TEMPLATE = "{solution}{feedback}{prompt}"
QUESTION_LAST_SOLUTION_TEMPLATE = "A correct answer to the question below:\n{successful_previous_attempt}\n\n"
QUESTION_LAST_FEEDBACK_TEMPLATE = "Feedback on an earlier answer to the question below: {feedback_raw}\n\n"
SOURCES = ("feedback", "sibling", "solution", "demonstration", "privileged_context")
_THINK = re.compile(r"<think>.*?</think>", flags=re.DOTALL)
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
_WORD = re.compile(r"[a-z0-9']+")
LEAK_NGRAM = 4  # words: long enough that a shared phrase is a borrowing, short enough to catch "the correct answer is"


@dataclass(frozen=True)
class Templates:
    reprompt: str = REPROMPT_TEMPLATE
    solution: str = SOLUTION_TEMPLATE
    feedback: str = FEEDBACK_TEMPLATE
    demonstration: str = DEMONSTRATION_TEMPLATE


def strip_thinking(text: str) -> str:
    """Remove `<think>…</think>` blocks, so a sibling shown as a solution shows its answer, not its reasoning."""
    return _THINK.sub("", text).strip()


def successful_sibling(rewards: list[float], index: int, group_size: int, threshold: float) -> int | None:
    """Index of the first rollout in `index`'s group (consecutive blocks of `group_size`) with reward ≥ threshold,
    excluding `index` itself; None if there is none. NaN rewards (unscorable) never count as successes."""
    start = index // group_size * group_size
    for j in range(start, start + group_size):
        if j != index and rewards[j] >= threshold:  # NaN >= x is False
            return j
    return None


def rewrite_prompt(prompt, new_text_for):
    """Apply `new_text_for(last_user_text) -> text` to a plain prompt, or to the last user message of a chat prompt
    (system and earlier messages are kept)."""
    if isinstance(prompt, str):
        return new_text_for(prompt)
    if not prompt or prompt[-1].get("role") != "user":
        raise ValueError("A chat prompt for self-distillation must end with a user message; got " f"{prompt[-1:]}")
    content = prompt[-1]["content"]
    if isinstance(content, list):
        content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return [*prompt[:-1], {**prompt[-1], "content": new_text_for(content)}]


def teacher_prompt(
    prompt,
    *,
    feedback: str | None = None,
    sibling: str | None = None,
    solution: str | None = None,
    demonstration: str | None = None,
    templates: Templates = Templates(),
):
    """The teacher's prompt for one rollout, or None when there is no context (no distillation term).

    A demonstration uses the SDFT template. Otherwise the SDPO reprompt template is filled with a solution block
    (a successful sibling, else the dataset solution) and a feedback block (the rollout's feedback).
    """
    if demonstration:
        return rewrite_prompt(prompt, lambda text: templates.demonstration.format(prompt=text, demonstration=demonstration))
    shown_solution = sibling or solution
    if not shown_solution and not feedback:
        return None
    solution_block = templates.solution.format(successful_previous_attempt=shown_solution) if shown_solution else ""
    feedback_block = templates.feedback.format(feedback_raw=feedback) if feedback else ""
    return rewrite_prompt(
        prompt, lambda text: templates.reprompt.format(prompt=text, solution=solution_block, feedback=feedback_block)
    )


def teacher_prompts(
    prompts: list,
    completions: list[str],
    rewards: list[float],
    feedbacks: list[str | None],
    columns: dict[str, list],
    *,
    group_size: int,
    sources: tuple[str, ...],
    success_threshold: float,
    remove_thinking: bool = True,
    templates: Templates = Templates(),
) -> list:
    """Teacher prompts for a whole (global) batch of rollouts, grouped in consecutive blocks of `group_size`.

    `columns` holds the privileged dataset columns by name (`solution`, `demonstration`, `privileged_context`),
    one value per rollout. Returns one prompt or None per rollout.
    """
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"Unknown teacher-context sources {sorted(unknown)}; choose from {SOURCES}")

    def column(name, i):
        return columns[name][i] if name in sources and name in columns else None

    out = []
    for i, prompt in enumerate(prompts):
        sibling = None
        if "sibling" in sources:
            j = successful_sibling(rewards, i, group_size, success_threshold)
            if j is not None:
                sibling = strip_thinking(completions[j]) if remove_thinking else completions[j]
        feedback = "\n".join(
            text for text in (feedbacks[i] if "feedback" in sources else None, column("privileged_context", i)) if text
        )
        out.append(
            teacher_prompt(
                prompt,
                feedback=feedback or None,
                sibling=sibling,
                solution=column("solution", i),
                demonstration=column("demonstration", i),
                templates=templates,
            )
        )
    return out


def word_ngrams(text: str, n: int = LEAK_NGRAM) -> set[tuple[str, ...]]:
    """The word n-grams of `text`, lowercased, punctuation dropped."""
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def context_leakage(completions: list[str], prompt_texts: list[str], feedbacks: list[str | None],
                    templates: Templates = Templates(), n: int = LEAK_NGRAM) -> float:
    """Share of `completions` that reuse a phrase found only in what the teacher is shown.

    The phrases are the word n-grams of the templates' own text (placeholders removed) and of the rollouts'
    feedback, minus those of the student's prompts: "correctly solve the original question", "the correct answer is".
    A student that starts writing them has learnt the teacher's context rather than the task (seen here: "The correct
    answer is N" in the student's own answers). Successful siblings and demonstrations are the student's or the
    data's own words and are not counted.
    """
    shown = [_PLACEHOLDER.sub(" ", t) for t in (templates.reprompt, templates.solution, templates.feedback,
                                                 templates.demonstration)]
    phrases = set().union(*(word_ngrams(text, n) for text in shown + [f for f in feedbacks if f]))
    phrases -= set().union(set(), *(word_ngrams(text, n) for text in prompt_texts))
    if not completions:
        return 0.0
    return sum(bool(word_ngrams(c, n) & phrases) for c in completions) / len(completions)
