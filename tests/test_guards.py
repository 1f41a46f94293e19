"""The guards and diagnostics that keep a distillation run from failing silently (trainers/guards.py, the metrics of
DenseDistillTrainer), on the tiny fixture models with real TRL training steps.

Each guard is triggered for real: a teacher that never gets a context, a NaN injected into the student's loss
forward (loss) or its backward (gradient), a reward that collapses, a dropped teacher field, a teacher context
longer than the model. Each test asserts what the guard promises: the error names the cause, the weights and the EMA
teacher did not take the bad step, the checkpoint is kept, the collapse stop saves and says why.
"""

import json
import os

import pytest
import torch
from transformers import TrainerCallback

from selfdistill.trainers.guards import STOP_REASON_FILE, TrainingHalted
from test_self_distill import always_wrong, dataset, make_trainer, one_batch, wrong_with_feedback

pytestmark = pytest.mark.usefixtures("one_thread")


class Snapshots(TrainerCallback):
    """The student's weights and the EMA teacher's snapshot after each optimizer step."""

    def __init__(self, trainer):
        self.trainer, self.weights, self.teacher = trainer, {}, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.weights[state.global_step] = {n: p.detach().clone() for n, p in self.trainer.model.named_parameters()}
        self.teacher[state.global_step] = {n: t.clone() for n, t in self.trainer.teacher.state().items()}


def poison_from_step(trainer, step: int, where: str):
    """From optimizer step `step` on, make the student's loss forward (`where="loss"`) or its backward
    (`where="gradient"`) non-finite. Only forwards with a gradient are touched: generation and the teacher run under
    no_grad, so the rollouts stay real."""
    norm = trainer.model.model.norm

    def hook(module, args, output):
        if not torch.is_grad_enabled() or trainer.state.global_step + 1 < step:
            return output
        if where == "loss":
            return output * float("nan")
        output.register_hook(lambda grad: grad * float("nan"))
        return output

    norm.register_forward_hook(hook)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_step_stops_before_the_update_and_keeps_the_checkpoint(where, tmp_path, student_dir):
    trainer = make_trainer(tmp_path, student_dir, teacher="ema", teacher_update_rate=0.5, max_steps=3,
                           save_strategy="steps", save_steps=1)
    snapshots = Snapshots(trainer)
    trainer.add_callback(snapshots)
    poison_from_step(trainer, 2, where)
    with pytest.raises(TrainingHalted, match=f"non-finite {where} at step 2"):
        trainer.train()
    assert list(snapshots.weights) == [1]  # step 2 never ended
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param.detach(), snapshots.weights[1][name]), name
    for name, tensor in trainer.teacher.state().items():
        assert torch.equal(tensor, snapshots.teacher[1][name]), name
    assert os.path.isdir(tmp_path / "checkpoint-1") and not os.path.exists(tmp_path / "checkpoint-2")


def test_nonfinite_guard_can_be_turned_off(tmp_path, student_dir):
    trainer = make_trainer(tmp_path, student_dir, max_steps=2, stop_on_nonfinite=False)
    poison_from_step(trainer, 2, "loss")
    trainer.train()  # no error: the user asked for none
    assert trainer.state.global_step == 2


def test_no_teacher_signal_stops_with_the_cause(tmp_path, student_dir):
    # No rollout ever succeeds and the reward gives no feedback: a sibling-only teacher never gets a context.
    trainer = make_trainer(tmp_path, student_dir, reward_funcs=(always_wrong,), context_sources=["sibling"],
                           max_steps=5, no_teacher_signal_patience=2)
    with pytest.warns(UserWarning, match="no rollout in this batch has a teacher context"):
        with pytest.raises(TrainingHalted, match=r"2 consecutive generation batches without a teacher signal.*"
                                                 r"no rollout reached success_threshold"):
            trainer.train()
    assert trainer.state.global_step == 1  # the second batch without a signal raised


