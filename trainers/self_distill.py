"""Self-distillation (SDPO, SDFT, OPSD): the model, shown privileged context, teaches itself.

The teacher is the student's own network (live, EMA or frozen base) given a rewritten prompt that holds the
verifier's feedback on this very rollout, a successful sibling rollout, a reference solution or a demonstration
(`selfdistill.context`). It scores the student's exact completion tokens; the rest is the shared dense core
(`trainers/core.py`): a sampled-token reverse-KL advantage through GRPO's loss, or a logit-level JSD_β term.

Presets (`mode=`), each default with its source:
- `sdpo`: the settings of Hübotter et al. 2026, "Reinforcement Learning via Self-Distillation", arXiv:2601.20802
  (lasgroup/SDPO code, `trl.experimental.sdpo` defaults), with the teacher templates the seeded study
  `benchmarks/sdpo_vs_grpo.py` chose on SmolLM2-135M-Instruct (README, "Self-distillation study"). Each default and the
  measurement behind it: held-out greedy pass@1 after 12 steps × 8 rollouts of two-digit addition, on screening seeds
  100 and 101 (GRPO from the same start: 0.32 and 0.23; the start: 0.15 and 0.12):
  - context first, question last (`selfdistill.context.QUESTION_LAST_*` templates): 0.57 and 0.45, against 0.38 and
    0.17 with the paper's reprompt, whose closing "Correctly solve the original question" makes the teacher reply
    as a revision: 14% of its greedy replies to failed rollouts echoed the template or the feedback ("130 is
    incorrect. The correct answer is 140.", numbered lists), 2% with these templates, and students trained on the
    paper's wrote "1. 39 + 48 = 77" (two numbers, graded wrong). Not confirmed on fresh seeds 0-2: there the paper's
    templates gave 0.36, 0.55, 0.39 against these templates' 0.23, 0.59, 0.33 (GRPO 0.16, 0.47, 0.28), a difference
    within the seed spread; these stay the default as the screen chose them, and the paper's are one setting away.
    Over 8 fresh seeds the preset ended at 0.43 ± 0.16 against GRPO's 0.34 ± 0.13, above it on 6, below on one
    (seed 203: 0.20 against 0.39, its student took up the teacher's bare "The answer is N." format).
  - JSD β=0.5 on the student's top-100 with a tail bucket, IS clip 2 (the paper's): the sampled-token advantage gave
    0.09 and 0.35. It pushes the wrong digit down (−4.6 nats on it in the diagnosis) without saying which digit is
    right, which the logit-level term does: the teacher's top token at the answer's first digit was the gold's on
    62–77% of failed rollouts.
  - EMA teacher at rate 0.05 (the paper's): a live teacher collapsed with its student (0.03 and 0.30; answers "The
    answer is 11. The answer is 1…").
  - `policy_weight` 1 (GRPO's reward advantage blended in; TRL's SDPOTrainer has none): 0.40 and 0.43 without it.
  - feedback and successful sibling, success threshold 1.0 (the paper's), with feedback that reveals the answer
    (`MathAccuracy(reveal_solution=True)`): told only that its answer is wrong, the teacher's greedy reply was right on
    32% of failed rollouts (86% when told the answer), and it raised the rejected answer's digits (it copies what
    the feedback quotes). A sibling alone gave no context to 68% of failed rollouts.
  The sweep of the rest, one change at a time on this preset, same seeds (preset 0.57 and 0.45): JSD β 0 or 1, top-20,
  no tail, a frozen base teacher, EMA rate 0.2 all ended within 5 points of it (0.46 to 0.52 mean), so the paper's
  values stay; temperature 1 (0.23, 0.35), `kl_coef=1` on top of the JSD (0.13, 0.24) and a sibling alone (0.41,
  0.35) did worse; feedback that hides the answer (0.42, 0.52) is within noise of it, worse in the diagnosis. The
  budget's temperature 0.7 stays: GRPO did better at 1 on these seeds (0.41, 0.31 against 0.32, 0.23) but not on fresh
  seeds 200-204 (0.28 ± 0.17 against 0.37 ± 0.12).
- `sdft` (Shenfeld et al. 2026, "Self-Distillation Enables Continual Learning", arXiv:2601.19897): demonstration context, EMA 0.01,
  forward KL (β=0) over the full vocabulary (the author confirmed the paper's results used it; `distill_top_k=20`
  is the cheap option), one generation per prompt (the demonstration does not depend on siblings).
- `opsd` (Zhao et al. 2026, "Self-Distilled Reasoner: On-Policy Self-Distillation for Large Language Models";
  siyan-zhao/OPSD): reference-solution context,
  frozen base teacher, JSD β=0.5.
`sdpo` and `opsd` sample GRPO's default 8 rollouts per prompt. Any field set explicitly wins over the preset.

`policy_weight` (default 1) blends in GRPO's verifier-reward advantage: A = policy_weight · A_group + kl_coef · a.
TRL's SDPOTrainer defaults to pure distillation (`distillation_weight=1`, i.e. policy_weight 0); we keep the blend on
because it measured better (above). With one generation per prompt A_group is 0 (GRPO has no group to compare with),
so the weight has no effect there.
"""

