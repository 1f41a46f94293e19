"""The continual-learning tasks (`selfdistill/skills.py`) and their graders (`rewards/skills.py`), on fixed strings:
good answers pass, bad and hostile ones (empty, huge, restated instruction or question, several candidates) fail."""

import json

import pytest

from selfdistill.rewards import FEEDBACK_KEY, ToolCallMatch, get_reward
from selfdistill.rewards.skills import parse_call, restates, same_json
from selfdistill.skills import (CURRENCY, GENERAL_PROMPTS, INSTRUCTION_ARGUMENTS, TIMER, TOOLS_TEXT, WEATHER,
                               instruction_checker)
from selfdistill.tasks import load_task

TEMPLATES = {"get_weather": WEATHER, "convert_currency": CURRENCY, "set_timer": TIMER}
GOLD = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}


def _question(prompt) -> str:
    return prompt[-1]["content"]


def test_tool_calls_are_seeded_disjoint_and_their_demonstrations_are_the_gold_calls():
    train, again, test = (load_task("tool_calls", split=s, n=200, seed=0) for s in ("train", "train", "test"))
    assert train[:] == again[:] and train[:] != load_task("tool_calls", split="train", n=200, seed=1)[:]
    assert not {_question(p) for p in train["prompt"]} & {_question(p) for p in test["prompt"]}
    assert len({_question(p) for p in train["prompt"]}) == 200  # distinct problems
    assert ToolCallMatch()(completions=train["demonstration"], call=train["call"]) == [1.0] * 200
    for prompt, call in zip(train["prompt"], train["call"]):
        call = json.loads(call)
        request = _question(prompt).removeprefix(TOOLS_TEXT)
        assert request in {t.format(**call["arguments"]) for t in TEMPLATES[call["name"]]}  # the call serves it


def test_instruction_prompts_use_ifeval_wording_and_the_split_is_disjoint():
    test = load_task("instructions", split="test", n=100, seed=0)
    train = load_task("instructions", split="train", n=100, seed=0)
    assert not {_question(p) for p in train["prompt"]} & {_question(p) for p in test["prompt"]}
    assert {ids[0] for ids in test["instruction_id_list"]} == set(INSTRUCTION_ARGUMENTS)
    for prompt, ids, kwargs in zip(test["prompt"], test["instruction_id_list"], test["instruction_kwargs"]):
        assert _question(prompt).endswith(instruction_checker(ids[0], json.loads(kwargs)[0])[1])
    only = load_task("instructions", n=20, instruction_ids=["punctuation:no_comma"])
    assert {ids[0] for ids in only["instruction_id_list"]} == {"punctuation:no_comma"}
    with pytest.raises(ValueError, match="unknown instruction"):
        load_task("instructions", n=2, instruction_ids=["language:response_language"])
    with pytest.raises(ValueError, match="fewer than 10000 distinct"):
        load_task("instructions", n=10_000)
    assert [_question(p) for p in load_task("general")["prompt"]] == list(GENERAL_PROMPTS)


def _call_score(text: str, gold=GOLD, **options) -> tuple[float, list[str]]:
    slot = []
    score = ToolCallMatch(**options)(completions=[text], call=[json.dumps(gold)], **{FEEDBACK_KEY: [slot]})[0]
    return score, slot


@pytest.mark.parametrize("text", [
    json.dumps(GOLD), "  " + json.dumps(GOLD, indent=2) + "\n", "```json\n" + json.dumps(GOLD) + "\n```",
    '{"arguments": {"unit": "celsius", "city": "Paris"}, "name": "get_weather"}',  # key order is free
])
def test_tool_call_grader_passes_the_gold_call(text):
    assert _call_score(text) == (1.0, [])


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("   \n", "empty"),
    ('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' + " " * 5000 + "x", "over the limit"),
    ("What is the weather in Paris, in celsius?", "not exactly one JSON object"),  # the question restated
    ("Tools: get_weather(city, unit). Call the tool that serves this request: What is the weather in Paris?",
     "not exactly one JSON object"),
    ("Sure! " + json.dumps(GOLD), "not exactly one JSON object"),
    (json.dumps(GOLD) + " Hope this helps.", "not exactly one JSON object"),
    (json.dumps(GOLD) + "\n" + json.dumps(GOLD), "not exactly one JSON object"),  # two candidates
    (json.dumps([GOLD, {"name": "set_timer", "arguments": {"minutes": 5}}]), "exactly the keys"),
    ('{"name": "set_timer", "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
     "duplicate keys"),  # json.loads would keep the last name
    ('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}, "extra": 1}', "exactly the keys"),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', "wrong arguments"),
    ('{"name": "get_weather", "arguments": {"city": "paris", "unit": "celsius"}}', "wrong arguments"),
    ('{"name": "set_timer", "arguments": {"city": "Paris", "unit": "celsius"}}', "wrong tool"),
    ('{"name": "get_weather", "arguments": "city=Paris, unit=celsius"}', "must be a string and"),
    ("[" * 50_000 + "]" * 50_000, "over the limit"),
])
def test_tool_call_grader_fails_bad_and_hostile_answers(text, why):
    score, feedback = _call_score(text)
    assert score == 0.0 and len(feedback) == 1 and why in feedback[0], feedback


def test_tool_call_grader_compares_json_types():
    timer = {"name": "set_timer", "arguments": {"minutes": 25}}
    assert _call_score('{"name": "set_timer", "arguments": {"minutes": 25.0}}', timer)[0] == 1.0  # one JSON number
    assert _call_score('{"name": "set_timer", "arguments": {"minutes": "25"}}', timer)[0] == 0.0
    assert not same_json(True, 1) and not same_json(1, True) and not same_json([1], [1, 1]) and same_json({}, {})
    assert parse_call("[" * 50_000 + "]" * 50_000, max_chars=10**6)[1] == "the response is not exactly one JSON object"


