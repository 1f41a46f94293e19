"""Guards that stop a distillation run with a reason instead of letting it fail silently.

What users of other self-distillation code report: collapse after about 400 steps (lasgroup/SDPO#25); a gradient norm
of about 1e-5 while the loss looks normal (lasgroup/SDPO#38); teacher fields dropped before the loss, so distillation
silently did nothing (NousResearch/atropos#456). The trainers log the signals behind these (`DenseDistillTrainer`'s
metrics) and stop on them through this module:

- `no_teacher_signal_patience`: N consecutive generation batches in which no rollout carries a teacher signal raise
  `TrainingHalted` naming the likely cause;
- `stop_on_nonfinite`: a non-finite loss (checked before the backward pass) or gradient (before the optimizer step)
  raises `TrainingHalted`, so neither the weights nor an EMA teacher (updated after the step) take the bad update,
  and the checkpoints already written stay as they are;
- `collapse_fraction`: the train reward's running mean (over `collapse_patience` generation batches) staying below
  `collapse_fraction` × its best for `collapse_patience` batches stops the run, saves it, and writes the reason to
  `<output_dir>/stop_reason.json`.

Every check agrees across processes (the counts and flags are reduced), so all ranks stop together instead of one
rank raising while the others wait in a collective.
"""

import json
import os
from collections import deque

import torch
from transformers import TrainerCallback

STOP_REASON_FILE = "stop_reason.json"


class TrainingHalted(RuntimeError):
    """A guard stopped training; the message names the cause."""


def any_rank(accelerator, flag: bool) -> bool:
    """Whether `flag` is true on any process."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0)


def check_finite_loss(trainer, **terms: torch.Tensor) -> None:
    """Raise `TrainingHalted` before the backward pass when any named loss term is NaN or infinite on any process."""
    bad = [name for name, value in terms.items() if not torch.isfinite(value.detach()).all()]
    if any_rank(trainer.accelerator, bool(bad)):
        where = ", ".join(bad) if bad else "another process's loss"
        raise TrainingHalted(f"non-finite loss at step {trainer.state.global_step + 1} ({where}); stopped before the "
                             "backward pass, so the weights and the teacher are unchanged (stop_on_nonfinite).")


class Guards(TrainerCallback):
    """The trainer-side state of the guards (see the module docstring); added by `DenseDistillTrainer`."""

    def __init__(self, trainer):
        self.trainer, args = trainer, trainer.args
        self.batches_without_signal = 0
        self.rewards = deque(maxlen=args.collapse_patience)
        self.best_running_mean = self.running_mean = None
        self.batches_below = 0

    def record_teacher_signal(self, tokens_with_signal: int, cause: str) -> None:
        """Count generation batches with no token carrying a teacher signal (`tokens_with_signal`, over all ranks)."""
        patience = self.trainer.args.no_teacher_signal_patience
        self.batches_without_signal = 0 if tokens_with_signal else self.batches_without_signal + 1
        if patience and self.batches_without_signal >= patience:
            raise TrainingHalted(f"{self.batches_without_signal} consecutive generation batches without a teacher "
                                 f"signal (no_teacher_signal_patience={patience}): {cause}")

    def record_reward(self, mean_reward: float) -> None:
        """Track the running mean of the train reward, one value per generation batch (over all ranks)."""
        self.rewards.append(mean_reward)
        if len(self.rewards) < self.rewards.maxlen:
            return
        running = sum(self.rewards) / len(self.rewards)
        self.best_running_mean = running if self.best_running_mean is None else max(self.best_running_mean, running)
        fraction = self.trainer.args.collapse_fraction
        below = fraction is not None and self.best_running_mean > 0 and running < fraction * self.best_running_mean
        self.batches_below = self.batches_below + 1 if below else 0
        self.running_mean = running

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # DeepSpeed steps inside the backward pass (accelerate's engine wrapper), before this event: there the loss
        # check in `_compute_loss` is the guard.
        if not args.stop_on_nonfinite or self.trainer.is_deepspeed_enabled:
            return
        bad = []
        for name, param in self.trainer.model.named_parameters():
            grad = param.grad
            if grad is not None:
                grad = grad.to_local() if hasattr(grad, "to_local") else grad  # an FSDP2 shard
                if not torch.isfinite(grad).all():
                    bad.append(name)
        if any_rank(self.trainer.accelerator, bool(bad)):
            where = f"first in {bad[0]}" if bad else "on another process"
            raise TrainingHalted(f"non-finite gradient at step {state.global_step + 1} ({where}); stopped before the "
                                 "optimizer step, so the weights and the teacher are unchanged (stop_on_nonfinite).")

    def on_step_end(self, args, state, control, **kwargs):
        if args.collapse_fraction is None or self.batches_below < args.collapse_patience:
            return
        reason = (f"train reward collapsed: its running mean over {args.collapse_patience} generation batches stayed "
                  f"below collapse_fraction={args.collapse_fraction} × its best ({self.best_running_mean:.4f}) for "
                  f"{self.batches_below} batches (now {self.running_mean:.4f}); stopped at step {state.global_step} "
                  "and saved.")
        self.trainer.stop_reason = reason
        control.should_training_stop = control.should_save = True
        if self.trainer.accelerator.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, STOP_REASON_FILE), "w") as f:
                json.dump({"step": state.global_step, "reason": reason}, f, indent=2)
        self.trainer.log({"stopped_on_collapse": 1.0})
        print(f"selfdistill: {reason}")
