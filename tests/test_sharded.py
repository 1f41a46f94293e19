"""Both trainers sharded across 2 CPU processes (gloo): DeepSpeed ZeRO-3, ZeRO-2, FSDP2 and DDP, against 1 process.

What is checked, and how (`tests/_sharded.py` runs the sharded side; the rollouts are replayed, the same tokens on
both sides):
- ZeRO-3 and FSDP2, each trainer: OPD with a separate teacher (prepared as TRL prepares its reference model) and the
  full-vocabulary logit term plus the sampled-token advantage; SDPO with the EMA teacher (its own sharded copy) and
  the top-k logit term. After each of 2 steps, the logged loss, every updated student weight and the EMA teacher
  equal the 1-process run on the same global batch. Under FSDP2 with `reshard_after_forward=True`, the LM head's
  gradient too (before the optimizer step), which catches an unreduced per-rank head gradient.
- ZeRO-3 resume: the EMA teacher saved at step 1 is restored bit for bit, and the resumed run ends where the
  uninterrupted one does.
- ZeRO-3 with PEFT (LoRA) and the `base` teacher: only the adapter trains, and the teacher (adapter disabled) scores
  as the frozen starting model.
- ZeRO-2: one smoke run of each trainer with real sampling.
The student has an untied LM head (as Qwen3-8B): a head tied to the embedding stays gathered under ZeRO-3 while the
embedding is in use, so only an untied one tests the gathering in the loss's forward and backward passes.

Tolerances: fp32 on both sides, plain SGD at lr 0.5 (an update linear in the gradient); the sum orders of the
reductions differ, so losses (~0.01-0.1) agree to 1e-6 and weights to 2e-6, absolute, while a step moves them by ~1e-3
(asserted) and a gradient left unreduced or missing on one rank shows as half of that.

    pytest tests/test_sharded.py        # about 3 minutes on 2 CPU cores
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _sharded
from conftest import free_port

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")]
SCRIPT = Path(__file__).with_name("_sharded.py")
LOSS_ATOL, WEIGHT_ATOL = 1e-6, 2e-6
# Persistence threshold 0: ZeRO-3 otherwise keeps every parameter under 1e5 elements whole on each rank, which is
# all of the tiny fixture, and nothing would be partitioned.
DEEPSPEED_JSON = ('{{"zero_optimization": {{"stage": {stage}, "stage3_param_persistence_threshold": 0}}, '
                  '"train_micro_batch_size_per_gpu": "auto", '
                  '"train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", '
                  '"zero_allow_untested_optimizer": true, "zero_force_ds_cpu_optimizer": false, '
                  '"bf16": {{"enabled": false}}}}')


def launch(tmp_path, strategy: str, student_dir: str, teacher_dir: str, *cases: str) -> dict:
    """Run `tests/_sharded.py` on 2 processes; the cases' records, by case."""
    out = tmp_path / strategy
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if strategy.startswith("zero"):
        # DeepSpeed on CPU: its CPU accelerator falls back to gloo without oneCCL (ARCHITECTURE.md, "Sharding").
        config = out / "deepspeed.json"
        config.write_text(DEEPSPEED_JSON.format(stage=strategy[-1]))
        (out / "accelerate.yaml").write_text(
            "distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: "
            f"{config}\n  zero3_init_flag: true\nnum_machines: 1\nnum_processes: 2\nuse_cpu: true\n")
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(out / "accelerate.yaml"),
                   "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port())]
        env["DS_ACCELERATOR"] = "cpu"
    elif strategy == "ddp":  # accelerate's multi-process launcher; use_cpu in the config makes it gloo on CPU
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port())]
        env["ACCELERATE_USE_CPU"] = "1"
    else:  # fsdp2: torchrun; the script lets accelerate pick FSDP on CPU (see its docstring)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(free_port())]
    command += [str(SCRIPT), strategy, str(out), student_dir, teacher_dir, *cases]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    runs = {path.stem: torch.load(path, weights_only=False) for path in out.glob("*.pt")}
    for path in out.glob("*.contexts.rank*"):
        runs[path.name] = torch.load(path, weights_only=False)
    return runs


