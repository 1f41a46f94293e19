"""The divergence core: pure tensor functions, no trainer state.

Shapes are in the names: `B` batch, `T` completion tokens, `V` vocabulary, `H` hidden size, `K` top-k support,
`R = B·T` flattened rows, `N` unmasked rows.

Memory: nothing here materialises `(B, T, V)`. Functions that take a `head` (an `nn.Linear`, e.g. `model.lm_head`)
receive hidden states `(B, T, H)` and project them to logits one chunk of `DEFAULT_CHUNK` rows at a time into a few
reused `(rows, V)` buffers (at most 4, in the JSD's forward pass), in the forward *and* the backward pass. The head's
weight gradient is one `(V, H)` buffer in the compute dtype that every chunk adds into; a bf16 head is cast to fp32
once per pass. Without a head the functions take logits `(B, T, V)` and still work chunk by chunk. Only unmasked
positions are computed at all.

Speed: each function is a custom `autograd.Function` with the analytic gradient with respect to the logits. The
backward pass recomputes a chunk's logits (storing them would cost O(N · V)), forms `G = ∂loss/∂z` in place, and
multiplies it back through the head: `∂h = G W`, `∂W += Gᵀ h`, `∂b += Σ G`. Full-vocabulary JSD: 6 matmuls of
`N × H × V` (2 forward, 4 backward); top-k: 5 (the teacher's support log-probs are kept, not recomputed). TRL's
chunked JSD needs 8, SDPO's loss utils 4 plus full `(N, V)` tensors (see benchmarks/losses.py).

Numerics: the compute dtype is `promote_types(input, float32)`, so bf16/fp16 inputs are computed in fp32 and fp64
inputs in fp64 (for `gradcheck`); outputs have the compute dtype. Log-probs are floored at `LOG_FLOOR`: a
probability that is exactly 0 (a −inf logit, e.g. top-k filtered) then has a finite log, so `0 · log 0 = 0`, and a
divergence that is truly infinite (e.g. teacher mass where the student has none, for KL(T‖S)) becomes a large finite
penalty (≈ p · 1e4) with finite gradients instead of inf/NaN. No finite logit gap reaches the floor in practice.

Conventions (shared with TRL's DistillationTrainer and `trl.experimental.sdpo`):
- temperature τ: all log-probs are `log_softmax(logits / τ)`, the distribution the student sampled from;
- generalized JSD_β with M = β·T + (1−β)·S, JSD_β = β·KL(T‖M) + (1−β)·KL(S‖M) for 0 < β < 1,
  and the limits β=0 → forward KL(T‖S), β=1 → reverse KL(S‖T) (Agarwal et al. 2024, "On-Policy Distillation of
  Language Models", GKD; TRL's `beta`, SDPO's `distillation_alpha`).
"""

import math
from contextlib import nullcontext

import torch
from torch.autograd.function import once_differentiable

Head = torch.nn.Linear  # anything with `.weight` (V, H) and `.bias` (V) or None

# Rows per chunk. Each chunk's projection streams the whole (V, H) head, so fewer rows make it slower (measured on
# CPU, V=152k, H=896: 1.5× at 55 rows, flat from about 220); more rows only cost memory (148 MiB per fp32 buffer
# at V=152k).
DEFAULT_CHUNK = 256
LOG_FLOOR = -1e4  # exp(LOG_FLOOR) is exactly 0 in fp32 and fp64


# ---------------------------------------------------------------------------------------------------------------------
# Chunked driver: projection, buffers, and the backward through the head, shared by all losses.


def _logits_(x_nX: torch.Tensor, weight, bias, temperature: float, out_nV: torch.Tensor) -> torch.Tensor:
    """`out ← (x Wᵀ + b) / τ`, or `x / τ` without a head, in the dtype of `out` (fp32 or fp64)."""
    if weight is None:
        out_nV.copy_(x_nX)
    else:
        torch.mm(x_nX.to(out_nV.dtype), weight.t(), out=out_nV)
        if bias is not None:
            out_nV.add_(bias)
    if temperature != 1.0:
        out_nV.div_(temperature)
    return out_nV


