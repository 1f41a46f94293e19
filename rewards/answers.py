"""What a completion answers: extraction of the final answer, and the rules that keep a grader from being gamed.

A policy optimises whatever the grader lets through. math-verify *evaluates* expressions, so graded naively an
answer that merely restates an arithmetic question ("\\boxed{123 + 456}", "... 964 + 494 =") verifies against the
sum, and self-distillation then shows that rollout to the teacher as a success (ARCHITECTURE.md, "Graders"). The
rules here, applied by `MathAccuracy` before anything is verified:

1. **One answer.** The candidates are every well-formed `\\boxed{...}` (else every "Answer: ..." line). Two different
   candidates ("\\boxed{41} or \\boxed{42}") are wrong, not the last one. An empty `\\boxed{}` is no answer.
2. **A number for a numeric gold** (`number_values`): when the gold is a number, the answer must be a number
   literal: an integer (thousands may be written "1,234" or "1{,}234"), a decimal, a fraction `a/b` or
   `\\frac{a}{b}` in lowest terms, any of them signed or as a percentage; a leading currency sign and a trailing
   unit (`\\text{cm}`, `^\\circ`) are ignored. It is compared with the gold exactly, as a rational number. An
   expression to evaluate is wrong, whatever it evaluates to ("123 + 456", "\\frac{84}{2}", "2^{3}"), and so is an
   answer with several numbers ("42 or 43"). Only ASCII digits count: int() would read "٤٢" as 42, a grader must
   not. A percentage p% equals the gold p or p/100 (gsm8k writes "50" for "50%").
3. **No restated problem for a symbolic gold** (`restates`): an answer with an operator that is, verbatim (spaces,
   `$` and `\\left`/`\\right` ignored), one of the problem's own expressions (a `$...$` span, or an arithmetic
   expression written in it) is wrong. Limits: only the whole expression counts (an answer may contain part of it:
   "x+1" for "simplify (x+1)^2/(x+1)" is fine), and a restatement in another form ("456 + 123", an equivalent
   rewrite) is not detected for symbolic golds; math-verify then decides.
4. **Last-number mode** (`last_number=True`, for small models that answer "17 + 25 = 42." and never box): with no box
   and no "Answer:" line the answer is the one number the completion commits to. The arithmetic expressions it
   writes ("17 + 25", "32 + 10" in "17 + 25 = 32 + 10 = 42") are not candidates; if the numbers left are not all
   equal, the problem's own numbers are dropped too ("the sum of 17 and 25 is 42"); then exactly one distinct number
   must remain. So "42 or 43", "42 ... no, 43", a list of every number and a trailing "964 + 494 =" all fail.
   Limits: it is meant for short answers: a worked solution with intermediate results written as separate numbers
   fails, so ask for `\\boxed{}` or "Answer:" there. It reads integers and decimals, not fractions.

Everything here is plain string work with linear regular expressions (no backtracking on nested quantifiers), so a
1 MB completion is cheap, and it runs on any thread.
"""

import re
from dataclasses import dataclass
from fractions import Fraction
from math import gcd

BOXED_TRIES = 8  # how many trailing \boxed occurrences are read; bounds the scan of a huge malformed completion
_MAX_BRACES = 10_000  # a group with more braces than this counts as malformed
_BRACES = re.compile(r"[{}]")
_MAX_NUMBER_CHARS = 200  # a longer "number" is not read as one

_MINUS = "-−"  # ASCII hyphen-minus and U+2212: models write both
_INT = r"(?:[0-9]{1,3}(?:(?:,|\{,\})[0-9]{3})+|[0-9]+)"
_NUMBER_LITERAL = re.compile(
    r"(?P<sign>[+\-−]?)\s*(?:"
    rf"(?P<int>{_INT})(?:\.(?P<frac>[0-9]+))?"
    r"|(?P<num>[0-9]+)\s*/\s*(?P<den>[0-9]+)"
    r"|\\[dt]?frac\s*(?:\{\s*(?P<fnum>[0-9]+)\s*\}|(?P<fnum1>[0-9]))\s*(?:\{\s*(?P<fden>[0-9]+)\s*\}|(?P<fden1>[0-9]))"
    r")\s*(?P<percent>\\?%)?",
    re.ASCII,
)
_CURRENCY = re.compile(r"^(?:\\\$|\$|€|£|\\text\{\s*\$\s*\})\s*")
_UNIT = re.compile(r"\s*(?:\\(?:text|mbox|mathrm)\{\s*[A-Za-z .]*\}|\^\s*\{?\s*\\circ\s*\}?|°|\\,)\s*$")
_DIGIT = re.compile(r"[0-9]", re.ASCII)
_OPERATOR = re.compile(r"[-+*/×÷·^−]|\\(?:frac|dfrac|tfrac|cdot|times|div|sqrt)|(?<=\d)\s*\(")
_SEPARATOR = re.compile(r"\bor\b|\band\b|[,;]|\\(?:quad|text\{\s*(?:or|and)\s*\})", re.IGNORECASE)
# A plain number in running text (last-number mode): not part of a longer number, ASCII digits only.
_NUMBER_IN_TEXT = re.compile(rf"(?<![0-9.,])[{_MINUS}]?{_INT}(?:\.[0-9]+)?(?![0-9])", re.ASCII)
# An arithmetic expression written in a problem: numbers joined by operators, with optional parentheses.
_OPERAND = r"\(?\s*[0-9]+(?:\.[0-9]+)?\s*\)?"
_EXPRESSION = re.compile(rf"{_OPERAND}(?:\s*(?:[-+*/×÷·x−]|\\times|\\cdot|\\div)\s*{_OPERAND})+", re.ASCII)
_OPERATOR_SYNONYMS = {"*": "*×·x", "x": "*×·x", "×": "*×·x", "·": "*×·x", "-": "-−", "−": "-−", "/": "/÷", "÷": "/÷"}
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_SPACES = re.compile(r"\s+|\$|\\left|\\right|\\[,;!]")


