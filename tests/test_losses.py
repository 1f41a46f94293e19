"""selfdistill.losses against brute-force references, gradcheck, the sampled-token estimator identity, edge cases,
and TRL 1.16's own loss functions on the same tensors.

The references below are written plainly, one row at a time, in float64: explicit softmax, explicit KL sums, the
top-k support by sorting. Our functions run in fp32 and must agree to 1e-5 in value and in gradient (the reference's
gradient comes from autograd through its plain formulas; ours is analytic).
"""

import math
import os
import types

import pytest
import torch

from selfdistill.losses import (
    DEFAULT_CHUNK, importance_weights, jsd, jsd_on_teacher_topk, masked_mean, reverse_kl_advantage, token_logprobs,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors and models: see conftest

TOL = dict(atol=1e-5, rtol=1e-5)
BETAS = [0.0, 0.3, 0.5, 1.0]  # 0.3 as well: β and 1 − β swapped agree at 0.5
# (top_k, support, add_tail); None = full vocabulary
SUPPORTS = [
    (None, "student", False),
    (4, "student", False),
    (4, "student", True),
    (4, "teacher", False),
    (4, "teacher", True),
]
B, T, V, H = 2, 5, 11, 6
# left and right padding and a hole: 7 valid rows, so chunk_size=3 leaves a partial chunk
MASK = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(seed, shape=(B, T, V)):
    return torch.randn(*shape, generator=_gen(seed)) * 2


# ---------------------------------------------------------------------------------------------------------------------
# Brute-force references (float64, one row at a time).


def ref_softmax(z):
    e = torch.exp(z - z.max())
    return e / e.sum()


def ref_kl(p, q):
    """KL(p‖q) = Σ_v p_v log(p_v / q_v), for strictly positive p and q."""
    return (p * torch.log(p / q)).sum()


def ref_gjsd(s, t, beta):
    """Generalized JSD_β: β=0 → KL(T‖S), β=1 → KL(S‖T), else β·KL(T‖M) + (1−β)·KL(S‖M), M = β·T + (1−β)·S."""
    if beta == 0.0:
        return ref_kl(t, s)
    if beta == 1.0:
        return ref_kl(s, t)
    m = beta * t + (1 - beta) * s
    return beta * ref_kl(t, m) + (1 - beta) * ref_kl(s, m)


def ref_row(zs, zt, beta, tau, top_k, support, add_tail):
    s, t = ref_softmax(zs / tau), ref_softmax(zt / tau)
    if top_k is None or top_k >= s.numel():
        return ref_gjsd(s, t, beta)
    keep = torch.argsort((s if support == "student" else t).detach(), descending=True)[:top_k]
    s_k, t_k = s[keep], t[keep]
    if add_tail:  # one extra bucket with the mass outside the support
        s_k, t_k = torch.cat([s_k, (1 - s_k.sum())[None]]), torch.cat([t_k, (1 - t_k.sum())[None]])
    else:  # renormalise over the support
        s_k, t_k = s_k / s_k.sum(), t_k / t_k.sum()
    return ref_gjsd(s_k, t_k, beta)


def ref_jsd(zs_BTV, zt_BTV, mask_BT, **kw):
    out = torch.zeros(mask_BT.shape, dtype=torch.float64)
    for b in range(mask_BT.shape[0]):
        for t in range(mask_BT.shape[1]):
            if mask_BT[b, t]:
                out[b, t] = ref_row(zs_BTV[b, t], zt_BTV[b, t], **kw)
    return out


def ref_token_logprobs(z_BTV, tokens_BT, mask_BT, tau):
    out = torch.zeros(mask_BT.shape, dtype=torch.float64)
    for b in range(mask_BT.shape[0]):
        for t in range(mask_BT.shape[1]):
            if mask_BT[b, t]:
                out[b, t] = torch.log(ref_softmax(z_BTV[b, t] / tau)[tokens_BT[b, t]])
    return out


def value_and_grad(fn, x, weights_BT):
    """`fn(x)` and the gradient of `Σ weights · fn(x)` with respect to the leaf `x` (arbitrary upstream weights)."""
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    (grad,) = torch.autograd.grad((y * weights_BT.to(y.dtype)).sum(), x)
    return y.detach(), grad


# ---------------------------------------------------------------------------------------------------------------------
# Against the references.


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("top_k,support,add_tail", SUPPORTS)
@pytest.mark.parametrize("tau,chunk_size", [(1.0, DEFAULT_CHUNK), (0.7, 3)])
def test_jsd_matches_reference(beta, top_k, support, add_tail, tau, chunk_size):
    zs, zt, w = _logits(0), _logits(1), torch.randn(B, T, generator=_gen(2))
    kw = dict(beta=beta, top_k=top_k, support=support, add_tail=add_tail)
    ref, ref_grad = value_and_grad(lambda x: ref_jsd(x, zt.double(), MASK, tau=tau, **kw), zs.double(), w)
    ours, grad = value_and_grad(lambda x: jsd(x, zt, MASK, temperature=tau, chunk_size=chunk_size, **kw), zs, w)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, **TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL)
    assert (ours[~MASK] == 0).all() and (grad[~MASK] == 0).all()
    assert (ref[MASK] > 1e-3).all()  # the divergences compared are not trivially 0


