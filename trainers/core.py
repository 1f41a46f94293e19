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

import torch
from trl import GRPOConfig, GRPOTrainer

from ..losses import importance_weights, jsd, jsd_on_teacher_topk, masked_mean, reverse_kl_advantage, token_logprobs
from ..teachers import causal_lm_parts
from ..vllm_sync import cpu_server_generation, fix_vllm_cpu_weight_sync


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


def score_only_completions_on_cpu() -> None:
    """Make GRPO's fused LM head project only the completion positions on CPU too (TRL 1.16).

    `trl.trainer.utils._fused_forward` projects only the positions with a label on Triton devices, and every position
    elsewhere, because on devices that compile per shape (Neuron) a varying count would recompile each batch. CPU
    compiles nothing, so there the prompt positions only cost time and memory: on the 38M-parameter model of
    benchmarks/sdpo_vs_trl.py (16 rollouts, prompts of ~30 tokens, completions of 32) plain GRPOTrainer's step peaked
    at +1.9 GiB. This rebinds the name `_use_triton` in that module only, where it picks the compact layout, to be
    true on CPU as well; which kernel runs (`trl.kernels.chunked_logprob` keeps its own name) and other devices are
    unchanged. The values are the same, only fewer rows are computed. Our loss projects the student itself (see
    `DenseDistillTrainer._get_per_token_logps_and_entropies`); GRPO's fused head still computes the log-probs at
    sampling when they differ from the loss's (vLLM, several iterations per batch) and the reference model's.
    """
    import trl.trainer.utils as trl_utils

    use_triton = trl_utils._use_triton
    if getattr(use_triton, "compact_on_cpu", False):
        return

    def compact_layout(device: torch.device) -> bool:
        return device.type == "cpu" or use_triton(device)

    compact_layout.compact_on_cpu = True
    trl_utils._use_triton = compact_layout


def no_reward(completions, **kwargs) -> list[float]:
    """Zero reward, used when a trainer gets `reward_funcs=None` (pure distillation): the KL term is the signal."""
    return [0.0] * len(completions)


