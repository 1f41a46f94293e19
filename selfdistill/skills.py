"""Tasks for continual-learning runs: a new skill written by a demonstration generator, an instruction-following
retention task, and general prompts for the KL-from-start forgetting measure. All offline, built in-project.

- `tool_calls`: requests to a toy API of three tools ("What is the weather in Paris, in celsius?"), each with a
  demonstration, the one JSON call that serves it: `{"name": "get_weather", "arguments": {"city": "Paris",
  "unit": "celsius"}}`. The prompt lists the tools' signatures but not the answer format, so a model learns the
  format from the demonstrations alone (no reward needed). Columns `prompt`, `demonstration`, `call` (the gold
  call, JSON); grade with the "tool_call" reward (`rewards/skills.py`).
- `instructions`: IFEval-style verifiable instructions (Zhou et al. 2023, "Instruction-Following Evaluation for
  Large Language Models", arXiv:2311.07911) attached to short writing requests, e.g. "Write a short paragraph about
  the ocean. Answer with less than 30 words." The instruction texts are IFEval's own (the checker's
  `build_description`, from the `if-verifiable` package), with the arguments drawn here. Columns `prompt`,
  `instruction_id_list`, `instruction_kwargs` (JSON); grade with the "instructions" reward.
- `general`: general-purpose prompts (advice, explanations, short writing) with no grader, on which
  `selfdistill.continual` measures the KL from the starting model to the current one.

Train and held-out problems are disjoint for every seed: a problem's split is a CRC32 of its text
(`tasks.split_of`), as for `arithmetic`.
"""

import json
import random

from datasets import Dataset

from .tasks import _prompt, split_of

CITIES = ("Paris", "Tokyo", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Oslo", "Dublin", "Cairo",
          "Lima", "Seoul", "Delhi", "Sydney", "Toronto", "Chicago", "Boston", "Denver", "Nairobi", "Athens", "Warsaw",
          "Helsinki", "Bangkok", "Istanbul", "Mumbai", "Santiago", "Havana", "Zurich", "Munich")
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD")
TOOLS_TEXT = ("Tools: get_weather(city, unit), convert_currency(amount, source, target), set_timer(minutes). "
              "Call the tool that serves this request: ")
WEATHER = ("What is the weather in {city}, in {unit}?", "How warm is it in {city} right now? Give me {unit}.",
           "Tell me the temperature in {city} in {unit}.", "I am flying to {city}. What's the weather there, in {unit}?")
CURRENCY = ("Convert {amount} {source} to {target}.", "How much is {amount} {source} in {target}?",
            "I have {amount} {source}. What is that in {target}?")
TIMER = ("Set a timer for {minutes} minutes.", "Remind me in {minutes} minutes.",
         "Start a {minutes} minute countdown.")


def _tool_request(rng: random.Random) -> tuple[str, dict]:
    """One request and the call that serves it."""
    tool = rng.choice(("get_weather", "convert_currency", "set_timer"))
    if tool == "get_weather":
        arguments = {"city": rng.choice(CITIES), "unit": rng.choice(("celsius", "fahrenheit"))}
        template = rng.choice(WEATHER)
    elif tool == "convert_currency":
        source, target = rng.sample(CURRENCIES, 2)
        arguments = {"amount": rng.randint(2, 500), "source": source, "target": target}
        template = rng.choice(CURRENCY)
    else:
        arguments = {"minutes": rng.randint(2, 90)}
        template = rng.choice(TIMER)
    return template.format(**arguments), {"name": tool, "arguments": arguments}


def tool_calls(n: int = 500, seed: int = 0, split: str = "train", chat: bool = True,
               system_prompt: str | None = None) -> Dataset:
    """`n` distinct tool requests with their demonstration (the JSON call, as `json.dumps` writes it) and gold `call`.

    The tool is drawn uniformly, then its arguments and wording, with a generator seeded by (split, seed), keeping the
    requests of the split not drawn before (about 240 weather, 45,000 currency and 270 timer requests in all).
    """
    rng = random.Random(f"tool_calls/{split}/{seed}")
    rows = {"prompt": [], "demonstration": [], "call": []}
    for request, call in _distinct(lambda: _tool_request(rng), n, split):
        rows["prompt"].append(_prompt(TOOLS_TEXT + request, chat, system_prompt))
        rows["demonstration"].append(json.dumps(call))
        rows["call"].append(json.dumps(call))
    return Dataset.from_dict(rows)


TOPICS = ("the ocean", "coffee", "a rainy day", "learning to swim", "city parks", "winter", "bicycles", "friendship",
          "the moon", "gardening", "music", "trains", "libraries", "breakfast", "mountains", "cats", "recycling",
          "a birthday party", "the desert", "honey bees", "volcanoes", "board games", "the night sky", "bread",
          "summer holidays", "forests", "rivers", "a lighthouse", "kites", "snow", "dogs", "the sun", "a market",
          "painting", "a long walk", "owls", "apples", "a train station", "the wind", "tea")
REQUESTS = ("Write a short paragraph about {topic}.", "Describe {topic} to a friend.", "Tell me something about {topic}.",
            "Write a few sentences about {topic}.", "What do you like about {topic}?", "Write a short note about {topic}.")