@pytest.mark.parametrize("tau,chunk_size", [(1.0, DEFAULT_CHUNK), (0.7, 3)])
def test_token_logprobs_matches_reference(tau, chunk_size):
    z, w = _logits(0), torch.randn(B, T, generator=_gen(2))
    tokens = torch.randint(V, (B, T), generator=_gen(3))
    ref, ref_grad = value_and_grad(lambda x: ref_token_logprobs(x, tokens, MASK, tau), z.double(), w)
    ours, grad = value_and_grad(
        lambda x: token_logprobs(x, tokens, MASK, temperature=tau, chunk_size=chunk_size), z, w
    )
    torch.testing.assert_close(ours.double(), ref, **TOL)
    torch.testing.assert_close(grad.double(), ref_grad, **TOL)
    assert (ours[~MASK] == 0).all()


def _heads(seed, bias=True):
    torch.manual_seed(seed)
    return torch.nn.Linear(H, V, bias=bias), torch.nn.Linear(H, V, bias=bias)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("top_k,support,add_tail", [SUPPORTS[0], SUPPORTS[2], SUPPORTS[3]])
def test_hidden_states_with_head_equal_logits_path(beta, top_k, support, add_tail):
    """`jsd(h, head=lin)` equals `jsd(lin(h))`, in value and in the gradients of h, weight and bias."""
    student_head, teacher_head = _heads(0)
    h_s, h_t = torch.randn(B, T, H, generator=_gen(1)), torch.randn(B, T, H, generator=_gen(2))
    w = torch.randn(B, T, generator=_gen(3))
    kw = dict(beta=beta, top_k=top_k, support=support, add_tail=add_tail, temperature=0.7, chunk_size=3)
    params = [student_head.weight, student_head.bias]

    def run(with_head):
        h = h_s.clone().requires_grad_()
        if with_head:
            y = jsd(h, h_t, MASK, student_head=student_head, teacher_head=teacher_head, **kw)
        else:
            with torch.no_grad():
                logits_t = teacher_head(h_t)
            y = jsd(student_head(h), logits_t, MASK, **kw)
        return (y.detach(), *torch.autograd.grad((y * w).sum(), [h, *params]))

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, **TOL)


def test_token_logprobs_hidden_states_with_head_equal_logits_path():
    head, _ = _heads(0)
    h, tokens = torch.randn(B, T, H, generator=_gen(1)), torch.randint(V, (B, T), generator=_gen(2))
    w = torch.randn(B, T, generator=_gen(3))

    def run(with_head):
        x = h.clone().requires_grad_()
        if with_head:
            y = token_logprobs(x, tokens, MASK, head=head, chunk_size=3)
        else:
            y = token_logprobs(head(x), tokens, MASK)
        return (y.detach(), *torch.autograd.grad((y * w).sum(), [x, head.weight, head.bias]))

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, **TOL)