def _softmax(z_nV: torch.Tensor, out_nV: torch.Tensor) -> torch.Tensor:
    """`out ← softmax(z)`; returns the row log-normaliser `logsumexp(z)`, `(n, 1)`.

    One exp per entry, and no temporaries: torch's `logsumexp` is about 4× slower than `exp` on CPU.
    """
    max_n1 = z_nV.amax(-1, keepdim=True)
    sum_n1 = torch.sub(z_nV, max_n1, out=out_nV).exp_().sum(-1, keepdim=True)
    out_nV.div_(sum_n1)
    return max_n1 + sum_n1.log()


def _rowdot_(a_nV: torch.Tensor, b_nV: torch.Tensor) -> torch.Tensor:
    """`Σ_v a·b` per row, overwriting `a` (an `(n, V)` temporary costs more than the product on CPU)."""
    return a_nV.mul_(b_nV).sum(-1)


def _record(stats: dict | None, key: str, value: torch.Tensor) -> None:
    """`stats[key] += value` (detached), for the diagnostics a caller asked for with `stats=`."""
    if stats is not None:
        stats[key] = stats.get(key, 0.0) + value.detach()


def _record_grad(stats: dict | None, key: str, G: torch.Tensor) -> None:
    """Accumulate `‖G‖²` (a dense or a `_TopkJSD` sparse gradient with respect to the logits) into `stats[key]`."""
    if stats is not None:
        _record(stats, key, torch.linalg.vector_norm(G).square())


class _ChunkedLoss(torch.autograd.Function):
    """Per-row values `f(z_s, z_t)` of the unmasked rows, chunk by chunk; `rule` supplies f and `∂f/∂z_s`.

    The rule declares how many `(rows, V)` buffers each pass needs: the logits of each model, then work buffers.
    `rule.forward(zs, zt, work, idx)` (`idx`: the chunk's row indices in `R`) may overwrite its `(n, V)` arguments and
    returns `(value_n, *aux_n)`; the small aux tensors are kept for the backward pass. `rule.backward(zs, zt, work,
    idx, aux, go_n)` gets freshly recomputed logits (each only if `rule.student_in_backward`,
    `rule.teacher_in_backward`) and returns `G = go · ∂f/∂z_s`: dense, possibly in the storage of `zs`, or a sparse
    COO tensor. The teacher's inputs are constants. Both passes run inside `rule.weights_context()`, which gathers
    heads that DeepSpeed ZeRO-3 partitions (`selfdistill.sharding.whole_heads`; a null context otherwise).
    """

    @staticmethod
    def forward(ctx, rule, index_N, xs_RX, ws, bs, xt_RX, wt, bt):
        ctx.save_for_backward(index_N, xs_RX, ws, bs, xt_RX, wt, bt)
        with rule.weights_context():
            return _ChunkedLoss._forward(ctx, rule, index_N, xs_RX, ws, bs, xt_RX, wt, bt)

    @staticmethod
    def _forward(ctx, rule, index_N, xs_RX, ws, bs, xt_RX, wt, bt):
        dtype = rule.dtype
        ws_, wt_ = (w if w is None else w.to(dtype) for w in (ws, wt))  # one cast per pass (a no-op in fp32)
        N, V = index_N.numel(), xs_RX.shape[-1] if ws is None else ws.shape[0]
        ctx.rule = rule
        ctx.rows = rows = max(1, min(N, rule.chunk_size))
        work = [torch.empty(rows, V, dtype=dtype, device=xs_RX.device) for _ in range(rule.forward_buffers)]
        values, auxes = [], []
        for start in range(0, N, rows):
            sl = slice(start, min(start + rows, N))
            n, idx = sl.stop - start, index_N[sl]
            bufs = [w[:n] for w in work]
            zs = _logits_(xs_RX.index_select(0, idx), ws_, bs, rule.temperature, bufs.pop(0))
            zt = None if xt_RX is None else _logits_(xt_RX.index_select(0, idx), wt_, bt, rule.temperature, bufs.pop(0))
            value, *aux = rule.forward(zs, zt, bufs, idx)
            values.append(value)
            auxes.append(aux)
        ctx.aux = [torch.cat(a) for a in zip(*auxes)]  # derived, not inputs: no need for save_for_backward
        return torch.cat(values) if values else xs_RX.new_zeros((0, *rule.value_shape), dtype=dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, go_N):
        with ctx.rule.weights_context():  # ZeRO-3: the heads are gathered again for the recomputation
            return _ChunkedLoss._backward(ctx, go_N)

    @staticmethod
    def _backward(ctx, go_N):
        rule, rows, aux = ctx.rule, ctx.rows, ctx.aux
        index_N, xs_RX, ws, bs, xt_RX, wt, bt = ctx.saved_tensors
        _, _, need_x, need_w, need_b, *_ = ctx.needs_input_grad
        dtype, N = rule.dtype, index_N.numel()
        ws_, wt_ = (w if w is None else w.to(dtype) for w in (ws, wt))
        V = xs_RX.shape[-1] if ws is None else ws.shape[0]
        grad_x = torch.zeros_like(xs_RX) if need_x else None
        grad_w = torch.zeros_like(ws_) if need_w else None  # accumulated in the compute dtype
        grad_b = torch.zeros(V, dtype=dtype, device=xs_RX.device) if need_b else None
        work = [torch.empty(rows, V, dtype=dtype, device=xs_RX.device) for _ in range(rule.backward_buffers)]
        go_N = go_N.to(dtype) / rule.temperature  # z = logits / τ, so ∂/∂logits = ∂/∂z / τ
        for start in range(0, N, rows):
            sl = slice(start, min(start + rows, N))
            n, idx = sl.stop - start, index_N[sl]
            bufs = [w[:n] for w in work]
            x_nX = xs_RX.index_select(0, idx)
            zs = zt = None
            if rule.student_in_backward:
                zs = _logits_(x_nX, ws_, bs, rule.temperature, bufs.pop(0))
            if rule.teacher_in_backward:
                zt = _logits_(xt_RX.index_select(0, idx), wt_, bt, rule.temperature, bufs.pop(0))
            G_nV = rule.backward(zs, zt, bufs, idx, [a[sl] for a in aux], go_N[sl])  # dense or sparse
            if ws is None:  # logits in: their gradient is G itself
                grad_x.index_copy_(0, idx, G_nV.to_dense().to(grad_x.dtype))
                continue
            if need_x:
                grad_x.index_copy_(0, idx, (G_nV @ ws_).to(grad_x.dtype))
            if need_w:
                grad_w.addmm_(G_nV.t(), x_nX.to(dtype))
            if need_b:
                grad_b += G_nV.sum(0)
        grad_w = None if grad_w is None else grad_w.to(ws.dtype)
        grad_b = None if grad_b is None else grad_b.to(bs.dtype)
        return None, None, grad_x, grad_w, grad_b, None, None, None


