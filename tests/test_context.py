"""Teacher-context builders (`selfdistill.context`): pure functions, no models.

Expected strings are written out by hand from the SDPO paper code's templates (lasgroup/SDPO, the defaults of
`trl.experimental.sdpo.SDPOConfig`) and the SDFT paper's demonstration template, so a template edit fails here.
"""

import math

import pytest

from selfdistill.context import rewrite_prompt, strip_thinking, successful_sibling, teacher_prompt, teacher_prompts

QUESTION = "What is 2 + 3?"
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
CHAT = [SYSTEM, {"role": "user", "content": QUESTION}]

SOLUTION_BLOCK = "\nCorrect solution:\n\n{}\n\n"
FEEDBACK_BLOCK = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{}\n\n"
REPROMPT_TAIL = "\n\nCorrectly solve the original question.\n"


def reprompt(solution=None, feedback=None, prompt=QUESTION):
    """The SDPO reprompt, assembled by hand: prompt, solution block, feedback block, instruction."""
    return (
        prompt
        + (SOLUTION_BLOCK.format(solution) if solution else "")
        + (FEEDBACK_BLOCK.format(feedback) if feedback else "")
        + REPROMPT_TAIL
    )


# ---------------------------------------------------------------------------------------------------------------------
# rewrite_prompt


def test_rewrite_plain_prompt():
    assert rewrite_prompt("abc", str.upper) == "ABC"


def test_rewrite_chat_keeps_earlier_messages_and_rewrites_the_last_user_message():
    chat = [SYSTEM, {"role": "user", "content": "first"}, {"role": "assistant", "content": "reply"},
            {"role": "user", "content": "last", "name": "u1"}]
    out = rewrite_prompt(chat, str.upper)
    assert out[:3] == chat[:3]
    assert out[3] == {"role": "user", "content": "LAST", "name": "u1"}  # other keys of the message survive
    assert chat[3]["content"] == "last"  # the dataset's prompt is not mutated


