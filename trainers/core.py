"""The core both trainers share: teacher scores → per-token advantages for GRPO's loss, plus an optional
logit-level term.

Per rollout b and completion token t (ARCHITECTURE.md, "Data flow of one step"):

    A_bt = w · A_group_b + kl_coef · a_bt,    a_bt = −(logp_S(x_t) − logp_T(x_t))   [detached]

where w weighs GRPO's group-normalised verifier-reward advantage: `task_weight` in OnPolicyDistillConfig,
`policy_weight` in SelfDistillConfig (the names of their issues; `DistillConfig.group_advantage_weight` reads either).

with an optional discount γ (`kl_discount`) turning a_bt into Σ_{s≥t} γ^{s−t} a_bs. GRPO's own loss (its
`loss_type`, clipping and importance-sampling correction) consumes these `(B, T)` advantages unchanged. The
optional logit-level term adds `distill_loss_weight · JSD_β(S‖T)` over the full vocabulary or a top-k support.
"""

import math
from dataclasses import dataclass, field
from functools import partial

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp

from ..losses import importance_weights, jsd, jsd_on_teacher_topk, masked_mean, reverse_kl_advantage, token_logprobs
from ..sharding import in_forward, whole_heads
from ..teachers import causal_lm_parts
from ..vllm_sync import cpu_server_generation, fix_vllm_cpu_weight_sync
from .guards import Guards, check_finite_loss


@dataclass
class DistillConfig(GRPOConfig):
    """Fields shared by `OnPolicyDistillConfig` and `SelfDistillConfig`; everything else is GRPOConfig's."""

    kl_coef: float = field(
        default=1.0,
        metadata={"help": "Weight of the sampled-token reverse-KL advantage (tinker-cookbook kl_penalty_coef=1)."},
    )
    kl_discount: float = field(
        default=0.0, metadata={"help": "Discount γ: the KL advantage at t sums later terms γ^(s−t). 0 = per token."}
    )
    teacher_logp_threshold: float = field(
        default=math.log(0.01),
        metadata={"help": "Logged metric: fraction of sampled tokens whose teacher log-prob is below this (log 0.01: p < 0.01)."},
    )
    distill_loss_weight: float = field(
        default=0.0, metadata={"help": "Weight of the logit-level JSD_β term (GKD-style). 0 turns it off."}
    )
    distill_beta: float = field(
        default=0.5, metadata={"help": "β of JSD_β: 0 forward KL(T‖S), 1 reverse KL(S‖T) (TRL's convention)."}
    )
    distill_top_k: int | None = field(
        default=None, metadata={"help": "Top-k support of the logit-level term; None = full vocabulary."}
    )
    distill_support: str = field(
        default="student", metadata={"help": "Whose top-k defines the support: 'student' or 'teacher'."}
    )
    distill_add_tail: bool = field(
        default=True, metadata={"help": "Add a bucket with the mass outside the top-k (SDPO paper code)."}
    )
    distill_is_clip: float | None = field(
        default=None,
        metadata={"help": "Clip of the token-level IS weight exp(logp_now − logp_old) on the logit-level term."},
    )
    # Guards (trainers/guards.py), each default with its reason.
    no_teacher_signal_patience: int = field(
        default=10,
        metadata={"help": "Stop with an error after this many consecutive generation batches in which no rollout has "
                          "a teacher signal (0: never). Not 1: early batches where no sibling succeeds are normal for "
                          "sibling-only contexts; 10 batches without one means the distillation term is off."},
    )
    stop_on_nonfinite: bool = field(
        default=True,
        metadata={"help": "Stop with an error on a non-finite loss (before the backward pass) or gradient (before the "
                          "optimizer step): one such step corrupts the weights and the EMA teacher for good."},
    )
    collapse_fraction: float | None = field(
        default=None,
        metadata={"help": "Stop and save when the train reward's running mean stays below this fraction of its best "
                          "for collapse_patience generation batches (None: off; e.g. 0.5). Off by default: a reward "
                          "that falls can be a curriculum or a harder data order, which only the user can tell."},
    )
    collapse_patience: int = field(
        default=20,
        metadata={"help": "Window of the running mean, and how long it must stay low, for collapse_fraction."},
    )

    @property
    def group_advantage_weight(self) -> float:
        """w of the module docstring: the weight of GRPO's group-normalised reward advantage."""
        raise NotImplementedError

    def __post_init__(self):
        super().__post_init__()
        if self.distill_support not in ("student", "teacher"):
            raise ValueError(f"distill_support must be 'student' or 'teacher', got {self.distill_support!r}")
        if not 0.0 <= self.distill_beta <= 1.0:
            raise ValueError(f"distill_beta must be in [0, 1], got {self.distill_beta}")
        if self.distill_top_k is not None and self.distill_top_k < 1:
            raise ValueError(f"distill_top_k must be >= 1 or None, got {self.distill_top_k}")
        if self.no_teacher_signal_patience < 0 or self.collapse_patience < 1:
            raise ValueError("no_teacher_signal_patience must be >= 0 and collapse_patience >= 1")
        if self.collapse_fraction is not None and not 0.0 < self.collapse_fraction < 1.0:
            raise ValueError(f"collapse_fraction must be in (0, 1) or None, got {self.collapse_fraction}")