KEYWORDS = ("blue", "happy", "light", "water", "green", "small", "morning", "family")
END_PHRASES = ("Any other questions?", "Is there anything else I can help with?")
# The IFEval instructions the task draws from, with the arguments each is given (None: the checker takes none).
# Left out: those whose checkers need NLTK data (sentence counts) or rely on langdetect for short texts only (the
# case checkers do too, but on a whole response).
INSTRUCTION_ARGUMENTS = {
    "keywords:existence": lambda rng: {"keywords": [rng.choice(KEYWORDS)]},
    "length_constraints:number_words": lambda rng: {"num_words": rng.choice((20, 30, 40)), "relation": "less than"},
    "detectable_format:number_bullet_lists": lambda rng: {"num_bullets": rng.choice((2, 3, 4))},
    "change_case:english_lowercase": lambda rng: None,
    "change_case:english_capital": lambda rng: None,
    "punctuation:no_comma": lambda rng: None,
    "startend:end_checker": lambda rng: {"end_phrase": rng.choice(END_PHRASES)},
    "detectable_format:title": lambda rng: None,
    "startend:quotation": lambda rng: None,
    "detectable_content:postscript": lambda rng: {"postscript_marker": "P.S."},
}


def instruction_checker(instruction_id: str, kwargs: dict | None):
    """IFEval's checker for `instruction_id`, built with `kwargs` (`if-verifiable`'s copy of the IFEval registry)."""
    try:
        from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT
    except ImportError as error:
        raise ImportError("the instructions task needs `pip install if-verifiable`") from error
    if instruction_id not in INSTRUCTION_DICT:
        raise ValueError(f"unknown IFEval instruction {instruction_id!r}")
    checker = INSTRUCTION_DICT[instruction_id](instruction_id)
    description = checker.build_description(**(kwargs or {}))
    return checker, description


def instructions(n: int = 200, seed: int = 0, split: str = "test", chat: bool = True,
                 system_prompt: str | None = None, instruction_ids: list[str] | None = None) -> Dataset:
    """`n` writing requests, each with one verifiable IFEval instruction (`instruction_ids`, default all of
    `INSTRUCTION_ARGUMENTS`, drawn uniformly) in IFEval's own words, e.g. "Tell me something about kites. Your
    answer must contain exactly 3 bullet points. Use the markdown bullet points such as: ...".

    Distinct problems are drawn from the split's share of (request, topic, instruction, arguments), with a generator
    seeded by (split, seed); about 5,000 prompts in all, 500 of them held out.
    """
    ids = list(instruction_ids or INSTRUCTION_ARGUMENTS)
    unknown = [i for i in ids if i not in INSTRUCTION_ARGUMENTS]
    if unknown:
        raise ValueError(f"unknown instruction ids {unknown}; choose from {sorted(INSTRUCTION_ARGUMENTS)}")
    rng = random.Random(f"instructions/{split}/{seed}")

    def draw():
        instruction_id = rng.choice(ids)
        kwargs = INSTRUCTION_ARGUMENTS[instruction_id](rng)
        request = rng.choice(REQUESTS).format(topic=rng.choice(TOPICS))
        return f"{request} {instruction_checker(instruction_id, kwargs)[1]}", (instruction_id, kwargs)

    rows = {"prompt": [], "instruction_id_list": [], "instruction_kwargs": []}
    for text, (instruction_id, kwargs) in _distinct(draw, n, split):
        rows["prompt"].append(_prompt(text, chat, system_prompt))
        rows["instruction_id_list"].append([instruction_id])
        rows["instruction_kwargs"].append(json.dumps([kwargs or {}]))
    return Dataset.from_dict(rows)


GENERAL_PROMPTS = (
    "Give me three tips for staying healthy.", "Explain why the sky is blue.", "What is a good name for a pet fish?",
    "How do I make a cup of tea?", "Write a haiku about autumn.", "What are the planets of the solar system?",
    "Why do we need sleep?", "Suggest a fun activity for a rainy afternoon.", "What is photosynthesis?",
    "How can I learn a new language faster?", "Describe a typical breakfast in France.", "What is a prime number?",
    "Write a short thank-you note to a teacher.", "How does a bicycle work?", "What should I pack for a beach trip?",
    "Explain what a computer program is.", "Why are forests important?", "Tell me a joke about cats.",
    "How do airplanes stay in the air?", "What is the difference between weather and climate?",
    "Give me a simple recipe for pancakes.", "What makes a good friend?", "How do I save money each month?",
    "Explain how rain forms.", "What is the capital of Japan, and what is it known for?",
    "Write two sentences about the moon.", "How do bees make honey?", "What is a healthy lunch?",
    "Why do leaves change color in the fall?", "How do I start running?", "What is gravity?",
    "Describe the smell of fresh bread.", "How can I be more productive at work?", "What is an atom?",
    "Write a short poem about the sea.", "What are some good habits for students?", "How do magnets work?",
    "What is the water cycle?", "Suggest a name for a bakery.", "Why is exercise good for the brain?",
)


def general(n: int | None = None, seed: int = 0, split: str = "test", chat: bool = True,
            system_prompt: str | None = None) -> Dataset:
    """General prompts (`GENERAL_PROMPTS`, 40, one "test" split) in order, the first `n`: the fixed prompt set of
    the KL-from-start measure. `seed` is unused (no sampling)."""
    del seed
    if _checked(split) != "test":
        raise ValueError("the general prompts have only a 'test' split")
    return Dataset.from_dict({"prompt": [_prompt(p, chat, system_prompt) for p in GENERAL_PROMPTS[:n]]})


def _distinct(draw, n: int, split: str, patience: int = 20_000):
    """`n` distinct draws `(text, payload) = draw()` whose text falls in `split`; an error when the split seems to
    hold fewer (no new problem in `patience` draws in a row)."""
    split = _checked(split)
    seen, misses = set(), 0
    while len(seen) < n:
        text, payload = draw()
        if split_of(text) == split and text not in seen:
            seen.add(text)
            misses = 0
            yield text, payload
        elif (misses := misses + 1) > patience:
            raise ValueError(f"the {split!r} split holds fewer than {n} distinct problems ({len(seen)} found)")


def _checked(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split
