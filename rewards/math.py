"""Math accuracy with math-verify, safe off the main thread and bounded in wall time.

math-verify bounds its own work with SIGALRM, which only works on the main thread; TRL may call rewards from other
threads (its async reward loop, user thread pools). So here math-verify runs with its timeouts off in a few worker
processes owned by the reward object (`rewards/_math_worker.py`), each answer gets a wall-clock budget, and a worker
that overruns it (e.g. on `\\frac{9^{9^{9^9}}}{1}`) is killed and replaced. Answers longer than `max_answer_chars`
are rejected without parsing.

The workers are plain subprocesses speaking JSON lines, not a `concurrent.futures.ProcessPoolExecutor`: on Python
3.11 an executor cannot kill one hung worker without private API, its "fork" start method is unsafe in a process
with threads (a trainer has many), and "spawn"/"forkserver" re-import the user's `__main__`, which re-runs a training
script that has no `if __name__ == "__main__"` guard.
"""

import json
import re
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from pathlib import Path

from .feedback import add_feedback, completion_text

NO_ANSWER = "no final answer found (expected \\boxed{...})"
_WORKER_SCRIPT = str(Path(__file__).with_name("_math_worker.py"))
_BOXED_TRIES = 8  # how many trailing \boxed occurrences to try; bounds the scan of a huge malformed completion
_MAX_BRACES = 10_000  # an answer with more braces than this counts as malformed
_BRACES = re.compile(r"[{}]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed `\\boxed{...}` in `text` (balanced braces), or None."""
    end = len(text)
    for _ in range(_BOXED_TRIES):
        start = text.rfind("\\boxed", 0, end)
        if start < 0:
            return None
        content = _braced(text, start + len("\\boxed"))
        if content is not None:
            return content
        end = start
    return None


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


def extract_answer(text: str, last_number: bool = False) -> str | None:
    """The final answer of a completion: the last `\\boxed{...}`, else the last "Answer: ..." line, else None.

    "Answer:" lines may carry markdown decoration ("**Final answer:** 42"); surrounding `$`, `*` and a trailing
    period are stripped. Line-by-line string tests, no backtracking regex, so a 1 MB completion is cheap.
    `last_number=True` adds a lenient last resort: the last number written anywhere ("17 + 25 = 32." gives "32"),
    with thousands separators "1,234" read as 1234. Small instruct models answer arithmetic in such plain sentences
    and almost never write `\\boxed{}`, so a strict grader scores every rollout 0 and GRPO gets no signal.
    """
    boxed = last_boxed(text)
    if boxed and boxed.strip():
        return boxed.strip()
    for line in reversed(text.splitlines()):
        head, colon, value = line.partition(":")
        if colon and head.strip(" \t*#>-_").lower() in ("answer", "final answer"):
            value = value.strip(" \t*$").rstrip(".").strip(" \t*$")
            if value:
                return value
    if last_number:
        numbers = _NUMBER.findall(text[-2000:].replace(",", ""))
        return numbers[-1] if numbers else None
    return None


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


def _shorten(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Worker:
    """One math-verify process and the request it is working on (`job`, with its `deadline`)."""

    def __init__(self, startup_timeout_s: float):
        # -P: the script's folder (which holds this package's `math.py`) must not shadow the stdlib on sys.path.
        self.proc = subprocess.Popen(
            [sys.executable, "-P", _WORKER_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.ready = False
        self.job: int | None = None
        self.deadline = time.monotonic() + startup_timeout_s

    def send(self, job: int, gold: str, answer: str | None, timeout_s: float) -> None:
        self.proc.stdin.write(json.dumps([gold, answer]) + "\n")
        self.proc.stdin.flush()
        self.job, self.deadline = job, time.monotonic() + timeout_s

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _kill_all(workers: list) -> None:
    for worker in workers:
        worker.kill()


class MathVerifier:
    """A small pool of math-verify processes with a wall-clock budget per answer.

    `judge(pairs)` takes `(gold, answer_or_None)` strings and returns one status per pair: "correct", "wrong",
    "no_answer", "bad_gold" (the gold did not parse), "error" (math-verify raised) or "timeout". Processes start on
    first use (about a second: sympy's import); an overrunning one is killed and replaced. Calls from several threads
    are serialised by a lock, and the processes end with this object (or with the interpreter).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, startup_timeout_s: float = 120.0):
        self.workers, self.timeout_s, self.startup_timeout_s = workers, timeout_s, startup_timeout_s
        self._pool: list[_Worker] = []
        self._lock = threading.Lock()
        self._finalizer = weakref.finalize(self, _kill_all, self._pool)

    def close(self) -> None:
        """Stop the worker processes (they restart on the next call)."""
        with self._lock:
            _kill_all(self._pool)
            self._pool.clear()

    def judge(self, pairs: list[tuple[str, str | None]]) -> list[str]:
        with self._lock:
            while len(self._pool) < self.workers:
                self._pool.append(_Worker(self.startup_timeout_s))
            return self._run(pairs)

    def _run(self, pairs: list[tuple[str, str | None]]) -> list[str]:
        statuses = ["timeout"] * len(pairs)
        todo = deque(range(len(pairs)))
        while True:
            for worker in self._pool:
                if worker.ready and worker.job is None and todo:
                    job = todo.popleft()
                    worker.send(job, *pairs[job], self.timeout_s)
            waiting = [w for w in self._pool if not w.ready or w.job is not None]
            if not todo and all(w.job is None for w in self._pool):
                return statuses
            timeout = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            readable, _, _ = select.select([w.proc.stdout for w in waiting], [], [], timeout)
            for worker in waiting:
                if worker.proc.stdout in readable:
                    self._receive(worker, statuses)
                elif time.monotonic() >= worker.deadline:
                    self._replace(worker, statuses, "timeout")

    def _receive(self, worker: _Worker, statuses: list[str]) -> None:
        # One request in flight per worker, so a readable pipe holds exactly one whole line.
        line = worker.proc.stdout.readline()
        if not line:
            if not worker.ready:
                raise RuntimeError("the math-verify worker exited while starting; its error is on stderr above")
            self._replace(worker, statuses, "error")
        elif not worker.ready:
            worker.ready = True
        else:
            statuses[worker.job] = json.loads(line)
            worker.job = None

    def _replace(self, worker: _Worker, statuses: list[str], status: str) -> None:
        if not worker.ready:
            raise RuntimeError(f"the math-verify worker did not start within {self.startup_timeout_s:g} s")
        statuses[worker.job] = status
        worker.kill()
        self._pool[self._pool.index(worker)] = _Worker(self.startup_timeout_s)


class MathAccuracy:
    """Reward 1.0 when the completion's final answer equals the gold answer under math-verify, else 0.0.

    The final answer is the last `\\boxed{...}`, else the last "Answer: ..." line (`extract_answer`). The gold comes
    from the `solution` column (or `answer`), as a bare answer, a worked solution with `\\boxed{}` or a gsm8k
    "#### N" (`gold_answer`); both are parsed as `\\boxed{...}` and compared with `verify(gold, answer)` (gold first).
    Equivalent forms match: `1/2`, `0.5`, `\\frac12`. A gold that is empty or does not parse gives None (TRL skips
    the row), not 0.

    Feedback per rollout (None when correct): "no final answer found (expected \\boxed{...})", "your final answer X
    is incorrect", "your final answer X could not be verified within T s", "your final answer is too long to check
    (N characters)", followed by "the correct answer is Y" when `reveal_solution=True`. It goes to the feedback
    channel and to TRL's completions table as column `feedback_<name>`.

    `last_number=True` grades the last number of a completion that has neither (`extract_answer`): a lenient
    option for small models that answer in plain text. Use the same options for the training reward and the
    evaluation (the CLI's held-out evaluation takes the run's `reward_options`), for every method compared.

    Holds its own `MathVerifier` (worker processes with a per-answer timeout); call `close()` to stop them early.
    """

    def __init__(
        self,
        reveal_solution: bool = False,
        timeout_s: float = 5.0,
        workers: int = 2,
        max_answer_chars: int = 1000,
        last_number: bool = False,
        name: str = "accuracy",
    ):
        self.__name__ = name  # TRL names a reward after its `__name__`
        self.reveal_solution = reveal_solution
        self.max_answer_chars = max_answer_chars
        self.last_number = last_number
        self.verifier = MathVerifier(workers=workers, timeout_s=timeout_s)

    def close(self) -> None:
        """Stop the math-verify worker processes now (they restart on the next call)."""
        self.verifier.close()

    def __call__(self, completions, solution=None, answer=None, **kwargs) -> list[float | None]:
        golds = solution if solution is not None else answer
        if golds is None:
            raise ValueError(f"the {self.__name__} reward needs a `solution` (or `answer`) dataset column")
        golds = [gold_answer(g) for g in golds]
        answers = [extract_answer(completion_text(c), self.last_number) for c in completions]
        too_long = [a is not None and len(a) > self.max_answer_chars for a in answers]
        asked = [i for i, g in enumerate(golds) if g is not None]
        statuses = ["bad_gold"] * len(golds)
        verdicts = self.verifier.judge([(golds[i], None if too_long[i] else answers[i]) for i in asked])
        for i, status in zip(asked, verdicts, strict=True):
            statuses[i] = status

        rewards = [None if s == "bad_gold" else float(s == "correct") for s in statuses]
        feedback = [self._explain(*row) for row in zip(golds, answers, too_long, statuses, strict=True)]
        add_feedback(kwargs, feedback, log_column=f"feedback_{self.__name__}")
        return rewards

    def _explain(self, gold: str | None, answer: str | None, too_long: bool, status: str) -> str | None:
        """The feedback for one rollout; None when it is correct or skipped."""
        if status in ("correct", "bad_gold"):
            return None
        if too_long:
            text = f"your final answer is too long to check ({len(answer)} characters)"
        elif status == "no_answer":
            text = NO_ANSWER
        elif status == "timeout":
            limit = self.verifier.timeout_s
            text = f"your final answer {_shorten(answer)} could not be verified within {limit:g} s"
        else:  # "wrong", or "error": math-verify could not make sense of it
            text = f"your final answer {_shorten(answer)} is incorrect"
        if self.reveal_solution:
            text += f"; the correct answer is {_shorten(gold)}"
        return text
