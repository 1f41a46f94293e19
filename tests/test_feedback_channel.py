"""The feedback channel: rollout i's feedback lands on rollout i, under threads, asyncio and a real GRPOTrainer run."""

import asyncio
import glob
import hashlib
import os
import threading

import pandas as pd
import pytest

from selfdistill.rewards import (
    FEEDBACK_KEY,
    MathAccuracy,
    add_feedback,
    boxed_format,
    completion_text,
    final_answer,
    think_format,
    think_problem,
)
from selfdistill.tasks import arithmetic


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def echo_reward(completions, **kwargs):
    """Feedback that depends on the completion itself, so alignment can be checked row by row."""
    texts = [completion_text(c) for c in completions]
    add_feedback(kwargs, [f"echo {_digest(t)}" for t in texts], log_column="feedback_echo")
    return [float(len(t) % 2) for t in texts]


@pytest.fixture(scope="module")
def accuracy():
    reward = MathAccuracy(timeout_s=5)
    yield reward
    reward.close()


def test_add_feedback_fills_each_slot_with_its_own_text():
    slots = [[] for _ in range(4)]
    logged = []
    kwargs = {FEEDBACK_KEY: slots, "log_extra": lambda column, values: logged.append((column, values))}
    add_feedback(kwargs, ["a", None, "", "d"], log_column="feedback_x")
    add_feedback(kwargs, ["a2", "b2", None, None])  # a second reward appends to the same slots
    assert slots == [["a", "a2"], ["b2"], [], ["d"]]
    assert logged == [("feedback_x", ["a", None, "", "d"])]  # one value per rollout, None kept for alignment


def test_add_feedback_without_channel_is_a_no_op_and_checks_lengths():
    add_feedback({"trainer_state": None}, ["ignored"])  # plain GRPOTrainer: no slots, no log column asked
    with pytest.raises(ValueError):
        add_feedback({FEEDBACK_KEY: [[], []]}, ["only one"])


def test_every_rollout_gets_exactly_its_own_math_feedback(accuracy):
    answers = [str(k) for k in range(16)]
    completions = [[{"role": "assistant", "content": f"<think>guess</think> \\boxed{{{a}}}"}] for a in answers]
    slots = [[] for _ in answers]
    rewards = accuracy(completions, solution=["99"] * 16, **{FEEDBACK_KEY: slots})
    boxed_format(completions, **{FEEDBACK_KEY: slots})  # no feedback: every completion has a box
    think_format(completions, **{FEEDBACK_KEY: slots})  # no feedback: the structure is right
    assert rewards == [0.0] * 16
    assert slots == [[f"your final answer {a} is incorrect"] for a in answers]


def test_concurrent_threads_do_not_mix_feedback(accuracy):
    def worker(k, out):
        completions = [f"\\boxed{{{k * 100 + i}}}" for i in range(8)]
        slots = [[] for _ in completions]
        accuracy(completions, solution=["-1"] * 8, **{FEEDBACK_KEY: slots})
        out[k] = slots

    out = {}
    threads = [threading.Thread(target=worker, args=(k, out)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for k in range(8):
        assert out[k] == [[f"your final answer {k * 100 + i} is incorrect"] for i in range(8)]


def test_async_rewards_keep_feedback_per_call():
    async def async_reward(completions, **kwargs):
        await asyncio.sleep(0.01)  # interleave the calls
        add_feedback(kwargs, [f"async {c}" for c in completions])
        return [0.0] * len(completions)

    async def run_all():
        calls = [([f"c{k}-{i}" for i in range(4)], [[] for _ in range(4)]) for k in range(5)]
        await asyncio.gather(*(async_reward(c, **{FEEDBACK_KEY: s}) for c, s in calls))
        return calls

    for completions, slots in asyncio.run(run_all()):
        assert slots == [[f"async {c}"] for c in completions]


def test_plain_grpo_trainer_logs_aligned_feedback(student_dir, tokenizer, tmp_path):
    """Two steps of unmodified trl.GRPOTrainer with our rewards: the completions table keeps each feedback on its
    own row."""
    from trl import GRPOConfig, GRPOTrainer

    accuracy = MathAccuracy(timeout_s=5)
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=12,
        max_steps=2,
        logging_steps=1,
        log_completions=True,
        num_completions_to_print=0,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=student_dir,
        reward_funcs=[echo_reward, accuracy, think_format, boxed_format],
        args=args,
        train_dataset=arithmetic(16, seed=0, difficulty=2),
        processing_class=tokenizer,
    )
    try:
        trainer.train()

        # The in-memory table (last generation batch) ...
        logs = trainer._logs
        completions = [completion_text(c) for c in logs["completion"]]
        assert len(completions) == 8
        assert list(logs["extra"]["feedback_echo"]) == [f"echo {_digest(t)}" for t in completions]
        # the tiny model emits junk; each row's math feedback must be about that row's own answer
        for text, feedback in zip(completions, logs["extra"]["feedback_accuracy"], strict=True):
            answer = final_answer(text).text
            if answer is None:
                assert feedback in ("no final answer found (expected \\boxed{...})", "your \\boxed{} is empty")
            else:
                assert feedback is None or answer[:50] in feedback
        # ... and the parquet files TRL writes at each logging step.
        files = sorted(glob.glob(os.path.join(tmp_path, "completions", "*.parquet")))
        assert len(files) == 2
        for path in files:
            table = pd.read_parquet(path)
            texts = [completion_text(list(c)) for c in table["completion"]]
            assert list(table["feedback_echo"]) == [f"echo {_digest(t)}" for t in texts]
            assert list(table["feedback_think_format"]) == [think_problem(t) for t in texts]

        # The slot channel through TRL's own reward call, as the self-distillation trainer feeds it.
        prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(6)]
        outs = [[{"role": "assistant", "content": f"<think>t</think> \\boxed{{{i}}}"}] for i in range(6)]
        inputs = [{"prompt": p, "solution": "3", FEEDBACK_KEY: []} for p in prompts]
        rewards = trainer._calculate_rewards(inputs, prompts, outs, [[1, 2]] * 6)
        assert rewards[:, 1].tolist() == [float(i == 3) for i in range(6)]
        for i, example in enumerate(inputs):
            expected = [f"echo {_digest(completion_text(outs[i]))}"]
            expected += [] if i == 3 else [f"your final answer {i} is incorrect"]
            assert example[FEEDBACK_KEY] == expected
    finally:
        accuracy.close()