def test_no_teacher_signal_guard_counts_consecutive_batches_only(tmp_path, student_dir):
    trainer = make_trainer(tmp_path, student_dir, max_steps=1, no_teacher_signal_patience=2)
    trainer.guards.record_teacher_signal(0, "cause")
    trainer.guards.record_teacher_signal(5, "cause")  # a batch with a signal resets the count
    trainer.guards.record_teacher_signal(0, "cause")
    with pytest.raises(TrainingHalted, match="2 consecutive"):
        trainer.guards.record_teacher_signal(0, "cause")


def test_collapse_stops_saves_and_says_why(tmp_path, student_dir):
    calls = []

    def collapsing(completions, **kwargs):
        """Reward 1 on the first three generation batches, then 0: a collapse."""
        calls.append(1)
        return [1.0 if len(calls) <= 3 else 0.0] * len(completions)

    trainer = make_trainer(tmp_path, student_dir, reward_funcs=(collapsing, wrong_with_feedback), max_steps=20,
                           collapse_fraction=0.5, collapse_patience=2)
    trainer.train()
    # Batches 1-3 reward 1, then 0: the running mean over 2 batches is 0.5 at batch 4 (not below 0.5 × 1) and 0 from
    # batch 5 on; it has stayed low for 2 batches at batch 6.
    assert trainer.state.global_step == 6
    assert "train reward collapsed" in trainer.stop_reason
    saved = json.loads((tmp_path / STOP_REASON_FILE).read_text())
    assert saved["step"] == 6 and saved["reason"] == trainer.stop_reason
    assert os.path.isdir(tmp_path / "checkpoint-6")  # saved although save_strategy is "no"


def test_dropped_teacher_fields_are_an_error_not_a_silent_zero(tmp_path, student_dir):
    trainer = make_trainer(tmp_path, student_dir)
    _, batch = one_batch(trainer)
    del batch["teacher_logps"]
    with pytest.raises(KeyError, match="lacks the teacher fields"):
        trainer._compute_loss(trainer.model, batch)


def test_a_static_teacher_context_too_long_for_the_model_is_refused_before_compute(tmp_path, student_dir):
    data = dataset(n=3).add_column("demonstration", ["short", "word " * 600, "short"])  # the fixture model holds 512
    with pytest.raises(ValueError, match="train_dataset row 1 has a .*-token teacher prompt.*maximum length 512"):
        make_trainer(tmp_path, student_dir, mode="sdft", train_dataset=data)


def test_a_feedback_context_too_long_for_the_model_is_refused_at_its_step(tmp_path, student_dir):
    def verbose_feedback(completions, **kwargs):
        for slot in kwargs["rollout_feedback"]:
            slot.append("wrong " * 600)
        return [0.0] * len(completions)

    trainer = make_trainer(tmp_path, student_dir, reward_funcs=(verbose_feedback,))
    with pytest.raises(ValueError, match="step 1 has a .*-token teacher prompt.*not truncated"):
        trainer.train()


# ---------------------------------------------------------------------------------------------------------------------
# Diagnostics.


def test_diagnostics_reach_the_log_history(tmp_path, student_dir):
    # Both terms: the logit-level JSD and, through kl_coef, the sampled-token advantage (the policy term's only signal
    # here: every reward is 0, so GRPO's own advantage is 0).
    trainer = make_trainer(tmp_path, student_dir, max_steps=2, objective="logits", distill_top_k=5, kl_coef=0.5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "distill/reverse_kl" in h]
    assert len(logs) == 2
    for log in logs:
        assert log["distill/logp_gap"] == pytest.approx(-log["distill/reverse_kl"])
        assert 0 < log["distill/frac_tokens_with_teacher"] <= 1
        assert 0 < log["distill/support_mass_student"] <= 1 + 1e-6 and 0 < log["distill/support_mass_teacher"] <= 1 + 1e-6
        assert log["distill/grad_norm_logits_distill"] > 0 and log["distill/grad_norm_logits_policy"] > 0
        assert 0 <= log["self_distill/teacher_helps_failed"] <= 1
        assert 0 <= log["self_distill/context_leakage"] <= 1
        assert log["distill/adv_rms_distill"] > 0 and log["distill/adv_rms_policy"] == 0