import os
import warnings
from copy import deepcopy
from dataclasses import dataclass, field

import torch
from accelerate.utils import gather_object, is_peft_model
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model, get_config_model_id, pad

from ..context import (
    QUESTION_LAST_FEEDBACK_TEMPLATE,
    QUESTION_LAST_REPROMPT_TEMPLATE,
    QUESTION_LAST_SOLUTION_TEMPLATE,
    SOURCES,
    Templates,
    context_leakage,
    teacher_prompt,
    teacher_prompts,
)
from ..rewards import FEEDBACK_KEY
from ..rewards.feedback import problem_text
from ..teachers import SelfTeacher
from ..vllm_teacher import generation_engine_teacher
from .core import DenseDistillTrainer, DistillConfig, no_reward

PAPER_TEMPLATES = dict(reprompt_template=Templates.reprompt, solution_template=Templates.solution,
                       feedback_template=Templates.feedback)  # the SDPO paper code's
QUESTION_LAST_TEMPLATES = dict(reprompt_template=QUESTION_LAST_REPROMPT_TEMPLATE,
                               solution_template=QUESTION_LAST_SOLUTION_TEMPLATE,
                               feedback_template=QUESTION_LAST_FEEDBACK_TEMPLATE)
PRESETS = {
    "sdpo": dict(num_generations=8, context_sources=("feedback", "sibling"), teacher="ema", teacher_update_rate=0.05,
                 objective="logits", distill_beta=0.5, distill_top_k=100, distill_add_tail=True,
                 distill_is_clip=2.0, success_threshold=1.0, **QUESTION_LAST_TEMPLATES),
    "sdft": dict(num_generations=1, context_sources=("demonstration",), teacher="ema", teacher_update_rate=0.01,
                 objective="logits", distill_beta=0.0, distill_top_k=None, distill_add_tail=False,
                 distill_is_clip=None, success_threshold=1.0, **PAPER_TEMPLATES),
    "opsd": dict(num_generations=8, context_sources=("solution",), teacher="base", teacher_update_rate=0.0,
                 objective="logits", distill_beta=0.5, distill_top_k=None, distill_add_tail=False,
                 distill_is_clip=None, success_threshold=1.0, **PAPER_TEMPLATES),
}


class _OneGeneration(int):
    """The int 1, except that it is not `< 2`: TRL 1.16's GRPOConfig refuses fewer than 2 generations per prompt, as
    GRPO's group-relative advantage needs a group. Self-distillation does not (SDFT samples one rollout per prompt),
    and GRPOTrainer itself handles a group of one (its advantage is then 0). Used only while GRPOConfig validates,
    so that all its other checks (batch divisibility) see the real value 1."""

    def __lt__(self, other):
        return False if other == 2 else super().__lt__(other)


