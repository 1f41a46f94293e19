"""Both trainers on 2 CPU processes under DDP, DeepSpeed ZeRO-2/3 or FSDP2, recording what `tests/test_sharded.py`
compares with a 1-process run.

    python -m accelerate.commands.launch ... tests/_sharded.py STRATEGY OUT_DIR STUDENT_DIR TEACHER_DIR CASE [CASE...]
    torchrun --nproc_per_node 2 tests/_sharded.py fsdp2 OUT_DIR STUDENT_DIR TEACHER_DIR CASE [CASE...]

The rollouts are replayed, not sampled (`Replay`): each prompt's completions are a fixed function of the prompt, so
the sharded run and the 1-process reference train on exactly the same tokens. Each case writes
`OUT_DIR/<case>.pt` from rank 0: per step the logged loss, the whole student weights and the teacher's weights after
the optimizer step (gathered from their shards), and under FSDP2 the LM head's gradient before the step.

FSDP2 on CPU: accelerate turns FSDP on only for GPU-like devices (`AcceleratorState` skips it for MULTI_CPU). With
`fsdp2`, `allow_fsdp_on_cpu` lifts exactly that one check; everything else is the real path a GPU user runs:
TrainingArguments' `fsdp_config`, accelerate's `fsdp2_prepare_model` (`fully_shard` per decoder layer and at the
root, `reshard_after_forward=True`), TRL's `prepare_fsdp` for the teacher, and the Trainer loop.
"""

import os
import re
import sys

import torch
from datasets import Dataset
from transformers import TrainerCallback

NUM_GENERATIONS = 4
STEPS = 2
# SGD, so that the update is linear in the gradient and the comparison tests the gradient's reduction: Adam's first
# step is ≈ lr · sign(g), which turns the rounding of a gradient near 0 into a full-size difference.
COMMON = dict(num_generations=NUM_GENERATIONS, max_completion_length=16, max_steps=STEPS, optim="sgd", learning_rate=0.5,
              temperature=0.8, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True,
              bf16=False, gradient_checkpointing=False, seed=3)
FSDP2 = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                             "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                             "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]})
# Per prompt, the 4 rollouts answer right, wrong, right in other words, and not at all: the rewards differ within a
# group (GRPO advantages, successful siblings) and the wrong ones get feedback.
ANSWERS = ["The answer is \\boxed{{{right}}}.", "\\boxed{{{wrong}}}", "So it is \\boxed{{{right}}}", "I do not know"]


def prompts(n: int = 16) -> Dataset:
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 3?"}], "solution": str(i + 3)}
                              for i in range(n)])


def char_length_reward(completions, **kwargs) -> list[float]:
    return [len(completion[0]["content"]) / 10 for completion in completions]


