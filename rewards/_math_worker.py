"""math-verify worker process, started by `selfdistill.rewards.math` (run as a script, never imported).

Protocol: it prints `ready` once math-verify is imported, then answers each stdin line `[gold, answer]` (JSON;
`answer` may be null) with one stdout line: "correct", "wrong", "no_answer", "bad_gold" or "error" (JSON).
math-verify's own SIGALRM timeouts are off (`parsing_timeout=None`, `timeout_seconds=None`): the parent bounds the
wall time of each request and kills this process when it overruns.
"""

import functools
import json
import logging
import os
import sys

from math_verify import parse, verify


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> list:
    # A group's rollouts share one gold and often repeat answers, so parsed forms are cached (never mutated).
    return parse("\\boxed{" + text + "}", parsing_timeout=None)


def judge(gold: str, answer: str | None) -> str:
    gold_parsed = _parse(gold)
    if not gold_parsed:
        return "bad_gold"
    if answer is None:
        return "no_answer"
    return "correct" if verify(gold_parsed, _parse(answer), timeout_seconds=None) else "wrong"


def main() -> None:
    # Replies go to a private copy of stdout; anything printed by sympy or math-verify goes to stderr instead.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    # math-verify warns once that its timeouts are off; that is deliberate here.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    replies.write(json.dumps("ready") + "\n")
    replies.flush()
    for line in sys.stdin:
        gold, answer = json.loads(line)
        try:
            status = judge(gold, answer)
        except Exception:  # math-verify raising on an odd expression counts as "not verified"
            status = "error"
        replies.write(json.dumps(status) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
