"""SelfDistillTrainer on the tiny offline Qwen2 (fixtures in conftest.py).

What is checked, and how:
- alignment: the teacher scores exactly the student's completion token ids, after a prompt that decodes to the
  rewritten prompt and ends with the same generation prompt (ChatML, plain text, and a template with a think prefix);
- teacher log-probs equal a plain forward, log_softmax(logits / τ), gather, at τ ≠ 1;
- teacher kinds: the EMA teacher is the EMA of the recorded parameter trajectory, the base teacher never moves, the
  live teacher scores with the current weights; a resumed run restores the EMA teacher bit for bit;
- a batch with no teacher context trains with a finite loss and finite gradients and warns once;
- parity with `trl.experimental.sdpo.SDPOTrainer` on one fixed batch (top-k logits and sampled-token modes);
- the `mode` presets.
"""

import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from conftest import with_dense_advantages
from selfdistill.rewards import FEEDBACK_KEY
from selfdistill.teachers import TEACHER_FILE
from selfdistill.trainers.self_distill import PAPER_TEMPLATES, SelfDistillConfig, SelfDistillTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors and models: see conftest

TEMPERATURE = 0.7  # ≠ 1, so a log-prob taken at the wrong temperature shows
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
THINK_PREFIX = "<think>\n\n</think>\n\n"


def question(i: int) -> str:
    return f"What is {i} + 3?"


def dataset(kind: str = "chat", n: int = 2) -> Dataset:
    """`n` arithmetic prompts, chat (system + user) or plain text, with their answers in `solution`."""
    prompts = [question(i) if kind == "plain" else [SYSTEM, {"role": "user", "content": question(i)}] for i in range(n)]
    return Dataset.from_dict({"prompt": prompts, "solution": [str(i + 3) for i in range(n)]})


def wrong_with_feedback(completions, solution, **kwargs):
    """Reward 0 and feedback naming the answer, for every rollout: deterministic contexts whatever the model writes."""
    for slot, answer in zip(kwargs[FEEDBACK_KEY], solution, strict=True):
        slot.append(f"The correct answer is {answer}.")
    return [0.0] * len(completions)


def always_wrong(completions, **kwargs):
    """Reward 0 and no feedback: no rollout ever succeeds, so no sibling can be shown."""
    return [0.0] * len(completions)


def make_trainer(tmp_path, student_dir, reward_funcs=(wrong_with_feedback,), train_dataset=None, processing_class=None,
                 callbacks=None, **overrides):
    # bf16=False: GRPOConfig defaults to bf16 autocast; fp32 keeps the 1e-5 comparisons exact (and is faster on CPU).
    defaults = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_completion_length=8,
        temperature=TEMPERATURE, max_steps=1, learning_rate=1e-2, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
    )
    return SelfDistillTrainer(
        model=student_dir,
        reward_funcs=list(reward_funcs),
        args=SelfDistillConfig(**{**defaults, **overrides}),
        train_dataset=train_dataset if train_dataset is not None else dataset(),
        processing_class=processing_class,
        callbacks=callbacks,
    )


def record_teacher_calls(trainer) -> list:
    """Wrap `trainer.teacher.score` so every call's arguments and result are kept."""
    calls, score = [], trainer.teacher.score

    def recording(*args):
        scores = score(*args)
        calls.append((args, scores))
        return scores

    trainer.teacher.score = recording
    return calls


def one_batch(trainer):
    """One generation batch through the trainer's own dataloader and `_generate_and_score_completions`."""
    trainer.model.train()  # train mode: groups of `num_generations`, as during training
    inputs = next(iter(trainer.get_train_dataloader()))
    return inputs, with_dense_advantages(trainer, trainer._generate_and_score_completions(inputs))


def reference_logprobs(model, prompt_ids, completion_ids, temperature):
    """Independent teacher log-probs of one unpadded row: plain forward, log_softmax(logits / τ), gather."""
    with torch.no_grad():
        logits = model(torch.cat([prompt_ids, completion_ids])[None]).logits[0]
    logits = logits[len(prompt_ids) - 1 : -1]  # position P − 1 + t predicts completion token t
    return torch.log_softmax(logits / temperature, dim=-1).gather(-1, completion_ids[:, None]).squeeze(-1)


