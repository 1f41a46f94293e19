"""CUDA checks: our losses in bf16 against TRL's and against our own fp32 values, three bf16 training steps of each
trainer with HF generation, and TRL's Triton fused LM head (GRPO's) against our projection.

Every test here is `gpu`-marked and skipped without CUDA (tests/conftest.py); `benchmarks/gpu_check.sh` runs them on
a machine with one NVIDIA GPU:
    python3 -P -m pytest tests/test_gpu.py -m gpu      # -P: import selfdistill from the installed wheel, not ./

Tolerances. bf16 keeps 8 significant bits: rounding a number to bf16 moves it by at most u = 2^-8 of its size (half a
unit in the last place), so at most 2^-8 ≈ 0.4% of the largest entry of a tensor. Our losses take bf16 hidden states
and heads but compute in fp32, and return fp32 values and gradients in the input's dtype (`selfdistill.losses`,
"Numerics"). Hence, with e = max|actual − expected| / max|expected| unless said otherwise:
- against TRL's function on the very bf16 values ours gets, TRL in fp64 (fp32 for its Triton kernel): values e ≤ 1e-4
  (fp32 arithmetic, only the order of the sums differs; 1e-6 measured on CPU with these inputs), gradients e ≤ 1e-2
  (ours are rounded once to bf16, so e ≤ u; 3e-3 measured);
- against ours on the fp32 numbers the bf16 inputs were rounded from: norm-wise ‖actual − expected‖ / ‖expected‖ ≤
  3e-2 for values and gradients. Rounding moves each entry of h and W by up to u relative (about u/√3 RMS), so each
  product h_i·w_i by about √2·u/√3 ≈ 0.3% RMS, and each logit z = Σ_i h_i·w_i, a sum of such independent errors, by
  about 0.3% of the logits' spread; values and gradients, smooth in the logits, move by the same order (plus u for
  the gradient's own rounding): measured on CPU with these inputs 0.06-1.0%, so the bound is 3× the largest.
  Norm-wise, because rounding can also swap near-tied tokens in and out of a top-k support, which moves a few single
  tokens by up to 6% (measured) and the norm hardly at all;
- TRL's fused LM head rounds its logits to bf16 (its tiles are in the compute dtype; emulating that reproduces its
  log-probs to 1e-5 on CPU) before an fp32 log-sum-exp, ours does not. That moves each logit x = z/τ by at most
  u·|x|, so per position |Δ log p_t| ≤ u·(|x_t| + max_v |x_v|) (log-sum-exp moves by at most the largest change),
  and, to first order, |Δ entropy| ≤ u·max_v |x_v| · Σ_v p_v |x_v − Σ_w p_w x_w| (dH = −Σ_v p_v (x_v − x̄) dx_v).
  Measured on CPU: at most 0.44 and 0.30 of these bounds. Logits spread as a trained LM's (std ≈ 3) make a shifted
  token or a wrong temperature move a log-prob by far more (8 nats for τ = 1 instead of 0.7).
"""

