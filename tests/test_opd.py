"""OnPolicyDistillTrainer on tiny offline models: it trains, the advantages follow the documented formula (alone, with
rewards, with a discount, across two processes), it learns the teacher, and it refuses a foreign vocabulary.

The per-token advantage under test (ARCHITECTURE.md, "Data flow of one step"):
    A_bt = task_weight · A_group_b + kl_coef · a_bt,    a_bt = −(logp_S(x_t) − logp_T(x_t))
A batch is inspected by calling `trainer._generate_and_score_completions` on one batch of the trainer's own
dataloader: the step that training runs, before the loss.

    pytest tests/test_opd.py                         # about 1-2 minutes on 2 idle CPU cores
    pytest tests/test_opd.py -m slow -k learns -s    # the learning test on two more seeds, with its numbers
"""

import ast
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from _opd_distributed import NUM_GENERATIONS, PER_DEVICE_BATCH, char_length_reward, make_config, prompts_dataset
from conftest import SPECIAL_TOKENS, build_model, free_port, with_dense_advantages
from selfdistill.losses import jsd, masked_mean
from selfdistill.teachers import completion_hidden_states
from selfdistill.trainers import OnPolicyDistillTrainer

DISTILL_METRICS = [
    "distill/reverse_kl",
    "distill/teacher_logp",
    "distill/student_logp",
    "distill/frac_teacher_logp_below",
    "distill/acceptance",
]


def make_trainer(tmp_path, student, teacher, reward_funcs=None, train_dataset=None, **overrides):
    """The settings of `_opd_distributed.make_config` (temperature 0.8, kl_coef 0.5, task_weight 2, fp32) unless
    overridden."""
    return OnPolicyDistillTrainer(
        model=student,
        teacher_model=teacher,
        reward_funcs=reward_funcs,
        args=make_config(str(tmp_path / "out"), **overrides),
        train_dataset=train_dataset if train_dataset is not None else prompts_dataset(),
    )


def score_one_batch(trainer) -> dict:
    """Generate, reward and score the first batch of the trainer's dataloader, as a training step would."""
    trainer.model.train()  # the mode decides where metrics go: trainer._metrics["train"]
    return with_dense_advantages(trainer, trainer._generate_and_score_completions(next(iter(trainer.get_train_dataloader()))))