def rows(ids, mask):
    return [row[m.bool()] for row, m in zip(ids, mask)]


# ---------------------------------------------------------------------------------------------------------------------
# 1. The teacher scores the student's exact completion tokens.


def feedback_reprompt(i: int) -> str:
    """The `sdpo` preset's teacher prompt for question i with the feedback `wrong_with_feedback` gives it: the context
    first, the question last (the question-last templates of `selfdistill.context`)."""
    return f"Feedback on an earlier answer to the question below: The correct answer is {i + 3}.\n\n{question(i)}"


def chatml(user_text: str, generation_prefix: str = "") -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n{generation_prefix}"
    )


@pytest.mark.parametrize("kind", ["chat", "plain", "think"])
def test_teacher_scores_the_students_exact_completion_tokens(kind, tmp_path, tokenizer, student_dir):
    processing_class = None  # the trainer loads the student's tokenizer (the fixture's, saved with the model)
    if kind == "think":  # a template whose generation prompt opens an empty think block, like Qwen3's
        processing_class = AutoTokenizer.from_pretrained(student_dir)
        generation_prompt = "{{ '<|im_start|>assistant\n' }}"
        assert generation_prompt in processing_class.chat_template
        processing_class.chat_template = processing_class.chat_template.replace(
            generation_prompt, "{{ '<|im_start|>assistant\n" + THINK_PREFIX + "' }}"
        )
    trainer = make_trainer(tmp_path, student_dir, train_dataset=dataset("plain" if kind == "plain" else "chat"),
                           processing_class=processing_class)
    calls = record_teacher_calls(trainer)
    inputs, batch = one_batch(trainer)

    assert len(calls) == 1
    (prompt_ids, prompt_mask, completion_ids, completion_mask), _ = calls[0]
    assert torch.equal(completion_ids, batch["completion_ids"])
    assert torch.equal(completion_mask, batch["completion_mask"])

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    teacher_prompts = rows(prompt_ids, prompt_mask)
    student_prompts = rows(batch["prompt_ids"], batch["prompt_mask"])
    for example, teacher, student in zip(inputs, teacher_prompts, student_prompts, strict=True):
        i = int(example["solution"]) - 3
        if kind == "plain":
            assert tokenizer.decode(teacher) == feedback_reprompt(i)
            assert tokenizer.decode(student) == question(i)
            continue
        prefix = THINK_PREFIX if kind == "think" else ""
        assert tokenizer.decode(teacher) == chatml(feedback_reprompt(i), prefix)
        assert tokenizer.decode(student) == chatml(question(i), prefix)
        # Token-level: from the user turn's end on, teacher and student prompts are the same ids, so the completion
        # tokens follow the same context in both.
        teacher_tail = teacher[(teacher == im_end).nonzero().max() :]
        student_tail = student[(student == im_end).nonzero().max() :]
        assert torch.equal(teacher_tail, student_tail)
        assert tokenizer.decode(teacher_tail) == "<|im_end|>\n<|im_start|>assistant\n" + prefix


def test_teacher_logprobs_equal_a_plain_forward_at_the_sampling_temperature(tmp_path, student_dir):
    trainer = make_trainer(tmp_path, student_dir)  # sdpo preset: EMA teacher, so its copy and its head are used
    calls = record_teacher_calls(trainer)
    one_batch(trainer)
    (prompt_ids, prompt_mask, completion_ids, completion_mask), scores = calls[0]

    model = AutoModelForCausalLM.from_pretrained(student_dir)  # no step taken: the teacher still has these weights
    completions = rows(completion_ids, completion_mask)
    for row, (prompt, completion) in enumerate(zip(rows(prompt_ids, prompt_mask), completions, strict=True)):
        T = len(completion)
        expected = reference_logprobs(model, prompt, completion, TEMPERATURE)
        torch.testing.assert_close(scores.logp_BT[row, :T], expected, atol=1e-5, rtol=0)
        assert (scores.logp_BT[row, T:] == 0).all()
        # The check can see a temperature mistake: at τ = 1 the values are clearly different.
        at_one = reference_logprobs(model, prompt, completion, 1.0)
        assert not torch.allclose(scores.logp_BT[row, :T], at_one, atol=1e-2)