def test_compute_dtype_follows_input():
    """bf16 is computed (and returned) in fp32, fp64 stays fp64."""
    z = _logits(0)
    assert jsd(z.bfloat16(), z.bfloat16(), MASK).dtype == torch.float32
    assert jsd(z.double(), z.double(), MASK).dtype == torch.float64
    assert token_logprobs(z.double(), torch.zeros(B, T, dtype=torch.long), MASK).dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------------------
# gradcheck (float64): the analytic backward against finite differences.

GC_MASK = torch.tensor([[1, 0, 1]], dtype=torch.bool)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("top_k,support,add_tail", SUPPORTS)
def test_jsd_gradcheck(beta, top_k, support, add_tail):
    zs = _logits(0, (1, 3, 6)).double().requires_grad_()
    zt = _logits(1, (1, 3, 6)).double()
    kw = dict(beta=beta, top_k=None if top_k is None else 3, support=support, add_tail=add_tail, temperature=0.7)
    assert torch.autograd.gradcheck(lambda x: jsd(x, zt, GC_MASK, **kw), (zs,))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("top_k", [None, 3])
def test_jsd_gradcheck_through_head(beta, top_k):
    """Gradients of hidden states, head weight and head bias (the head only needs `.weight` and `.bias`)."""
    g = _gen(0)
    h_s, h_t = torch.randn(1, 3, 4, generator=g, dtype=torch.float64), torch.randn(1, 3, 4, generator=g).double()
    weight, bias = torch.randn(6, 4, generator=g).double(), torch.randn(6, generator=g).double()
    teacher_head = types.SimpleNamespace(weight=torch.randn(6, 4, generator=g).double(), bias=None)

    def fn(h, weight, bias):
        head = types.SimpleNamespace(weight=weight, bias=bias)
        return jsd(h, h_t, GC_MASK, beta=beta, top_k=top_k, student_head=head, teacher_head=teacher_head, chunk_size=1)

    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (h_s, weight, bias)))


def test_token_logprobs_gradcheck():
    g = _gen(0)
    z = torch.randn(1, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    h, weight = torch.randn(1, 3, 4, generator=g).double(), torch.randn(6, 4, generator=g).double()
    tokens = torch.tensor([[2, 0, 5]])
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens, GC_MASK, temperature=0.7), (z,))

    def through_head(h, weight):
        return token_logprobs(h, tokens, GC_MASK, head=types.SimpleNamespace(weight=weight, bias=None))

    assert torch.autograd.gradcheck(through_head, (h.requires_grad_(), weight.requires_grad_()))


# ---------------------------------------------------------------------------------------------------------------------
# The sampled-token estimator: E_{x~S}[∇ sg(log S(x) − log T(x)) · log S(x)] = ∇ KL(S‖T).


def test_sampled_token_surrogate_is_unbiased_for_reverse_kl_gradient():
    """On V=8 and one position, the mean over N=200k samples of the surrogate's gradient matches ∇θ KL(S‖T).

    Each sample's gradient depends only on the sampled token x, so the 8 possible per-sample gradients are computed
    once (by autograd, through token_logprobs and reverse_kl_advantage) and indexed. The tolerance is 5 standard
    errors per coordinate, from the per-sample gradients' standard deviation: with a fixed seed the test is
    deterministic, and a correct estimator would fail it with probability < 1e-5 for a random seed.
    """
    Vs, N = 8, 200_000
    g = _gen(0)
    theta = torch.randn(Vs, generator=g, dtype=torch.float64).requires_grad_()
    logT = torch.log_softmax(torch.randn(Vs, generator=g, dtype=torch.float64), -1)

    def surrogate(tokens_1N):
        logp_S = token_logprobs(theta.expand(1, tokens_1N.shape[1], Vs), tokens_1N, chunk_size=N)
        adv = reverse_kl_advantage(logp_S, logT[tokens_1N], torch.ones_like(tokens_1N, dtype=torch.bool))
        return -adv * logp_S  # = sg(log S − log T) · log S

    # per-sample gradient of the surrogate for each possible token
    per_token = torch.stack([torch.autograd.grad(surrogate(torch.tensor([[x]])).sum(), theta)[0] for x in range(Vs)])
    samples = torch.multinomial(torch.softmax(theta.detach(), -1), N, replacement=True, generator=g)
    per_sample = per_token[samples]  # (N, V)
    estimate, std_err = per_sample.mean(0), per_sample.std(0) / math.sqrt(N)

    # the surrogate through the batched path gives the same mean (the batch, not the 8-row table, is the estimator)
    (batched,) = torch.autograd.grad(surrogate(samples[None]).mean(), theta)
    torch.testing.assert_close(batched, estimate)

    S = torch.softmax(theta, -1)
    (exact,) = torch.autograd.grad((S * (torch.log(S) - logT)).sum(), theta)
    assert ((estimate - exact).abs() <= 5 * std_err).all(), (estimate, exact, std_err)
    assert (exact.abs() > 20 * std_err).any()  # the test has power: a wrong sign or scale would fail


