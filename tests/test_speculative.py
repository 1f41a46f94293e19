"""Speculative decoding measured (`selfdistill.speculative`): the counters against a brute-force replay of greedy
speculative decoding, the greedy-equality check, the target as its own draft (α = 1, τ = k + 1, also at T>0), a weak
draft, the command line, and vLLM's draft-model method in the `vllm` group."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdistill import cli
from selfdistill.evaluate import _generated
from selfdistill.speculative import (StepCounts, check_same_tokenizer, measure_hf, speculative_eval,
                                     target_sample_acceptance)
from selfdistill.tasks import arithmetic

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest
K = 3


@pytest.fixture(scope="module")
def weak_draft_dir(teacher_dir, tmp_path_factory):
    """The fixture teacher with Gaussian noise (0.5 of each tensor's spread) on every weight: a draft that agrees with
    it often, not always."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=generator))
    path = tmp_path_factory.mktemp("weak_draft")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(path)
    return str(path)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


PROMPTS = arithmetic(6, split="test")["prompt"]


def test_step_counts_summary_by_hand():
    counts = StepCounts()
    counts.add([3, 3, 3, 2], [3, 1, 0, 2])  # the last step (2 drafted, cut by the length) is not counted
    counts.add([3, 3], [2, 3])
    summary = counts.summary(3)
    # looked at: 3 (all kept) + 2 (1 kept, 1 rejected) + 1 (rejected) + 3 (2 kept, 1 rejected) = 9, kept 6
    assert summary["alpha"] == pytest.approx(6 / 9)
    assert summary["alpha_by_position"] == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    assert summary["tau"] == pytest.approx((4 + 2 + 1 + 3) / 4)
    assert summary["draft_acceptance_rate"] == pytest.approx(6 / 12)
    assert (summary["steps_counted"], summary["steps"]) == (4, 6)


@torch.no_grad()
def replay_greedy(target, draft, tokenizer, prompts, k, max_new_tokens, engine="hf") -> StepCounts:
    """Greedy speculative decoding replayed from plain greedy runs of both models: the target's output y; at each step
    from position t the draft's own greedy continuation of y[:t], of which the prefix equal to y[t:] is accepted, and
    the target adds one token. transformers drafts from the prompt on, min(k, tokens left − 1) tokens; vLLM drafts
    after its prefill step has produced the first token, always k tokens."""
    counts = StepCounts()
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        y = target.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids["input_ids"].shape[1]:]
        t, drafted, accepted = (0 if engine == "hf" else 1), [], []
        while t < len(y):
            d = min(k, max_new_tokens - t - 1) if engine == "hf" else k
            context = torch.cat([ids["input_ids"][0], y[:t]])[None]
            proposal = draft.generate(context, attention_mask=torch.ones_like(context), max_new_tokens=d,
                                      do_sample=False)[0, context.shape[1]:] if d else y[:0]
            a = next((i for i, (p, q) in enumerate(zip(proposal, y[t:])) if p != q), min(len(proposal), len(y) - t))
            drafted.append(len(proposal))
            accepted.append(a)
            t += a + 1
        counts.add(drafted, accepted)
    return counts


def test_target_as_its_own_draft_accepts_everything(teacher_dir, tokenizer):
    target = load(teacher_dir)
    for temperature in (0.0, 0.7):
        r = measure_hf(target, target, tokenizer, PROMPTS, k=K, temperature=temperature, max_new_tokens=24,
                       progress=False)
        assert r["steps_counted"] > 10
        assert r["alpha"] == 1.0 and r["alpha_by_position"] == [1.0] * K and r["draft_acceptance_rate"] == 1.0
        assert r["tau"] == K + 1
    assert r["new_tokens"] > 0 and r["tokens_per_s_target"] > 0 and r["speedup"] > 0
    assert "greedy_identical" not in r  # T>0


def test_weak_draft_greedy_output_is_the_targets_and_its_counts_match_a_replay(teacher_dir, weak_draft_dir, tokenizer):
    target, draft = load(teacher_dir), load(weak_draft_dir)
    r = measure_hf(target, draft, tokenizer, PROMPTS, k=K, temperature=0.0, max_new_tokens=24, progress=False)
    assert r["greedy_identical"] == len(PROMPTS)
    assert 0.1 < r["alpha"] < 0.9
    expected = replay_greedy(target, draft, tokenizer, PROMPTS, K, 24).summary(K)
    assert {key: r[key] for key in expected} == expected  # the same counts give the same floats