import math
import os

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from _opd_distributed import prompts_dataset
from selfdistill.losses import jsd, masked_mean, token_logprobs
from selfdistill.rewards import add_feedback
from selfdistill.trainers import OnPolicyDistillConfig, OnPolicyDistillTrainer, SelfDistillConfig, SelfDistillTrainer

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
B, T, V, H = 2, 256, 32768, 256  # 472 unmasked rows: two of our chunks of 256 rows, the second partial
TAU, BETA, TOP_K = 0.7, 0.5, 100  # τ ≠ 1 so that a missing temperature shows; SDPO's β and top-k
SAME_VALUES_TOL, SAME_GRAD_TOL = 1e-4, 1e-2  # relative to the largest entry of the reference, see the docstring
ROUNDED_INPUTS_TOL = 3e-2  # norm-wise
BF16_U = 2**-8  # bf16's unit roundoff


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """fp32 matmuls in full fp32 (torch's default), whatever an import set: TF32 would round the references to 10
    significant bits."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def normwise_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ (Frobenius)."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()


def loss_inputs(device, dtype) -> dict:
    """Hidden states and heads as in benchmarks/losses.py (logits of std ≈ 3, the teacher a perturbed student), drawn
    on the CPU, so every device and dtype gets the same numbers (rounded for bf16); the last 40 positions of row 1
    are masked; per-token weights for the backward pass."""
    g = torch.Generator().manual_seed(0)
    w_s = torch.randn(V, H, generator=g) * (3 / math.sqrt(H))
    w_t = w_s + torch.randn(V, H, generator=g) / math.sqrt(H)
    h_s = torch.randn(B, T, H, generator=g)
    h_t = h_s + 0.5 * torch.randn(B, T, H, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, -40:] = False
    tokens = torch.randint(V, (B, T), generator=g)
    weights = torch.randn(B, T, generator=g) * mask
    x = dict(w_s=w_s, w_t=w_t, h_s=h_s, h_t=h_t)
    x = {name: value.to(device, dtype) for name, value in x.items()}
    return x | dict(mask=mask.to(device), tokens=tokens.to(device), weights=weights.to(device))


def head(weight: torch.Tensor, trainable: bool) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear.requires_grad_(trainable)


OUR_CASES = {
    "jsd_full": dict(),
    "jsd_topk_tail": dict(top_k=TOP_K, add_tail=True),
    "jsd_topk": dict(top_k=TOP_K, add_tail=False),  # renormalised: the sparse gradient
    "token_logprobs": None,
}


def ours(case: str, x: dict):
    """Per-token values `(B, T)` (zero where masked) and the gradients of Σ weights·values with respect to the student's
    hidden states and head weight."""
    h_s, student_head = x["h_s"].clone().requires_grad_(), head(x["w_s"], trainable=True)
    if OUR_CASES[case] is None:
        values = token_logprobs(h_s, x["tokens"], x["mask"], head=student_head, temperature=TAU)
    else:
        values = jsd(h_s, x["h_t"], x["mask"], beta=BETA, temperature=TAU, student_head=student_head,
                     teacher_head=head(x["w_t"], trainable=False), **OUR_CASES[case])
    (values * x["weights"]).sum().backward()
    return values.detach(), h_s.grad, student_head.weight.grad


def trl_from_logits(case: str, x: dict, dtype):
    """TRL's per-token functions on logits computed in `dtype` from the same hidden states and heads: SDPO's loss
    utils (which take logits already divided by τ, as SDPOTrainer hands them over) and `selective_log_softmax`."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.sdpo import loss_utils as sdpo
    from trl.trainer.utils import selective_log_softmax

    h_s, w_s = x["h_s"].to(dtype).requires_grad_(), x["w_s"].to(dtype).requires_grad_()
    logits_s = h_s @ w_s.T
    if case == "token_logprobs":
        values = selective_log_softmax(logits_s, x["tokens"], temperature=TAU)
    else:
        logits_t = x["h_t"].to(dtype) @ x["w_t"].to(dtype).T
        if case == "jsd_full":
            values = sdpo.compute_full_logit_self_distillation_loss(logits_s / TAU, logits_t / TAU,
                                                                    distillation_alpha=BETA)
        else:
            values = sdpo.compute_topk_self_distillation_loss(
                logits_s / TAU, logits_t / TAU, distillation_topk=TOP_K, distillation_alpha=BETA,
                distillation_add_tail=OUR_CASES[case]["add_tail"])
    (values * x["weights"]).sum().backward()
    return values.detach() * x["mask"], h_s.grad, w_s.grad


# fp64 for SDPO's utils: their tail log(1 − Σ_K p) loses precision in fp32 (tests/test_losses.py); fp32 for
# `selective_log_softmax`, which then runs TRL's Triton kernel on CUDA. Ours picks the top-k from fp32 logits, TRL here
# from fp64 ones: with these inputs the smallest gap between a row's 100th and 101st logit/τ is 2.4e-5, far above
# the fp32 rounding of a logit (~1e-6), so both pick the same support.
REFERENCE_DTYPE = {"jsd_full": torch.float64, "jsd_topk_tail": torch.float64, "jsd_topk": torch.float64,
                   "token_logprobs": torch.float32}


@pytest.mark.parametrize("case", list(OUR_CASES))
def test_bf16_losses_on_cuda_equal_trls_on_the_same_bf16_values(case):
    x = loss_inputs(CUDA, torch.bfloat16)
    values, grad_h, grad_w = ours(case, x)
    expected = trl_from_logits(case, x, REFERENCE_DTYPE[case])

    assert values.device.type == CUDA.type and values.dtype == torch.float32  # computed in fp32
    assert grad_h.dtype == grad_w.dtype == torch.bfloat16  # the inputs' dtype
    assert relative_error(values, expected[0]) <= SAME_VALUES_TOL
    assert relative_error(grad_h, expected[1]) <= SAME_GRAD_TOL
    assert relative_error(grad_w, expected[2]) <= SAME_GRAD_TOL