# ---------------------------------------------------------------------------------------------------------------------
# Discount γ.


def test_reverse_kl_advantage_discount_matches_double_loop():
    g = _gen(0)
    logp_s, logp_t = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    a = -(logp_s - logp_t)
    gamma = 0.9
    expected = torch.zeros(B, T)
    for b in range(B):
        for t in range(T):
            if MASK[b, t]:
                expected[b, t] = sum(gamma ** (s - t) * a[b, s] * MASK[b, s] for s in range(t, T))
    torch.testing.assert_close(reverse_kl_advantage(logp_s, logp_t, MASK, gamma=gamma), expected)
    torch.testing.assert_close(reverse_kl_advantage(logp_s, logp_t, MASK), a * MASK)
    for gamma in (0.0, 0.9):
        out = reverse_kl_advantage(logp_s.requires_grad_(), logp_t, MASK, gamma=gamma)
        assert (out[~MASK] == 0).all() and not out.requires_grad


# ---------------------------------------------------------------------------------------------------------------------
# Edge cases.


@pytest.mark.parametrize("top_k", [None, 4])
@pytest.mark.parametrize("mask", [MASK & torch.tensor([[False], [True]]), torch.zeros(B, T, dtype=torch.bool)])
def test_fully_masked_rows_give_zero_loss_and_zero_gradient(top_k, mask):
    """A fully masked row (and a fully masked batch) contributes 0 to the loss and 0 to the gradient, never NaN."""
    student_head, teacher_head = _heads(0)
    h = torch.randn(B, T, H, generator=_gen(1), requires_grad=True)
    h_t = torch.randn(B, T, H, generator=_gen(2))
    tokens = torch.randint(V, (B, T), generator=_gen(3))
    per_token = jsd(h, h_t, mask, top_k=top_k, student_head=student_head, teacher_head=teacher_head)
    per_token = per_token + token_logprobs(h, tokens, mask, head=student_head)
    loss = masked_mean(per_token, mask)
    loss.backward()
    assert (per_token[~mask] == 0).all() and (h.grad[~mask] == 0).all()
    assert torch.isfinite(h.grad).all() and torch.isfinite(student_head.weight.grad).all()
    if not mask.any():
        assert loss.item() == 0.0 and (student_head.weight.grad == 0).all() and (student_head.bias.grad == 0).all()


def _top5_only(z):
    """Logits filtered to −inf outside each row's top 5 (as top-k sampling does)."""
    return z.masked_fill(z < z.topk(5, dim=-1).values[..., -1:], float("-inf"))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("top_k,support,add_tail", [(None, "student", False), *[(8, *s[1:]) for s in SUPPORTS[1:]]])
@pytest.mark.parametrize("filtered", ["student", "teacher", "both"])
def test_minus_inf_logits_give_no_nan(beta, top_k, support, add_tail, filtered):
    """−inf logits outside a top-5 (in the student, the teacher or both; top-k=8 > 5 reaches into them): values and
    gradients stay finite. Where the true divergence is infinite (e.g. β=0 with teacher mass where the student has
    none) it is a large finite penalty instead (log-probs floored at LOG_FLOOR)."""
    zs_raw = _logits(0).requires_grad_()
    zs = _top5_only(zs_raw) if filtered in ("student", "both") else zs_raw
    zt = _top5_only(_logits(1)) if filtered in ("teacher", "both") else _logits(1)
    y = jsd(zs, zt, MASK, beta=beta, top_k=top_k, support=support, add_tail=add_tail)
    (grad,) = torch.autograd.grad(masked_mean(y, MASK), zs_raw)
    assert torch.isfinite(y).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("top_k,support,add_tail", SUPPORTS)