def no_reward(completions, **kwargs) -> list[float]:
    """Zero reward, used when a trainer gets `reward_funcs=None` (pure distillation): the KL term is the signal."""
    return [0.0] * len(completions)


def _stat_sums(trainer, keys) -> torch.Tensor:
    """The projection's recorded diagnostics `keys` (0 where none was recorded), summed over all processes."""
    stats = trainer._term_stats or {}
    device = trainer.accelerator.device
    values = torch.stack([torch.as_tensor(stats.get(key, 0.0), dtype=torch.float32, device=device) for key in keys])
    return trainer.accelerator.reduce(values, reduction="sum")


class DenseDistillTrainer(GRPOTrainer):
    """GRPOTrainer whose advantages gain a dense per-token teacher term.

    Overrides four GRPOTrainer methods, and nothing else:
    - `_generate_and_score_completions`: after GRPO generates and rewards, score the completion tokens under the
      teacher; when GRPO computed the sampling log-probs (off-policy, vLLM), replace the `(B,)` advantages by the
      `(B, T)` ones of the module docstring right away;
    - `_get_per_token_logps_and_entropies`, inside GRPO's loss: one projection of the student's hidden states gives
      the log-probs GRPO's loss needs and the logit-level term; on-policy, the `(B, T)` advantages are formed there
      from those log-probs, before GRPO's loss reads them (no separate student pass for the sampling log-probs);
    - `_compute_loss`: adds the optional logit-level JSD term;
    - `training_step`: logs the gradient norms the projection's backward pass recorded.

    Subclasses set `self.teacher` (see `selfdistill.teachers`) and implement `_teacher_prompts` (and
    `_no_teacher_signal_cause`).

    Metrics, per step, besides GRPO's (`distill/...`): `reverse_kl`, `teacher_logp`, `student_logp` and `logp_gap`
    (teacher − student, = −reverse_kl) on tokens with a teacher signal; `frac_with_teacher` and
    `frac_tokens_with_teacher` (rollouts and completion tokens that carry one); `frac_teacher_logp_below`,
    `acceptance`; `adv_rms_policy` and `adv_rms_distill`, the root mean square over completion tokens of the two parts
    of the advantage, `w·A_group` and `kl_coef·a` (GRPO's loss is linear in the advantage at a given ratio, so they
    weigh the two signals); with the logit-level term, `logit_loss`, `grad_norm_logits_policy` and
    `grad_norm_logits_distill` (the norm of the gradient each term sends into the LM head's logits: a vanishing
    distillation gradient shows here, lasgroup/SDPO#38), and for top-k `support_mass_student` / `support_mass_teacher`.
    Guards: see `trainers/guards.py`.
    """

    # The batch, while `_compute_loss` runs: GRPO's loss asks `_get_per_token_logps_and_entropies` for the student's
    # log-probs without handing it the batch, whose completions and teacher fields our projection needs.
    _loss_inputs = None
    _student_terms = None  # (log-probs, logit-level term) of that batch, from `_get_per_token_logps_and_entropies`
    _term_stats = None  # diagnostics of that batch's projection, filled by its forward and backward passes
    stop_reason = None  # set when a guard stopped training early (collapse)

    def __init__(self, *args, **kwargs):
        with cpu_server_generation(self, kwargs["args"]):  # vLLM server mode with a CPU trainer
            super().__init__(*args, **kwargs)
        fix_vllm_cpu_weight_sync(self)  # colocated vLLM on CPU only; see selfdistill/vllm_sync.py
        self.guards = Guards(self)
        self.add_callback(self.guards)

    def _teacher_prompts(self, inputs: list[dict], batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(prompt_ids, prompt_mask, has_teacher_B)`: the prompt the teacher conditions on for each rollout, and
        whether the rollout gets a distillation term at all."""
        raise NotImplementedError

    def _no_teacher_signal_cause(self) -> str:
        """Why a whole generation batch may carry no teacher signal, for the guard's error."""
        raise NotImplementedError

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        teacher_prompt_ids, teacher_prompt_mask, has_teacher_B = self._teacher_prompts(inputs, batch)
        # The student's forward runs under accelerate's autocast (bf16 by default), which accelerate adds to the
        # prepared model's `forward`; a teacher runs its own module's forward, so it needs the same context.
        with self.accelerator.autocast():
            scores = self.teacher.score(teacher_prompt_ids, teacher_prompt_mask, completion_ids, completion_mask)
        mask_BT = completion_mask * batch.get("tool_mask", 1) * has_teacher_B.unsqueeze(1).to(completion_mask.dtype)
        batch["teacher_logps"], batch["distill_mask"], batch["has_teacher"] = scores.logp_BT, mask_BT, has_teacher_B
        # Over the whole generation batch and every process, like GRPO's `num_items_in_batch`: the logit-level term
        # is normalised by it, so that its gradient does not depend on how the batch is split (ranks, accumulation).
        batch["num_distill_tokens"] = self.accelerator.gather(mask_BT.sum()).sum()
        if self.model.training:
            signal = batch["num_distill_tokens"].item()
            self.guards.record_teacher_signal(signal, self._no_teacher_signal_cause())
            self.guards.record_reward(self._metrics["train"]["reward"][-1])  # GRPO's mean over all ranks
        if self.args.distill_loss_weight:
            batch.update(scores.logit_inputs())
        if "old_per_token_logps" in batch:  # sampled by older weights (or vLLM): their log-probs are known now
            self._add_dense_term(batch, batch["old_per_token_logps"])
        # Otherwise GRPO skipped them, as they equal the log-probs of its loss's own forward: `_compute_loss` takes
        # them from that forward, which saves a student forward per step.
        return batch

    def _add_dense_term(self, batch, student_logp_BT):
        """Turn GRPO's `(B,)` advantages into the `(B, T)` ones of the module docstring, and log the teacher metrics."""
        args, mode = self.args, "train" if self.model.training else "eval"
        logp_t, mask_BT = batch["teacher_logps"], batch["distill_mask"]
        kl_adv_BT = reverse_kl_advantage(student_logp_BT, logp_t, mask_BT, args.kl_discount)
        policy_adv_B1 = args.group_advantage_weight * batch["advantages"].unsqueeze(1)
        batch["advantages"] = policy_adv_B1 + args.kl_coef * kl_adv_BT
        batch["student_logps_at_sampling"] = student_logp_BT
        self._log_distill_metrics(mode, batch, student_logp_BT, policy_adv_B1, args.kl_coef * kl_adv_BT)

    def _log_distill_metrics(self, mode, batch, logp_s, policy_adv_B1, distill_adv_BT):
        """Log the teacher metrics of the class docstring, summed over all processes."""
        logp_t, m, has_teacher_B = batch["teacher_logps"], batch["distill_mask"].float(), batch["has_teacher"]
        completion = batch["completion_mask"].float()
        sums = torch.stack(
            [
                ((logp_s - logp_t) * m).sum(),
                (logp_t * m).sum(),
                (logp_s * m).sum(),
                ((logp_t < self.args.teacher_logp_threshold).float() * m).sum(),
                # Expected speculative-decoding acceptance of the student drafting for the teacher:
                # E_{x~S} min(1, T(x)/S(x)) = Σ_x min(S(x), T(x)) (Leviathan et al. 2023).
                ((logp_t - logp_s).clamp(max=0).exp() * m).sum(),
                m.sum(),
                has_teacher_B.float().sum(),
                torch.tensor(float(has_teacher_B.numel()), device=m.device),
                completion.sum(),
                (policy_adv_B1.square() * completion).sum(),
                (distill_adv_BT.square() * completion).sum(),
            ]
        )
        sums = self.accelerator.reduce(sums, reduction="sum")
        n, tokens = sums[5].clamp(min=1), sums[8].clamp(min=1)
        names = ["reverse_kl", "teacher_logp", "student_logp", "frac_teacher_logp_below", "acceptance"]
        values = dict(zip(names, (sums[:5] / n).tolist()))
        values |= {"logp_gap": -values["reverse_kl"], "frac_with_teacher": (sums[6] / sums[7]).item(),
                   "frac_tokens_with_teacher": (sums[5] / tokens).item(),
                   "adv_rms_policy": (sums[9] / tokens).sqrt().item(), "adv_rms_distill": (sums[10] / tokens).sqrt().item()}
        for name, value in values.items():
            self._metrics[mode][f"distill/{name}"].append(value)

    def _compute_loss(self, model, inputs):
        # GRPO's loss asks `_get_per_token_logps_and_entropies` (below) for the student's log-probs; there, one
        # projection of the student's hidden states gives them together with the logit-level term.
        args, mode = self.args, "train" if self.model.training else "eval"
        missing = [key for key in ("teacher_logps", "distill_mask", "has_teacher") if key not in inputs]
        if missing:  # NousResearch/atropos#456: teacher fields dropped on the way, distillation silently off
            raise KeyError(f"the batch reaching the loss lacks the teacher fields {missing}: something between "
                           "_generate_and_score_completions and _compute_loss dropped them (a custom _prepare_inputs "
                           "or batch split?), and the distillation term would silently be zero.")
        self._loss_inputs = inputs
        try:
            loss = super()._compute_loss(model, inputs)
            logp_now, per_token = self._student_terms
        finally:  # neither the batch nor the term's graph outlives the step
            self._loss_inputs = self._student_terms = None
        if not args.distill_loss_weight:
            if args.stop_on_nonfinite:
                check_finite_loss(self, policy=loss)
            return loss
        mask_BT = inputs["distill_mask"]
        # On-policy the IS weights are exactly 1: the log-probs at sampling came from this very forward.
        if args.distill_is_clip is not None and "old_per_token_logps" in inputs:
            per_token = per_token * importance_weights(logp_now, inputs["student_logps_at_sampling"], args.distill_is_clip)
        # Σ over this micro-batch / (the generation batch's tokens per process and accumulation step): summed over
        # micro-batches and averaged over processes by the gradient reduction, it is the mean over all of them,
        # exactly as GRPO's "dapo" normalisation (for one process and no accumulation, the plain masked mean).
        normalizer = inputs["num_distill_tokens"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps / args.steps_per_generation
        distill_loss = (per_token * mask_BT).sum() / normalizer
        if args.stop_on_nonfinite:
            check_finite_loss(self, policy=loss, distillation=distill_loss)
        logit_loss = masked_mean(per_token.detach(), mask_BT)  # this micro-batch's mean, for the log
        self._metrics[mode]["distill/logit_loss"].append(self.accelerator.gather(logit_loss).mean().item())
        if args.distill_top_k is not None:  # a rank without unmasked rows recorded nothing: zeros keep the sums aligned
            masses = _stat_sums(self, ("support_mass_student", "support_mass_teacher", "support_rows"))
            for name, mass in zip(("support_mass_student", "support_mass_teacher"), masses[:2] / masses[2].clamp(min=1)):
                self._metrics[mode][f"distill/{name}"].append(mass.item())
        return loss + args.distill_loss_weight * distill_loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The projection's backward pass, which just ran, recorded each term's gradient into `_term_stats`.
        norms = _stat_sums(self, ("grad_sq_logp", "grad_sq_divergence")).sqrt()
        self._term_stats = None
        self._metrics["train"]["distill/grad_norm_logits_policy"].append(norms[0].item())
        if self.args.distill_loss_weight:
            self._metrics["train"]["distill/grad_norm_logits_distill"].append(norms[1].item())
        return loss

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """Inside `_compute_loss`: the student's completion log-probs and entropies for GRPO's loss, and the logit-level
        term, from one chunked projection of the hidden states (`losses.jsd(..., tokens_BT=)`), where GRPO's fused head
        and the distillation term would each project them. On-policy, the `(B, T)` advantages are formed here from
        these log-probs, before GRPO's loss reads them. GRPO's other uses (old and reference log-probs) are unchanged.

        Where it runs, and why: inside the wrapped model's forward (`sharding.in_forward`), with the LM head read whole
        (`sharding.whole_heads`, entered again by the backward pass). That is the one place where DDP's reducer,
        ZeRO-3's gathering and gradient reduction, and FSDP2's unsharded root parameters are all in effect, so the
        gradient reaches the (sharded) head and every other parameter reduced across ranks, as for TRL's own fused
        head (`add_fused_lm_head`). Reading the head outside (before) gave an empty ZeRO-3 weight, an FSDP2 shard with
        unreduced gradients, and a loss that skips DDP's all-reduce (trl#7245)."""
        inputs = self._loss_inputs
        if inputs is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)
        if any(value is not None for value in multimodal.values()):
            raise NotImplementedError("selfdistill's trainers take text-only prompts: the teacher scores token ids.")
        with self.accelerator.autocast():
            logp, entropy, per_token, aux_loss = in_forward(
                model, partial(self._student_terms_in_forward, getattr(model, "module", model)), input_ids=input_ids,
                attention_mask=attention_mask, logits_to_keep=logits_to_keep, compute_aux_loss=compute_aux_loss)
        self._student_terms = (logp.detach(), per_token)
        if "student_logps_at_sampling" not in inputs:
            self._add_dense_term(inputs, logp.detach())
        return logp, entropy, aux_loss

    def _student_terms_in_forward(self, module, input_ids, attention_mask, logits_to_keep, compute_aux_loss):
        """The body of `_get_per_token_logps_and_entropies`, run as the forward of the wrapped `module`: its own
        forward (head on one position only), whose backbone's last hidden states a hook keeps, then the projection."""
        args, inputs = self.args, self._loss_inputs
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        backbone, head = causal_lm_parts(module)
        captured = []
        handle = backbone.register_forward_hook(lambda mod, hook_args, out: captured.append(out.last_hidden_state))
        try:
            router = {"output_router_logits": True} if compute_aux_loss else {}
            outputs = module.forward(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1,
                                     use_cache=False, **router)
        finally:
            handle.remove()
        hidden_s = captured[0][:, -logits_to_keep - 1 : -1]  # position P−1+t predicts completion token t
        self._term_stats = stats = {}
        teacher_head = self.teacher.head if args.distill_loss_weight and "teacher_hidden" in inputs else None
        with whole_heads(head, teacher_head) as ((head, teacher_head), gathered):
            common = dict(temperature=self.temperature, tokens_BT=completion_ids, stats=stats, weights_context=gathered)
            per_token = None
            if not args.distill_loss_weight:
                logp, entropy = token_logprobs(hidden_s, completion_ids, completion_mask, head=head, entropy=True,
                                               temperature=self.temperature, stats=stats, weights_context=gathered)
            elif "teacher_topk_ids" in inputs:  # a vLLM-served teacher: its top-k log-probs, not its hidden states
                per_token, logp, entropy = jsd_on_teacher_topk(
                    hidden_s, head, inputs["teacher_topk_ids"], inputs["teacher_topk_logps"], completion_mask,
                    beta=args.distill_beta, add_tail=args.distill_add_tail, **common)
            else:
                per_token, logp, entropy = jsd(
                    hidden_s, inputs["teacher_hidden"], completion_mask, student_head=head, teacher_head=teacher_head,
                    beta=args.distill_beta, top_k=args.distill_top_k, support=args.distill_support,
                    add_tail=args.distill_add_tail, **common)
        return logp, entropy, per_token, outputs.aux_loss if compute_aux_loss else None

    def _prepare_teacher_model(self, model):
        """A frozen teacher network placed as GRPOTrainer places its reference model: a ZeRO-3 inference engine (or a
        stage-0 replica under ZeRO-1/2), FSDP shards, or on the device."""
        model.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(model, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(model, self.accelerator)
        return self.accelerator.prepare_model(model, evaluation_mode=True)