def reference(tmp_path, case: str, student_dir: str, teacher_dir: str) -> dict:
    """The 1-process run of `case`: the same global batch (2 prompts × 4 rollouts) on one process."""
    per_device = 2 * _sharded.NUM_GENERATIONS
    if case == "opd":
        trainer = _sharded.opd_trainer(str(tmp_path / "ref-opd"), student_dir, teacher_dir, per_device)
    else:
        trainer = _sharded.sdpo_trainer(str(tmp_path / "ref-sdpo"), student_dir, per_device)
    return _sharded.run(trainer)


def assert_same_weights(got: dict, want: dict, what: str):
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=WEIGHT_ATOL, rtol=0, msg=lambda m: f"{what} {name}: {m}")


def assert_matches_reference(sharded: dict, ref: dict, case: str):
    assert sorted(sharded) == sorted(ref) == list(range(1, _sharded.STEPS + 1))
    for step in ref:
        assert sharded[step]["loss"] == pytest.approx(ref[step]["loss"], abs=LOSS_ATOL, rel=0), (case, step)
        assert_same_weights(sharded[step]["weights"], ref[step]["weights"], f"{case} step {step} student")
        if "teacher" in ref[step]:
            assert_same_weights(sharded[step]["teacher"], ref[step]["teacher"], f"{case} step {step} teacher")
    # Not vacuous: the student moved, and the EMA teacher moved less.
    start, end = ref[1]["weights"], ref[_sharded.STEPS]["weights"]
    assert max((start[n] - end[n]).abs().max().item() for n in start) > 1e-3


@pytest.fixture(scope="module")
def references(tmp_path_factory, untied_student_dir, teacher_dir):
    tmp = tmp_path_factory.mktemp("references")
    return {case: reference(tmp, case, untied_student_dir, teacher_dir) for case in ("opd", "sdpo")}


def test_zero3_equals_one_process_and_resumes_and_trains_lora(tmp_path, untied_student_dir, teacher_dir, references):
    runs = launch(tmp_path, "zero3", untied_student_dir, teacher_dir, "opd", "sdpo", "resume", "peft")
    for case in ("opd", "sdpo"):
        assert_matches_reference(runs[case], references[case], f"zero3 {case}")

    # Resume: the teacher loaded at step 1 is the one saved there, bit for bit; the resumed run ends where the
    # uninterrupted one ends (the replayed rollouts and the data order are the same).
    first, resumed = runs["resume-first"], runs["resume"]
    loaded = resumed.pop("loaded_teacher")
    assert loaded.keys() == first[1]["teacher"].keys()
    assert all(torch.equal(loaded[n], first[1]["teacher"][n]) for n in loaded)
    assert list(resumed) == [2]
    assert_same_weights(resumed[2]["teacher"], first[2]["teacher"], "resumed teacher")
    assert_same_weights(resumed[2]["weights"], first[2]["weights"], "resumed student")

    # LoRA with the base teacher: the base weights never move, the adapter does, and the teacher is the start.
    peft = runs["peft"]
    weights = peft[2]["weights"]
    lora = [n for n in weights if "lora_" in n]
    base = [n for n in weights if "lora_" not in n]
    assert lora and base
    from transformers import AutoModelForCausalLM

    start = dict(AutoModelForCausalLM.from_pretrained(untied_student_dir).named_parameters())
    for name in base:  # "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" → the plain name
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(weights[name], start[plain].detach()), name
    assert any(not torch.equal(peft[1]["weights"][n], weights[n]) for n in lora)
    from selfdistill.teachers import ModelTeacher

    ids = peft["fixed_ids"]
    initial = ModelTeacher(AutoModelForCausalLM.from_pretrained(untied_student_dir), _sharded.COMMON["temperature"], 4)
    expected = initial.score(ids[:, :8], torch.ones_like(ids[:, :8]), ids[:, 8:], torch.ones_like(ids[:, 8:]))
    torch.testing.assert_close(peft["base_teacher_logp"], expected.logp_BT, atol=1e-5, rtol=0)