class DenseDistillTrainer(GRPOTrainer):
    """GRPOTrainer whose advantages gain a dense per-token teacher term.

    Overrides three GRPOTrainer methods, and nothing else:
    - `_generate_and_score_completions`: after GRPO generates and rewards, score the completion tokens under the
      teacher; when GRPO computed the sampling log-probs (off-policy, vLLM), replace the `(B,)` advantages by the
      `(B, T)` ones of the module docstring right away;
    - `_get_per_token_logps_and_entropies`, inside GRPO's loss: one projection of the student's hidden states gives
      the log-probs GRPO's loss needs and the logit-level term; on-policy, the `(B, T)` advantages are formed there
      from those log-probs, before GRPO's loss reads them (no separate student pass for the sampling log-probs);
    - `_compute_loss`: adds the optional logit-level JSD term.

    Subclasses set `self.teacher` (see `selfdistill.teachers`) and implement `_teacher_prompts`.
    """

    _loss_inputs = None  # the batch, while `_compute_loss` runs
    _student_terms = None  # (log-probs, logit-level term) of that batch, from `_get_per_token_logps_and_entropies`

    def __init__(self, *args, **kwargs):
        with cpu_server_generation(self, kwargs["args"]):  # vLLM server mode with a CPU trainer
            super().__init__(*args, **kwargs)
        fix_vllm_cpu_weight_sync(self)  # colocated vLLM on CPU only; see selfdistill/vllm_sync.py
        if self.accelerator.device.type == "cpu":
            score_only_completions_on_cpu()

    def _teacher_prompts(self, inputs: list[dict], batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(prompt_ids, prompt_mask, has_teacher_B)`: the prompt the teacher conditions on for each rollout, and
        whether the rollout gets a distillation term at all."""
        raise NotImplementedError

    def _generate_and_score_completions(self, inputs):
        batch = super()._generate_and_score_completions(inputs)
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        teacher_prompt_ids, teacher_prompt_mask, has_teacher_B = self._teacher_prompts(inputs, batch)
        # The student's forward runs under accelerate's autocast (bf16 by default); the teacher calls the backbone
        # directly, bypassing the wrapped `forward`, so it needs the same context to be comparable.
        with self.accelerator.autocast():
            scores = self.teacher.score(teacher_prompt_ids, teacher_prompt_mask, completion_ids, completion_mask)
        mask_BT = completion_mask * batch.get("tool_mask", 1) * has_teacher_B.unsqueeze(1).to(completion_mask.dtype)
        batch["teacher_logps"], batch["distill_mask"], batch["has_teacher"] = scores.logp_BT, mask_BT, has_teacher_B
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
        batch["advantages"] = args.group_advantage_weight * batch["advantages"].unsqueeze(1) + args.kl_coef * kl_adv_BT
        batch["student_logps_at_sampling"] = student_logp_BT
        self._log_distill_metrics(mode, student_logp_BT, logp_t, mask_BT, batch["has_teacher"])

    def _log_distill_metrics(self, mode, logp_s, logp_t, mask, has_teacher_B):
        m = mask.float()
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
            ]
        )
        sums = self.accelerator.reduce(sums, reduction="sum")
        n = sums[5].clamp(min=1)
        names = ["reverse_kl", "teacher_logp", "student_logp", "frac_teacher_logp_below", "acceptance"]
        for name, value in zip(names, sums[:5] / n):
            self._metrics[mode][f"distill/{name}"].append(value.item())
        self._metrics[mode]["distill/frac_with_teacher"].append((sums[6] / sums[7]).item())

    def _compute_loss(self, model, inputs):
        # GRPO's loss asks `_get_per_token_logps_and_entropies` (below) for the student's log-probs; there, one
        # projection of the student's hidden states gives them together with the logit-level term.
        args, mode = self.args, "train" if self.model.training else "eval"
        self._loss_inputs = inputs
        try:
            loss = super()._compute_loss(model, inputs)
            logp_now, per_token = self._student_terms
        finally:  # neither the batch nor the term's graph outlives the step
            self._loss_inputs = self._student_terms = None
        if not args.distill_loss_weight:
            return loss
        mask_BT = inputs["distill_mask"]
        # On-policy the IS weights are exactly 1: the log-probs at sampling came from this very forward.
        if args.distill_is_clip is not None and "old_per_token_logps" in inputs:
            per_token = per_token * importance_weights(logp_now, inputs["student_logps_at_sampling"], args.distill_is_clip)
        distill_loss = masked_mean(per_token, mask_BT)
        self._metrics[mode]["distill/logit_loss"].append(self.accelerator.gather(distill_loss.detach()).mean().item())
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        return loss + args.distill_loss_weight * distill_loss / accumulation

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """Inside `_compute_loss`: the student's completion log-probs and entropies for GRPO's loss, and the logit-level
        term, from one chunked projection of the hidden states (`losses.jsd(..., tokens_BT=)`), where GRPO's fused head
        and the distillation term would each project them. On-policy, the `(B, T)` advantages are formed here from
        these log-probs, before GRPO's loss reads them. GRPO's other uses (old and reference log-probs) are unchanged."""
        inputs = self._loss_inputs
        if inputs is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)
        if any(value is not None for value in multimodal.values()):
            raise NotImplementedError("selfdistill's trainers take text-only prompts: the teacher scores token ids.")
        args, completion_ids, completion_mask = self.args, inputs["completion_ids"], inputs["completion_mask"]
        backbone, head = causal_lm_parts(model)
        captured = []
        handle = backbone.register_forward_hook(lambda module, hook_args, out: captured.append(out.last_hidden_state))
        try:
            router = {"output_router_logits": True} if compute_aux_loss else {}
            with self.accelerator.autocast():  # through the wrapped model (DDP, FSDP, PEFT); the head on 1 position only
                outputs = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False,
                                **router)
        finally:
            handle.remove()
        hidden_s = captured[0][:, -logits_to_keep - 1 : -1]  # position P−1+t predicts completion token t
        common = dict(temperature=self.temperature, tokens_BT=completion_ids)
        per_token = None
        if not args.distill_loss_weight:
            logp, entropy = token_logprobs(hidden_s, completion_ids, completion_mask, head=head,
                                           temperature=self.temperature, entropy=True)
        elif "teacher_topk_ids" in inputs:  # a vLLM-served teacher: its top-k log-probs, not its hidden states
            per_token, logp, entropy = jsd_on_teacher_topk(
                hidden_s, head, inputs["teacher_topk_ids"], inputs["teacher_topk_logps"], completion_mask,
                beta=args.distill_beta, add_tail=args.distill_add_tail, **common)
        else:
            per_token, logp, entropy = jsd(
                hidden_s, inputs["teacher_hidden"], completion_mask, student_head=head, teacher_head=self.teacher.head,
                beta=args.distill_beta, top_k=args.distill_top_k, support=args.distill_support,
                add_tail=args.distill_add_tail, **common)
        self._student_terms = (logp.detach(), per_token)
        if "student_logps_at_sampling" not in inputs:
            self._add_dense_term(inputs, logp.detach())
        return logp, entropy, outputs.aux_loss if compute_aux_loss else None
