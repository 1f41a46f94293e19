"""Held-out evaluation: pass@1 and mean reward of a model on one or more built-in tasks.

Several tasks in one call let a continual-learning run show what was gained on the new task and what was kept on
the old one. Each task is scored with its own reward (`TASK_REWARDS`); pass@1 is the fraction of problems whose
single completion (greedy, or one sample) gets the full reward 1.0.

`selfdistill eval` is `main(argv)`. Given the output folder of a `selfdistill train` run, it reads the run's
`run_args.json` and evaluates as the run did (its tasks, problems, generation length, task and reward options), so
its pass@1 is the one the run recorded in `eval.json`; an explicit flag wins over the run's value.

    selfdistill eval --model runs/demo/sdpo
    selfdistill eval --model runs/demo/sdpo --reward_options '{"accuracy": {}}'   # grade strictly instead
    selfdistill eval --model smollm2 --task arithmetic --task humaneval --n 50 --output eval.json
"""

import argparse
import json
import os
import sys
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .rewards import FEEDBACK_KEY, get_reward
from .tasks import load_task
from .teachers import ModelTeacher

TASK_REWARDS = {"arithmetic": "accuracy", "humaneval": "code", "gsm8k": "accuracy", "math": "accuracy",
                "deepmath": "accuracy", "openthoughts": "accuracy",
                "tool_calls": "tool_call", "instructions": "instructions"}
MAX_NEW_TOKENS = 64  # tokens generated per problem when neither a flag nor a run says otherwise