# ---------------------------------------------------------------------------------------------------------------------
# 2. Teacher kinds: EMA math, frozen base, live weights, resume.


def trainable(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


class RecordParameters(TrainerCallback):
    """The trainable parameters after every optimizer step."""

    def __init__(self):
        self.after_step = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append(trainable(model))


def test_ema_teacher_is_the_ema_of_the_parameter_trajectory(tmp_path, student_dir):
    rate, steps = 0.3, 3
    record = RecordParameters()
    trainer = make_trainer(tmp_path, student_dir, teacher="ema", teacher_update_rate=rate, max_steps=steps,
                           callbacks=[record])
    expected = trainable(trainer.model)
    trainer.train()

    assert len(record.after_step) == steps
    for params in record.after_step:  # θ_T ← (1 − r)·θ_T + r·θ after each step, from θ_T = θ_0
        expected = {name: (1 - rate) * value + rate * params[name] for name, value in expected.items()}
    assert trainer.teacher.state().keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(trainer.teacher.state()[name], value, atol=1e-6, rtol=0)
    # Not trivial: the teacher lags the student, which moved.
    final = record.after_step[-1]
    assert any(not torch.allclose(trainer.teacher.state()[n], final[n], atol=1e-4) for n in final)


def fixed_sequence(tokenizer):
    prompt = tokenizer("<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
    completion = tokenizer("The answer is \\boxed{3}.", return_tensors="pt")
    return prompt.input_ids, prompt.attention_mask, completion.input_ids, completion.attention_mask


def test_base_teacher_never_moves(tmp_path, tokenizer, student_dir):
    trainer = make_trainer(tmp_path, student_dir, teacher="base", max_steps=2)
    start = trainable(trainer.model)
    trainer.train()

    assert trainer.teacher.state().keys() == start.keys()
    assert all(torch.equal(trainer.teacher.state()[n], start[n]) for n in start)
    assert any(not torch.equal(p, start[n]) for n, p in trainable(trainer.model).items())  # the student did move
    prompt_ids, prompt_mask, completion_ids, completion_mask = fixed_sequence(tokenizer)
    scores = trainer.teacher.score(prompt_ids, prompt_mask, completion_ids, completion_mask)
    initial = AutoModelForCausalLM.from_pretrained(student_dir)
    expected = reference_logprobs(initial, prompt_ids[0], completion_ids[0], TEMPERATURE)
    torch.testing.assert_close(scores.logp_BT[0], expected, atol=1e-5, rtol=0)


def test_live_teacher_scores_with_the_current_weights(tmp_path, tokenizer, student_dir):
    trainer = make_trainer(tmp_path, student_dir, teacher="live", max_steps=1)
    assert trainer.teacher.state() is None
    trainer.train()

    prompt_ids, prompt_mask, completion_ids, completion_mask = fixed_sequence(tokenizer)
    scores = trainer.teacher.score(prompt_ids, prompt_mask, completion_ids, completion_mask)
    current = reference_logprobs(trainer.model, prompt_ids[0], completion_ids[0], TEMPERATURE)
    torch.testing.assert_close(scores.logp_BT[0], current, atol=1e-5, rtol=0)
    initial = reference_logprobs(AutoModelForCausalLM.from_pretrained(student_dir), prompt_ids[0], completion_ids[0],
                                 TEMPERATURE)
    assert not torch.allclose(scores.logp_BT[0], initial, atol=1e-3)  # one step at lr 1e-2 moved them


def test_teacher_identical_to_the_student_gives_zero_kl_under_bf16_autocast(tmp_path, student_dir):
    """GRPOConfig's default bf16=True runs the student's forward under autocast. A live teacher shown the student's
    own prompt must then reproduce the student's log-probs, or the precision gap enters every advantage as a
    spurious KL. Both sides project with the same fp32 chunked head (the student's log-probs for the advantage come
    from its loss forward's hidden states, not from GRPO's bf16 head), so no `cast_lm_head_to_fp32` is needed. Not
    bit-exact: the teacher runs a group's shared prompt once and its completions on the cached keys and values, which
    rounds differently in bf16 (measured KL 1.5e-5; 0 with one full forward per row)."""
    trainer = make_trainer(tmp_path, student_dir, teacher="live", objective="sampled_token", bf16=True)
    trainer._teacher_prompts = lambda inputs, batch: (
        batch["prompt_ids"], batch["prompt_mask"], torch.ones(len(batch["prompt_ids"]), dtype=torch.bool)
    )
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["distill/frac_with_teacher"] == 1
    assert abs(logs["distill/reverse_kl"]) < 1e-4
    assert abs(logs["distill/acceptance"] - 1) < 1e-4


class CopyTeacherOnSave(TrainerCallback):
    """The teacher's snapshot at each checkpoint, by step."""

    def __init__(self, teacher):
        self.teacher, self.saved = teacher, {}

    def on_save(self, args, state, control, **kwargs):
        self.saved[state.global_step] = {n: t.clone() for n, t in self.teacher.state().items()}


def test_resume_restores_the_ema_teacher_bit_exactly(tmp_path, student_dir):
    # 8 prompts, 2 per batch: all 4 steps lie in the first pass over the data. TRL's RepeatSampler draws each pass's
    # order from a generator seeded once, so a run resumed in a later pass replays the first pass's order instead.
    options = dict(teacher="ema", teacher_update_rate=0.3, max_steps=4, save_strategy="steps", save_steps=2,
                   train_dataset=dataset(n=8))
    first = make_trainer(tmp_path / "first", student_dir, **options)
    copies = CopyTeacherOnSave(first.teacher)
    first.add_callback(copies)
    first.train()
    checkpoint = tmp_path / "first" / "checkpoint-2"
    assert (checkpoint / TEACHER_FILE).exists()
    at_step_2 = copies.saved[2]

    resumed = make_trainer(tmp_path / "resumed", student_dir, **options)
    assert any(not torch.equal(resumed.teacher.state()[n], at_step_2[n]) for n in at_step_2)  # starts elsewhere
    loaded = {}
    load = resumed._load_optimizer_and_scheduler

    def load_and_copy(path):
        load(path)
        loaded.update({n: t.clone() for n, t in resumed.teacher.state().items()})

    resumed._load_optimizer_and_scheduler = load_and_copy
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert loaded.keys() == at_step_2.keys()
    assert all(torch.equal(loaded[n], at_step_2[n]) for n in at_step_2)
    # Resuming at step 2 and training to 4 gives the uninterrupted run's teacher: the checkpoint carries the RNG state
    # (so the same rollouts are sampled) and the data order is replayed.
    final = first.teacher.state()
    assert all(torch.equal(resumed.teacher.state()[n], final[n]) for n in final)


# ---------------------------------------------------------------------------------------------------------------------
# 3. A batch without any teacher context.


class RecordGradients(TrainerCallback):
    """Whether every gradient is finite, before each optimizer step."""

    def __init__(self):
        self.all_finite = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.all_finite.append(bool(grads) and all(torch.isfinite(g).all() for g in grads))


@pytest.mark.parametrize(
    "options",
    [
        dict(mode="sdft"),  # full-vocabulary KL(T‖S); the dataset has no demonstration column
        dict(mode="sdpo", context_sources=["sibling"]),  # top-k JSD with IS clip; no rollout ever succeeds
        dict(mode="sdpo", context_sources=["sibling"], objective="sampled_token"),
    ],
    ids=["sdft-no-demonstration", "sdpo-logits-no-success", "sdpo-sampled-no-success"],
)
def test_batch_without_context_trains_finitely_and_warns_once(options, tmp_path, student_dir):
    steps = 2
    grads = RecordGradients()
    trainer = make_trainer(tmp_path, student_dir, reward_funcs=[always_wrong], max_steps=steps, callbacks=[grads],
                           **options)
    with pytest.warns(UserWarning, match="no rollout") as caught:
        trainer.train()

    messages = [str(w.message) for w in caught if "no rollout" in str(w.message)]
    assert len(messages) == steps  # one per batch
    assert all(str(trainer.args.context_sources) in m for m in messages)  # says which sources gave nothing
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert grads.all_finite == [True] * steps
    assert [h["distill/frac_with_teacher"] for h in trainer.state.log_history if "loss" in h] == [0.0] * steps


# ---------------------------------------------------------------------------------------------------------------------
# 4. Parity with trl.experimental.sdpo.SDPOTrainer on one fixed batch.
#
# Both trainers get the same 8 rollouts (2 prompts x 4) from a stubbed `generate`, the same initial weights, and the
# same contexts: a successful sibling (SDPO's `use_successful_as_teacher`) plus the dataset's `privileged_context`
# (SDPO's `include_environment_feedback`). Every rollout has a context and every completion has the same length, so
# TRL's reduction (mean over tokens per sequence, then over sequences) and ours (mean over all tokens) coincide; with
# rows of different lengths or rows without context they differ by design.
#
# - top-k logits: SDPO `distillation_mode="topk_logits"` (topk, alpha, add_tail) is our objective "logits"
#   (distill_top_k, distill_beta, distill_add_tail); the loss values and the gradients must agree.
# - sampled token: SDPO's per-token loss is sg(logS − logT)·logS. Ours is GRPO's loss with advantages
#   A = −(logS − logT): −A·exp(logS − sg(logS)), whose value is mean(logS − logT) but whose gradient is
#   (logS − logT)·∇logS, the same as SDPO's. So the gradients must agree; the values differ by design.

ANSWER = "7"


def parity_dataset() -> Dataset:
    prompts = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "What is 5 + 2?"}]]
    return Dataset.from_dict(
        {"prompt": prompts, "solution": [ANSWER] * 2, "privileged_context": ["The answer is 7.", "It is 7."]}
    )