@dataclass
class SelfDistillConfig(DistillConfig):
    """GRPOConfig + DistillConfig + what the self-teacher sees. Fields left at None take the `mode` preset."""

    mode: str = field(default="sdpo", metadata={"help": "Preset: 'sdpo', 'sdft' or 'opsd'."})
    policy_weight: float = field(
        default=1.0, metadata={"help": "Weight of GRPO's verifier-reward advantage, blended with the distillation term."}
    )
    num_generations: int | None = field(
        default=None, metadata={"help": "Rollouts per prompt; None = preset (8, GRPO's default; 1 for sdft)."}
    )
    teacher: str | None = field(default=None, metadata={"help": "'live', 'ema' or 'base'."})
    teacher_update_rate: float | None = field(default=None, metadata={"help": "EMA rate r: θ_T ← (1−r)θ_T + rθ."})
    objective: str | None = field(
        default=None,
        metadata={"help": "'sampled_token' (reverse-KL advantage in GRPO's loss) or 'logits' (JSD_β term)."},
    )
    context_sources: list[str] | None = field(
        default=None, metadata={"help": f"Teacher-context sources, among {SOURCES}."}
    )
    success_threshold: float | None = field(
        default=None, metadata={"help": "A sibling whose total reward is at least this is shown as a solution."}
    )
    teacher_on_vllm: bool = field(
        default=True,
        metadata={"help": "With use_vllm and teacher='live', score the teacher contexts on the vLLM that "
                          "generates (colocated engine or server): it holds the current weights, synced right before "
                          "generation, so this saves the teacher's HF forward. Its max_model_len "
                          "(vllm_max_model_length) must fit the teacher contexts. Sampled-token term only: with the "
                          "logit-level term (distill_loss_weight > 0) the HF model scores, as vLLM returns no hidden "
                          "states."},
    )
    remove_thinking: bool = field(default=True, metadata={"help": "Strip <think>…</think> from a shown sibling."})
    demonstration_template: str = field(default=Templates.demonstration)
    # Preset-controlled: None means "take the preset's value".
    reprompt_template: str | None = field(
        default=None, metadata={"help": "The teacher's prompt around its context ({prompt}, {solution}, {feedback})."})
    solution_template: str | None = field(
        default=None, metadata={"help": "How a shown solution or successful sibling is written ({successful_previous_attempt})."})
    feedback_template: str | None = field(default=None, metadata={"help": "How the feedback is written ({feedback_raw})."})
    kl_coef: float | None = None
    distill_loss_weight: float | None = None
    distill_beta: float | None = None
    distill_add_tail: bool | None = None
    distill_top_k: int | None = field(default=None, metadata={"help": "Top-k support; None = preset, 0 = full vocabulary."})
    distill_is_clip: float | None = field(default=None, metadata={"help": "IS clip; None = preset, 0 = off."})

    def __post_init__(self):
        if self.mode not in PRESETS:
            raise ValueError(f"mode must be one of {sorted(PRESETS)}, got {self.mode!r}")
        preset = PRESETS[self.mode]
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        # 0 means "off" (full vocabulary / no IS clip), since None already means "take the preset".
        self.distill_top_k = self.distill_top_k or None
        self.distill_is_clip = self.distill_is_clip or None
        if self.teacher not in SelfTeacher.KINDS:
            raise ValueError(f"teacher must be one of {SelfTeacher.KINDS}, got {self.teacher!r}")
        if self.objective not in ("sampled_token", "logits"):
            raise ValueError(f"objective must be 'sampled_token' or 'logits', got {self.objective!r}")
        sampled = self.objective == "sampled_token"
        self.kl_coef = (1.0 if sampled else 0.0) if self.kl_coef is None else self.kl_coef
        self.distill_loss_weight = (0.0 if sampled else 1.0) if self.distill_loss_weight is None else self.distill_loss_weight
        self.context_sources = tuple(self.context_sources)
        if set(self.context_sources) - set(SOURCES):
            raise ValueError(f"context_sources must be among {SOURCES}, got {self.context_sources}")
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}")
        if self.num_generations == 1 and self.context_sources == ("sibling",):
            raise ValueError("context_sources=('sibling',) needs num_generations >= 2: with one rollout per prompt "
                             "there is no sibling to show.")
        if self.num_generations == 1:
            self.num_generations = _OneGeneration(1)
        super().__post_init__()
        self.num_generations = int(self.num_generations)

    @property
    def group_advantage_weight(self) -> float:
        return self.policy_weight

    @property
    def templates(self) -> Templates:
        return Templates(self.reprompt_template, self.solution_template, self.feedback_template,
                         self.demonstration_template)