def test_identical_student_and_teacher_give_zero(beta, top_k, support, add_tail):
    z = _logits(0).requires_grad_()
    y = jsd(z, z, MASK, beta=beta, top_k=top_k, support=support, add_tail=add_tail, temperature=0.7)
    (grad,) = torch.autograd.grad(y.sum(), z)
    torch.testing.assert_close(y, torch.zeros(B, T), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, torch.zeros(B, T, V), atol=1e-6, rtol=0)
    tokens = torch.randint(V, (B, T), generator=_gen(1))
    logp = token_logprobs(z, tokens, MASK)
    assert (reverse_kl_advantage(logp, logp.detach(), MASK) == 0).all()


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("add_tail", [False, True])
@pytest.mark.parametrize("support", ["student", "teacher"])
def test_top_k_at_least_vocabulary_is_full_vocabulary(beta, add_tail, support):
    zs, zt = _logits(0), _logits(1)
    full = jsd(zs, zt, MASK, beta=beta)
    for k in (V, V + 5):
        torch.testing.assert_close(jsd(zs, zt, MASK, beta=beta, top_k=k, support=support, add_tail=add_tail), full)


# ---------------------------------------------------------------------------------------------------------------------
# Importance weights.


def test_importance_weights():
    now = torch.tensor([0.0, -1.0, 2.0, 50.0, -50.0], requires_grad=True)
    sampled = torch.tensor([0.0, -2.0, 0.0, 0.0, 0.0])
    w = importance_weights(now, sampled, clip=float("inf"))
    torch.testing.assert_close(w, torch.tensor([1.0, math.e, math.e**2, math.exp(20.0), math.exp(-20.0)]))
    assert not w.requires_grad  # detached
    w = importance_weights(now, sampled, clip=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, 2.0, 2.0, math.exp(-20.0)]))


# ---------------------------------------------------------------------------------------------------------------------
# Parity with TRL 1.16 on the same tensors.
#
# Mapping of conventions:
# - SDPO's `distillation_alpha` is our β (0: KL(T‖S), 1: KL(S‖T), else the generalized JSD with M = α·T + (1−α)·S);
#   SDPO's loss utils take logits already divided by τ (SDPOTrainer divides the model's logits), we take τ.
# - SDPO's top-k support is always the student's: our `support="student"`; `distillation_add_tail` is `add_tail`.
# - SDPO's sampled-token loss is `sg(log S − log T) · log S` per token = −reverse_kl_advantage · log S.
# - TRL's DistillationTrainer `_chunked_divergence_loss` returns `(Σ_valid D / n_valid, entropy sum, n_valid)`:
#   its loss is `masked_mean(jsd(...), mask)`. Its `temperature` divides the logits before both softmaxes, like ours.