def test_distillation_gradient_norm_scales_with_its_weight(tmp_path, student_dir):
    """The logged norm is the distillation term's own gradient: doubling its weight doubles it, and leaves the policy
    term's norm unchanged (same rollouts: same seed, one step)."""
    norms = []
    for weight in (1.0, 2.0):
        trainer = make_trainer(tmp_path / str(weight), student_dir, objective="logits", distill_top_k=5,
                               distill_loss_weight=weight, kl_coef=0.5)
        trainer.train()
        log = trainer.state.log_history[0]
        norms.append((log["distill/grad_norm_logits_distill"], log["distill/grad_norm_logits_policy"]))
    assert norms[1][0] == pytest.approx(2 * norms[0][0], rel=1e-4)
    assert norms[0][1] > 0 and norms[1][1] == pytest.approx(norms[0][1], rel=1e-4)


def test_advantage_split_follows_the_weights(tmp_path, student_dir):
    """`adv_rms_policy` is the RMS of policy_weight · A_group: 0 with policy_weight 0; `adv_rms_distill` that of
    kl_coef · a, computed here from the batch."""
    trainer = make_trainer(tmp_path, student_dir, objective="sampled_token", policy_weight=0.0, kl_coef=0.5)
    _, batch = one_batch(trainer)
    metrics = trainer._metrics["train"]
    assert metrics["distill/adv_rms_policy"][-1] == 0
    completion = batch["completion_mask"].float()
    expected = ((batch["advantages"].square() * completion).sum() / completion.sum()).sqrt()
    assert metrics["distill/adv_rms_distill"][-1] == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_helps_counts_the_direction_of_each_rollouts_push(tmp_path, student_dir):
    """Failed rollouts helped when the teacher's log-prob of the completion is below the student's, successful ones
    when it is above."""
    trainer = make_trainer(tmp_path, student_dir)
    _, batch = one_batch(trainer)
    logp_s = batch["student_logps_at_sampling"]
    mask = batch["distill_mask"]
    B = len(logp_s)
    batch["has_teacher"] = torch.ones(B, dtype=torch.bool)
    batch["succeeded"] = torch.tensor([False, False, True, True])[:B]
    shift = torch.tensor([-1.0, 1.0, 1.0, 1.0])[:B, None]  # failed: helps, hurts; succeeded: helps, helps
    batch["teacher_logps"] = (logp_s + shift) * mask
    trainer._metrics["train"].clear()
    zeros = torch.zeros_like(logp_s)
    trainer._log_distill_metrics("train", batch, logp_s, zeros[:, :1], zeros)
    assert trainer._metrics["train"]["self_distill/teacher_helps_failed"] == [0.5]
    assert trainer._metrics["train"]["self_distill/teacher_helps_succeeded"] == [1.0]



def test_selfdistill_plot_draws_the_diagnostics(tmp_path, student_dir):
    from selfdistill.plot import panels_of, plot_run

    trainer = make_trainer(tmp_path, student_dir, max_steps=3, objective="logits", distill_top_k=5, kl_coef=0.5)
    trainer.train()
    trainer.state.save_to_json(str(tmp_path / "trainer_state.json"))
    panels = panels_of(trainer.state.log_history)
    for title in ("teacher − student log-prob", "advantage RMS", "gradient norm at the logits", "top-k support mass",
                  "teacher context points the right way"):
        assert title in panels, title
    assert set(panels["gradient norm at the logits"]) == {"distill/grad_norm_logits_policy",
                                                          "distill/grad_norm_logits_distill"}
    import matplotlib.image

    image = matplotlib.image.imread(plot_run(str(tmp_path)))
    assert image.shape[0] >= 2 * 300  # more panels than one row holds