def _apply(rule, mask_BT, student_BTX, student_head, teacher_BTX=None, teacher_head=None,
           weights_context=None) -> torch.Tensor:
    """Run `rule` on the unmasked rows and scatter the values into a `(B, T, *rule.value_shape)` tensor, zero at masked
    positions. `weights_context` (a context factory) is entered around both passes (see `_ChunkedLoss`)."""
    rule.weights_context = weights_context or nullcontext
    B, T = mask_BT.shape
    index_N = mask_BT.reshape(-1).nonzero().squeeze(-1)
    ws, bs = (None, None) if student_head is None else (student_head.weight, student_head.bias)
    xt = wt = bt = None
    if teacher_BTX is not None:
        xt = teacher_BTX.detach().reshape(B * T, -1)
        if teacher_head is not None:
            wt = teacher_head.weight.detach()
            bt = None if teacher_head.bias is None else teacher_head.bias.detach()
    values_N = _ChunkedLoss.apply(rule, index_N, student_BTX.reshape(B * T, -1), ws, bs, xt, wt, bt)
    return values_N.new_zeros((B * T, *rule.value_shape)).index_copy(0, index_N, values_N).view(B, T, *rule.value_shape)


def _compute_dtype(*tensors) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ---------------------------------------------------------------------------------------------------------------------
# Token log-probs.


