"""SFT (`selfdistill.sft`): the row formats, completion-only loss, and the KL penalty to the starting model against a
brute-force full-softmax reference, on the tiny fixture model."""

import json

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from selfdistill import cli
from selfdistill.sft import SFTKLConfig, SFTKLTrainer, as_prompt_completion

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors and models: see conftest


def chat(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def generated_rows(n: int = 8) -> list[dict]:
    """Rows in the format best-of-N generation writes: chat prompt and completion plus its bookkeeping columns."""
    return [{"prompt": chat("user", f"What is {i} + 1?"), "completion": chat("assistant", f"\\boxed{{{i + 1}}}"),
             "reward": 1.0, "pass_rate": 0.5, "teacher": "teacher-model"} for i in range(n)]


def config(tmp_path, config_class=SFTKLConfig, **overrides):
    return config_class(**{"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "report_to": "none",
                           "per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1,
                           "save_strategy": "no", **overrides})


def test_every_row_format_becomes_prompt_and_completion():
    plain = as_prompt_completion(Dataset.from_list([{"prompt": "2 + 2 =", "completion": " 4", "reward": 1.0}]))
    assert plain.column_names == ["prompt", "completion"] and plain[0] == {"prompt": "2 + 2 =", "completion": " 4"}
    demo = as_prompt_completion(Dataset.from_list([{"prompt": chat("user", "2 + 2?"), "demonstration": "4"}]))
    assert demo[0] == {"prompt": chat("user", "2 + 2?"), "completion": chat("assistant", "4")}
    messages = as_prompt_completion(Dataset.from_list(
        [{"messages": chat("system", "Be brief.") + chat("user", "2 + 2?") + chat("assistant", "4")}]))
    assert messages[0] == {"prompt": chat("system", "Be brief.") + chat("user", "2 + 2?"),
                           "completion": chat("assistant", "4")}
    assert as_prompt_completion(Dataset.from_list(generated_rows(2))).column_names == ["prompt", "completion"]


def test_unknown_format_empty_data_and_a_conversation_ending_with_the_user_are_refused():
    with pytest.raises(ValueError, match=r"prompt \+ completion.*has \['prompt', 'solution'\]"):
        as_prompt_completion(Dataset.from_list([{"prompt": "2 + 2?", "solution": "4"}]))
    with pytest.raises(ValueError, match="empty"):
        as_prompt_completion(Dataset.from_dict({"prompt": [], "completion": []}))
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        as_prompt_completion(Dataset.from_list([{"messages": chat("user", "2 + 2?")}]))


@pytest.mark.parametrize("style", ["chat", "plain"])
def test_only_completion_tokens_carry_loss(style, student_dir, tokenizer, tmp_path):
    """In a collated batch, the labels are -100 on every prompt token and the token itself on every completion token
    (the completion as the chat template renders it, or the completion text plus EOS)."""
    if style == "chat":
        rows = generated_rows(4)
    else:
        rows = [{"prompt": f"What is {i} + 1?", "completion": f" \\boxed{{{i + 1}}}"} for i in range(4)]
    trainer = SFTKLTrainer(model=student_dir, args=config(tmp_path), train_dataset=Dataset.from_list(rows))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    for row, input_ids, labels, attention in zip(rows, batch["input_ids"], batch["labels"],
                                                 batch["attention_mask"]):
        if style == "chat":
            prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True,
                                                       return_dict=True)["input_ids"]
            full_ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True,
                                                     return_dict=True)["input_ids"]
            completion_ids = full_ids[len(prompt_ids):]
        else:
            prompt_ids = tokenizer(row["prompt"])["input_ids"]
            completion_ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"][
                len(prompt_ids):]
        real = attention.bool()
        assert input_ids[real].tolist() == prompt_ids + completion_ids
        assert labels[real].tolist() == [-100] * len(prompt_ids) + completion_ids
        assert (labels[~real] == -100).all()


def _batch(trainer):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))


