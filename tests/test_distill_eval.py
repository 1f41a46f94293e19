"""Held-out closeness of an OPD student to its teacher (`evaluate.distill_metrics`) and its place in `selfdistill
train` (before/after rows, the teacher's own accuracy, the plot), on the tiny fixture models."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfdistill import cli
from selfdistill.evaluate import distill_metrics


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_distill_metrics_is_zero_against_itself_and_seeded(student_dir, teacher_dir):
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student, teacher = _load(student_dir), _load(teacher_dir)
    same = distill_metrics(student, student, tokenizer, ["arithmetic"], n=4, max_new_tokens=6, temperature=0.7)
    r = same["arithmetic"]
    assert 0 < r["tokens"] <= 4 * 6
    assert r["reverse_kl"] == pytest.approx(0.0, abs=1e-5) and r["acceptance"] == pytest.approx(1.0, abs=1e-5)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = distill_metrics(student, teacher, tokenizer, ["arithmetic"], n=4, max_new_tokens=6, temperature=0.7)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    again = distill_metrics(student, teacher, tokenizer, ["arithmetic"], n=4, max_new_tokens=6, temperature=0.7)
    assert first == again  # same seed, same samples, same numbers
    r = first["arithmetic"]
    assert 0.0 < r["acceptance"] < 1.0 and r["reverse_kl"] != 0.0


def test_distill_metrics_matches_a_direct_computation(student_dir, teacher_dir):
    """One prompt, one sample: recompute the per-token log-ratio by hand from the same seeded sample."""
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student, teacher = _load(student_dir), _load(teacher_dir)
    r = distill_metrics(student, teacher, tokenizer, ["arithmetic"], n=1, seed=5, max_new_tokens=5,
                        temperature=0.5)["arithmetic"]
    from selfdistill.tasks import load_task

    prompt = load_task("arithmetic", split="test", n=1, seed=5)["prompt"][0]
    ids = tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                    return_tensors="pt", add_special_tokens=False)["input_ids"]
    torch.manual_seed(5)
    out = student.generate(ids, max_new_tokens=5, do_sample=True, temperature=0.5, top_k=0, top_p=1.0,
                           pad_token_id=tokenizer.pad_token_id)
    completion = out[0, ids.shape[1]:].tolist()
    eos = student.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    keep = next((i + 1 for i, t in enumerate(completion) if t in eos), len(completion))
    out = out[:, : ids.shape[1] + keep]
    with torch.no_grad():
        logp = [torch.log_softmax(m(out).logits[0, ids.shape[1] - 1 : -1] / 0.5, -1)
                .gather(-1, out[0, ids.shape[1]:, None]).squeeze(-1) for m in (student, teacher)]
    diff = logp[0] - logp[1]
    assert r["tokens"] == keep
    assert r["reverse_kl"] == pytest.approx(diff.mean().item(), abs=1e-4)
    assert r["acceptance"] == pytest.approx((-diff).clamp(max=0).exp().mean().item(), abs=1e-4)


def test_opd_train_reports_closeness_before_after_and_the_teacher_ceiling(student_dir, teacher_dir, tmp_path, capsys):
    config = {
        "method": "opd", "model_name_or_path": student_dir, "teacher_model_name_or_path": teacher_dir,
        "dataset_name": "arithmetic", "train_size": 8, "eval_tasks": ["arithmetic"], "eval_size": 4,
        "reward_funcs": [], "output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 4,
        "num_generations": 4, "max_completion_length": 6, "temperature": 0.7, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "bf16": False, "use_cpu": True, "learning_rate": 1e-2,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    table = cli.train(["--config", str(path)])
    assert list(table) == ["before", "teacher", "after opd"]
    for label in ("before", "after opd"):
        assert {"pass@1", "reverse_kl", "acceptance", "tokens"} <= set(table[label]["arithmetic"])
    assert "reverse_kl" not in table["teacher"]["arithmetic"] and table["teacher"]["arithmetic"]["n"] == 4
    evals = json.loads((tmp_path / "run" / "opd" / "eval.json").read_text())["arithmetic"]
    assert [p["step"] for p in evals] == [0, 2] and all("acceptance" in p for p in evals)
    out = capsys.readouterr().out
    assert "| teacher | arithmetic |" in out and "before arithmetic: held-out reverse KL" in out
    assert (tmp_path / "run" / "opd" / "curves.png").exists()


def test_smollm2_pruned_keeps_explicit_layers(teacher_dir, tmp_path, monkeypatch):
    """`pruned_keep_layers` picks the kept layers of 'smollm2-pruned' (here the 3-layer fixture stands in for it)."""
    import shutil

    from selfdistill import assets

    base = tmp_path / "SmolLM2-135M-Instruct"
    shutil.copytree(teacher_dir, base)
    monkeypatch.setattr(assets, "smollm2_path", lambda: str(base))
    explicit = cli.resolve_model("smollm2-pruned", 2, [0, 2])
    default = cli.resolve_model("smollm2-pruned", 2)
    assert explicit != default and explicit.endswith("-L0-2") and default.endswith("-2L")
    assert json.loads(open(f"{explicit}/pruning.json").read())["kept_layers"] == [0, 2]
    assert json.loads(open(f"{default}/pruning.json").read())["kept_layers"] == assets.default_layers(3, 2)
    run, _ = cli.parse_train_args(["--method", "opd", "--pruned_keep_layers", "0", "2", "--output_dir", str(tmp_path),
                                   "--bf16", "false", "--use_cpu", "true"],
                                  "opd", use_demo=False)
    assert run.pruned_keep_layers == [0, 2]