class _TokenLogprob:
    """Columns of the per-row value: `log_softmax(z)[token]`, then optionally the entropy `H(softmax(z))` and the value
    of an `inner` rule (a divergence) on the same student logits, so that one projection of the student's hidden
    states serves both GRPO's policy log-probs and the distillation term.

    Gradients: `∂ logp/∂z = onehot(token) − softmax(z)`, plus the inner rule's `∂f/∂z`. The entropy gets none (GRPO
    uses it for logging and masking only): `H = lse(z) − Σ_v softmax(z)_v z_v`.
    """

    def __init__(self, tokens_R, temperature, chunk_size, dtype, entropy=False, inner=None, stats=None):
        self.tokens_R1 = tokens_R[:, None]
        self.temperature, self.chunk_size, self.dtype = temperature, chunk_size, dtype
        self.entropy, self.inner, self.stats = entropy, inner, stats
        self.value_shape = (1 + entropy + (inner is not None),)
        self.student_in_backward = True
        self.teacher_in_backward = inner is not None and inner.teacher_in_backward
        # Forward: the softmax buffer is free again before the inner rule runs, so both share the buffers. Backward:
        # one more buffer than the inner rule, for the softmax the log-prob gradient needs (the inner rule overwrites
        # the student logits).
        self.forward_buffers = 2 if inner is None else max(2, inner.forward_buffers)
        self.backward_buffers = 1 if inner is None else inner.backward_buffers + (1 if inner.student_in_backward else 2)

    def forward(self, zs, zt, work, idx):
        lse_n1 = _softmax(zs, work[0])
        columns = [(zs.gather(-1, self.tokens_R1[idx]) - lse_n1).clamp(min=LOG_FLOOR).squeeze(-1)]
        if self.entropy:
            columns.append(lse_n1.squeeze(-1) - _rowdot_(work[0], zs))
        aux = [lse_n1]
        if self.inner is not None:
            value, *inner_aux = self.inner.forward(zs, zt, work, idx)
            columns.append(value)
            aux += inner_aux
        return torch.stack(columns, dim=-1), *aux

    def backward(self, zs, zt, work, idx, aux, go_nC):
        lse_n1, *inner_aux = aux
        go_n1 = go_nC[:, :1]
        S = zs.sub_(lse_n1) if self.inner is None else torch.sub(zs, lse_n1, out=work[0])
        G = S.exp_().mul_(-go_n1).scatter_add_(-1, self.tokens_R1[idx], go_n1)
        _record_grad(self.stats, "grad_sq_logp", G)
        if self.inner is None:
            return G
        zs_inner = zs if self.inner.student_in_backward else None
        return G.add_(self.inner.backward(zs_inner, zt, work[1:], idx, inner_aux, go_nC[:, -1]))  # dense or sparse


