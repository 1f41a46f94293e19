import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_hub_is_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_models_load_back_and_share_tokenizer(student_dir, teacher_dir):
    tok_s, tok_t = AutoTokenizer.from_pretrained(student_dir), AutoTokenizer.from_pretrained(teacher_dir)
    assert tok_s.get_vocab() == tok_t.get_vocab()
    assert tok_s.pad_token == "<|endoftext|>" and tok_s.eos_token == "<|im_end|>"
    text = tok_s.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    for model in (student, teacher):
        cfg = model.config
        assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM's CPU backend needs head dim >= 32
        assert cfg.vocab_size == len(tok_s)
    assert sum(p.numel() for p in teacher.parameters()) > sum(p.numel() for p in student.parameters())
    ids = tok_s("What is 12 + 30?", return_tensors="pt").input_ids
    assert tok_s.decode(ids[0]) == "What is 12 + 30?"
    with torch.no_grad():
        assert torch.isfinite(student(ids).logits).all()


def test_fixture_tokenizer_encodes_like_the_model_directories(tokenizer, student_dir, teacher_dir):
    """AutoTokenizer applies Qwen2's digit split to a checkpoint whose config says qwen2; the fixture must agree."""
    text = tokenizer.decode(sorted(tokenizer.get_vocab().values())) + " What is 12 + 345?\n\\boxed{1}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for path in (student_dir, teacher_dir):
        assert AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"] == ids
