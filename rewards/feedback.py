"""The per-rollout feedback channel shared by every reward in this package.

The channel is carried by the reward call itself, never by module or object state, so concurrent calls (threads,
TRL's async reward path) cannot mix their feedback. See the package docstring for the protocol.
"""

from collections.abc import Sequence

FEEDBACK_KEY = "rollout_feedback"
"""Column under which the self-distillation trainer gives each rollout its own empty list (a "slot")."""


def add_feedback(kwargs: dict, texts: Sequence[str | None], log_column: str | None = None) -> None:
    """Attach one feedback text (or None) to each rollout of the current reward call.

    `kwargs` is the reward function's `**kwargs`. When it holds `FEEDBACK_KEY` (the self-distillation trainer put a
    fresh list per rollout there, aligned with `completions`), each non-empty text is appended to its rollout's own
    list; several rewards may append, and the trainer joins a slot's texts with a newline. Without the key (plain
    `trl.GRPOTrainer`) nothing is appended.

    With `log_column`, the texts also go to TRL's completions table through the `log_extra` callback that TRL 1.16
    passes to rewards (one value per rollout, None included, so the column stays aligned with the rows). Use one
    column per reward function so that two rewards never interleave in one column.
    """
    slots = kwargs.get(FEEDBACK_KEY)
    if slots is not None:
        for slot, text in zip(slots, texts, strict=True):
            if text:
                slot.append(text)
    log_extra = kwargs.get("log_extra")
    if log_column is not None and log_extra is not None:
        log_extra(log_column, list(texts))


def completion_text(completion) -> str:
    """The text of one completion: a plain string, or the concatenated contents of a chat completion's messages.

    Message content may be a string or a list of parts such as `{"type": "text", "text": ...}` (TRL's multimodal form).
    """
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content") or ""
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(part.get("text", "") for part in content if part.get("type") == "text")
    return "".join(parts)


def problem_text(prompt) -> str:
    """The problem a prompt poses: a plain prompt, or the last user message of a chat prompt."""
    if isinstance(prompt, str):
        return prompt
    users = [message for message in prompt if message.get("role") == "user"]
    return completion_text(users[-1:]) if users else ""