def _generated(model, tokenizer, prompts: list, *, max_new_tokens: int, temperature: float, batch_size: int,
               desc: str):
    """`(tokenized batch, generated ids)` per left-padded batch of chat or plain prompts; `temperature=0` is greedy."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list) else p
             for p in prompts]
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)
        yield batch, model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                    **sampling)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, *, max_new_tokens: int, temperature: float, batch_size: int,
             desc: str = "generate") -> list[str]:
    """Completions for chat or plain prompts, left-padded batches; `temperature=0` is greedy."""
    batches = _generated(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                         batch_size=batch_size, desc=desc)
    return [text for batch, ids in batches
            for text in tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)]


def evaluate(model, tokenizer, tasks: list[str], *, n: int = 50, seed: int = 0, temperature: float = 0.0,
             max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16, task_options: dict | None = None,
             reward_options: dict | None = None, answers: bool = False) -> dict:
    """`{task: {"pass@1", "mean_reward", "n"}}` on the held-out ("test") split of each task.

    pass@1 = (1/n) Σ_i 1[r_i ≥ 1] and mean_reward = (1/n) Σ_i r_i over the n problems the reward scores (a reward of
    None, "not applicable", is left out). `answers=True` adds `"answers"`: per problem, its completion, its reward, the
    verifier's feedback on it (what a self-distillation teacher would be shown) and the task's other columns.

    `task_options` are keyword arguments of the task builders, by task name; `reward_options` those of the rewards,
    by reward name (as in a training run's `reward_options`, so the evaluation grades like the training reward).
    The model generates in eval mode (then gets its mode back): a model just out of `trainer.train()` is in training
    mode with gradient checkpointing on (GRPOConfig's default), and `generate` there (transformers 5.19) gave SmolLM2
    garbage ("4-----------") where eval mode, or training mode without checkpointing, gives "41 + 98 = 199".
    """
    with eval_mode(model):
        return _evaluate(model, tokenizer, tasks, n=n, seed=seed, temperature=temperature,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, task_options=task_options,
                         reward_options=reward_options, answers=answers)


@contextmanager
def eval_mode(*models):
    """The models in eval mode inside the block, each back in its own mode after it."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def _evaluate(model, tokenizer, tasks, *, n, seed, temperature, max_new_tokens, batch_size, task_options,
              reward_options, answers) -> dict:
    results = {}
    for task in tasks:
        dataset = load_task(task, split="test", n=n, seed=seed, **(task_options or {}).get(task, {}))
        completions = generate(model, tokenizer, dataset["prompt"], max_new_tokens=max_new_tokens,
                               temperature=temperature, batch_size=batch_size, desc=f"eval {task}")
        reward = get_reward(TASK_REWARDS[task], **(reward_options or {}).get(TASK_REWARDS[task], {}))
        columns = {k: dataset[k] for k in dataset.column_names if k != "prompt"}
        feedback = [[] for _ in completions]  # filled by rewards that explain their grade (rewards.add_feedback)
        rewards = reward(prompts=dataset["prompt"], completions=completions, **columns, **{FEEDBACK_KEY: feedback})
        scores = [s for s in rewards if s is not None]
        results[task] = {
            "pass@1": sum(s >= 1.0 for s in scores) / max(len(scores), 1),
            "mean_reward": sum(scores) / max(len(scores), 1),
            "n": len(scores),
        }
        if answers:
            results[task]["answers"] = [
                {"completion": text, "reward": score, "feedback": "\n".join(lines) or None,
                 **{k: values[i] for k, values in columns.items()}}
                for i, (text, score, lines) in enumerate(zip(completions, rewards, feedback))]
    return results


def format_table(results: dict[str, dict]) -> str:
    """Markdown table, one row per (label, task)."""
    lines = ["| model | task | pass@1 | mean reward | n |", "|---|---|---|---|---|"]
    for label, per_task in results.items():
        for task, r in per_task.items():
            lines.append(f"| {label} | {task} | {r['pass@1']:.3f} | {r['mean_reward']:.3f} | {r['n']} |")
    return "\n".join(lines)


def evaluate_path(path: str, tasks: list[str], output: str | None = None, **options) -> dict:
    """Load a checkpoint, evaluate it, optionally write JSON (the model, the results and the options used)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    results = evaluate(model, tokenizer, tasks, **options)
    if output:
        with open(output, "w") as f:
            json.dump({"model": path, "results": results, "options": options}, f, indent=2)
    return results


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags of `selfdistill eval`; those left unset are None, filled by `settings`."""
    parser = argparse.ArgumentParser(
        prog="selfdistill eval",
        description="Held-out pass@1 and mean reward of a model on built-in tasks. MODEL may be the output folder of "
                    "a 'selfdistill train' run: its run_args.json then gives the defaults of --task, --n, --seed, "
                    "--max_new_tokens, --task_options and --reward_options, so the evaluation grades as the run did. "
                    "With --draft DRAFT: speculative decoding of MODEL with DRAFT instead ('selfdistill eval --draft "
                    "DRAFT --model MODEL --help').")
    parser.add_argument("--model", required=True, help="checkpoint folder, hub id, 'smollm2', or a run folder")
    parser.add_argument("--task", action="append", choices=sorted(TASK_REWARDS),
                        help="a task to evaluate on (repeatable); default: the run's eval_tasks")
    parser.add_argument("--n", type=int, help="held-out problems per task; default: the run's eval_size, else 50")
    parser.add_argument("--seed", type=int, help="which held-out problems; default: the run's seed, else 0")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy pass@1; >0: one sample each")
    parser.add_argument("--max_new_tokens", type=int,
                        help=f"default: the run's generation length, else {MAX_NEW_TOKENS}")
    parser.add_argument("--task_options", type=_json_object,
                        help='task builder options by task, e.g. \'{"arithmetic": {"difficulty": 1}}\'; default: '
                             "the run's dataset_options for its dataset")
    parser.add_argument("--reward_options", type=_json_object,
                        help='reward options by reward name, the shape of a run\'s reward_options, e.g. '
                             '\'{"accuracy": {"last_number": true}}\'; default: the run\'s')
    parser.add_argument("--output", help="write the results (and the options used) to this JSON file")
    return parser.parse_args(argv)


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def settings(args: argparse.Namespace) -> dict:
    """The evaluation options: each flag given, else the run's (`run_args.json` in the model folder), else the
    defaults (n=50, seed=0, max_new_tokens=MAX_NEW_TOKENS, no task or reward options)."""
    run = {}
    run_args = os.path.join(args.model, "run_args.json")
    if os.path.isfile(run_args):
        with open(run_args) as f:
            run = json.load(f)["evaluation"]
    defaults = {"tasks": None, "n": 50, "seed": 0, "max_new_tokens": MAX_NEW_TOKENS, "task_options": {},
                "reward_options": {}}
    given = {"tasks": args.task, "n": args.n, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
             "task_options": args.task_options, "reward_options": args.reward_options}
    chosen = {key: given[key] if given[key] is not None else run.get(key, default) for key, default in defaults.items()}
    if not chosen["tasks"]:
        print(f"selfdistill eval: error: give --task (no run_args.json with eval_tasks in {args.model})",
              file=sys.stderr)
        raise SystemExit(2)
    return chosen


def main(argv: list[str]) -> dict:
    """`selfdistill eval`: evaluate, print a table, optionally write JSON. With `--draft`, speculative decoding of
    the model with that draft instead (`selfdistill.speculative.main`, its own flags)."""
    from .cli import resolve_model

    if any(arg == "--draft" or arg.startswith("--draft=") for arg in argv):
        from .speculative import main as speculative_main

        return speculative_main(argv)
    args = parse_args(argv)
    options = settings(args)
    results = evaluate_path(resolve_model(args.model), options.pop("tasks"), args.output,
                            temperature=args.temperature, **options)
    print(format_table({args.model: results}))
    return results


@torch.no_grad()
def distill_metrics(student, teacher, tokenizer, tasks: list[str], *, n: int = 50, seed: int = 0,
                    temperature: float = 1.0, max_new_tokens: int = 64, batch_size: int = 16,
                    task_options: dict | None = None) -> dict:
    """`{task: {"reverse_kl", "acceptance", "tokens"}}`: how close the student is to the teacher on held-out prompts.

    The student samples one completion per held-out prompt at `temperature` (seeded with `seed`, in a forked RNG so
    the caller's random state is untouched); both models score those tokens at the same temperature, as in training.
    Per sampled token (up to and including the first EOS): `reverse_kl` is the mean of log S(x) − log T(x), an
    unbiased estimate of KL(S‖T) per token, and `acceptance` the mean of min(1, T(x)/S(x)), the expected
    speculative-decoding acceptance of the student drafting for the teacher — the training metrics
    `distill/reverse_kl` and `distill/acceptance`, measured on a fixed prompt set before and after training.
    """
    eos = student.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    scorers = [ModelTeacher(model, temperature, batch_size) for model in (student, teacher)]
    results = {}
    for task in tasks:
        dataset = load_task(task, split="test", n=n, seed=seed, **(task_options or {}).get(task, {}))
        kl_sum = acc_sum = tokens = 0.0
        with torch.random.fork_rng(devices=[]), eval_mode(student, teacher):
            torch.manual_seed(seed)
            for batch, ids in _generated(student, tokenizer, dataset["prompt"], max_new_tokens=max_new_tokens,
                                         temperature=temperature, batch_size=batch_size, desc=f"distill eval {task}"):
                completion = ids[:, batch["input_ids"].shape[1] :]
                is_eos = torch.isin(completion, eos.to(completion.device)).long()
                mask = (is_eos.cumsum(1) - is_eos) == 0  # up to and including the first EOS
                student_logp, teacher_logp = (
                    scorer.score(batch["input_ids"], batch["attention_mask"], completion, mask.long()).logp_BT
                    for scorer in scorers
                )
                diff = (student_logp - teacher_logp)[mask]
                kl_sum += diff.sum().item()
                acc_sum += (-diff).clamp(max=0).exp().sum().item()
                tokens += mask.sum().item()
        results[task] = {"reverse_kl": kl_sum / max(tokens, 1), "acceptance": acc_sum / max(tokens, 1),
                         "tokens": int(tokens)}
    return results