def token_logprobs(
    x_BTX: torch.Tensor,
    tokens_BT: torch.Tensor,
    mask_BT: torch.Tensor | None = None,
    *,
    head: Head | None = None,
    temperature: float = 1.0,
    entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    stats: dict | None = None,
    weights_context=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of given tokens: `logp_BT[b, t] = log_softmax(z_bt / τ)[tokens_BT[b, t]]`, floored at LOG_FLOOR.

    `x_BTX` are logits `(B, T, V)`, or hidden states `(B, T, H)` when `head` (an `nn.Linear`) maps them to logits.
    Computed per chunk of `chunk_size` rows; masked positions are skipped and return 0. Differentiable in `x_BTX`
    and in the head's weight and bias, with the analytic gradient `∂ logp / ∂z = onehot(token) − softmax(z)`.
    With `entropy`, returns `(logp_BT, entropy_BT)`, the entropy `−Σ_v p_v log p_v` of the same distribution taken
    from the same projection, detached (as GRPO's fused head gives it, for its metrics and entropy mask).
    `stats` (a dict, see `jsd`) receives `grad_sq_logp` after the backward pass. `weights_context`, a context
    factory, is entered around the forward and the backward pass: `selfdistill.sharding.whole_heads` gives one that
    gathers a ZeRO-3 partitioned head.
    """
    if mask_BT is None:
        mask_BT = torch.ones_like(tokens_BT, dtype=torch.bool)
    dtype = _compute_dtype(x_BTX, None if head is None else head.weight)
    rule = _TokenLogprob(tokens_BT.reshape(-1), temperature, chunk_size, dtype, entropy=entropy, stats=stats)
    out = _apply(rule, mask_BT.bool(), x_BTX, head, weights_context=weights_context)
    return (out[..., 0], out[..., 1].detach()) if entropy else out[..., 0]


def _with_token_logprobs(rule, tokens_BT, mask_BT, student_BTX, student_head, teacher_BTX=None, teacher_head=None,
                         weights_context=None):
    """`rule`'s values, or with `tokens_BT` also their log-probs and entropy from the same projection of the student:
    `(value_BT, logp_BT, entropy_BT)` (see `_TokenLogprob`)."""
    if tokens_BT is None:
        return _apply(rule, mask_BT.bool(), student_BTX, student_head, teacher_BTX, teacher_head, weights_context)
    both = _TokenLogprob(tokens_BT.reshape(-1), rule.temperature, rule.chunk_size, rule.dtype, entropy=True, inner=rule,
                         stats=rule.stats)
    out = _apply(both, mask_BT.bool(), student_BTX, student_head, teacher_BTX, teacher_head, weights_context)
    return out[..., 2], out[..., 0], out[..., 1].detach()


# ---------------------------------------------------------------------------------------------------------------------
# Generalized JSD.


def _divergence_from_logprobs(logp_s: torch.Tensor, logp_t: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD_β over the last dimension of two floored log-distributions (see the module docstring).

    Plain out-of-place ops, used with autograd on the small top-k supports; `_FullJSD` is the in-place version.
    """
    if beta == 0.0:
        return (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    if beta == 1.0:
        return (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    logp_m = torch.logaddexp(logp_s + math.log1p(-beta), logp_t + math.log(beta))
    kl_t_m = (logp_t.exp() * (logp_t - logp_m)).sum(-1)
    kl_s_m = (logp_s.exp() * (logp_s - logp_m)).sum(-1)
    return beta * kl_t_m + (1 - beta) * kl_s_m


class _FullJSD:
    """JSD_β over the whole vocabulary, in place on `(n, V)` buffers.

    Gradient with respect to the student's scaled logits z (S = softmax(z)), per row:
      β=0: ∂KL(T‖S)/∂z = S − T
      β=1: ∂KL(S‖T)/∂z = S ⊙ (log S − log T − KL(S‖T))
      else: ∂JSD_β/∂z = (1−β) · S ⊙ (log S − log M − KL(S‖M))
    (∂JSD_β/∂S_v = (1−β) log(S_v / M_v): the terms from M's dependence on S cancel; then the softmax Jacobian
    diag(S) − S Sᵀ.) The same formulas as TRL's `trl/kernels/chunked_divergence.py` backward.
    """

    forward_buffers, backward_buffers, student_in_backward, teacher_in_backward = 4, 2, True, True
    value_shape = ()

    def __init__(self, beta, temperature, chunk_size, dtype, stats=None):
        self.beta, self.temperature, self.chunk_size, self.dtype, self.stats = beta, temperature, chunk_size, dtype, stats

    def forward(self, zs, zt, work, idx):
        P, M = work
        lse_s, lse_t = _softmax(zs, P), _softmax(zt, M)
        zs.sub_(lse_s).clamp_(min=LOG_FLOOR)  # log S, and P = S
        zt.sub_(lse_t).clamp_(min=LOG_FLOOR)  # log T, and M = T
        beta = self.beta
        if beta == 0.0:
            kl = _rowdot_(M, zt.sub_(zs))
            return kl, lse_s, lse_t, kl
        if beta == 1.0:
            kl = _rowdot_(P, zs.sub_(zt))
            return kl, lse_s, lse_t, kl
        # log M − log(1−β) = logaddexp(log S, log T + log β − log(1−β)): needs no buffer for log S + log(1−β)
        shift = math.log1p(-beta)
        torch.logaddexp(zs, torch.add(zt, math.log(beta) - shift, out=M), out=M)
        kl_s_m = _rowdot_(P, zs.sub_(M).sub_(shift))
        kl_t_m = _rowdot_(torch.exp(zt, out=P), zt.sub_(M).sub_(shift))  # P ← T again: M now holds log M
        return beta * kl_t_m + (1 - beta) * kl_s_m, lse_s, lse_t, kl_s_m

    def backward(self, zs, zt, work, idx, aux, go_n):
        lse_s, lse_t, kl_n = aux
        zs.sub_(lse_s).clamp_(min=LOG_FLOOR)  # log S
        zt.sub_(lse_t).clamp_(min=LOG_FLOOR)  # log T
        beta = self.beta
        if beta == 0.0:
            G = zs.exp_().sub_(zt.exp_())
        elif beta == 1.0:
            torch.sub(zs, zt, out=zt).sub_(kl_n[:, None])
            G = zs.exp_().mul_(zt)
        else:
            shift = math.log1p(-beta)  # as in forward: zt ← log M − log(1−β)
            torch.logaddexp(zs, zt.add_(math.log(beta) - shift), out=zt)
            torch.sub(zs, zt, out=zt).sub_(kl_n[:, None] + shift)  # log S − log M − KL(S‖M)
            G = zs.exp_().mul_(zt).mul_(1 - beta)
        G = G.mul_(go_n[:, None])
        _record_grad(self.stats, "grad_sq_divergence", G)
        return G


class _TopkJSD:
    """JSD_β on a top-k support of `k` tokens per row, renormalised over it or with a tail bucket.

    Buckets: the K support tokens, plus with `add_tail` one bucket holding the rest, `q_tail = Σ_{v∉K} p_v`. The tail
    is summed directly from the softmax rather than taken as `1 − Σ_K p_v` (SDPO's `add_tail_bucket`): in fp32 the
    latter loses all precision once the support holds almost all the mass, which is the usual case for k ≈ 100.

    The forward keeps the support, the student's log-normaliser and both models' bucket log-probs, so the teacher is
    never recomputed. The backward gets g = ∂D/∂log q_s from autograd on the small `(n, K[+1])` tensors; then, with
    ∂log p_k/∂z_v = [v=k] − S_v and ∂log q_tail/∂z_v = [v∉K]·S_v/q_tail − S_v:
      ∂D/∂z_v = g_v − S_v·Σg                       for v in the support,
      ∂D/∂z_v = (S_v/q_tail)·(g_tail − q_tail·Σg)  outside it (with a tail).
    Without a tail Σg = 0 (the renormalisation is shift-invariant), so ∂D/∂z is g on the support and 0 elsewhere: a
    sparse gradient that needs no logits, and so no matmul, in the backward pass.
    """

    forward_buffers, teacher_in_backward = 3, False  # zs, zt, softmax
    value_shape = ()

    def __init__(self, beta, k, support, add_tail, vocab_size, temperature, chunk_size, dtype, stats=None):
        self.beta, self.k, self.support, self.add_tail, self.V = beta, k, support, add_tail, vocab_size
        self.temperature, self.chunk_size, self.dtype, self.stats = temperature, chunk_size, dtype, stats
        self.student_in_backward = add_tail
        self.backward_buffers = 1 if add_tail else 0

    def buckets(self, z, lse_n1, softmax, top_nK):
        """Bucket log-probs `(n, K[+1])` of one model (`softmax` is overwritten)."""
        logp_nK = (z.gather(-1, top_nK) - lse_n1).clamp(min=LOG_FLOOR)
        if not self.add_tail:
            return logp_nK
        tail_n1 = softmax.scatter_(-1, top_nK, 0.0).sum(-1, keepdim=True)
        return torch.cat([logp_nK, tail_n1.log().clamp(min=LOG_FLOOR)], dim=-1)

    def record_support_mass(self, logq_s, logq_t) -> None:
        """Add the probability mass each model puts on the support, summed over rows, to `stats`."""
        for key, logq in (("support_mass_student", logq_s), ("support_mass_teacher", logq_t)):
            _record(self.stats, key, logq[:, : self.k].exp().sum())
        _record(self.stats, "support_rows", torch.tensor(float(len(logq_s))))

    def divergence(self, logq_s, logq_t):
        if self.add_tail:
            return _divergence_from_logprobs(logq_s, logq_t, self.beta)
        return _divergence_from_logprobs(logq_s.log_softmax(-1), logq_t.log_softmax(-1), self.beta)

    def forward(self, zs, zt, work, idx):
        (P,) = work
        top_nK = (zs if self.support == "student" else zt).topk(self.k, dim=-1).indices
        lse_s = _softmax(zs, P)
        logq_s = self.buckets(zs, lse_s, P, top_nK)
        logq_t = self.buckets(zt, _softmax(zt, P), P, top_nK)
        self.record_support_mass(logq_s, logq_t)
        return self.divergence(logq_s, logq_t), top_nK, lse_s, logq_s, logq_t

    def backward(self, zs, zt, work, idx, aux, go_n):
        top_nK, lse_s, logq_s, logq_t = aux
        with torch.enable_grad():
            logq_s = logq_s.detach().requires_grad_()
            (g,) = torch.autograd.grad(self.divergence(logq_s, logq_t), logq_s, go_n)
        if not self.add_tail:
            _record_grad(self.stats, "grad_sq_divergence", g)  # the sparse gradient's values
            rows_nK = torch.arange(len(g), device=g.device)[:, None].expand_as(top_nK)
            indices = torch.stack([rows_nK.reshape(-1), top_nK.reshape(-1)])
            return torch.sparse_coo_tensor(indices, g.reshape(-1), (len(g), self.V), check_invariants=False)
        S = zs.sub_(lse_s).exp_()
        sum_g = g.sum(-1, keepdim=True)
        S_K = S.gather(-1, top_nK)
        # S/q_tail ≤ 1 outside the support; q_tail = 0 only when every S_v there is 0 (the clamp keeps 0/0 away)
        q_tail = logq_s[:, -1:].detach().exp().clamp(min=torch.finfo(S.dtype).tiny)
        G = S.div_(q_tail).mul_(g[:, -1:] - q_tail * sum_g)
        G = G.scatter_(-1, top_nK, g[:, :-1] - S_K * sum_g)  # the support's entries overwritten (may be inf above)
        _record_grad(self.stats, "grad_sq_divergence", G)
        return G


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
    tokens_BT: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    stats: dict | None = None,
    weights_context=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token generalized JSD_β between the student S and teacher T, `(B, T)`, zero at masked positions.

    β=0 is forward KL(T‖S), β=1 is reverse KL(S‖T), otherwise M = β·T + (1−β)·S and
    JSD_β = β·KL(T‖M) + (1−β)·KL(S‖M) (GKD, Agarwal et al. 2024; TRL DistillationTrainer's `beta`, SDPO's
    `distillation_alpha`).

    - Full vocabulary when `top_k` is None.
    - Top-k: the support is the k most likely tokens of the `support` model ("student" or "teacher"); both
      distributions are restricted to it and either renormalised over it, or, with `add_tail`, extended by one
      bucket holding the remaining mass `Σ_{v∉K} p_v = 1 − Σ_K p` (the SDPO paper code's tail; lasgroup/SDPO; here
      summed directly, see `_TopkJSD`). `k ≥ V` is the full vocabulary, where the tail is empty and is dropped.

    Inputs are logits `(B, T, V)` or hidden states with a head (see `token_logprobs`); student and teacher may differ
    in that respect and in hidden size. The teacher is detached: the gradient flows into the student (and its head)
    only, computed analytically (see `_FullJSD`, `_TopkJSD`).

    With `tokens_BT` (the sampled tokens), returns `(jsd_BT, logp_BT, entropy_BT)`: also the student's log-probs of
    those tokens (differentiable) and its entropy (detached), from the same projection of the student's hidden states,
    so a trainer that needs both (GRPO's policy loss and the distillation term) projects them once.

    `stats`, a dict, receives diagnostics as summed tensors (no extra pass over the vocabulary): after the forward,
    with top-k, `support_mass_student` / `support_mass_teacher` (Σ over rows of the mass each model puts on the
    support) and `support_rows`; after the backward, `grad_sq_divergence` and, with `tokens_BT`, `grad_sq_logp`: the
    squared Frobenius norms of the gradient with respect to the logits that the divergence and the log-prob column
    each send back (the loss weights included), i.e. each term's share of the signal entering the LM head.
    `weights_context` as in `token_logprobs`.
    """
    if support not in ("student", "teacher"):
        raise ValueError(f"support must be 'student' or 'teacher', got {support!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    ws = None if student_head is None else student_head.weight
    wt = None if teacher_head is None else teacher_head.weight
    dtype = _compute_dtype(student_BTX, teacher_BTX, ws, wt)
    V = student_BTX.shape[-1] if ws is None else ws.shape[0]
    if top_k is None or top_k >= V:
        rule = _FullJSD(beta, temperature, chunk_size, dtype, stats)
    else:
        rule = _TopkJSD(beta, top_k, support, add_tail, V, temperature, chunk_size, dtype, stats)
    return _with_token_logprobs(rule, tokens_BT, mask_BT, student_BTX, student_head, teacher_BTX, teacher_head,
                                weights_context)


class _GivenTopkJSD(_TopkJSD):
    """`_TopkJSD` on a support given with the teacher's log-probs on it (a served teacher's top-k), instead of
    teacher logits: the teacher's buckets are the given log-probs, and its tail `log(1 − Σ_K p)` (floored)."""

    forward_buffers = 2  # zs, softmax: no teacher logits

    def __init__(self, ids_RK, logp_RK, beta, add_tail, vocab_size, temperature, chunk_size, dtype, stats=None):
        super().__init__(beta, ids_RK.shape[-1], "teacher", add_tail, vocab_size, temperature, chunk_size, dtype, stats)
        self.ids_RK, self.logp_RK = ids_RK, logp_RK.to(dtype).clamp(min=LOG_FLOOR)

    def forward(self, zs, zt, work, idx):
        (P,) = work
        top_nK, logq_t = self.ids_RK[idx], self.logp_RK[idx]
        lse_s = _softmax(zs, P)
        logq_s = self.buckets(zs, lse_s, P, top_nK)
        if self.add_tail:
            tail_n1 = torch.log1p(-logq_t.exp().sum(-1, keepdim=True).clamp(max=1.0)).clamp(min=LOG_FLOOR)
            logq_t = torch.cat([logq_t, tail_n1], dim=-1)
        self.record_support_mass(logq_s, logq_t)
        return self.divergence(logq_s, logq_t), top_nK, lse_s, logq_s, logq_t


def jsd_on_teacher_topk(
    student_BTX: torch.Tensor,
    student_head: Head | None,
    teacher_ids_BTK: torch.Tensor,
    teacher_logp_BTK: torch.Tensor,
    mask_BT: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    add_tail: bool = False,
    tokens_BT: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    stats: dict | None = None,
    weights_context=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token JSD_β `(B, T)` on the teacher's top-k support when only that support is known: the K token ids
    `teacher_ids_BTK` and the teacher's log-probs on them `teacher_logp_BTK` (at temperature τ), as a vLLM-served
    teacher returns them (`prompt_logprobs`).

    The same divergence as `jsd(..., top_k=K, support="teacher")`: both distributions restricted to the K tokens and
    renormalised, or with `add_tail` extended by the bucket of the remaining mass, for the teacher `1 − Σ_K p_T`
    (floored at `LOG_FLOOR` in log space; it cannot be summed directly without the teacher's logits). The K ids of
    a position must be distinct. The student enters as logits or hidden states with `student_head`. `tokens_BT`,
    `stats` and `weights_context` as in `jsd`.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if teacher_ids_BTK.shape != teacher_logp_BTK.shape or teacher_ids_BTK.shape[:2] != mask_BT.shape:
        raise ValueError(f"teacher ids {tuple(teacher_ids_BTK.shape)} and log-probs {tuple(teacher_logp_BTK.shape)} "
                         f"must both be (B, T, K) with (B, T) = {tuple(mask_BT.shape)}")
    ws = None if student_head is None else student_head.weight
    dtype = _compute_dtype(student_BTX, ws)
    V = student_BTX.shape[-1] if ws is None else ws.shape[0]
    K = teacher_ids_BTK.shape[-1]
    rule = _GivenTopkJSD(teacher_ids_BTK.reshape(-1, K), teacher_logp_BTK.detach().reshape(-1, K), beta, add_tail, V,
                         temperature, chunk_size, dtype, stats)
    return _with_token_logprobs(rule, tokens_BT, mask_BT, student_BTX, student_head, weights_context=weights_context)


# ---------------------------------------------------------------------------------------------------------------------
# Sampled-token advantage and importance weights.


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