@pytest.mark.parametrize("case", list(OUR_CASES))
def test_bf16_losses_on_cuda_stay_within_bf16_rounding_of_our_fp32_values(case):
    rounded = ours(case, loss_inputs(CUDA, torch.bfloat16))
    exact = ours(case, loss_inputs(CUDA, torch.float32))

    for actual, expected in zip(rounded, exact):
        assert normwise_error(actual, expected) <= ROUNDED_INPUTS_TOL


def test_bf16_jsd_on_cuda_equals_trl_chunked_divergence_loss():
    """DistillationTrainer's loss (its Triton kernels on CUDA) on the same bf16 tensors: the mean JSD over unmasked
    tokens and its gradients. TRL computes fp32 logits from the bf16 values too, but rounds each gradient tile to bf16
    before projecting it back (`ChunkedDivergenceFunction.backward`), a second rounding: 2 × SAME_GRAD_TOL."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    x = loss_inputs(CUDA, torch.bfloat16)
    student_head, teacher_head = head(x["w_s"], trainable=True), head(x["w_t"], trainable=False)

    def run(fn):
        h_s = x["h_s"].clone().requires_grad_()
        student_head.weight.grad = None
        loss = fn(h_s)
        loss.backward()
        return loss.detach(), h_s.grad, student_head.weight.grad

    theirs = run(lambda h_s: _chunked_divergence_loss(h_s, x["h_t"], student_head.weight, teacher_head.weight,
                                                      x["mask"], BETA, temperature=TAU)[0])
    mine = run(lambda h_s: masked_mean(jsd(h_s, x["h_t"], x["mask"], beta=BETA, temperature=TAU,
                                           student_head=student_head, teacher_head=teacher_head), x["mask"]))
    assert theirs[0].item() > 0.05  # not trivially zero: the teacher differs
    assert relative_error(mine[0], theirs[0]) <= SAME_VALUES_TOL
    for actual, expected in zip(mine[1:], theirs[1:]):
        assert relative_error(actual, expected) <= 2 * SAME_GRAD_TOL


# ---------------------------------------------------------------------------------------------------------------------
# Three steps of each trainer on CUDA in bf16, with HF generation.


def cuda_bf16_settings(tmp_path) -> dict:
    """A few rollouts on the GPU with bf16 autocast; gradient checkpointing left at TRL's default (on), as a user's
    first run has it."""
    return dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
                max_steps=3, logging_steps=1, learning_rate=1e-3, temperature=0.8, bf16=True, use_cpu=False,
                report_to="none", save_strategy="no", disable_tqdm=True, seed=0)


def check_three_finite_logged_steps(trainer, metrics: list[str]) -> list[dict]:
    assert trainer.accelerator.mixed_precision == "bf16"
    assert next(trainer.model.parameters()).device.type == CUDA.type
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        values = {key: h.get(key) for key in ["loss", "grad_norm", *metrics]}
        assert all(value is not None and math.isfinite(value) for value in values.values()), values
    return logs


def moved(start_dir: str, params: dict) -> float:
    """Σ |θ − θ_start| over the model's parameters."""
    start = dict(AutoModelForCausalLM.from_pretrained(start_dir).named_parameters())
    return sum((value.detach().float().cpu() - start[name]).abs().sum().item() for name, value in params.items())


def test_on_policy_distill_trainer_trains_three_steps_on_cuda_in_bf16(tmp_path, student_dir, teacher_dir):
    """Pure distillation with the full-vocabulary logit term, so that both the sampled-token advantage and the chunked
    JSD through the teacher's head run on the GPU."""
    args = OnPolicyDistillConfig(**cuda_bf16_settings(tmp_path), distill_loss_weight=0.5)
    trainer = OnPolicyDistillTrainer(model=student_dir, teacher_model=teacher_dir, args=args,
                                     train_dataset=prompts_dataset())
    trainer.train()

    check_three_finite_logged_steps(trainer, ["distill/reverse_kl", "distill/teacher_logp", "distill/student_logp",
                                              "distill/acceptance", "distill/logit_loss",
                                              "distill/grad_norm_logits_distill"])
    assert moved(student_dir, dict(trainer.model.named_parameters())) > 0


