"""Paths the multi-GPU recipes take that a default run does not: gradient accumulation, several iterations per
generation batch (the off-policy path), and gradient checkpointing with the backbone hook. One process, the rollouts
replayed (`tests/_sharded.py`), so that two configurations train on exactly the same tokens.
"""

import pytest
import torch

import _sharded
from selfdistill.trainers import core

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHT_ATOL = 2e-6  # plain SGD at lr 0.5 (see tests/_sharded.py): a step moves weights by ~1e-3


def trainers(case, tmp_path, student_dir, teacher_dir, **overrides):
    if case == "opd":
        return _sharded.opd_trainer(str(tmp_path), student_dir, teacher_dir, **overrides)
    return _sharded.sdpo_trainer(str(tmp_path), student_dir, **overrides)


@pytest.mark.parametrize("case", ["opd", "sdpo"])
def test_gradient_accumulation_equals_one_big_batch(case, tmp_path, student_dir, teacher_dir):
    """2 micro-batches of 4 rollouts accumulated equal one batch of 8: the loss scaling, the advantages (formed on the
    whole generation batch) and the logit-level term (normalised over the generation batch's tokens)."""
    one = _sharded.run(trainers(case, tmp_path / "k1", student_dir, teacher_dir, per_device=8))
    two = _sharded.run(trainers(case, tmp_path / "k2", student_dir, teacher_dir, per_device=4,
                                gradient_accumulation_steps=2))
    for step in one:
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-6), step
        for name, value in one[step]["weights"].items():
            torch.testing.assert_close(two[step]["weights"][name], value, atol=WEIGHT_ATOL, rtol=0)
    start = _sharded.full_weights(trainers(case, tmp_path / "k0", student_dir, teacher_dir, per_device=8).model)
    assert max((start[n] - one[1]["weights"][n]).abs().max().item() for n in start) > 1e-3  # it did train


def test_two_iterations_per_batch_use_the_old_logprobs_and_the_is_clip(tmp_path, student_dir, teacher_dir, monkeypatch):
    """`num_iterations=2` without vLLM: GRPO computes the sampling log-probs at generation, so the advantages are
    formed there from them (`A = w·A_group + kl·(log T − log π_old)`); on the second pass over the batch the
    weights have moved, and the logit-level term is weighted by `min(exp(log π − log π_old), clip)`."""
    calls, importance_weights = [], core.importance_weights

    def recording(logp_now, logp_sampled, clip):
        weights = importance_weights(logp_now, logp_sampled, clip)
        calls.append((logp_now.detach().clone(), logp_sampled.clone(), clip, weights))
        return weights

    monkeypatch.setattr(core, "importance_weights", recording)
    trainer = _sharded.sdpo_trainer(str(tmp_path), student_dir, per_device=8, num_iterations=2, max_steps=2,
                                    kl_coef=0.5, distill_is_clip=1.05)
    batches = []
    generate = trainer._generate_and_score_completions

    def keep(inputs):
        batch = generate(inputs)
        batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        return batch

    trainer._generate_and_score_completions = keep
    trainer.train()

    assert len(batches) == 1  # two optimizer steps on one generation batch
    batch = batches[0]
    old, mask = batch["old_per_token_logps"], batch["completion_mask"]
    # The advantages were formed at generation from the old log-probs (not in the loss).
    group = batch["advantages"] - 0.5 * (batch["teacher_logps"] - old) * batch["distill_mask"]
    assert torch.allclose(group[mask.bool()].view(-1), group[:, :1].expand_as(group)[mask.bool()].view(-1), atol=1e-6)
    # Both passes weighted the logit term; the second one after an update, so with weights below the clip and ≠ 1.
    assert len(calls) == 2
    for now, sampled, clip, weights in calls:
        assert clip == 1.05
        torch.testing.assert_close(weights, (now - sampled).clamp(-20, 20).exp().clamp(max=clip))
    # (GRPO reshuffles the buffered batch between passes: positions are compared within each call. Completion
    # positions are where the projection's log-prob is nonzero.)
    first, second = calls
    unmasked = [call[0] != 0 for call in calls]
    torch.testing.assert_close(first[3][unmasked[0]], torch.ones_like(first[3][unmasked[0]]), atol=1e-5, rtol=0)
    moved = second[3][unmasked[1]]
    assert (moved - 1).abs().max() > 1e-3 and (moved <= 1.05).all()


@pytest.mark.parametrize("case", ["opd", "sdpo"])
def test_gradient_checkpointing_gives_the_same_step(case, tmp_path, student_dir, teacher_dir):
    """The loss's forward captures the backbone's last hidden states with a hook; under gradient checkpointing the
    layers are recomputed in the backward pass, and the step must not change."""
    plain = _sharded.run(trainers(case, tmp_path / "plain", student_dir, teacher_dir, per_device=8))
    checkpointed = _sharded.run(trainers(case, tmp_path / "ckpt", student_dir, teacher_dir, per_device=8,
                                         gradient_checkpointing=True))
    for step in plain:
        assert checkpointed[step]["loss"] == pytest.approx(plain[step]["loss"], abs=1e-6)
        for name, value in plain[step]["weights"].items():
            torch.testing.assert_close(checkpointed[step]["weights"][name], value, atol=WEIGHT_ATOL, rtol=0)