def test_rewrite_chat_with_content_parts_uses_their_text():
    parts = [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text", "text": "b"}]
    chat = [{"role": "user", "content": parts}]
    assert rewrite_prompt(chat, lambda text: f"<{text}>")[-1]["content"] == "<ab>"


@pytest.mark.parametrize("chat", [[SYSTEM, {"role": "assistant", "content": "prefill"}], [SYSTEM], []])
def test_rewrite_chat_not_ending_with_a_user_message_raises(chat):
    with pytest.raises(ValueError, match="must end with a user message"):
        rewrite_prompt(chat, str.upper)


# ---------------------------------------------------------------------------------------------------------------------
# successful_sibling


def test_sibling_is_never_the_rollout_itself():
    rewards = [0.0, 1.0, 0.0, 0.0]
    assert successful_sibling(rewards, 1, group_size=4, threshold=1.0) is None  # only itself succeeded
    assert all(successful_sibling(rewards, i, group_size=4, threshold=1.0) == 1 for i in (0, 2, 3))


def test_sibling_respects_the_threshold():
    rewards = [0.0, 0.99, 1.0, 0.5]
    assert successful_sibling(rewards, 0, group_size=4, threshold=1.0) == 2  # 0.99 is below, 1.0 is at it
    assert successful_sibling(rewards, 0, group_size=4, threshold=0.5) == 1  # the first one at or above wins
    assert successful_sibling(rewards, 0, group_size=4, threshold=1.5) is None


def test_sibling_stays_inside_its_group():
    rewards = [0.0, 0.0, 1.0, 1.0]  # groups {0, 1} and {2, 3}
    assert successful_sibling(rewards, 0, group_size=2, threshold=1.0) is None
    assert successful_sibling(rewards, 1, group_size=2, threshold=1.0) is None
    assert successful_sibling(rewards, 2, group_size=2, threshold=1.0) == 3


def test_nan_reward_never_counts_as_success():
    rewards = [0.0, math.nan, math.nan, 1.0]
    assert successful_sibling(rewards, 0, group_size=4, threshold=1.0) == 3
    # Even a threshold of -inf, which every real reward meets, must skip NaN (unscorable) rollouts.
    assert successful_sibling([0.0, math.nan, 1.0], 0, group_size=3, threshold=-math.inf) == 2
    assert successful_sibling([math.nan, math.nan], 0, group_size=2, threshold=-math.inf) is None


# ---------------------------------------------------------------------------------------------------------------------
# teacher_prompt: one rollout


def test_feedback_only():
    assert teacher_prompt(QUESTION, feedback="The answer is 5.") == (
        "What is 2 + 3?\nThe following is feedback from your unsuccessful earlier attempt:\n\nThe answer is 5.\n\n"
        "\n\nCorrectly solve the original question.\n"
    )


def test_solution_only_from_the_dataset():
    assert teacher_prompt(QUESTION, solution="2 + 3 = 5") == (
        "What is 2 + 3?\nCorrect solution:\n\n2 + 3 = 5\n\n\n\nCorrectly solve the original question.\n"
    )


def test_sibling_and_feedback():
    assert teacher_prompt(QUESTION, sibling="It is 5.", feedback="Wrong: you said 6.") == (
        "What is 2 + 3?\nCorrect solution:\n\nIt is 5.\n\n\n"
        "The following is feedback from your unsuccessful earlier attempt:\n\nWrong: you said 6.\n\n"
        "\n\nCorrectly solve the original question.\n"
    )


def test_sibling_is_shown_before_the_dataset_solution():
    assert teacher_prompt(QUESTION, sibling="sibling text", solution="dataset text") == reprompt("sibling text")


def test_templates_equal_trl_sdpo_defaults():
    """The same strings as `trl.experimental.sdpo` (so the side-by-side comparison with TRL is like for like)."""
    from dataclasses import fields

    from trl.experimental.sdpo import SDPOConfig

    from selfdistill.context import Templates

    trl = {f.name: f.default for f in fields(SDPOConfig)}
    ours = Templates()
    assert (ours.reprompt, ours.solution, ours.feedback) == (
        trl["reprompt_template"], trl["solution_template"], trl["feedback_template"]
    )


def test_demonstration_uses_the_sdft_template_and_ignores_the_rest():
    expected = (
        "What is 2 + 3?\n\nThis is an example for a response to the question:\n2 + 3 = 5\n\n"
        "Now answer with a response of your own, including the thinking process."
    )
    assert teacher_prompt(QUESTION, demonstration="2 + 3 = 5") == expected
    assert teacher_prompt(QUESTION, demonstration="2 + 3 = 5", feedback="f", solution="s", sibling="x") == expected


def test_chat_prompt_rewrites_only_the_last_user_message():
    out = teacher_prompt(CHAT, feedback="The answer is 5.")
    assert out == [SYSTEM, {"role": "user", "content": reprompt(feedback="The answer is 5.")}]


def test_no_context_gives_none():
    assert teacher_prompt(QUESTION) is None
    assert teacher_prompt(CHAT, feedback="", sibling="", solution=None, demonstration="") is None


# ---------------------------------------------------------------------------------------------------------------------
# teacher_prompts: a whole batch of groups


def build(prompts, completions, rewards, feedbacks=None, columns=None, *, group_size, sources, threshold=1.0,
          remove_thinking=True):
    return teacher_prompts(
        prompts, completions, rewards, feedbacks or [None] * len(prompts), columns or {},
        group_size=group_size, sources=tuple(sources), success_threshold=threshold, remove_thinking=remove_thinking,
    )


def test_batch_sibling_and_feedback_per_rollout():
    prompts = ["Q1"] * 3 + ["Q2"] * 3
    completions = ["a0", "a1", "a2", "b0", "b1", "b2"]
    rewards = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    feedbacks = ["f0", None, "f2", "g0", None, None]
    out = build(prompts, completions, rewards, feedbacks, group_size=3, sources=("feedback", "sibling"))
    assert out == [
        reprompt("a1", "f0", prompt="Q1"),
        None,  # the only success: no other sibling succeeded, and it got no feedback
        reprompt("a1", "f2", prompt="Q1"),
        reprompt(None, "g0", prompt="Q2"),
        None,
        None,
    ]


def test_batch_sources_select_what_is_shown():
    prompts, completions, rewards = ["Q"] * 2, ["c0", "c1"], [1.0, 0.0]
    feedbacks, columns = ["fb", "fb"], {"solution": ["sol", "sol"]}
    only_feedback = build(prompts, completions, rewards, feedbacks, columns, group_size=2, sources=("feedback",))
    assert only_feedback == [reprompt(None, "fb", prompt="Q")] * 2
    only_sibling = build(prompts, completions, rewards, feedbacks, columns, group_size=2, sources=("sibling",))
    assert only_sibling == [None, reprompt("c0", prompt="Q")]
    only_solution = build(prompts, completions, rewards, feedbacks, columns, group_size=2, sources=("solution",))
    assert only_solution == [reprompt("sol", prompt="Q")] * 2


def test_batch_nan_rewards_are_not_successes():
    out = build(["Q"] * 3, ["c0", "c1", "c2"], [math.nan, math.nan, 0.0], group_size=3, sources=("sibling",),
                threshold=-math.inf)
    assert out == [reprompt("c2", prompt="Q"), reprompt("c2", prompt="Q"), None]


THINKING = "<think>\nsecret plan\n</think>\nThe answer is 5."


def test_batch_strips_thinking_from_a_shown_sibling():
    out = build(["Q"] * 2, [THINKING, "wrong"], [1.0, 0.0], group_size=2, sources=("sibling",))
    assert out[1] == reprompt("The answer is 5.", prompt="Q")


def test_batch_keeps_thinking_when_asked():
    out = build(["Q"] * 2, [THINKING, "wrong"], [1.0, 0.0], group_size=2, sources=("sibling",), remove_thinking=False)
    assert out[1] == reprompt(THINKING, prompt="Q")


def test_strip_thinking_removes_every_block():
    assert strip_thinking("<think>a</think> x <think>\nb\n</think> y ") == "x  y"
    assert strip_thinking("no thinking") == "no thinking"


def test_batch_without_any_context_is_all_none():
    out = build([CHAT] * 4, ["c"] * 4, [0.0] * 4, ["ignored"] * 4, group_size=2, sources=("sibling",))
    assert out == [None] * 4


def test_batch_demonstration_column():
    out = build(["Q"] * 2, ["c0", "c1"], [1.0, 1.0], ["fb", None], {"demonstration": ["d0", "d1"]}, group_size=2,
                sources=("demonstration",))
    template = (
        "Q\n\nThis is an example for a response to the question:\n{}\n\n"
        "Now answer with a response of your own, including the thinking process."
    )
    assert out == [template.format("d0"), template.format("d1")]


def test_batch_privileged_context_is_shown_like_feedback_after_the_rollout_feedback():
    columns = {"privileged_context": ["the answer is 5", None]}
    both = build(["Q"] * 2, ["c0", "c1"], [0.0, 0.0], ["you said 6", None], columns, group_size=2,
                 sources=("feedback", "privileged_context"))
    assert both == [reprompt(None, "you said 6\nthe answer is 5", prompt="Q"), None]
    column_only = build(["Q"] * 2, ["c0", "c1"], [0.0, 0.0], ["you said 6", None], columns, group_size=2,
                        sources=("privileged_context",))
    assert column_only == [reprompt(None, "the answer is 5", prompt="Q"), None]


def test_unknown_source_raises():
    with pytest.raises(ValueError, match="Unknown teacher-context sources"):
        build(["Q"], ["c"], [0.0], group_size=1, sources=("feedback", "oracle"))


def test_context_leakage_counts_phrases_only_the_teacher_saw():
    from selfdistill.context import context_leakage

    completions = [
        "17 + 25 = 42.",
        "The correct answer is 42.",  # from the feedback "the correct answer is 42"
        "Sure. Correctly solve the original question: 42",  # from the reprompt template
        "What is 17 + 25? It is 42.",  # repeats the student's own prompt: not a leak
    ]
    leakage = context_leakage(completions, ["What is 17 + 25? It is"],
                              ["your final answer 32 is incorrect; the correct answer is 42", None])
    assert leakage == 2 / 4
    assert context_leakage([], ["q"], [None]) == 0.0
    # A phrase the student's prompt already holds is the student's own, even if a template has it too.
    assert context_leakage(["correctly solve the original question"], ["Correctly solve the original question"], []) == 0