@pytest.fixture(scope="module")
def sdpo():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the "experimental API" warning, once per import
    from trl.experimental.sdpo import loss_utils

    return loss_utils


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("top_k,add_tail", [(None, False), (4, False), (4, True)])
def test_parity_with_trl_sdpo_loss_utils(sdpo, beta, top_k, add_tail):
    """Full-vocabulary and top-k (student support, with and without tail) SDPO losses: values and gradients.

    With the tail, TRL runs on the same tensors in fp64: its tail `log(1 − Σ_K p)` loses precision in fp32 when the
    support holds almost all of the student's mass (here its fp32 values are 7e-4 off at β=0); ours sums the tail's
    probabilities directly and stays within 1e-5 of the fp64 result.
    """
    tau = 0.7
    zs, zt, w = _logits(0), _logits(1), torch.randn(B, T, generator=_gen(2))
    ones = torch.ones(B, T, dtype=torch.bool)

    def trl(x):
        x, t = x / tau, zt.to(x.dtype) / tau  # SDPOTrainer hands its loss utils logits already divided by τ
        if top_k is None:
            return sdpo.compute_full_logit_self_distillation_loss(x, t, distillation_alpha=beta)
        return sdpo.compute_topk_self_distillation_loss(
            x, t, distillation_topk=top_k, distillation_alpha=beta, distillation_add_tail=add_tail
        )

    ours = value_and_grad(lambda x: jsd(x, zt, ones, beta=beta, temperature=tau, top_k=top_k, add_tail=add_tail), zs, w)
    theirs = value_and_grad(trl, zs.double() if add_tail else zs, w)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.to(b.dtype), b, **TOL)
    if top_k is None:  # compute_divergence on log-probs: log_softmax of log-probs is the identity
        logp_s, logp_t = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
        theirs = sdpo.compute_divergence(logp_s, logp_t, beta)
        torch.testing.assert_close(jsd(logp_s, logp_t, ones, beta=beta), theirs, **TOL)


