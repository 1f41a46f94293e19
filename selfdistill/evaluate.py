"""Held-out evaluation: pass@1 and mean reward of a model on one or more built-in tasks.

Several tasks in one call let a continual-learning run show what was gained on the new task and what was kept on
the old one. Each task is scored with its own reward (`TASK_REWARDS`); pass@1 is the fraction of problems whose
single completion (greedy, or one sample) gets the full reward 1.0.
"""

import json

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .rewards import get_reward
from .tasks import load_task

TASK_REWARDS = {"arithmetic": "accuracy", "humaneval": "code", "gsm8k": "accuracy", "math": "accuracy",
                "deepmath": "accuracy", "openthoughts": "accuracy"}


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, max_new_tokens: int, temperature: float, batch_size: int,
             desc: str = "generate") -> list[str]:
    """Completions for chat or plain prompts, left-padded batches; `temperature=0` is greedy."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
             for p in prompts]
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(**batch.to(model.device), max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **sampling)
        out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def evaluate(model, tokenizer, tasks: list[str], *, n: int = 50, seed: int = 0, temperature: float = 0.0,
             max_new_tokens: int = 64, batch_size: int = 16, task_options: dict | None = None) -> dict:
    """`{task: {"pass@1", "mean_reward", "n"}}` on the held-out ("test") split of each task."""
    results = {}
    for task in tasks:
        dataset = load_task(task, split="test", n=n, seed=seed, **(task_options or {}).get(task, {}))
        completions = generate(model, tokenizer, dataset["prompt"], max_new_tokens=max_new_tokens,
                               temperature=temperature, batch_size=batch_size, desc=f"eval {task}")
        reward = get_reward(TASK_REWARDS[task])
        columns = {k: dataset[k] for k in dataset.column_names if k != "prompt"}
        scores = [s for s in reward(prompts=dataset["prompt"], completions=completions, **columns) if s is not None]
        results[task] = {
            "pass@1": sum(s >= 1.0 for s in scores) / max(len(scores), 1),
            "mean_reward": sum(scores) / max(len(scores), 1),
            "n": len(scores),
        }
    return results


def format_table(results: dict[str, dict]) -> str:
    """Markdown table, one row per (label, task)."""
    lines = ["| model | task | pass@1 | mean reward | n |", "|---|---|---|---|---|"]
    for label, per_task in results.items():
        for task, r in per_task.items():
            lines.append(f"| {label} | {task} | {r['pass@1']:.3f} | {r['mean_reward']:.3f} | {r['n']} |")
    return "\n".join(lines)


def evaluate_path(path: str, tasks: list[str], output: str | None = None, **options) -> dict:
    """Load a checkpoint, evaluate it, optionally write JSON."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    results = evaluate(model, tokenizer, tasks, **options)
    if output:
        with open(output, "w") as f:
            json.dump({"model": path, "results": results}, f, indent=2)
    return results