def test_kl_weight_zero_is_trl_sft_loss_exactly(student_dir, tmp_path):
    rows = as_prompt_completion(Dataset.from_list(generated_rows(4)))
    ours = SFTKLTrainer(model=student_dir, args=config(tmp_path / "ours", kl_to_start=0.0), train_dataset=rows)
    trl = SFTTrainer(model=student_dir, args=config(tmp_path / "trl", SFTConfig), train_dataset=rows)
    assert ours.start_model is None  # no copy of the model is kept for w = 0
    batch = _batch(ours)
    assert torch.equal(ours.compute_loss(ours.model, dict(batch)), trl.compute_loss(trl.model, dict(batch)))


def test_kl_penalty_adds_exactly_the_full_vocabulary_kl_to_the_start(student_dir, tmp_path):
    """loss(w) − loss(0) = w · mean over completion tokens of Σ_v π_θ(v) (log π_θ(v) − log π_start(v)), from full
    softmaxes of both models; the gradient is that of NLL + w · KL computed by autograd on the full logits."""
    weight = 0.7
    trainer = SFTKLTrainer(model=student_dir, args=config(tmp_path, kl_to_start=weight),
                           train_dataset=Dataset.from_list(generated_rows(4)))
    torch.manual_seed(0)
    with torch.no_grad():  # move the model away from its start, or the KL is 0
        for p in trainer.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    batch, model = _batch(trainer), trainer.model

    params = [p for p in model.parameters() if p.requires_grad]
    with_kl = trainer.compute_loss(model, dict(batch))
    grads = torch.autograd.grad(with_kl, params)
    trainer.kl_to_start = 0.0
    without = trainer.compute_loss(model, dict(batch))

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logp_BTV = torch.log_softmax(model(**inputs).logits[:, :-1].double(), -1)
    with torch.no_grad():
        start_BTV = torch.log_softmax(trainer.start_model(**inputs).logits[:, :-1].double(), -1)
    labels, mask = batch["labels"][:, 1:], batch["labels"][:, 1:] != -100
    nll = -logp_BTV.gather(-1, labels.clamp(min=0)[..., None])[..., 0][mask].mean()
    kl = (logp_BTV.exp() * (logp_BTV - start_BTV)).sum(-1)[mask].mean()
    reference_grads = torch.autograd.grad(nll + weight * kl, params)

    assert kl.item() > 0.01
    assert without.item() == pytest.approx(nll.item(), abs=1e-5)
    assert (with_kl - without).item() == pytest.approx(weight * kl.item(), rel=1e-4, abs=1e-6)
    for grad, reference in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference.float(), rtol=1e-4, atol=1e-6)


def test_sft_method_trains_two_steps_on_generated_rows_with_completion_only_loss(student_dir, tmp_path):
    """`method: sft` of `selfdistill train` on a JSONL file in the generated format (`train_file`): the trainer the CLI
    builds puts loss on completion tokens only, and two steps train and log a loss and the KL to the start."""
    path = tmp_path / "generated.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in generated_rows(8)))
    argv = ["--method", "sft", "--model_name_or_path", student_dir, "--train_file", str(path),
            "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--bf16", "false", "--report_to", "none",
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
            "--kl_to_start", "0.1", "--learning_rate", "1e-3"]
    run, config_ = cli.parse_train_args(argv, "sft", use_demo=False)
    dataset = cli.load_train_data(run, config_)
    assert dataset.column_names[:2] == ["prompt", "completion"] and "pass_rate" in dataset.column_names
    trainer = cli.build_trainer("sft", run, config_, student_dir, dataset, rewards=[])
    assert isinstance(trainer, SFTKLTrainer) and trainer.args.kl_to_start == 0.1
    for row in trainer.train_dataset:
        first = next(i for i, label in enumerate(row["labels"]) if label != -100)
        assert all(label == -100 for label in row["labels"][:first])  # the prompt: no loss
        assert row["labels"][first:] == row["input_ids"][first:]  # the completion: every token
        assert trainer.processing_class.decode(row["labels"][first:]).startswith("\\boxed{")
    trainer.train()
    losses = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in losses] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in losses)
    assert losses[-1]["kl_to_start"] > 0  # the model moved off its start after one step