def test_parity_with_trl_sdpo_sampled_token_loss(sdpo):
    zs, zt, w = _logits(0), _logits(1), torch.randn(B, T, generator=_gen(2))
    tokens = torch.randint(V, (B, T), generator=_gen(3))
    ones = torch.ones(B, T, dtype=torch.bool)

    def ours(x):
        logp_s = token_logprobs(x, tokens, ones)
        return -reverse_kl_advantage(logp_s, token_logprobs(zt, tokens, ones), ones) * logp_s

    def trl(x):
        return sdpo.compute_sampled_token_self_distillation_loss(x, zt, tokens, distillation_alpha=1.0)

    for a, b in zip(value_and_grad(ours, zs, w), value_and_grad(trl, zs, w)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("beta", BETAS)
def test_parity_with_trl_distillation_trainer_chunked_jsd(beta):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    tau = 0.7
    student_head, teacher_head = _heads(0)
    teacher_head.requires_grad_(False)
    h_s, h_t = torch.randn(B, T, H, generator=_gen(1)), torch.randn(B, T, H, generator=_gen(2))
    params = [student_head.weight, student_head.bias]

    def run(fn):
        h = h_s.clone().requires_grad_()
        loss = fn(h)
        return (loss.detach(), *torch.autograd.grad(loss, [h, *params]))

    def ours(h):
        per_token = jsd(h, h_t, MASK, beta=beta, temperature=tau, student_head=student_head, teacher_head=teacher_head)
        return masked_mean(per_token, MASK)

    def trl(h):
        loss, _, n_valid = _chunked_divergence_loss(
            h, h_t, student_head.weight, teacher_head.weight, MASK, beta,
            student_lm_head_bias=student_head.bias, teacher_lm_head_bias=teacher_head.bias, temperature=tau,
        )  # fmt: skip
        assert n_valid == MASK.sum()
        return loss

    for a, b in zip(run(ours), run(trl)):
        torch.testing.assert_close(a, b, **TOL)


# ---------------------------------------------------------------------------------------------------------------------
# The teacher's top-k given as ids and log-probs (a vLLM-served teacher) instead of logits.


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("add_tail", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_given_teacher_topk_equals_teacher_support_jsd(beta, add_tail, temperature):
    """Told the teacher's top-k ids and its log-probs on them, the divergence and its gradient equal `jsd` on the
    teacher's top-k support computed from the teacher's logits (values and gradient in fp64, 1e-10)."""
    K = 4
    h = torch.randn(B, T, H, dtype=torch.float64, generator=_gen(1), requires_grad=True)
    head = torch.nn.Linear(H, V).double()
    z_t = 2 * torch.randn(B, T, V, dtype=torch.float64, generator=_gen(2))
    ids = (z_t / temperature).topk(K, dim=-1).indices
    logp = (z_t / temperature).log_softmax(-1).gather(-1, ids)
    common = dict(beta=beta, add_tail=add_tail, temperature=temperature)
    expected = jsd(h, z_t, MASK, student_head=head, top_k=K, support="teacher", **common)
    got = jsd_on_teacher_topk(h, head, ids, logp, MASK, **common)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    grad_expected, grad_got = (torch.autograd.grad(x.sum(), h)[0] for x in (expected, got))
    torch.testing.assert_close(grad_got, grad_expected, atol=1e-10, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda x: jsd_on_teacher_topk(x, head, ids, logp, MASK, **common), (h,))


def test_given_teacher_topk_rejects_mismatched_shapes():
    ids = torch.zeros(B, T, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(B, T, K\)"):
        jsd_on_teacher_topk(torch.randn(B, T, V), None, ids, torch.zeros(B, T, 4), MASK)


# ---------------------------------------------------------------------------------------------------------------------
# One projection for both: the divergence plus the sampled tokens' log-probs and entropy (`tokens_BT=`), as the
# trainers use it for GRPO's policy loss and the distillation term together.


def ref_entropy(z_BTV, tau):
    logp = (z_BTV.double() / tau).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("top_k,support,add_tail", SUPPORTS)
def test_divergence_with_token_logprobs_equals_the_separate_functions(beta, top_k, support, add_tail):
    """Values and gradients (of h, weight, bias) of `a·jsd + b·logp` equal the separate `jsd` and `token_logprobs`;
    the entropy equals a plain −Σ p log p, at masked positions 0, without gradient."""
    student_head, teacher_head = _heads(0)
    h_s, h_t = torch.randn(B, T, H, generator=_gen(1)), torch.randn(B, T, H, generator=_gen(2))
    tokens = torch.randint(V, (B, T), generator=_gen(3))
    a, b = torch.randn(B, T, generator=_gen(4)), torch.randn(B, T, generator=_gen(5))
    kw = dict(beta=beta, top_k=top_k, support=support, add_tail=add_tail, temperature=0.7, chunk_size=3,
              student_head=student_head, teacher_head=teacher_head)
    params = [student_head.weight, student_head.bias]

    def run(fused):
        h = h_s.clone().requires_grad_()
        if fused:
            div, logp, entropy = jsd(h, h_t, MASK, tokens_BT=tokens, **kw)
            assert not entropy.requires_grad
            with torch.no_grad():
                expected = ref_entropy(student_head(h_s), 0.7) * MASK
            torch.testing.assert_close(entropy.double(), expected, **TOL)
        else:
            div = jsd(h, h_t, MASK, **kw)
            logp = token_logprobs(h, tokens, MASK, head=student_head, temperature=0.7, chunk_size=3)
        return (div.detach(), logp.detach(), *torch.autograd.grad((a * div + b * logp).sum(), [h, *params]))

    for x, y in zip(run(True), run(False)):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("add_tail", [False, True])
def test_given_teacher_topk_with_token_logprobs_equals_the_separate_functions(add_tail):
    K = 4
    h_s = torch.randn(B, T, H, generator=_gen(1))
    head = torch.nn.Linear(H, V)
    z_t = 2 * torch.randn(B, T, V, generator=_gen(2))
    ids = z_t.topk(K, dim=-1).indices
    logp_t = z_t.log_softmax(-1).gather(-1, ids)
    tokens = torch.randint(V, (B, T), generator=_gen(3))
    a, b = torch.randn(B, T, generator=_gen(4)), torch.randn(B, T, generator=_gen(5))

    def run(fused):
        h = h_s.clone().requires_grad_()
        if fused:
            div, logp, _ = jsd_on_teacher_topk(h, head, ids, logp_t, MASK, add_tail=add_tail, tokens_BT=tokens)
        else:
            div = jsd_on_teacher_topk(h, head, ids, logp_t, MASK, add_tail=add_tail)
            logp = token_logprobs(h, tokens, MASK, head=head)
        return (div.detach(), logp.detach(), *torch.autograd.grad((a * div + b * logp).sum(), [h, head.weight]))

    for x, y in zip(run(True), run(False)):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("top_k,support,add_tail", [SUPPORTS[0], SUPPORTS[1], SUPPORTS[2]])
def test_divergence_with_token_logprobs_gradcheck(top_k, support, add_tail):
    zs = _logits(0, (1, 3, 6)).double().requires_grad_()
    zt = _logits(1, (1, 3, 6)).double()
    tokens = torch.tensor([[2, 0, 5]])
    kw = dict(beta=0.5, top_k=None if top_k is None else 3, support=support, add_tail=add_tail, temperature=0.7)

    def both(x):
        div, logp, _ = jsd(x, zt, GC_MASK, tokens_BT=tokens, **kw)
        return div, logp

    assert torch.autograd.gradcheck(both, (zs,))


def test_token_logprobs_entropy_and_all_masked_rows():
    z = _logits(0)
    tokens = torch.randint(V, (B, T), generator=_gen(1))
    logp, entropy = token_logprobs(z, tokens, MASK, temperature=0.7, entropy=True)
    torch.testing.assert_close(logp, token_logprobs(z, tokens, MASK, temperature=0.7))
    torch.testing.assert_close(entropy.double(), ref_entropy(z, 0.7) * MASK, **TOL)
    none = torch.zeros_like(MASK)
    div, logp, entropy = jsd(z.requires_grad_(), z, none, tokens_BT=tokens)
    assert div.shape == logp.shape == entropy.shape == (B, T) and not (div.any() or logp.any())


# ---------------------------------------------------------------------------------------------------------------------
# Diagnostics (`stats=`).


@pytest.mark.parametrize("top_k,support,add_tail", SUPPORTS, ids=lambda v: str(v))
def test_stats_hold_each_terms_logit_gradient_norm_and_the_support_mass(top_k, support, add_tail):
    """With logits as input the gradient of the input *is* the gradient at the logits, so each term's recorded
    `‖∂loss/∂z‖²` must equal the squared norm of the gradient autograd gives for that term alone; the support masses
    equal Σ_K softmax over the brute-force top-k."""
    zs, zt = _logits(0), _logits(1)
    tokens = torch.randint(V, (B, T), generator=_gen(2))
    a, b = 0.7, -1.3  # weights of the two terms, as the trainer's loss weights them

    def loss_of(x, stats=None):
        per_token, logp, _ = jsd(x, zt, MASK, top_k=top_k, support=support, add_tail=add_tail, tokens_BT=tokens,
                                 stats=stats)
        return a * per_token.sum(), b * logp.sum()

    stats = {}
    x = zs.clone().requires_grad_()
    sum(loss_of(x, stats)).backward()
    grads = []
    for term in range(2):
        x_alone = zs.clone().requires_grad_()
        loss_of(x_alone)[term].backward()
        grads.append(x_alone.grad)
    torch.testing.assert_close(stats["grad_sq_divergence"], grads[0].square().sum(), **TOL)
    torch.testing.assert_close(stats["grad_sq_logp"], grads[1].square().sum(), **TOL)
    if top_k is None:
        assert "support_rows" not in stats
        return
    chooser = zs if support == "student" else zt
    top = chooser[MASK].topk(top_k, dim=-1).indices
    for key, z in (("support_mass_student", zs), ("support_mass_teacher", zt)):
        expected = z[MASK].softmax(-1).gather(-1, top).sum()
        torch.testing.assert_close(stats[key], expected, **TOL)
    assert stats["support_rows"].item() == MASK.sum().item()


def test_stats_are_recorded_by_token_logprobs_and_the_served_teacher_topk():
    z = _logits(0)
    tokens = torch.randint(V, (B, T), generator=_gen(2))
    stats = {}
    x = z.clone().requires_grad_()
    token_logprobs(x, tokens, MASK, stats=stats).sum().backward()
    torch.testing.assert_close(stats["grad_sq_logp"], x.grad.square().sum(), **TOL)
    ids = _logits(1).topk(4, dim=-1).indices
    logp_t = torch.log_softmax(_logits(1), -1).gather(-1, ids)
    stats = {}
    jsd_on_teacher_topk(z.clone().requires_grad_(), None, ids, logp_t, MASK, add_tail=True, stats=stats)
    torch.testing.assert_close(stats["support_mass_teacher"], logp_t[MASK].exp().sum(), **TOL)
