"""Learning test: self-distillation makes the student do without the context what its teacher does with it.

The claim (SDPO, Hübotter et al. 2026): the model, shown feedback that reveals the answer, teaches its own context-free
self; after training, the student gives without the feedback the answer it could only copy from it before.

The model is a one-layer Qwen2 (width 128) on the fixture tokenizer, trained in a module fixture for 200 steps of plain
next-token loss on the completion (15-20 s on one busy core) on a mixture of
  (a, 55%) copying an answer shown in the context: the feedback "The correct answer is 57." first, the question "What
      is the code of xyz?" last (the layout of the `sdpo` preset's teacher prompt, with shorter text) → "\\boxed{57}";
  (b, 30%) the same question without context, answered with a random code: nobody can know the code of an unseen name;
  (c, 15%) the fixed codes of 24 "known" names, without context. Without (c) the network has no route from the
      question to an answer, and a few steps of any training only learn the codes' marginal distribution (measured:
      log p stalled near the marginal's); with it the model is like a pretrained one that recalls facts about some
      names and not others.
The 8 test names never appear in that training: without context the model gives their codes at chance (log p of the
whole answer ≈ −5 nats), with the feedback it copies them (≈ −0.05).

`SelfDistillTrainer` then runs 20 steps of 8 questions × 4 rollouts, with a reward that is 1 for the right code and
otherwise gives the feedback "The correct answer is N."; the control is 20 steps of `trl.GRPOTrainer` with the same
reward, data and settings. Two claims, on the mean log p(right answer | question without context):
1. pure self-distillation (`policy_weight=0`, feedback only) raises it by at least 2 nats, and more than GRPO does;
2. the `sdpo` preset as it is (GRPO's advantage blended in, feedback and sibling context, EMA teacher, top-100 JSD
   with IS clip) raises it by at least 1 nat and ends above GRPO, for each of 3 trainer seeds.
Measured on fixture seed 0 (before −4.96): (1) −0.08, GRPO −8.97; (2) trainer seeds 0, 1, 2: −1.90, −0.76, −3.50,
GRPO −8.97, −8.41, −9.11. The layout matters: with a reader trained on the question first and the feedback after it
(the paper's layout), which the preset's templates no longer use, the preset only reached −4.4, −4.1, −3.4 from −5.0.
GRPO falls, probably because a success is rare (about 1 in 90) and credits a code more than the name it belongs to,
so the policy sharpens on a few codes and the right ones lose mass.
"""

import random

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from trl import GRPOConfig, GRPOTrainer

from conftest import build_model
from selfdistill.context import QUESTION_LAST_REPROMPT_TEMPLATE, Templates, teacher_prompt
from selfdistill.rewards import add_feedback, completion_text
from selfdistill.trainers import SelfDistillConfig, SelfDistillTrainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors and models: see conftest

# The preset's templates add about 45 tokens that the small fixture vocabulary spells nearly letter by letter: they
# would triple the cost of every forward here and test nothing more. These keep their layout (the context first, the
# question last) with less text; the trainers get the same templates.
TEMPLATES = Templates(reprompt=QUESTION_LAST_REPROMPT_TEMPLATE, feedback="{feedback_raw}\n")
LETTERS = "abcdefghijklmnopqrstuvwxyz"
STEPS = 20


def question(name: str) -> list[dict]:
    return [{"role": "user", "content": f"What is the code of {name}?"}]


def feedback(code) -> str:
    return f"The correct answer is {code}."


def boxed(code) -> str:
    return f"\\boxed{{{code}}}"


def with_context(name: str, code) -> list[dict]:
    return teacher_prompt(question(name), feedback=feedback(code), templates=TEMPLATES)


def random_name(rng: random.Random, taken) -> str:
    while (name := "".join(rng.choice(LETTERS) for _ in range(3))) in taken:
        pass
    return name


_rng = random.Random(0)
TEST_CODES = {random_name(_rng, ()): _rng.randint(10, 99) for _ in range(8)}
KNOWN_CODES = {random_name(_rng, TEST_CODES): _rng.randint(10, 99) for _ in range(24)}


def example_ids(tokenizer, prompt, code) -> tuple[list[int], list[int]]:
    """(prompt ids ending with the generation prompt, completion ids) of one chat example."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
    return prompt_ids, tokenizer(boxed(code) + tokenizer.eos_token).input_ids


def pretraining_example(rng: random.Random):
    u = rng.random()
    if u < 0.15:  # (c) a known name: its fixed code
        name = rng.choice(list(KNOWN_CODES))
        return question(name), KNOWN_CODES[name]
    name, code = random_name(rng, {**TEST_CODES, **KNOWN_CODES}), rng.randint(10, 99)
    if u < 0.7:  # (a) copy the code the feedback shows
        return with_context(name, code), code
    return question(name), code  # (b) an unknown name without context: any code


def train_context_reader(tokenizer, seed: int = 0):
    """The one-layer model of the module docstring, trained to read its context."""
    model = build_model(tokenizer, hidden_size=128, num_layers=1, seed=seed)
    # Qwen2's default init (std 0.02) leaves a one-layer model ignoring its context for 150 to over 300 steps,
    # depending on the seed; with std 0.06 it learned to copy within 75 to 125 steps on every seed tried.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.06, generator=generator)
    steps, batch_size, rng = 200, 32, random.Random(seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / steps))
    model.train()
    for _ in range(steps):
        examples = [example_ids(tokenizer, *pretraining_example(rng)) for _ in range(batch_size)]
        length = max(len(p) + len(c) for p, c in examples)
        input_ids = torch.full((batch_size, length), tokenizer.pad_token_id)
        labels = torch.full((batch_size, length), -100)  # loss on the completion only
        for row, (p, c) in enumerate(examples):
            input_ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            labels[row, len(p) - 1 : len(p) + len(c) - 1] = torch.tensor(c)  # position i predicts token i + 1
        logits = model(input_ids=input_ids, attention_mask=input_ids != tokenizer.pad_token_id).logits
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model


@pytest.fixture(scope="module")
def context_reader_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("context_reader")
    train_context_reader(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@torch.no_grad()
def answer_logp(model, tokenizer, context: bool = False) -> float:
    """Mean over the test names of log p("\\boxed{code}<|im_end|>" | the question, with or without the feedback)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for name, code in TEST_CODES.items():
        prompt_ids, completion_ids = example_ids(tokenizer, with_context(name, code) if context else question(name), code)
        logits = model(input_ids=torch.tensor([prompt_ids + completion_ids])).logits[0, len(prompt_ids) - 1 : -1]
        total += logits.float().log_softmax(-1).gather(-1, torch.tensor(completion_ids)[:, None]).sum().item()
    model.train(was_training)
    return total / len(TEST_CODES)