class Replay:
    """Mixin for a trainer: completions come from `ANSWERS` instead of sampling. Rollout j of a group gets answer j;
    j is the rollout's place in its group, from its row in the global batch (groups are consecutive rows, and rank r
    holds rows r·B to (r+1)·B − 1), so a group split across ranks gets the same answers as on one process."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        tokenizer = self.processing_class
        first_row = self.accelerator.process_index * len(prompt_ids)
        completions = []
        for row, ids in enumerate(prompt_ids, start=first_row):
            i = int(re.search(r"What is (\d+) \+ 3", tokenizer.decode(ids)).group(1))
            answer = ANSWERS[row % num_generations % len(ANSWERS)].format(right=i + 3, wrong=i + 4)
            completions.append(tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id])
        return completions, None


def opd_trainer(output_dir, student_dir, teacher_dir, per_device, **overrides):
    from selfdistill.trainers import OnPolicyDistillConfig, OnPolicyDistillTrainer

    class ReplayOPD(Replay, OnPolicyDistillTrainer):
        pass

    args = OnPolicyDistillConfig(output_dir=output_dir, per_device_train_batch_size=per_device, kl_coef=0.5,
                                 task_weight=2.0, distill_loss_weight=0.5, **{**COMMON, **overrides})
    return ReplayOPD(model=student_dir, teacher_model=teacher_dir, reward_funcs=[char_length_reward], args=args,
                     train_dataset=prompts())


class RecordContexts:
    """Mixin for SelfDistillTrainer: `self.contexts`, per generation batch, each local rollout's teacher prompt (as
    text) and its `(B, T)` advantages, keyed by its (prompt, completion) text."""

    contexts: list

    def _teacher_prompts(self, inputs, batch):
        prompt_ids, prompt_mask, has_teacher = super()._teacher_prompts(inputs, batch)
        decode = self.processing_class.decode
        keys = [(decode(p[pm.bool()]), decode(c[cm.bool()])) for p, pm, c, cm in
                zip(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])]
        self.contexts.append({key: {"teacher_prompt": decode(t[tm.bool()]) if h else None}
                              for key, t, tm, h in zip(keys, prompt_ids, prompt_mask, has_teacher)})
        return prompt_ids, prompt_mask, has_teacher

    def _add_dense_term(self, batch, student_logp_BT):
        super()._add_dense_term(batch, student_logp_BT)
        decode = self.processing_class.decode
        for p, pm, c, cm, advantages in zip(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                            batch["completion_mask"], batch["advantages"]):
            self.contexts[-1][decode(p[pm.bool()]), decode(c[cm.bool()])]["advantages"] = advantages[cm.bool()].detach()


def sdpo_trainer(output_dir, student_dir, per_device, peft_config=None, replay=True, **overrides):
    from selfdistill.rewards import MathAccuracy
    from selfdistill.trainers import SelfDistillConfig, SelfDistillTrainer

    class ReplaySDPO(Replay, RecordContexts, SelfDistillTrainer):
        contexts = None

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.contexts = []

    # The sdpo preset (EMA teacher, JSD on the student's top-k with a tail bucket) with a fast EMA and a small k.
    options = dict(mode="sdpo", teacher="ema", teacher_update_rate=0.3, distill_top_k=5, **COMMON)
    args = SelfDistillConfig(output_dir=output_dir, per_device_train_batch_size=per_device, **{**options, **overrides})
    return (ReplaySDPO if replay else SelfDistillTrainer)(
        model=student_dir, reward_funcs=[MathAccuracy(reveal_solution=True, workers=1)], args=args,
        train_dataset=prompts(), peft_config=peft_config)


def full_weights(module) -> dict[str, torch.Tensor]:
    """Every parameter of `module`, whole (gathered from ZeRO-3 partitions or FSDP2 shards), on CPU, by name."""
    params = dict(module.named_parameters())
    if any(getattr(p, "ds_id", None) is not None for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone().cpu() for n, p in params.items()}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().cpu() for n, p in params.items()}


class Record(TrainerCallback):
    """Per step: the loss, the student's and the teacher's whole weights; under FSDP2 the head's whole gradient."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, {}

    def _step(self, state):
        return self.steps.setdefault(state.global_step, {})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        head = self.trainer.model.get_output_embeddings().weight
        if hasattr(head, "full_tensor") and head.grad is not None:
            self.steps.setdefault(state.global_step + 1, {})["head_grad"] = head.grad.full_tensor().clone()

    def on_step_end(self, args, state, control, **kwargs):
        record = self._step(state)
        record["weights"] = full_weights(self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped))
        teacher = getattr(self.trainer, "teacher", None)
        state_of = getattr(teacher, "state", lambda: None)()
        if state_of is not None:
            copy = getattr(teacher, "copy", None)
            record["teacher"] = full_weights(getattr(copy, "module", copy)) if copy is not None else {
                n: t.detach().clone() for n, t in state_of.items()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self._step(state)["loss"] = logs["loss"]


def run(trainer, **train_kwargs) -> dict:
    record = Record(trainer)
    trainer.add_callback(record)
    trainer.train(**train_kwargs)
    return record.steps


def allow_fsdp_on_cpu() -> None:
    """Let accelerate select FSDP on CPU processes (see the module docstring): when TrainingArguments hand it an
    FSDP plugin and the processes are MULTI_CPU, set the distributed type to FSDP, which accelerate otherwise does
    for GPU-like devices only."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__

    def init_with_fsdp(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = init_with_fsdp


def main(strategy: str, out_dir: str, student_dir: str, teacher_dir: str, *cases: str) -> None:
    extra = dict(ddp_backend="gloo")
    if strategy == "fsdp2":
        allow_fsdp_on_cpu()
        extra |= FSDP2
    results = {}
    for case in cases:
        output_dir = os.path.join(out_dir, case)
        if case == "opd":
            results[case] = run(opd_trainer(output_dir, student_dir, teacher_dir, NUM_GENERATIONS, **extra))
        elif case == "sdpo":
            results[case] = run(sdpo_trainer(output_dir, student_dir, NUM_GENERATIONS, **extra))
        elif case == "resume":  # saved at step 1, resumed there by a new trainer, run to step 2
            first = sdpo_trainer(output_dir, student_dir, NUM_GENERATIONS, save_strategy="steps", save_steps=1,
                                 **extra)
            results["resume-first"] = run(first)
            resumed = sdpo_trainer(output_dir + "-resumed", student_dir, NUM_GENERATIONS, **extra)
            loaded = {}
            load = resumed._load_optimizer_and_scheduler

            def load_and_record(checkpoint, trainer=resumed):
                load(checkpoint)
                copy = trainer.teacher.copy
                loaded.update(full_weights(getattr(copy, "module", copy)))

            resumed._load_optimizer_and_scheduler = load_and_record
            results[case] = run(resumed, resume_from_checkpoint=os.path.join(output_dir, "checkpoint-1"))
            results[case]["loaded_teacher"] = loaded
        elif case == "peft":
            from peft import LoraConfig

            trainer = sdpo_trainer(output_dir, student_dir, NUM_GENERATIONS, teacher="base", peft_config=LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0), **extra)
            steps = run(trainer)
            # The base teacher's log-probs of a fixed sequence, from inside the trainer (adapter disabled).
            ids = trainer.processing_class("What is 1 + 3? The answer is 4.", return_tensors="pt").input_ids
            scores = trainer.teacher.score(ids[:, :8], torch.ones_like(ids[:, :8]), ids[:, 8:], torch.ones_like(ids[:, 8:]))
            steps["base_teacher_logp"] = scores.logp_BT.cpu()
            steps["fixed_ids"] = ids
            results[case] = steps
        elif case == "smoke-opd":  # real sampling, no replay
            from selfdistill.trainers import OnPolicyDistillConfig, OnPolicyDistillTrainer

            args = OnPolicyDistillConfig(output_dir=output_dir, per_device_train_batch_size=NUM_GENERATIONS,
                                         distill_loss_weight=0.5, **COMMON, **extra)
            trainer = OnPolicyDistillTrainer(model=student_dir, teacher_model=teacher_dir, args=args,
                                             reward_funcs=[char_length_reward], train_dataset=prompts())
            results[case] = run(trainer)
        elif case == "split":  # 3 groups of 4 on 2 ranks of 6: the middle group is split across the ranks
            trainer = sdpo_trainer(output_dir, student_dir, 6, objective="sampled_token", **extra)
            steps = run(trainer)
            torch.save(trainer.contexts, os.path.join(out_dir, f"split.contexts.rank{trainer.accelerator.process_index}"))
            results[case] = steps
        elif case == "smoke-sdpo":
            results[case] = run(sdpo_trainer(output_dir, student_dir, NUM_GENERATIONS, replay=False, **extra))
        else:
            raise ValueError(f"unknown case {case!r}")
    if int(os.environ.get("RANK", "0")) == 0:
        for case, steps in results.items():
            torch.save(steps, os.path.join(out_dir, f"{case}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
