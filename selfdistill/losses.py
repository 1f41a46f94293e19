"""The divergence core: pure tensor functions, no trainer state.

Shapes are in the names: `B` batch, `T` completion tokens, `V` vocabulary, `H` hidden size, `N` flattened rows.

Memory: nothing here materialises `(B, T, V)` in fp32. Functions that take a `head` (an `nn.Linear`-like callable,
e.g. `model.lm_head`) receive hidden states `(B, T, H)` and project them to logits one chunk of tokens at a time
under activation checkpointing, so peak memory is O(chunk · V) in the forward *and* the backward pass. Without a
head they take logits `(B, T, V)` and still work chunk by chunk, in fp32 inside a chunk. Only unmasked positions
are computed at all.

Conventions (shared with TRL's DistillationTrainer and `trl.experimental.sdpo`):
- temperature τ: all log-probs are `log_softmax(logits / τ)`, the distribution the student sampled from;
- generalized JSD_β with M = β·T + (1−β)·S, JSD_β = β·KL(T‖M) + (1−β)·KL(S‖M) for 0 < β < 1,
  and the limits β=0 → forward KL(T‖S), β=1 → reverse KL(S‖T) (Agarwal et al. 2024, "On-Policy Distillation of
  Language Models", GKD; TRL's `beta`, SDPO's `distillation_alpha`).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

Head = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_CHUNK = 1024


def _chunked_rows(fn, row_tensors: list[torch.Tensor], mask_BT: torch.Tensor, chunk_size: int):
    """Apply `fn(*rows) -> tuple of (n,)` to the unmasked rows of `(B, T, ...)` tensors, `chunk_size` rows at a time.

    Returns a tuple of fp32 `(B, T)` tensors, zero at masked positions. Each chunk runs under non-reentrant
    checkpointing when a gradient is needed, so its `(chunk, V)` intermediates are freed after the forward pass
    and recomputed in the backward pass. A fully masked input still runs `fn` once on zero rows, so the result
    stays attached to the graph (loss 0, gradient 0).
    """
    B, T = mask_BT.shape
    index_N = mask_BT.reshape(-1).nonzero().squeeze(-1)
    rows = [x.reshape(B * T, *x.shape[2:]).index_select(0, index_N) for x in row_tensors]
    pieces = []
    for start in range(0, max(index_N.numel(), 1), chunk_size):
        chunk = [r[start : start + chunk_size] for r in rows]
        if torch.is_grad_enabled() and any(r.requires_grad for r in chunk):
            pieces.append(checkpoint(fn, *chunk, use_reentrant=False))
        else:
            pieces.append(fn(*chunk))
    return tuple(
        torch.zeros(B * T, device=mask_BT.device).index_copy(0, index_N, torch.cat(parts).float()).view(B, T)
        for parts in zip(*pieces)
    )


def _scaled_logits(x: torch.Tensor, head: Head | None, temperature: float) -> torch.Tensor:
    logits = x if head is None else head(x)
    return logits.float() / temperature


def token_logprobs(
    x_BTX: torch.Tensor,
    tokens_BT: torch.Tensor,
    mask_BT: torch.Tensor | None = None,
    *,
    head: Head | None = None,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Log-probability of given tokens: `logp_BT[b, t] = log_softmax(z_bt / τ)[tokens_BT[b, t]]`.

    `x_BTX` are logits `(B, T, V)`, or hidden states `(B, T, H)` when `head` maps them to logits. Computed in fp32
    per chunk of `chunk_size` tokens; masked positions are skipped and return 0. Differentiable in `x_BTX` and in
    the head's parameters.
    """
    if mask_BT is None:
        mask_BT = torch.ones_like(tokens_BT, dtype=torch.bool)

    def fn(x, tok):
        logits = _scaled_logits(x, head, temperature)
        return (logits.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1),)

    return _chunked_rows(fn, [x_BTX, tokens_BT], mask_BT.bool(), chunk_size)[0]


def reverse_kl_advantage(
    logp_student_BT: torch.Tensor, logp_teacher_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 0.0
) -> torch.Tensor:
    """Sampled-token reverse-KL advantage, detached and masked.

    `a_BT = −(logp_S − logp_T)` on tokens sampled from the student; its policy-gradient surrogate
    `sg(logp_S − logp_T) · logp_S` has, in expectation over x ~ S, the gradient of KL(S‖T). With a discount γ > 0
    the advantage at t is the discounted sum of the later per-token terms, `A_t = Σ_{s≥t} γ^{s−t} a_s`; γ = 0 gives
    the per-token term. Source: Thinking Machines, "On-Policy Distillation" (2025); tinker-cookbook
    `incorporate_kl_penalty` (`kl_advantages = −coef · mask · reverse_kl`).
    """
    mask = mask_BT.to(logp_student_BT.dtype)
    a_BT = -(logp_student_BT.detach() - logp_teacher_BT.detach()) * mask
    if gamma == 0.0:
        return a_BT
    out_BT = torch.zeros_like(a_BT)
    running_B = torch.zeros_like(a_BT[:, 0])
    for t in range(a_BT.shape[1] - 1, -1, -1):
        running_B = a_BT[:, t] + gamma * running_B
        out_BT[:, t] = running_B
    return out_BT * mask