def contains_answer(completions, solution, **kwargs):
    return [float(s in c[0]["content"]) for c, s in zip(completions, solution, strict=True)]


def fixed_completions(tokenizer) -> torch.Tensor:
    """Four completions of one length (no EOS, so none is cut): the first in each group of 4 is correct."""
    texts = [f"<think>\n3 + 4 = {ANSWER}\n</think>\nThe answer is \\boxed{{{ANSWER}}}.", "The answer is 8.",
             "I think it is 9", "Answer: 12"]
    ids = [tokenizer(t).input_ids for t in texts]
    filler = tokenizer(".").input_ids
    assert len(filler) == 1
    length = max(map(len, ids))
    return torch.tensor([x + filler * (length - len(x)) for x in ids])


def stub_generate(model, completions: torch.Tensor) -> None:
    """`model.generate` returns the prompt followed by `completions[row % 4]`, whatever the sampling settings."""

    def generate(input_ids, **kwargs):
        return torch.cat([input_ids, completions[torch.arange(len(input_ids)) % len(completions)]], dim=1)

    model.generate = generate


def gradients(model, loss) -> dict:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("objective", ["logits", "sampled_token"])
def test_parity_with_trl_sdpo_trainer(objective, tmp_path, tokenizer, student_dir):
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    completions = fixed_completions(tokenizer)
    common = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=completions.shape[1],
                  temperature=TEMPERATURE, report_to="none", use_cpu=True, bf16=False, seed=0, disable_tqdm=True)
    top_k, beta = 20, 0.5
    if objective == "logits":
        trl_mode = dict(distillation_mode="topk_logits", distillation_topk=top_k, distillation_alpha=beta,
                        distillation_add_tail=True)
    else:
        trl_mode = dict(distillation_mode="sampled_token", distillation_alpha=1.0)
    theirs = SDPOTrainer(
        model=student_dir, reward_funcs=[contains_answer], train_dataset=parity_dataset(),
        args=SDPOConfig(output_dir=str(tmp_path / "trl"), teacher_model_kind="ema", distillation_weight=1.0,
                        include_environment_feedback=True, remove_thinking_from_demonstration=True,
                        **trl_mode, **common),
    )
    ours = SelfDistillTrainer(
        model=student_dir, reward_funcs=[contains_answer], train_dataset=parity_dataset(),
        args=SelfDistillConfig(output_dir=str(tmp_path / "ours"), mode="sdpo", objective=objective,
                               context_sources=["sibling", "privileged_context"], teacher="ema", policy_weight=0.0,
                               distill_top_k=top_k, distill_beta=beta, distill_add_tail=True,
                               **PAPER_TEMPLATES, **common),  # TRL's SDPO uses the paper's templates
    )
    calls = record_teacher_calls(ours)
    for trainer in (theirs, ours):
        stub_generate(trainer.model, completions)
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, read by both losses
        trainer.model.train()
    batch_theirs = theirs._prepare_inputs(next(iter(theirs.get_train_dataloader())))
    batch_ours = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))

    # Same contexts: TRL's teacher input is our teacher prompt followed by the same completion tokens.
    (prompt_ids, prompt_mask, completion_ids, completion_mask), _ = calls[0]
    assert torch.equal(batch_theirs["teacher_input_ids"], torch.cat([prompt_ids, completion_ids], dim=1))
    assert torch.equal(batch_theirs["teacher_attention_mask"], torch.cat([prompt_mask, completion_mask], dim=1))
    assert batch_theirs["self_distillation_mask"].all()
    assert completion_mask.all()  # equal lengths, see above
    shown = tokenizer.decode(prompt_ids[1][prompt_mask[1].bool()])  # a failed rollout: sibling 0 and the context
    assert "Correct solution:\n\nThe answer is \\boxed{7}." in shown and "The answer is 7." in shown

    loss_theirs = theirs.compute_loss(theirs.model, batch_theirs)
    loss_ours = ours.compute_loss(ours.model, batch_ours)
    grads_theirs, grads_ours = gradients(theirs.model, loss_theirs), gradients(ours.model, loss_ours)
    if objective == "logits":
        assert loss_theirs.item() > 1e-5  # not trivially zero: the contexts change the teacher
        torch.testing.assert_close(loss_ours, loss_theirs, atol=0, rtol=1e-4)  # relative: the loss itself is ~1e-4
    assert grads_ours.keys() == grads_theirs.keys()
    max_grad = max(g.abs().max().item() for g in grads_theirs.values())
    assert max_grad > 1e-4
    for name, grad in grads_theirs.items():
        torch.testing.assert_close(grads_ours[name], grad, atol=1e-5 * max_grad, rtol=0, msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# 5. Presets.


def preset(**fields) -> SelfDistillConfig:
    return SelfDistillConfig(output_dir="unused", report_to="none", use_cpu=True, **fields)


PRESET_FIELDS = ("num_generations", "context_sources", "teacher", "teacher_update_rate", "objective", "distill_beta", "distill_top_k",
                 "distill_add_tail", "distill_is_clip", "success_threshold", "kl_coef", "distill_loss_weight")
DOCUMENTED = {  # trainers/self_distill.py module docstring
    "sdpo": (8, ("feedback", "sibling"), "ema", 0.05, "logits", 0.5, 100, True, 2.0, 1.0, 0.0, 1.0),
    "sdft": (1, ("demonstration",), "ema", 0.01, "logits", 0.0, None, False, None, 1.0, 0.0, 1.0),
    "opsd": (8, ("solution",), "base", 0.0, "logits", 0.5, None, False, None, 1.0, 0.0, 1.0),
}


@pytest.mark.parametrize("mode", sorted(DOCUMENTED))
def test_preset_defaults(mode):
    config = preset(mode=mode)
    assert tuple(getattr(config, name) for name in PRESET_FIELDS) == DOCUMENTED[mode]


def test_explicit_fields_win_over_the_preset():
    config = preset(mode="sdpo", teacher="live", teacher_update_rate=0.2, distill_beta=0.0, distill_add_tail=False,
                    context_sources=["solution"], success_threshold=0.5)
    assert (config.teacher, config.teacher_update_rate, config.distill_beta, config.distill_add_tail,
            config.context_sources, config.success_threshold) == ("live", 0.2, 0.0, False, ("solution",), 0.5)
    off = preset(mode="sdpo", distill_top_k=0, distill_is_clip=0)  # 0 = off, since None means "take the preset"
    assert (off.distill_top_k, off.distill_is_clip) == (None, None)
    sampled = preset(mode="sdpo", objective="sampled_token")  # the objective picks the weights of the two terms
    assert (sampled.kl_coef, sampled.distill_loss_weight) == (1.0, 0.0)
    both = preset(mode="sdft", objective="sampled_token", distill_loss_weight=0.5, kl_coef=0.3)
    assert (both.kl_coef, both.distill_loss_weight) == (0.3, 0.5)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(mode="grpo"), "mode must be one of"),
        (dict(objective="full"), "objective must be"),
        (dict(context_sources=["feedback", "oracle"]), "context_sources must be among"),
        (dict(num_generations=0), "num_generations must be >= 1"),
        (dict(num_generations=1, context_sources=["sibling"]), "no sibling to show"),
    ],
)
def test_bad_settings_raise(fields, message):
    with pytest.raises(ValueError, match=message):
        preset(**fields)