def test_fsdp2_equals_one_process_including_the_head_gradient(tmp_path, untied_student_dir, teacher_dir, references):
    runs = launch(tmp_path, "fsdp2", untied_student_dir, teacher_dir, "opd", "sdpo")
    for case in ("opd", "sdpo"):
        assert_matches_reference(runs[case], references[case], f"fsdp2 {case}")
        for step in runs[case]:
            assert "head_grad" in runs[case][step]  # the head was a DTensor shard: the check ran
    # The head's whole gradient at step 1 (after clipping, before the optimizer step) against a 1-process run's.
    for case in ("opd", "sdpo"):
        ref = record_head_grad(tmp_path / f"grad-{case}", case, untied_student_dir, teacher_dir)
        torch.testing.assert_close(runs[case][1]["head_grad"], ref, atol=1e-7, rtol=1e-5)


def record_head_grad(tmp_path, case, student_dir, teacher_dir) -> torch.Tensor:
    per_device = 2 * _sharded.NUM_GENERATIONS
    trainer = (_sharded.opd_trainer(str(tmp_path), student_dir, teacher_dir, per_device, max_steps=1) if case == "opd"
               else _sharded.sdpo_trainer(str(tmp_path), student_dir, per_device, max_steps=1))
    grads = []

    class HeadGrad(_sharded.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.append(trainer.model.get_output_embeddings().weight.grad.detach().clone())

    trainer.add_callback(HeadGrad())
    trainer.train()
    return grads[0]


def test_zero2_smoke_with_real_sampling(tmp_path, untied_student_dir, teacher_dir):
    runs = launch(tmp_path, "zero2", untied_student_dir, teacher_dir, "smoke-opd", "smoke-sdpo")
    for case in ("smoke-opd", "smoke-sdpo"):
        assert sorted(runs[case]) == [1, 2]
        for step in runs[case].values():
            assert torch.isfinite(torch.tensor(step["loss"]))
            assert all(torch.isfinite(w).all() for w in step["weights"].values())


def test_ddp_self_distillation_with_a_group_split_across_ranks(tmp_path, student_dir, teacher_dir):
    """Each step's 12 rollouts are 3 prompts × 4; rank 0 holds rows 0-5, rank 1 rows 6-11, so the middle group's
    rewards, feedback and successful siblings live on both ranks. Every rollout's teacher prompt (which shows a
    sibling from the other rank) and its `(B, T)` advantages, and the weights after each step, must equal those of
    one process holding all 12."""
    runs = launch(tmp_path, "ddp", student_dir, teacher_dir, "split")
    trainer = _sharded.sdpo_trainer(str(tmp_path / "ref"), student_dir, 12, objective="sampled_token")
    ref = _sharded.run(trainer)
    ranks = [runs[f"split.contexts.rank{r}"] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(trainer.contexts) == _sharded.STEPS
    sibling_shown = trainer.args.solution_template.split("{")[0].strip()  # the preset's "a correct answer" line
    for step, expected in enumerate(trainer.contexts):
        got = {**ranks[0][step], **ranks[1][step]}
        prompts_on = [{p for p, _ in rank[step]} for rank in ranks]
        assert prompts_on[0] & prompts_on[1], "no group was split across the ranks"
        assert got.keys() == expected.keys()
        assert any(c["teacher_prompt"] and sibling_shown in c["teacher_prompt"] for c in got.values())
        for key, want in expected.items():
            assert got[key]["teacher_prompt"] == want["teacher_prompt"], key
            torch.testing.assert_close(got[key]["advantages"], want["advantages"], atol=1e-5, rtol=0)
    for step in ref:
        assert_same_weights(runs["split"][step]["weights"], ref[step]["weights"], f"ddp step {step}")