def _divergence_from_logprobs(logp_s: torch.Tensor, logp_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD_β over the last dimension of two log-distributions (see the module docstring).

    Zero-probability entries (−inf log-probs, e.g. top-k filtered logits) contribute exactly 0 and no NaN
    gradient: the `p · log p` products use a log-prob clamped to a finite value where p = 0.
    """
    p_s, p_t = logp_s.exp(), logp_t.exp()
    finite_s = torch.where(p_s > 0, logp_s, torch.zeros_like(logp_s))
    finite_t = torch.where(p_t > 0, logp_t, torch.zeros_like(logp_t))
    if beta == 0.0:  # forward KL(T‖S); where T has mass, S must too (else +inf, as it should be)
        return (p_t * (finite_t - torch.where(p_t > 0, logp_s, torch.zeros_like(logp_s)))).sum(-1)
    if beta == 1.0:  # reverse KL(S‖T)
        return (p_s * (finite_s - torch.where(p_s > 0, logp_t, torch.zeros_like(logp_t)))).sum(-1)
    logp_m = torch.logaddexp(logp_s + math.log1p(-beta), logp_t + math.log(beta))
    finite_m = torch.where(logp_m > float("-inf"), logp_m, torch.zeros_like(logp_m))
    kl_t_m = (p_t * (finite_t - finite_m)).sum(-1)
    kl_s_m = (p_s * (finite_s - finite_m)).sum(-1)
    return beta * kl_t_m + (1 - beta) * kl_s_m


def _append_tail(logp_K: torch.Tensor) -> torch.Tensor:
    """Add one bucket with the mass outside the support: `log(1 − Σ_k p_k)`, so the K+1 entries sum to 1."""
    captured = logp_K.logsumexp(-1, keepdim=True).clamp(max=-1e-7)  # clamp: keep log(1 − 1) finite
    return torch.cat([logp_K, torch.log(-torch.expm1(captured))], dim=-1)


def jsd(
    student_BTX: torch.Tensor,
    teacher_BTX: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    beta: float = 0.5,
    student_head: Head | None = None,
    teacher_head: Head | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    support: str = "student",
    add_tail: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Per-token generalized JSD_β between the student S and teacher T, `(B, T)`, zero at masked positions.

    β=0 is forward KL(T‖S), β=1 is reverse KL(S‖T), otherwise M = β·T + (1−β)·S and
    JSD_β = β·KL(T‖M) + (1−β)·KL(S‖M) (GKD, Agarwal et al. 2024; TRL DistillationTrainer's `beta`).

    - Full vocabulary when `top_k` is None.
    - Top-k: the support is the k most likely tokens of the `support` model ("student" or "teacher"); both
      distributions are restricted to it and either renormalised over it, or, with `add_tail`, extended by one
      bucket holding the remaining mass `1 − Σ_k p` (the SDPO paper code's tail; lasgroup/SDPO). `k ≥ V` is the
      full vocabulary, where the tail is empty and is dropped.

    Inputs are logits `(B, T, V)` or hidden states with a head (see `token_logprobs`). The teacher is detached:
    the gradient flows into the student only.
    """
    if support not in ("student", "teacher"):
        raise ValueError(f"support must be 'student' or 'teacher', got {support!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")

    def fn(xs, xt):
        logp_s = _scaled_logits(xs, student_head, temperature).log_softmax(-1)
        with torch.no_grad():
            logp_t = _scaled_logits(xt, teacher_head, temperature).log_softmax(-1)
        if top_k is not None and top_k < logp_s.shape[-1]:
            idx = (logp_s if support == "student" else logp_t).detach().topk(top_k, dim=-1).indices
            logp_s, logp_t = logp_s.gather(-1, idx), logp_t.gather(-1, idx)
            if add_tail:
                logp_s, logp_t = _append_tail(logp_s), _append_tail(logp_t)
            else:
                logp_s, logp_t = logp_s.log_softmax(-1), logp_t.log_softmax(-1)
        return (_divergence_from_logprobs(logp_s, logp_t, beta),)

    return _chunked_rows(fn, [student_BTX, teacher_BTX.detach()], mask_BT.bool(), chunk_size)[0]


def importance_weights(logp_now_BT: torch.Tensor, logp_sampled_BT: torch.Tensor, clip: float) -> torch.Tensor:
    """Token-level importance weights `min(exp(logp_now − logp_sampled), clip)`, detached.

    Corrects the distillation term for tokens sampled by an older (or differently computed, e.g. vLLM) policy.
    The log-ratio is clamped to ±20 before exp so the weight stays finite. Source: SDPO paper code (lasgroup/SDPO),
    `trl.experimental.sdpo` `apply_importance_sampling_clipping`.
    """
    log_ratio = (logp_now_BT - logp_sampled_BT).detach().clamp(-20.0, 20.0)
    return log_ratio.exp().clamp(max=clip)


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """`Σ x·mask / max(Σ mask, 1)`: a fully masked batch gives 0, not NaN."""
    mask = mask_BT.to(x_BT.dtype)
    return (x_BT * mask).sum() / mask.sum().clamp(min=1.0)