class _UpdateTeacher(TrainerCallback):
    """The EMA step, after each optimizer step (so a step that a guard stops never reaches the teacher)."""

    def __init__(self, teacher: SelfTeacher):
        self.teacher = teacher

    def on_step_end(self, args, state, control, **kwargs):
        self.teacher.update()


class SelfDistillTrainer(DenseDistillTrainer):
    """`trl.GRPOTrainer` whose advantages (or loss) gain the self-teacher's dense per-token signal.

    Overrides, beyond `DenseDistillTrainer`'s two:
    - `_generate_and_score_completions`: hands each rollout a fresh feedback slot (the rewards' feedback channel);
    - `_calculate_rewards`: keeps the gathered rewards, to find successful siblings;
    - `_save_checkpoint` / `_load_optimizer_and_scheduler`: save and restore the EMA/base teacher weights.
    """

    _tag_names = ["trl", "grpo", "selfdistill", "self-distillation"]

    def __init__(self, model, reward_funcs=None, args: SelfDistillConfig | None = None, **kwargs):
        if args is None:
            raise ValueError("SelfDistillTrainer needs a SelfDistillConfig (args=...).")
        super().__init__(model, reward_funcs=reward_funcs or [no_reward], args=args, **kwargs)
        if reward_funcs and args.num_generations == 1 and args.policy_weight:
            warnings.warn("num_generations=1: GRPO's group advantage of a single rollout is 0, so the rewards are only "
                          "logged and used for the teacher's context; policy_weight has no effect.")
        on_vllm = args.teacher == "live" and args.use_vllm and args.teacher_on_vllm
        if on_vllm and args.distill_loss_weight:
            warnings.warn("teacher_on_vllm: the logit-level term (distill_loss_weight > 0) needs the teacher's hidden "
                          "states, which vLLM does not return, so the live teacher scores with the HF model.")
        if on_vllm and not args.distill_loss_weight:
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            self.teacher = generation_engine_teacher(self.vllm_generation, tokenizer, self.temperature)
        else:
            copy = None if args.teacher == "live" or is_peft_model(self.model) else self._teacher_copy()
            self.teacher = SelfTeacher(self.model, args.teacher, args.teacher_update_rate, self.temperature,
                                       args.per_device_train_batch_size, return_hidden=bool(args.distill_loss_weight),
                                       copy=copy)
        if args.teacher == "ema":
            self.add_callback(_UpdateTeacher(self.teacher))
        self._check_static_contexts_fit()

    def _teacher_copy(self):
        """The EMA or base teacher's own network: a copy of the student, prepared as the student is sharded (see
        `SelfTeacher`). Under ZeRO-3 the student is already partitioned here, so the copy is loaded again from the
        student's checkpoint, as GRPOTrainer builds its reference model; elsewhere it is a deep copy of the weights."""
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            init_kwargs = dict(self.args.model_init_kwargs or {})
            init_kwargs.setdefault("dtype", self.model.dtype)
            init_kwargs.setdefault("device_map", None)
            copy = create_model_from_path(get_config_model_id(self.model.config), **init_kwargs)
        else:
            copy = deepcopy(self.model)
        disable_dropout_in_model(copy)
        return self._prepare_teacher_model(copy)

    def _max_teacher_length(self) -> int:
        """The most tokens a teacher context plus a completion may hold: the model's positions (and vLLM's length
        when the teacher scores on vLLM)."""
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None) or float("inf")
        if not isinstance(self.teacher, SelfTeacher) and self.args.vllm_max_model_length:  # scored on vLLM
            limit = min(limit, self.args.vllm_max_model_length)
        return limit

    def _check_context_lengths(self, prompt_ids: list[list[int]], completion_length: int, where: str) -> None:
        limit = self._max_teacher_length()
        longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]), default=None)
        if longest is not None and len(prompt_ids[longest]) + completion_length > limit:
            raise ValueError(
                f"A teacher context is longer than the model can hold: {where} has a {len(prompt_ids[longest])}-token "
                f"teacher prompt, which with {completion_length} completion tokens exceeds the model's maximum length "
                f"{limit}. It is not truncated (that would change what the teacher sees); shorten the "
                "solution/demonstration/feedback or the templates, or lower max_completion_length.")

    def _check_static_contexts_fit(self) -> None:
        """Before any compute: the contexts known from the dataset alone (solutions, demonstrations, privileged
        context) plus `max_completion_length` must fit the model."""
        names = [n for n in ("solution", "demonstration", "privileged_context") if n in self.args.context_sources]
        dataset = self.train_dataset
        if not names or dataset is None or not hasattr(dataset, "column_names"):
            return
        names = [n for n in names if n in dataset.column_names]
        if not names:
            return
        for start in range(0, len(dataset), 256):
            rows = dataset[start : start + 256]
            prompts = [teacher_prompt(rows["prompt"][i], templates=self.args.templates,
                                      **{"feedback" if n == "privileged_context" else n: rows[n][i] for n in names})
                       for i in range(len(rows["prompt"]))]
            present = [i for i, p in enumerate(prompts) if p is not None]
            ids = self._tokenize_prompts([prompts[i] for i in present])[0] if present else []
            if ids:
                longest = max(range(len(ids)), key=lambda i: len(ids[i]))
                self._check_context_lengths([ids[longest]], self.args.max_completion_length,
                                            f"train_dataset row {start + present[longest]}")

    def _no_teacher_signal_cause(self) -> str:
        args = self.args
        return (f"no rollout had a teacher context for context_sources={args.context_sources}: no rollout reached "
                f"success_threshold={args.success_threshold} to be shown as a sibling, and the rewards gave no "
                "feedback (or the dataset no solution/demonstration column). Check that the reward functions add "
                "feedback (selfdistill.rewards.add_feedback) and the dataset's columns.")

    def _generate_and_score_completions(self, inputs):
        # Fresh dict copies, so every rollout owns its feedback slot even if the sampler repeated one dict object.
        inputs = [{**example, FEEDBACK_KEY: []} for example in inputs]
        return super()._generate_and_score_completions(inputs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _teacher_prompts(self, inputs, batch):
        args, mode = self.args, "train" if self.model.training else "eval"
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        completions = tokenizer.batch_decode(
            [ids[mask.bool()] for ids, mask in zip(completion_ids, completion_mask)], skip_special_tokens=True
        )
        rewards = (self._rewards_per_func * self.reward_weights.to(self._rewards_per_func.device)).nansum(dim=1)
        rewards[torch.isnan(self._rewards_per_func).all(dim=1)] = torch.nan
        feedbacks = ["\n".join(example[FEEDBACK_KEY]) or None for example in inputs]
        columns = {name: gather_object([example.get(name) for example in inputs])
                   for name in ("solution", "demonstration", "privileged_context") if name in inputs[0]}
        prompts_all = teacher_prompts(
            gather_object([example["prompt"] for example in inputs]),
            gather_object(completions),
            rewards.tolist(),
            gather_object(feedbacks),
            columns,
            group_size=self.num_generations if mode == "train" else self.num_generations_eval,
            sources=args.context_sources,
            success_threshold=args.success_threshold,
            remove_thinking=args.remove_thinking,
            templates=args.templates,
        )
        start = self.accelerator.process_index * len(inputs)
        local = prompts_all[start : start + len(inputs)]
        has_teacher_B = torch.tensor([p is not None for p in local], device=completion_ids.device)
        batch["succeeded"] = (rewards >= args.success_threshold)[start : start + len(inputs)].to(completion_ids.device)
        all_feedbacks = gather_object(feedbacks)
        self._metrics[mode]["self_distill/frac_with_feedback"].append(
            sum(f is not None for f in all_feedbacks) / len(prompts_all)
        )
        self._metrics[mode]["self_distill/context_leakage"].append(context_leakage(
            gather_object(completions), [problem_text(p) for p in gather_object([e["prompt"] for e in inputs])],
            all_feedbacks, args.templates))
        if not any(p is not None for p in prompts_all):
            warnings.warn(
                "Self-distillation: no rollout in this batch has a teacher context (no rollout reached "
                f"success_threshold={args.success_threshold}, and no feedback, solution or demonstration was given "
                f"for context_sources={args.context_sources}), so the distillation term is zero for this batch."
            )
        # Rollouts without context still need a row: they keep their own prompt and are masked out.
        teacher_inputs = [p if p is not None else example["prompt"] for p, example in zip(local, inputs)]
        prompt_ids = self._tokenize_prompts(teacher_inputs)[0]
        self._check_context_lengths(prompt_ids, completion_ids.shape[1], f"step {self.state.global_step + 1}")
        device = completion_ids.device
        ids = [torch.tensor(x, device=device) for x in prompt_ids]
        return (
            pad(ids, padding_value=tokenizer.pad_token_id, padding_side="left"),
            pad([torch.ones_like(x) for x in ids], padding_value=0, padding_side="left"),
            has_teacher_B,
        )

    def _log_distill_metrics(self, mode, batch, logp_s, policy_adv_B1, distill_adv_BT):
        """Also: how often the teacher's context points the right way. Per rollout with a teacher signal, the sign
        of Σ_t (log T − log S), the direction its dense advantage pushes the whole completion: down on a failed
        rollout (`self_distill/teacher_helps_failed`, the fraction where Σ < 0), up on a successful one
        (`teacher_helps_succeeded`, Σ > 0)."""
        super()._log_distill_metrics(mode, batch, logp_s, policy_adv_B1, distill_adv_BT)
        if "succeeded" not in batch:  # an override of `_teacher_prompts` that does not say
            return
        gap_B = ((batch["teacher_logps"] - logp_s) * batch["distill_mask"]).sum(1)
        has, ok = batch["has_teacher"], batch["succeeded"]
        counts = torch.stack([(has & ~ok & (gap_B < 0)).sum(), (has & ~ok).sum(), (has & ok & (gap_B > 0)).sum(),
                              (has & ok).sum()]).float()
        counts = self.accelerator.reduce(counts, reduction="sum")
        for name, hits, total in (("failed", counts[0], counts[1]), ("succeeded", counts[2], counts[3])):
            if total > 0:
                self._metrics[mode][f"self_distill/teacher_helps_{name}"].append((hits / total).item())

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if isinstance(self.teacher, SelfTeacher):  # a teacher scored by vLLM is live and has no weights of its own
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            self.teacher.save(folder, self.accelerator)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and isinstance(self.teacher, SelfTeacher):
            self.teacher.load(checkpoint, self.accelerator)