def test_one_generation_passes_grpo_validation_only_for_that_check():
    config = preset(mode="sdft", per_device_train_batch_size=3)  # 3 prompts, one rollout each
    assert type(config.num_generations) is int and config.num_generations == 1
    assert config.generation_batch_size == 3
    with pytest.raises(ValueError, match="must be divisible by the number of generations"):  # GRPO's other checks run
        preset(mode="sdft", num_generations_eval=2, per_device_eval_batch_size=3, eval_strategy="steps")


# ---------------------------------------------------------------------------------------------------------------------
# 6. SDFT's one generation per prompt, and the blend with GRPO's reward advantage.


def demonstration_dataset(n: int = 4) -> Dataset:
    return dataset(n=n).add_column("demonstration", [f"{i} + 3 = {i + 3}" for i in range(n)])


def text_reward(completions, **kwargs):
    """A reward that differs between different texts, so GRPO's group advantage is not 0."""
    return [float(sum(map(ord, c[0]["content"])) % 7) for c in completions]


def test_sdft_preset_samples_one_rollout_per_prompt_and_trains(tmp_path, student_dir):
    steps = 2
    grads = RecordGradients()
    with pytest.warns(UserWarning, match="policy_weight has no effect"):
        trainer = make_trainer(tmp_path, student_dir, reward_funcs=[text_reward], mode="sdft", num_generations=None,
                               max_steps=steps, callbacks=[grads], train_dataset=demonstration_dataset())
    assert trainer.num_generations == 1
    inputs, batch = one_batch(trainer)
    prompts = [example["prompt"][-1]["content"] for example in inputs]
    assert len(prompts) == 4 and len(set(prompts)) == 4  # four prompts, one rollout each
    # GRPO's group advantage of a group of one is 0, not NaN, whatever the rewards (which differ here).
    assert torch.equal(batch["advantages"], torch.zeros_like(batch["advantages"]))
    assert batch["has_teacher"].all()  # every rollout has its demonstration

    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == steps and all(math.isfinite(h["loss"]) for h in logs)
    assert grads.all_finite == [True] * steps
    assert all(h["distill/frac_with_teacher"] == 1.0 and h["distill/logit_loss"] > 0 for h in logs)