def completion_logprobs(model, batch, temperature) -> torch.Tensor:
    """log softmax(logits / τ) of each completion token: a plain forward, independent of the trainer's code."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    P = batch["prompt_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, P - 1 : -1]
    return (logits / temperature).log_softmax(-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def constant_reward(completions, **kwargs) -> list[float]:
    return [1.0] * len(completions)


# ---------------------------------------------------------------------------------------------------------------------
# 1. A few steps run, with and without rewards and with the logit-level term; everything logged is finite.


@pytest.mark.parametrize(
    "reward_funcs, overrides",
    [
        (None, {}),
        ([char_length_reward], {}),
        (None, dict(distill_loss_weight=0.5)),
        (None, dict(distill_loss_weight=0.5, distill_top_k=8)),
    ],
    ids=["pure", "with_reward", "logit_full_vocab", "logit_top_k"],
)
def test_training_steps_are_finite(tmp_path, student_dir, teacher_dir, reward_funcs, overrides):
    trainer = make_trainer(tmp_path, student_dir, teacher_dir, reward_funcs, **overrides)
    trainer.train()

    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    keys = ["loss", "grad_norm", *DISTILL_METRICS]
    if "distill_loss_weight" in overrides:
        keys.append("distill/logit_loss")
    for h in logged:
        assert all(math.isfinite(h[key]) for key in keys), {key: h.get(key) for key in keys}
    start = AutoModelForCausalLM.from_pretrained(student_dir)
    moved = sum((p - q).abs().sum().item() for p, q in zip(trainer.model.parameters(), start.parameters()))
    assert moved > 0  # the loss reached the optimizer


@pytest.mark.parametrize("reward_funcs", [None, [constant_reward]], ids=["no_reward", "constant_reward"])
def test_equal_reward_groups_keep_their_kl_advantage(tmp_path, student_dir, teacher_dir, reward_funcs):
    """GRPO's group advantage is 0 when a group's rewards are all equal; the teacher term must still be there."""
    trainer = make_trainer(tmp_path, student_dir, teacher_dir, reward_funcs)
    batch = score_one_batch(trainer)

    assert trainer._metrics["train"]["frac_reward_zero_std"] == [1.0]  # every group has equal rewards
    mask = batch["completion_mask"].bool()
    per_row = (batch["advantages"].abs() * mask).sum(dim=1)
    assert per_row.shape == (2 * NUM_GENERATIONS,) and (per_row > 0).all(), per_row


@pytest.mark.parametrize("logit_weight", [0.0, 0.5], ids=["advantage_only", "with_logit_term"])
def test_metrics_reach_log_history(tmp_path, student_dir, teacher_dir, logit_weight):
    """The distill/* metrics go through TRL's logging into state.log_history, and agree with the logged loss.

    Pure distillation at the sampling policy (importance ratio 1), with TRL's default token-level "dapo" loss:
    loss = token mean of −kl_coef · a = kl_coef · distill/reverse_kl, plus distill_loss_weight · distill/logit_loss.
    """
    trainer = make_trainer(tmp_path, student_dir, teacher_dir, distill_loss_weight=logit_weight)
    trainer.train()

    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2]
    for h in logged:
        assert set(DISTILL_METRICS + ["distill/frac_with_teacher"]) <= h.keys()
        expected = trainer.args.kl_coef * h["distill/reverse_kl"] + logit_weight * h.get("distill/logit_loss", 0.0)
        assert h["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# 2. A teacher with the student's weights adds nothing.


# The student's log-probs come from TRL's fused LM head, the teacher's from selfdistill's token_logprobs: two kernels
# that agree to rounding: in fp32 exactly 0 at τ = 1 today and ~5e-7 at τ = 0.8, hence the 1e-5 tolerance. Under
# bf16 autocast, TRL's default, they round differently by ~1e-3, so this runs in fp32.
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_teacher_equal_to_student_gives_zero_advantage(tmp_path, student_dir, temperature):
    trainer = make_trainer(tmp_path, student_dir, student_dir, temperature=temperature)
    batch = score_one_batch(trainer)

    mask = batch["completion_mask"].bool()
    # Pure distillation: the group advantage is 0 too, so the whole advantage is the KL term.
    assert batch["advantages"][mask].abs().max().item() <= 1e-5
    metrics = trainer._metrics["train"]
    assert metrics["distill/reverse_kl"][0] == pytest.approx(0.0, abs=1e-5)
    assert metrics["distill/acceptance"][0] == pytest.approx(1.0, abs=1e-5)


def test_shared_prompts_give_the_hidden_states_of_full_forwards(student_dir, tokenizer):
    """Rows with equal prompts share one prompt pass (KV cache copied per row): the hidden states at the completion
    positions equal one full forward per row, with left-padded prompts and right-padded completions (fp32, 1e-5)."""
    model = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    prompts = tokenizer(["What is 12 + 30?"] * 3 + ["Hi"] * 2, return_tensors="pt", padding=True, padding_side="left")
    completion_ids = torch.randint(5, len(tokenizer), (5, 6), generator=torch.Generator().manual_seed(0))
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 4:] = completion_mask[4, 2:] = 0
    rows = (prompts.input_ids, prompts.attention_mask, completion_ids, completion_mask)
    with torch.no_grad():
        shared = completion_hidden_states(model, *rows)
        P = prompts.input_ids.shape[1]
        full = [model.model(input_ids=torch.cat([p[None], c[None]], 1), attention_mask=torch.cat([pm[None], cm[None]], 1)
                            ).last_hidden_state[0, P - 1 : -1] for p, pm, c, cm in zip(*rows)]
    mask = completion_mask.bool()
    torch.testing.assert_close(shared[mask], torch.stack(full)[mask], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 3. It learns: the student's reverse KL to the teacher on held-out prompts drops.


@torch.no_grad()
def heldout_reverse_kl(student, others, tokenizer, prompts, max_new_tokens, seed=123) -> list[float]:
    """Mean over tokens of the exact full-vocabulary KL(S‖T), at positions sampled from the student S (temperature 1),
    for each model T in `others`. Completions end at the first EOS."""
    enc = tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens)
    ids = student.generate(**enc, **sampling, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    completion = ids[:, enc["input_ids"].shape[1] :]
    is_eos = (completion == tokenizer.eos_token_id).long()
    mask = (is_eos.cumsum(1) - is_eos) == 0  # up to and including the first EOS
    rows = (enc["input_ids"], enc["attention_mask"], completion, mask.long())
    hidden_s, head_s = completion_hidden_states(student, *rows), student.get_output_embeddings()
    kls = []
    for other in others:
        hidden_t, head_t = completion_hidden_states(other, *rows), other.get_output_embeddings()
        kl_BT = jsd(hidden_s, hidden_t, mask, beta=1.0, student_head=head_s, teacher_head=head_t)
        kls.append(masked_mean(kl_BT, mask).item())
    return kls


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_it_learns_the_teacher(tmp_path, student_dir, teacher_dir, tokenizer_dir, seed):
    """10 steps of pure distillation (16 rollouts of 12 tokens, Adam lr 3e-3) towards the fixture teacher, a fixed
    random model. Held-out KL(S‖teacher) 0.0332 → 0.0116 / 0.0123 / 0.0118 for seeds 0 / 1 / 2 (ratio ≈ 0.36; after
    20 steps ≈ 0.25), so the asserted ratio ≤ 0.7 has a wide margin.

    Why this teacher: the teacher is not sharpened. With its embeddings (tied, hence its logits too) scaled ×2 the
    KL starts at 0.128 but 20 steps at lr 3e-3 did not move it (0.128 → 0.128, seeds 0 and 1), and lr 1e-2 overshoots
    (the KL grows). A second random model, never trained towards, is the control: the student's KL to it stays put
    (0.0339 → 0.0350 / 0.0338 / 0.0343), so the student moved towards this teacher, not merely towards higher entropy
    (which would lower its KL to any near-uniform model).
    """
    settings = dict(per_device_train_batch_size=16, max_steps=10, learning_rate=3e-3, temperature=1.0, kl_coef=1.0)
    trainer = make_trainer(tmp_path, student_dir, teacher_dir, train_dataset=prompts_dataset(80), seed=seed, **settings)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="left")
    control = build_model(tokenizer, hidden_size=96, num_layers=3, seed=2)
    heldout = list(prompts_dataset(32, offset=500)["prompt"])
    models = [trainer.teacher_model, control]
    length = trainer.args.max_completion_length

    trainer.model.eval()
    before = heldout_reverse_kl(trainer.model, models, tokenizer, heldout, length)
    trainer.train()
    trainer.model.eval()
    after = heldout_reverse_kl(trainer.model, models, tokenizer, heldout, length)

    print(f"held-out KL(S‖·), seed {seed}: teacher {before[0]:.4f} → {after[0]:.4f}, control {before[1]:.4f} → {after[1]:.4f}")
    assert after[0] <= 0.7 * before[0], (before, after)
    assert after[1] >= 0.9 * before[1], (before, after)


# ---------------------------------------------------------------------------------------------------------------------
# 4. The advantages are exactly A = task_weight · A_group + kl_coef · a, with a discount when asked.


def discounted(a_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """A_t = Σ_{s≥t} γ^(s−t) a_s, spelled out."""
    T = a_BT.shape[1]
    return torch.stack([sum(gamma ** (s - t) * a_BT[:, s] for s in range(t, T)) for t in range(T)], dim=1)


@pytest.mark.parametrize("gamma", [0.0, 0.9])
def test_advantages_follow_the_formula(tmp_path, student_dir, teacher_dir, gamma):
    rewards = []

    def recorded_char_length_reward(completions, **kwargs):
        values = char_length_reward(completions)
        rewards.extend(values)
        return values

    trainer = make_trainer(tmp_path, student_dir, teacher_dir, [recorded_char_length_reward], kl_discount=gamma)
    args = trainer.args
    assert args.temperature != 1 and args.kl_coef != 1 and args.task_weight != 1  # so a dropped factor shows
    batch = score_one_batch(trainer)

    # GRPO's group advantage with scale_rewards="group": (r − mean) / (std + 1e-4), std with Bessel's correction.
    r = torch.tensor(rewards).view(-1, NUM_GENERATIONS)
    a_group_B = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()
    assert a_group_B.abs().max() > 0.5  # the rewards differ within groups, so this part is tested too

    mask_BT = batch["completion_mask"].float()
    logp_s = completion_logprobs(AutoModelForCausalLM.from_pretrained(student_dir), batch, args.temperature)
    logp_t = completion_logprobs(AutoModelForCausalLM.from_pretrained(teacher_dir), batch, args.temperature)
    a_BT = discounted(-(logp_s - logp_t) * mask_BT, gamma)
    expected = args.task_weight * a_group_B.unsqueeze(1) + args.kl_coef * a_BT

    torch.testing.assert_close(batch["advantages"] * mask_BT, expected * mask_BT, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# 5. A teacher with another vocabulary is refused, naming both models and the first token that differs.


def tokenizer_trained_on(text: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with the fixture's special tokens and alphabet, but merges learned from `text`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.mark.parametrize("difference", ["extra_token", "other_merges"])
def test_vocabulary_mismatch_is_refused(tmp_path, student_dir, teacher_dir, tokenizer, difference):
    if difference == "extra_token":
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        teacher_tokenizer.add_tokens(["<|extra|>"], special_tokens=True)
    else:
        teacher_tokenizer = tokenizer_trained_on(["The quick brown fox jumps over the lazy dog."] * 50)

    with pytest.raises(ValueError) as error:
        OnPolicyDistillTrainer(
            model=student_dir,
            teacher_model=teacher_dir,
            teacher_processing_class=teacher_tokenizer,
            args=make_config(str(tmp_path / "out")),
            train_dataset=prompts_dataset(),
        )

    message = str(error.value)
    assert student_dir in message and teacher_dir in message
    found = re.search(r"token (.+) has id (\w+) in the student and (\w+) in the teacher", message)
    assert found, message
    token = ast.literal_eval(found[1])
    vocab_s, vocab_t = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    assert (found[2], found[3]) == (str(vocab_s.get(token)), str(vocab_t.get(token)))
    # "First": the lowest id at which the two vocabularies hold different tokens.
    token_at_s, token_at_t = {i: t for t, i in vocab_s.items()}, {i: t for t, i in vocab_t.items()}
    first_id = min(i for i in token_at_s.keys() | token_at_t.keys() if token_at_s.get(i) != token_at_t.get(i))
    assert first_id in (vocab_s.get(token), vocab_t.get(token))
    if difference == "extra_token":
        assert token == "<|extra|>"


# ---------------------------------------------------------------------------------------------------------------------
# 6. Two processes (gloo) give the advantages a single process gives for the same rollouts.


class ReplayTrainer(OnPolicyDistillTrainer):
    """Single process; instead of sampling, returns the completion ids in `self.replay` (in batch order)."""

    replay: list[list[int]]

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        return self.replay, None


def test_two_processes_match_single_process(tmp_path, student_dir, teacher_dir):
    """What is checked: each step's global batch is 12 rollouts, 3 prompts × 4; rank 0 holds rows 0–5, rank 1 rows
    6–11, so the middle group is split across the ranks and its normalisation needs both ranks' rewards. Sampling
    differs between runs, so instead of sampling again, a single-process trainer (global batch 12) is given the exact
    prompts, completions and student weights of each two-process step; both must produce the same advantages.
    """
    # `--cpu` would make accelerate use its single-process launcher (several CPU processes need mpirun there);
    # `--multi_gpu` launches through torchrun, and use_cpu=True in the config makes the processes use gloo on CPU.
    script = Path(__file__).with_name("_opd_distributed.py")
    launch = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"
    launch += f" --num_cpu_threads_per_process 1 --main_process_port {free_port()}"
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch.split()]
    command += [str(script), student_dir, teacher_dir, str(tmp_path)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "1"}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert len(rank0) == len(rank1) == 2  # two steps, one generation batch each

    reference = ReplayTrainer(
        model=student_dir,
        teacher_model=teacher_dir,
        reward_funcs=[char_length_reward],
        args=make_config(str(tmp_path / "single"), per_device_train_batch_size=2 * PER_DEVICE_BATCH),
        train_dataset=prompts_dataset(),
    )
    reference.model.train()
    for step, (r0, r1) in enumerate(zip(rank0, rank1)):
        prompts = [row["prompt"] for row in r0["inputs"] + r1["inputs"]]
        assert prompts[4:6] == prompts[6:8]  # the split group
        for name, weight in r0["weights"].items():  # DDP keeps the replicas equal
            assert torch.equal(weight, r1["weights"][name]), name
        if step == 1:  # the optimizer moved the student between the two generation batches
            assert any(not torch.equal(w, rank0[0]["weights"][n]) for n, w in r0["weights"].items())

        reference.model.load_state_dict(r0["weights"])
        reference.replay = r0["completion_ids"] + r1["completion_ids"]
        batch = with_dense_advantages(reference, reference._generate_and_score_completions(r0["inputs"] + r1["inputs"]))

        prompt_ids = [ids[m].tolist() for ids, m in zip(batch["prompt_ids"], batch["prompt_mask"].bool())]
        assert prompt_ids == r0["prompt_ids"] + r1["prompt_ids"]  # same (prompt, completion) pairs, same order
        expected = [adv[m] for adv, m in zip(batch["advantages"], batch["completion_mask"].bool())]
        recorded = {**r0["advantages"], **r1["advantages"]}
        got_rows = [recorded[tuple(p), tuple(c)] for r in (r0, r1) for p, c in zip(r["prompt_ids"], r["completion_ids"])]
        for row, (got, want) in enumerate(zip(got_rows, expected, strict=True)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0, msg=lambda s: f"step {step} row {row}: {s}")