@dataclass(frozen=True)
class Answer:
    """The final answer of a completion (`text`), or why there is none usable (`problem`):
    "no_answer", "empty_box", "several" (`text` then lists the candidates) or "restated" (`text` is the problem's
    expression the completion only restated)."""

    text: str | None
    problem: str | None = None


def _braced(text: str, i: int) -> str | None:
    """Content of the `{...}` group opening at `text[i]` (after optional spaces); None if absent or unbalanced.

    Only brace characters are visited, at most `_MAX_BRACES` of them, so a huge or brace-spammed text stays cheap.
    """
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for count, brace in enumerate(_BRACES.finditer(text, i)):
        if count == _MAX_BRACES:
            return None
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[i + 1 : brace.start()]
    return None


def boxed_contents(text: str) -> list[str]:
    """Contents of the well-formed `\\boxed{...}` groups among the last `BOXED_TRIES` occurrences, in text order.

    A box nested in a box counts once, as its innermost content ("\\boxed{\\boxed{5}}" gives ["5"])."""
    found, end = [], len(text)
    for _ in range(BOXED_TRIES):
        start = text.rfind("\\boxed", 0, end)
        if start < 0:
            break
        content = _braced(text, start + len("\\boxed"))
        # An outer box around one already read is skipped: the inner content is the answer.
        if content is not None and not any(f"\\boxed{{{inner}}}" in content for inner in found):
            found.append(content)
        end = start
    return found[::-1]


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed `\\boxed{...}` in `text` (balanced braces), or None."""
    found = boxed_contents(text)
    return found[-1] if found else None


def _answer_lines(text: str) -> list[str]:
    """Values of "Answer: ..." / "Final answer: ..." lines (markdown decoration, `$` and a final period stripped)."""
    values = []
    for line in text.splitlines():
        head, colon, value = line.partition(":")
        if colon and head.strip(" \t*#>-_").lower() in ("answer", "final answer"):
            value = value.strip(" \t*$").rstrip(".").strip(" \t*$")
            if value:
                values.append(value)
    return values


def _distinct(candidates: list[str]) -> list[str]:
    """Candidates with duplicates removed (numbers by value, so "42" and "42.0" are one), in order."""
    seen, out = set(), []
    for candidate in candidates:
        values = number_values(candidate)
        key = values if values is not None else _SPACES.sub("", candidate)
        if key not in seen:
            seen.add(key)
            out.append(candidate)
    return out


def final_answer(text: str, problem: str = "", last_number: bool = False) -> Answer:
    """The completion's one final answer (see the module docstring for the rules), or why there is none.

    `problem` is the question's text, used in last-number mode to discount the question's own numbers."""
    boxed = boxed_contents(text)
    if boxed:
        candidates = _distinct([b.strip() for b in boxed if b.strip()])
        if not candidates:
            return Answer(None, "empty_box")
    else:
        candidates = _distinct(_answer_lines(text))
        if not candidates and last_number:
            return _committed_number(text, problem)
    if not candidates:
        return Answer(None, "no_answer")
    if len(candidates) > 1:
        return Answer(", ".join(candidates), "several")
    return Answer(candidates[0])


def _committed_number(text: str, problem: str) -> Answer:
    """Last-number mode: the one number the text commits to, outside the arithmetic expressions it writes."""
    expressions = [m.group().strip() for m in _EXPRESSION.finditer(text)]
    rest = _EXPRESSION.sub(" ", text)
    numbers = [m.group().replace(",", "").replace("−", "-") for m in _NUMBER_IN_TEXT.finditer(rest)
               if len(m.group()) <= _MAX_NUMBER_CHARS]
    values = list(dict.fromkeys(Fraction(n) for n in numbers))
    if len(values) > 1:
        given = {Fraction(m.group()) for m in re.finditer(r"[0-9]+(?:\.[0-9]+)?", problem, re.ASCII)}
        values = [v for v in values if v not in given] or values
    if len(values) > 1:
        shown = [_format(v) for v in values]
        return Answer(", ".join(shown[:5] + (["..."] if len(shown) > 5 else [])), "several")
    if values:
        return Answer(_format(values[0]))
    if not expressions:
        return Answer(None, "no_answer")
    restated = [e for e in problem_expressions(problem) if any(_expression_pattern(e).fullmatch(x) for x in expressions)]
    return Answer(restated[0], "restated") if restated else Answer(expressions[-1], "expression")


def _format(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else str(float(value))


def problem_expressions(problem: str) -> list[str]:
    """The arithmetic expressions written in a problem ("What is (43 - 17) * 12?" gives ["(43 - 17) * 12"])."""
    return [m.group().strip() for m in _EXPRESSION.finditer(problem)]


def _expression_pattern(expression: str) -> re.Pattern:
    """`expression` in any spacing, with operator synonyms (× · x for *, − for -, ÷ for /) and optional brackets."""
    parts = []
    for token in re.findall(r"[0-9]+(?:\.[0-9]+)?|\S", expression):
        if token[0].isdigit():
            parts.append(rf"(?<![0-9]){re.escape(token)}(?![0-9])")
        elif token in "()":
            parts.append(re.escape(token) + "?")
        else:
            parts.append("[" + re.escape(_OPERATOR_SYNONYMS.get(token, token)) + "]")
    return re.compile(r"\s*".join(parts))


def number_values(text: str) -> frozenset[Fraction] | None:
    """The value(s) of a number literal (rule 2 of the module docstring), or None if `text` is not exactly one.

    A percentage has two readings, p and p/100; every other literal has one value.
    """
    if len(text) > _MAX_NUMBER_CHARS:  # no answer is that long; int() refuses over 4300 digits anyway
        return None
    text = _CURRENCY.sub("", text.strip().strip("$").strip())
    text = _UNIT.sub("", text)
    match = _NUMBER_LITERAL.fullmatch(text)
    if match is None:
        return None
    if match["int"] is not None:
        digits = re.sub(r",|\{,\}", "", match["int"])
        value = Fraction(f"{digits}.{match['frac']}" if match["frac"] else digits)
    else:
        num = int(match["num"] or match["fnum"] or match["fnum1"])
        den = int(match["den"] or match["fden"] or match["fden1"])
        if den < 2 or gcd(num, den) != 1:  # "84/2", "\frac{6}{1}": an expression to evaluate, not an answer
            return None
        value = Fraction(num, den)
    if match["sign"] and match["sign"] in _MINUS:
        value = -value
    return frozenset({value, value / 100}) if match["percent"] else frozenset({value})


def answer_problem_with_number(text: str) -> str:
    """Why `text` is not a number literal: "several" (numbers joined by "or", "and", commas), "expression" (numbers
    joined by operators, an unreduced fraction) or "not_number"."""
    numbers = _NUMBER_IN_TEXT.findall(text)
    if len(numbers) > 1 and _SEPARATOR.search(text):
        return "several"
    if _DIGIT.search(text) and _OPERATOR.search(text):
        return "expression"
    return "not_number"


def restates(answer: str, problem: str) -> bool:
    """Whether an answer with an operator is one of the problem's own expressions (rule 3 of the module docstring):
    a `$...$`, `\\(...\\)` or `\\[...\\]` span of the problem, or an arithmetic expression written in it, compared
    with spaces, `$` and `\\left`/`\\right` ignored and a trailing "=" dropped."""
    if not problem or not _OPERATOR.search(answer):
        return False
    compact = _SPACES.sub("", answer).rstrip("=")
    spans = [next(g for g in m.groups() if g is not None) for m in _MATH_SPAN.finditer(problem)]
    return any(compact == _SPACES.sub("", span) for span in spans + problem_expressions(problem))


def gold_answer(solution) -> str | None:
    """The gold answer in a dataset's `solution` (or `answer`) value, or None when it is empty.

    Accepts a bare answer ("42", "\\frac12", "$0.5$"), a full worked solution ending in `\\boxed{...}` (MATH), or a
    gsm8k answer ending in "#### 72". Numbers are turned into strings.
    """
    text = "" if solution is None else str(solution).strip()
    if "\\boxed" in text:
        text = last_boxed(text) or ""
    elif "####" in text:
        text = text.rsplit("####", 1)[1]
    text = text.strip().strip("$").strip()
    return text or None