def test_advantages_blend_policy_weight_times_the_group_advantage(tmp_path, student_dir):
    rewards = []

    def recorded_reward(completions, **kwargs):
        values = text_reward(completions)
        rewards.extend(values)
        wrong_with_feedback(completions, **kwargs)
        return values

    trainer = make_trainer(tmp_path, student_dir, reward_funcs=[recorded_reward], objective="sampled_token",
                           policy_weight=0.5, kl_coef=0.3)
    calls = record_teacher_calls(trainer)
    _, batch = one_batch(trainer)
    r = torch.tensor(rewards).view(-1, trainer.num_generations)
    a_group_B = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    assert a_group_B.abs().max() > 0.5  # rewards differ within groups

    mask_BT = batch["completion_mask"].float()
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    logp_s = torch.stack([
        torch.nn.functional.pad(reference_logprobs(student, p, c, TEMPERATURE), (0, len(m) - len(c)))
        for p, c, m in zip(rows(batch["prompt_ids"], batch["prompt_mask"]),
                           rows(batch["completion_ids"], batch["completion_mask"]), mask_BT)
    ])
    logp_t = calls[0][1].logp_BT
    expected = 0.5 * a_group_B.unsqueeze(1) - 0.3 * (logp_s - logp_t)
    torch.testing.assert_close(batch["advantages"] * mask_BT, expected * mask_BT, atol=1e-5, rtol=0)
