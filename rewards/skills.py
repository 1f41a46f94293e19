"""Graders of the continual-learning tasks (`selfdistill/skills.py`), hardened like the math grader.

- `ToolCallMatch` ("tool_call"): the completion must be exactly one JSON object (an optional ```json fence aside),
  `{"name": ..., "arguments": {...}}`, equal to the gold call in column `call`, types included.
- `InstructionFollowing` ("instructions"): IFEval's strict check (Zhou et al. 2023, arXiv:2311.07911) of every
  instruction in the columns `instruction_id_list` and `instruction_kwargs`, through the maintained checkers of the
  `if-verifiable` package, plus three rules IFEval lacks because its checkers are easy to game by a policy:
  a response that restates the instruction (any `RESTATED_NGRAM` consecutive words of it) scores 0, since IFEval's
  own wording contains what several checkers look for (the keyword, "P.S.", a `<<title>>`, two `* ` bullets);
  one with fewer than `min_words` prose words scores 0: "less than 30 words" is met by saying nothing, and a model
  that has turned every answer into the new skill's format (`{"name": "walk", "arguments": {...}}`, seen after SFT
  on tool calls) meets a keyword or a word limit without writing a sentence; a prose word is a run of letters
  between spaces or sentence punctuation (`PROSE_WORD`), so quoted JSON keys and code do not count; one longer than
  `max_chars` scores 0 without being checked.
Both give feedback per rollout and return 1.0 or 0.0 (strict pass of every instruction, IFEval's prompt-level
strict accuracy).
"""

import json
import re

from .feedback import add_feedback, completion_text

_FENCE = re.compile(r"\A```(?:json)?\s*\n?(.*?)\n?```\Z", re.S)
_WORD = re.compile(r"[a-z0-9]+")
RESTATED_NGRAM = 5  # words: IFEval's shortest instruction text used here has 6
# A word of running text: letters (and apostrophes) after a space, a line start, an opening bracket or a hyphen,
# before a space, sentence punctuation, a hyphen or the end; `"name":` or `get_weather(` are not.
PROSE_WORD = re.compile(r"(?<![^\s(-])[A-Za-z][A-Za-z']*(?=[\s.,!?;:)-]|$)")


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs):
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):  # json.loads would keep the last of two "name"s: one call, not two
        raise _DuplicateKey(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def same_json(a, b) -> bool:
    """Equality of JSON values with JSON's types: `true` is not `1` (Python's `True == 1`), a string is not a
    number, numbers compare by value (`120` equals `120.0`)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) or isinstance(b, (int, float)):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(
            same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def parse_call(text: str, max_chars: int = 2000) -> tuple[dict | None, str | None]:
    """`(call, None)` when `text` is exactly one JSON object `{"name": str, "arguments": object}` (surrounding
    whitespace and one ```json fence allowed), else `(None, why)`."""
    text = text.strip()
    if not text:
        return None, "empty response (expected one JSON tool call)"
    if len(text) > max_chars:
        return None, f"response of {len(text)} characters, over the limit of {max_chars}"
    fenced = _FENCE.match(text)
    body = fenced.group(1).strip() if fenced else text
    try:
        call = json.loads(body, object_pairs_hook=_no_duplicate_keys)
    except _DuplicateKey as error:
        return None, f"the JSON object has {error}"
    except (ValueError, RecursionError):
        return None, "the response is not exactly one JSON object"
    if not isinstance(call, dict) or set(call) != {"name", "arguments"}:
        return None, 'expected a JSON object with exactly the keys "name" and "arguments"'
    if not isinstance(call["name"], str) or not isinstance(call["arguments"], dict):
        return None, '"name" must be a string and "arguments" an object'
    return call, None


class ToolCallMatch:
    """Reward 1.0 when the completion is exactly one JSON tool call equal to the gold `call` (a JSON string, as the
    `tool_calls` task writes it), else 0.0, with feedback: what was wrong, or which part differs."""

    __name__ = "tool_call"

    def __init__(self, max_chars: int = 2000):
        self.max_chars = max_chars

    def __call__(self, completions, call, **kwargs) -> list[float]:
        scores, feedback = [], []
        for completion, gold_text in zip(completions, call, strict=True):
            gold = json.loads(gold_text)
            answer, why = parse_call(completion_text(completion), self.max_chars)
            if answer is not None and not same_json(answer, gold):
                why = (f"wrong tool {answer['name']!r}" if answer["name"] != gold["name"]
                       else f"wrong arguments {json.dumps(answer['arguments'])[:200]}")
            scores.append(0.0 if why else 1.0)
            feedback.append(why)
        add_feedback(kwargs, feedback, log_column="feedback_tool_call")
        return scores


def restates(response: str, instruction: str, n: int = RESTATED_NGRAM) -> bool:
    """Whether `response` contains `n` consecutive words of `instruction` (lowercased, words `[a-z0-9]+`)."""
    words = _WORD.findall(instruction.lower())
    grams = {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
    said = _WORD.findall(response.lower())
    return any(tuple(said[i : i + n]) in grams for i in range(len(said) - n + 1))


class InstructionFollowing:
    """Reward 1.0 when the completion follows every instruction of its row (IFEval strict, `if-verifiable`'s
    checkers) and breaks none of the three rules of the module docstring, else 0.0, with feedback naming the failed
    instructions. langdetect (the case checkers') is seeded, so a grade is deterministic."""

    __name__ = "instructions"

    def __init__(self, min_words: int = 5, max_chars: int = 10_000):
        import langdetect

        langdetect.DetectorFactory.seed = 0  # langdetect samples; unseeded, the same text can grade differently
        self.min_words, self.max_chars = min_words, max_chars

    def __call__(self, completions, instruction_id_list, instruction_kwargs, **kwargs) -> list[float]:
        from if_verifiable.common import evaluate_instructions
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

        from ..skills import instruction_checker

        scores, feedback = [], []
        for completion, ids, kwargs_json in zip(completions, instruction_id_list, instruction_kwargs, strict=True):
            text = completion_text(completion)
            kwargs_list = json.loads(kwargs_json)
            descriptions = [instruction_checker(i, k)[1] for i, k in zip(ids, kwargs_list, strict=True)]
            why = None
            if len(text) > self.max_chars:
                why = f"response of {len(text)} characters, over the limit of {self.max_chars}"
            elif len(PROSE_WORD.findall(text)) < self.min_words:
                why = f"response of fewer than {self.min_words} prose words"
            elif any(restates(text, d) for d in descriptions):
                why = "the response restates the instruction"
            else:
                results, _ = evaluate_instructions(text, ids, kwargs_list, "", INSTRUCTION_DICT)
                failed = [r.instruction_id for r in results if not r.strict_pass]
                if failed or len(results) != len(ids):
                    why = f"instructions not followed: {failed or ids}"
            scores.append(0.0 if why else 1.0)
            feedback.append(why)
        add_feedback(kwargs, feedback, log_column="feedback_instructions")
        return scores