def wrong_with_feedback(completions, solution, **kwargs) -> list[float]:
    """Reward 0 and feedback naming the answer: every rollout has a teacher context, whatever the model writes."""
    add_feedback(kwargs, [f"The correct answer is {answer}." for answer in solution])
    return [0.0] * len(completions)


def test_self_distill_trainer_sdpo_trains_three_steps_on_cuda_in_bf16(tmp_path, student_dir):
    """The sdpo preset: feedback contexts, EMA teacher, top-100 JSD with a tail, IS clip."""
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 3?"}], "solution": str(i + 3)}
                              for i in range(16)])
    args = SelfDistillConfig(**cuda_bf16_settings(tmp_path), mode="sdpo")
    trainer = SelfDistillTrainer(model=student_dir, reward_funcs=[wrong_with_feedback], args=args, train_dataset=data)
    teacher_start = {name: value.detach().clone() for name, value in trainer.teacher.state().items()}
    trainer.train()

    logs = check_three_finite_logged_steps(trainer, ["distill/reverse_kl", "distill/logit_loss",
                                                     "distill/support_mass_student",
                                                     "distill/grad_norm_logits_distill"])
    assert all(h["distill/frac_with_teacher"] == 1.0 for h in logs)  # the feedback reached every rollout
    assert moved(student_dir, dict(trainer.model.named_parameters())) > 0
    teacher = trainer.teacher.state()
    assert next(iter(teacher.values())).device.type == CUDA.type
    assert any(not torch.equal(teacher[name], value) for name, value in teacher_start.items())  # the EMA moved


# ---------------------------------------------------------------------------------------------------------------------
# TRL's fused LM head (GRPO's, a Triton kernel on CUDA) against our projection.


def test_trl_fused_lm_head_and_our_projection_give_the_same_logprobs_in_bf16():
    """A bf16 Qwen2 on CUDA with a vocabulary of 50,000 (TRL's kernel folds it in chunks of 32,768, ours takes rows in
    chunks of 256: both have a partial last chunk); GRPO's labels (prompt and padding at −100). TRL's
    `add_fused_lm_head` forward (what GRPOTrainer calls) against `token_logprobs(hidden, tokens, head=lm_head)` on
    the backbone's last hidden states, for the log-probs and the entropy, at τ = 0.7."""
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=50_000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).to(CUDA, torch.bfloat16).eval()
    with torch.no_grad():  # logits of std ≈ 3 as a trained LM's (the init gives ≈ 0.2: near-uniform log-probs)
        model.lm_head.weight.mul_(3 / (model.lm_head.weight.float().std() * math.sqrt(config.hidden_size)))
    add_fused_lm_head(model, temperature=TAU, outputs=("log_probs", "entropy"))

    prompt, completion = 40, 88
    input_ids = torch.randint(config.vocab_size, (4, prompt + completion), device=CUDA)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :13] = attention_mask[2, :29] = 0  # left padding
    attention_mask[3, -20:] = 0  # a completion that ended early
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :prompt] = -100  # GRPO scores the completion tokens only
    with torch.no_grad():
        fused = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        mask = labels[:, 1:] != -100  # position t predicts token t + 1
        logp, entropy = token_logprobs(hidden[:, :-1], input_ids[:, 1:], mask, head=model.lm_head, temperature=TAU,
                                       entropy=True)

        x = hidden[:, :-1][mask].float() @ model.lm_head.weight.float().T / TAU  # (N, V) exact logits / τ
    largest = x.abs().amax(-1)
    logp_bound = BF16_U * (x.gather(-1, input_ids[:, 1:][mask][:, None]).squeeze(-1).abs() + largest)
    p = x.softmax(-1)
    entropy_bound = BF16_U * largest * (p * (x - (p * x).sum(-1, keepdim=True)).abs()).sum(-1)

    theirs_logp, theirs_entropy = fused.log_probs[mask].float(), fused.entropy[mask].float()
    assert theirs_logp.std() > 1.0  # spread log-probs: a shifted token or a wrong τ would show far above the bound
    assert ((logp[mask] - theirs_logp).abs() <= logp_bound + 1e-4).all()  # + fp32 arithmetic
    assert ((entropy[mask] - theirs_entropy).abs() <= entropy_bound + 1e-4).all()
    assert (logp[~mask] == 0).all()