def test_weak_draft_at_temperature_accepts_less_than_all(teacher_dir, weak_draft_dir, tokenizer):
    r = measure_hf(load(teacher_dir), load(weak_draft_dir), tokenizer, PROMPTS, k=K, temperature=0.7,
                   max_new_tokens=24, progress=False)
    assert 0.1 < r["alpha"] < 1.0 and 1.0 <= r["tau"] < K + 1


@torch.no_grad()
def test_acceptance_on_the_targets_samples_is_the_full_distribution_overlap(teacher_dir, weak_draft_dir, tokenizer):
    """Σ_v min(T(v), S(v)) over the target's own samples, chunked, equals the overlap of full-logit softmaxes on the
    same samples; with the target as its own draft it is 1."""
    target, draft = load(teacher_dir), load(weak_draft_dir)
    options = dict(temperature=0.7, max_new_tokens=16, seed=3)
    value = target_sample_acceptance(target, draft, tokenizer, PROMPTS, chunk=5, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        overlaps = []
        for batch, ids in _generated(target, tokenizer, PROMPTS, max_new_tokens=16, temperature=0.7, batch_size=4,
                                     desc="reference"):
            length = batch["input_ids"].shape[1]
            for row, prompt_mask in zip(ids, batch["attention_mask"]):
                completion = row[length:].tolist()
                end = completion.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in completion else 16
                sequence = row[: length + end][None]
                mask = torch.cat([prompt_mask, torch.ones(end, dtype=torch.long)])[None]
                p, q = ((m(input_ids=sequence, attention_mask=mask).logits[0, length - 1 : -1] / 0.7).softmax(-1)
                        for m in (target, draft))
                overlaps.append(torch.minimum(p, q).sum(-1))
    assert value == pytest.approx(torch.cat(overlaps).mean().item(), rel=1e-5)
    assert 0 < value < 0.99
    assert target_sample_acceptance(target, target, tokenizer, PROMPTS, **options) == pytest.approx(1.0, abs=1e-5)


def test_a_draft_with_another_tokenizer_is_refused(tokenizer):
    other = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="draft's tokenizer differs"):
        check_same_tokenizer(tokenizer, other)


def test_eval_with_a_draft_on_the_command_line(teacher_dir, weak_draft_dir, tmp_path, capsys):
    """`selfdistill eval --draft D --model T` measures, prints the table and writes the report, with the estimated
    acceptance next to the measured one at T>0."""
    output = tmp_path / "spec.json"
    cli.main(["eval", "--draft", weak_draft_dir, "--model", teacher_dir, "--n", "3", "--k", "2", "--temperature", "0",
              "--temperature", "1", "--max_new_tokens", "8", "--output", str(output)])
    table = capsys.readouterr().out
    assert "| arithmetic | 0 |" in table and "| arithmetic | 1 |" in table and "cost ratio" in table
    report = json.loads(output.read_text())
    assert set(report["arithmetic"]) == {"T=0", "T=1"} and report["settings"]["k"] == 2
    assert report["arithmetic"]["T=0"]["greedy_identical"] == 3
    assert 0 < report["arithmetic"]["T=1"]["estimated_acceptance"] <= 1 and report["cost"]["cost_ratio"] > 0
    assert 0 < report["arithmetic"]["T=1"]["target_sample_acceptance"] <= 1


@pytest.mark.vllm
def test_vllm_draft_model_at_t0_is_exact_and_its_counts_match_a_replay(teacher_dir, weak_draft_dir, tokenizer,
                                                                       monkeypatch):
    """vLLM's draft-model speculative decoding (fp32 engines): the target's own greedy output, the per-step counts of
    the HF replay; T>0 is refused on CPU."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    from selfdistill.speculative import measure_vllm

    r = measure_vllm(teacher_dir, weak_draft_dir, PROMPTS, k=K, max_new_tokens=24, dtype="float32",
                     max_model_len=512)[0.0]
    assert r["greedy_identical"] == len(PROMPTS)
    expected = replay_greedy(load(teacher_dir), load(weak_draft_dir), tokenizer, PROMPTS, K, 24, "vllm").summary(K)
    assert {key: r[key] for key in expected} == expected  # the same counts give the same floats
    with pytest.raises(ValueError, match="broken at T>0"):
        speculative_eval(teacher_dir, weak_draft_dir, ["arithmetic"], temperatures=(0.7,), backend="vllm")