def exact_code(completions, solution, **kwargs) -> list[float]:
    """1 for the right boxed code; otherwise 0, and feedback that reveals the code (the feedback channel)."""
    right = [boxed(code) in completion_text(c) for c, code in zip(completions, solution, strict=True)]
    add_feedback(kwargs, [None if ok else feedback(code) for ok, code in zip(right, solution)])
    return [float(ok) for ok in right]


def common_settings(tmp_path) -> dict:
    # 8 questions x 4 rollouts: every step sees every question. bf16=False: GRPOConfig defaults to bf16 autocast.
    return dict(
        output_dir=str(tmp_path), per_device_train_batch_size=32, num_generations=4, max_completion_length=8,
        max_steps=STEPS, learning_rate=1e-3, lr_scheduler_type="constant", seed=0, use_cpu=True, bf16=False,
        report_to="none", save_strategy="no", logging_steps=STEPS, disable_tqdm=True,
    )


def questions_dataset() -> Dataset:
    return Dataset.from_dict({
        "prompt": [question(name) for name in TEST_CODES],
        "solution": [str(code) for code in TEST_CODES.values()],
    })


def test_self_distillation_internalises_the_feedback(tmp_path, tokenizer, context_reader_dir):
    start = AutoModelForCausalLM.from_pretrained(context_reader_dir)
    before, copied = answer_logp(start, tokenizer), answer_logp(start, tokenizer, context=True)
    # The premise: the model reads the answer from its context, and does not know it without.
    assert before < -3.5 and copied > -0.5, (before, copied)

    dataset = questions_dataset()
    self_distill = SelfDistillTrainer(
        model=context_reader_dir,
        reward_funcs=[exact_code],
        args=SelfDistillConfig(
            **common_settings(tmp_path / "sdpo"), mode="sdpo", context_sources=("feedback",),
            reprompt_template=TEMPLATES.reprompt, feedback_template=TEMPLATES.feedback,
            # EMA, not live: at this learning rate the student's own copying decays as it trains, and a live teacher
            # decays with it (measured with 'live', on the paper's layout: −5.0 → −3.0 and → −8.0 on two seeds).
            teacher="ema",
            # Pure self-distillation (TRL SDPOTrainer's default distillation_weight=1): the teacher is the only signal,
            # so the comparison with the reward-only GRPO control below is clean; the preset's blend is claim 2.
            policy_weight=0.0,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    self_distill.train()
    after_self_distill = answer_logp(self_distill.model, tokenizer)
    assert after_self_distill - before >= 2.0, (before, after_self_distill)

    grpo = GRPOTrainer(
        model=context_reader_dir,
        reward_funcs=[exact_code],
        args=GRPOConfig(**common_settings(tmp_path / "grpo")),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    grpo.train()
    after_grpo = answer_logp(grpo.model, tokenizer)
    assert after_grpo - before < after_self_distill - before, (before, after_grpo, after_self_distill)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_default_sdpo_preset_beats_grpo(tmp_path, tokenizer, context_reader_dir, seed):
    """Claim 2 of the module docstring: the `sdpo` preset as it is (only the batch layout and the templates' text are
    the test's) learns, and beats the GRPO control, for each trainer seed."""
    settings = common_settings(tmp_path) | {"seed": seed}
    self_distill = SelfDistillTrainer(model=context_reader_dir, reward_funcs=[exact_code],
                                      args=SelfDistillConfig(**settings | {"output_dir": str(tmp_path / "sdpo")},
                                                             mode="sdpo", reprompt_template=TEMPLATES.reprompt,
                                                             feedback_template=TEMPLATES.feedback),
                                      train_dataset=questions_dataset(), processing_class=tokenizer)
    self_distill.train()
    grpo = GRPOTrainer(model=context_reader_dir, reward_funcs=[exact_code],
                       args=GRPOConfig(**settings | {"output_dir": str(tmp_path / "grpo")}),
                       train_dataset=questions_dataset(), processing_class=tokenizer)
    grpo.train()
    before = answer_logp(AutoModelForCausalLM.from_pretrained(context_reader_dir), tokenizer)
    after_self_distill, after_grpo = answer_logp(self_distill.model, tokenizer), answer_logp(grpo.model, tokenizer)
    assert after_self_distill - before >= 1.0, (before, after_self_distill)
    assert after_self_distill > after_grpo, (before, after_self_distill, after_grpo)
