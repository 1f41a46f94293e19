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
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from pathlib import Path

from .answers import Answer, answer_problem_with_number, final_answer, gold_answer, number_values, restates
from .feedback import add_feedback, completion_text, problem_text

NO_ANSWER = "no final answer found (expected \\boxed{...})"
NO_NUMBER = "no final answer found (expected one number)"
_WORKER_SCRIPT = str(Path(__file__).with_name("_math_worker.py"))


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
        if not pairs:  # no process is started for nothing (numeric golds never need one)
            return []
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
    """Reward 1.0 when the completion's one final answer equals the gold answer, else 0.0; hardened against gaming.

    The final answer and the rules that make the grade hard to game are in `selfdistill.rewards.answers` (its
    docstring): one candidate only (several boxes or "42 or 43" are wrong); for a numeric gold, a number literal
    compared exactly (an expression such as "123 + 456" is wrong, whatever it evaluates to); for a symbolic gold, no
    verbatim restatement of the problem, then math-verify equivalence (`verify(gold, answer)`, gold first, in worker
    processes with a wall-clock budget per answer). The gold comes from the `solution` column (or `answer`), as a bare
    answer, a worked solution with `\\boxed{}` or a gsm8k "#### N" (`gold_answer`). Equivalent forms match: `0.5`,
    `1/2`, `\\frac12`; `1,234` and `1234`. A gold that is empty or does not parse gives None (TRL skips the row).
    The problem's text is the last user message of TRL's `prompts` argument.

    Feedback per rollout (None when correct), for the feedback channel and TRL's completions table (column
    `feedback_<name>`): "your final answer X is incorrect", "your answer 123 + 456 is an expression, not a number",
    "your answer gives several candidates (41, 42); give exactly one final answer", "your \\boxed{} is empty", ...;
    followed by "the correct answer is Y" when `reveal_solution=True`.

    `last_number=True` grades a completion that has neither a box nor an "Answer:" line by the one number it
    commits to (rule 4 of `answers`): a lenient reading for small models that answer in plain sentences, strict about
    several numbers. Use the same options for the training reward and the evaluation (the CLI's evaluations take the
    run's `reward_options`), for every method compared.

    Holds its own `MathVerifier` (started only when a symbolic gold needs it); call `close()` to stop it early.
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

    def __call__(self, completions, solution=None, answer=None, prompts=None, **kwargs) -> list[float | None]:
        golds = solution if solution is not None else answer
        if golds is None:
            raise ValueError(f"the {self.__name__} reward needs a `solution` (or `answer`) dataset column")
        golds = [gold_answer(g) for g in golds]
        problems = [problem_text(p) for p in prompts] if prompts is not None else [""] * len(golds)
        answers = [final_answer(completion_text(c), p, self.last_number) for c, p in zip(completions, problems)]
        statuses = [self._status(*row) for row in zip(golds, answers, problems, strict=True)]
        symbolic = [i for i, s in enumerate(statuses) if s == "verify"]
        verdicts = self.verifier.judge([(golds[i], answers[i].text) for i in symbolic])
        for i, status in zip(symbolic, verdicts, strict=True):
            statuses[i] = status

        rewards = [None if s == "bad_gold" else float(s == "correct") for s in statuses]
        feedback = [self._explain(*row) for row in zip(golds, answers, statuses, strict=True)]
        add_feedback(kwargs, feedback, log_column=f"feedback_{self.__name__}")
        return rewards

    def _status(self, gold: str | None, found: Answer, problem: str) -> str:
        """The verdict that needs no math-verify, or "verify" for a symbolic gold's well-formed answer."""
        if gold is None:
            return "bad_gold"
        if found.problem is not None:
            return found.problem
        if len(found.text) > self.max_answer_chars:
            return "too_long"
        gold_values = number_values(gold)
        if gold_values is not None:
            values = number_values(found.text)
            if values is None:
                return answer_problem_with_number(found.text)
            return "correct" if values & gold_values else "wrong"
        return "restated" if restates(found.text, problem) else "verify"

    def _explain(self, gold: str | None, found: Answer, status: str) -> str | None:
        """The feedback for one rollout; None when it is correct or skipped."""
        if status in ("correct", "bad_gold"):
            return None
        answer = None if found.text is None else _shorten(found.text)
        texts = {
            "no_answer": NO_NUMBER if self.last_number else NO_ANSWER,
            "empty_box": "your \\boxed{} is empty",
            "several": f"your answer gives several candidates ({answer}); give exactly one final answer",
            "restated": (f"your answer only restates the question's expression {answer} instead of evaluating it"
                         if found.problem == "restated" else
                         f"your answer {answer} restates the problem instead of solving it"),
            "too_long": f"your final answer is too long to check ({len(found.text or '')} characters)",
            "expression": f"your answer {answer} is an expression, not a number",
            "not_number": f"your answer {answer} is not a number",
            "timeout": f"your final answer {answer} could not be verified within {self.verifier.timeout_s:g} s",
        }
        # "wrong", or "error": math-verify could not make sense of it
        text = texts.get(status, f"your final answer {answer} is incorrect")
        if self.reveal_solution:
            text += f"; the correct answer is {_shorten(gold)}"
        return text