def _if_score(text: str, instruction_id: str, kwargs: dict | None = None, **options) -> tuple[float, list[str]]:
    slot = []
    reward = get_reward("instructions", **options)
    score = reward(completions=[text], instruction_id_list=[[instruction_id]],
                   instruction_kwargs=[json.dumps([kwargs or {}])], **{FEEDBACK_KEY: [slot]})[0]
    return score, slot


CASES = [  # (instruction, kwargs, a response that follows it, one that does not)
    ("change_case:english_lowercase", None, "the ocean is wide and deep and full of life.",
     "The ocean is wide and deep and full of life."),
    ("change_case:english_capital", None, "THE OCEAN IS WIDE AND DEEP AND FULL OF LIFE.",
     "THE OCEAN IS WIDE and deep AND FULL OF LIFE."),
    ("keywords:existence", {"keywords": ["blue"]}, "The sky over the bay was blue all day long.",
     "The sky over the bay was grey all day long."),
    ("length_constraints:number_words", {"num_words": 20, "relation": "less than"},
     "Coffee is a warm drink that many people enjoy in the morning.",
     " ".join(["Coffee is a warm drink that many people enjoy."] * 4)),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "Trains:\n* They are fast and safe.\n* They carry many people.\n* They run on rails.",
     "Trains:\n* They are fast and safe.\n* They carry many people."),
    ("punctuation:no_comma", None, "Bread is made from flour and water and salt.",
     "Bread is made from flour, water and salt."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Kites fly best on a windy day in an open field. Any other questions?",
     "Any other questions? Kites fly best on a windy day in an open field."),
    ("detectable_format:title", None, "<<A day at sea>>\nThe waves were calm and the sun was out.",
     "A day at sea. The waves were calm and the sun was out."),
    ("startend:quotation", None, '"The moon is bright tonight over the hills."',
     'The moon is "bright" tonight over the hills.'),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Honey bees live in large colonies.\n\nP.S. They dance to share where flowers are.",
     "Honey bees live in large colonies and dance to share where flowers are."),
]


@pytest.mark.parametrize("instruction_id, kwargs, good, bad", CASES, ids=[c[0] for c in CASES])
def test_instruction_grader_on_good_and_bad_strings(instruction_id, kwargs, good, bad):
    assert _if_score(good, instruction_id, kwargs) == (1.0, [])
    score, feedback = _if_score(bad, instruction_id, kwargs)
    assert score == 0.0 and "not followed" in feedback[0]


def test_instruction_task_covers_the_cases():
    assert {c[0] for c in CASES} == set(INSTRUCTION_ARGUMENTS)


@pytest.mark.parametrize("text, instruction_id, kwargs, why", [
    ("", "punctuation:no_comma", None, "fewer than 5 prose words"),
    ("   \n\t", "change_case:english_lowercase", None, "fewer than 5 prose words"),
    ("ok.", "length_constraints:number_words", {"num_words": 20, "relation": "less than"}, "fewer than 5 prose words"),
    # The new skill's format taking over every answer (SmolLM2 after SFT on tool calls): no sentence written.
    ('{"name": "morning", "arguments": {"arguments": {"name": "morning"}}}', "keywords:existence",
     {"keywords": ["morning"]}, "fewer than 5 prose words"),
    ('{"name": "walk", "arguments": {"length": 1}}', "length_constraints:number_words",
     {"num_words": 30, "relation": "less than"}, "fewer than 5 prose words"),
    ("def blue():\n    return light_water[0] + green_small(x)", "keywords:existence", {"keywords": ["blue"]},
     "fewer than 5 prose words"),
    ("<think>the answer is short and has no comma", "punctuation:no_comma", None, "not followed"),  # never closed
    ("the sea " * 3000, "change_case:english_lowercase", None, "over the limit"),
    # The instruction restated: IFEval's own wording holds what the checker looks for.
    ("include keywords blue in the response.", "keywords:existence", {"keywords": ["blue"]}, "restates"),
    ("Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>.",
     "detectable_format:title", None, "restates"),
    ("* This is point 1. \n* This is point 2", "detectable_format:number_bullet_lists", {"num_bullets": 2},
     "restates"),
    ("at the end of your response, please explicitly add a postscript starting with p.s.",
     "detectable_content:postscript", {"postscript_marker": "P.S."}, "restates"),
    ("your entire response should be in english, and in all lowercase letters. no capital letters are allowed.",
     "change_case:english_lowercase", None, "restates"),
])
def test_instruction_grader_fails_hostile_answers(text, instruction_id, kwargs, why):
    score, feedback = _if_score(text, instruction_id, kwargs)
    assert score == 0.0 and why in feedback[0], feedback


def test_instruction_grader_is_deterministic_and_reads_its_options():
    text = "the river runs past the old mill and the green fields"
    assert {_if_score(text, "change_case:english_lowercase")[0] for _ in range(5)} == {1.0}
    assert _if_score("ok then.", "punctuation:no_comma", min_words=2)[0] == 1.0
    assert _if_score('"Yes (it is) blue; really: it is!"', "keywords:existence", {"keywords": ["blue"]})[0] == 1.0
    assert _if_score(text, "punctuation:no_comma", max_chars=20)[0] == 0.0
    assert restates("we include keywords blue in the text", "Include keywords ['blue'] in the response.")
    assert not restates("the sky is blue", "Include keywords ['blue'] in the response.")
