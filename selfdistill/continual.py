"""Continual learning, measured: train a sequence of stages and, before the first and after each, evaluate every task
of an evaluation set, to see what each stage gained on its new task and what it cost on the old ones.

    selfdistill continual --config recipes/continual/tool_calls_smollm2.yaml
    selfdistill continual --config recipes/continual/tool_calls_smollm2.yaml --seeds 0 --output_dir runs/try

`main(argv)` runs a YAML plan:

    model_name_or_path: smollm2          # the start (a path, a hub id, 'smollm2')
    output_dir: runs/continual
    seeds: [0, 1, 2]                     # each arm runs once per training seed
    train: {learning_rate: 5.0e-5, per_device_train_batch_size: 8, report_to: none}   # fields of every stage
    stages:                              # in order, each from the previous stage's weights
      - {name: tool_calls, method: sft, dataset_name: tool_calls, train_size: 256, max_steps: 32}
    arms:                                # optional: variants of the whole sequence, each overriding every stage
      sft: {}
      sdft: {method: sdft, reward_funcs: []}
    evaluation:
      seed: 0                            # which held-out problems: the same for every arm and training seed
      tasks:                             # row name: {task (default: the name), n, max_new_tokens, options, reward_options}
        tool_calls: {n: 50, max_new_tokens: 40}
        add2: {task: arithmetic, options: {difficulty: 2}, reward_options: {accuracy: {last_number: true}}}
      kl_from_start: {task: general, n: 24, max_new_tokens: 48, temperature: 1.0}

A stage is any `selfdistill train` run (method sft, sdft, sdpo, opsd, opd or grpo, with every field of its config):
its fields are `train`, then the stage's, then the arm's, and are parsed and checked by `cli.parse_train_args`,
`cli.load_train_data` and `cli.check_inputs` for every stage of every arm and seed before any model is loaded; it is
built by `cli.build_trainer`. Graded tasks are measured by `evaluate.evaluate` (greedy pass@1 on held-out problems).
`kl_from_start` is a forgetting measure that needs no grader: the starting model samples completions of a fixed
prompt set once (seeded), and after each stage

    KL(π_start ‖ π_θ) = (1/N) Σ_t Σ_v π_start(v | y_<t, x) · (log π_start(v | y_<t, x) − log π_θ(v | y_<t, x))

over the N tokens of those samples, the full vocabulary at every position (`losses.jsd` with β=0); 0 at the start.

Output, in `output_dir`: `forgetting.json` (`report`: per arm and seed the table task × stage, the change since the
start, the forgetting of every task and the average forgetting; per arm their mean and standard deviation over the
seeds), `forgetting.png` (`plot.plot_forgetting`), `start_kl_samples.pt` (the start's samples), and per stage
`ARM/seed-S/stage-K/` with the trained model, `run_args.json` (its resolved fields) and `trainer_state.json`.
Forgetting of a graded task (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning", arXiv:1801.10112) is
the drop from its best score to its final one, `max_s a_s − a_S`; average forgetting is its mean over the old tasks,
i.e. all graded rows except those of the last stage's training task (a row whose `task` is the last stage's
`dataset_name`).

Every stage is resumable: `state/` holds one small JSON file per finished stage (trained, then evaluated) and one
for the start, each written atomically, so a rerun of the same command after a crash skips what is done and restarts
the stage that was running, from its newest complete `checkpoint-*` when the stage saves checkpoints
(`save_strategy: steps`), else from the previous stage's weights. A stage whose settings changed since it ran is
refused, not silently reused. Processes given disjoint `--seeds` may share one `output_dir` (one per CPU core, say):
they share the start's evaluation, and the plain command afterwards, with everything done, reports every seed.
"""

import argparse
import fcntl
import gc
import json
import os
import re
import statistics
import tempfile
from contextlib import contextmanager

import torch
import yaml

from .cli import BadInput

PLAN_KEYS = {"model_name_or_path", "output_dir", "seeds", "train", "stages", "arms", "evaluation"}
OWN_FIELDS = {"model_name_or_path", "output_dir", "seed", "eval_tasks", "baseline"}  # set by the harness per stage
# Defaults of an evaluation row: `selfdistill train`'s eval_size and `evaluate.MAX_NEW_TOKENS`.
TASK_DEFAULTS = {"n": 50, "max_new_tokens": 64, "options": {}, "reward_options": {}}
# Defaults of the KL row: 24 of the 40 general prompts and 48 tokens, sampled at T=1 (the start's own distribution):
# about 1,100 scored tokens, chosen for cost (sampling them once took under a minute for SmolLM2-135M on one core).
KL_DEFAULTS = {"task": "general", "n": 24, "max_new_tokens": 48, "temperature": 1.0, "options": {}}
KL_ROW = "kl_from_start"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags of `selfdistill continual`."""
    parser = argparse.ArgumentParser(
        prog="selfdistill continual",
        description="Train a sequence of stages (each any 'selfdistill train' method) from the previous stage's "
                    "weights, evaluate every task of an evaluation set before the first stage and after each, and "
                    "write the forgetting table (forgetting.json, forgetting.png). Resumable: rerun the same command "
                    "after a crash. See selfdistill/continual.py for the YAML plan.")
    parser.add_argument("--config", required=True, help="the YAML plan, e.g. recipes/continual/tool_calls_smollm2.yaml")
    parser.add_argument("--output_dir", help="default: the plan's output_dir")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds; default: the plan's seeds, else [0]")
    return parser.parse_args(argv)


def load_plan(path: str, output_dir: str | None = None, seeds: list[int] | None = None) -> dict:
    """The YAML plan at `path`, its shape checked and its defaults filled in (`output_dir`, `seeds` override it)."""
    if not os.path.isfile(path):
        raise BadInput(f"no plan file {path!r}")
    with open(path) as f:
        plan = yaml.safe_load(f) or {}
    if not isinstance(plan, dict) or set(plan) - PLAN_KEYS:
        raise BadInput(f"a continual plan is a mapping with keys among {sorted(PLAN_KEYS)}; {path} has "
                       f"{sorted(plan) if isinstance(plan, dict) else type(plan).__name__}")
    plan = {"model_name_or_path": "smollm2", "output_dir": "runs/continual", "seeds": [0], "train": {},
            "arms": None, **plan}
    plan["output_dir"] = output_dir or plan["output_dir"]
    plan["train"] = plan["train"] or {}
    plan["seeds"] = list(seeds if seeds is not None else plan["seeds"])
    if not plan["seeds"] or not all(isinstance(s, int) for s in plan["seeds"]) or len(set(plan["seeds"])) < len(plan["seeds"]):
        raise BadInput(f"seeds must be distinct integers, got {plan['seeds']}")
    stages = plan.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise BadInput("the plan needs `stages`: a non-empty list of mappings (method, dataset_name, budget, ...)")
    plan["arms"] = plan["arms"] or {"run": {}}
    if not isinstance(plan["arms"], dict) or not all(re.fullmatch(r"[\w.-]+", str(a)) for a in plan["arms"]):
        raise BadInput(f"arms must map names (letters, digits, _ . -) to training fields, got {plan['arms']!r}")
    for where, fields in [("train", plan["train"])] + [(f"stage {i + 1}", s) for i, s in enumerate(stages)] + [
            (f"arm {name!r}", arm) for name, arm in plan["arms"].items()]:
        if not isinstance(fields, dict):
            raise BadInput(f"{where} must be a mapping of training fields, got {fields!r}")
        if fields.keys() & OWN_FIELDS:
            raise BadInput(f"{where} sets {sorted(fields.keys() & OWN_FIELDS)}, which the harness sets per stage")
    plan["stages"] = [{"name": s.get("name") or s.get("dataset_name") or f"stage{i + 1}", **s} for i, s in enumerate(stages)]
    plan["evaluation"] = _evaluation(plan.get("evaluation"))
    return plan


def _evaluation(spec) -> dict:
    from .evaluate import TASK_REWARDS
    from .tasks import TASKS

    if not isinstance(spec, dict) or set(spec) - {"seed", "batch_size", "tasks", KL_ROW}:
        raise BadInput("`evaluation` must be a mapping with keys among seed, batch_size, tasks, kl_from_start")
    tasks = {}
    for name, row in (spec.get("tasks") or {}).items():
        row = {"task": name, **TASK_DEFAULTS, **(row or {})}
        if set(row) - {"task", *TASK_DEFAULTS}:
            raise BadInput(f"evaluation task {name!r}: unknown keys {sorted(set(row) - {'task', *TASK_DEFAULTS})}")
        if row["task"] not in TASK_REWARDS:
            raise BadInput(f"evaluation task {name!r}: {row['task']!r} has no grader; choose from "
                           f"{', '.join(sorted(TASK_REWARDS))}")
        tasks[name] = row
    kl = spec.get(KL_ROW)
    if kl is not None:
        kl = {**KL_DEFAULTS, **kl}
        if set(kl) - set(KL_DEFAULTS) or kl["task"] not in TASKS or kl["temperature"] <= 0:
            raise BadInput(f"kl_from_start needs a task among {sorted(TASKS)}, a temperature > 0 and keys among "
                           f"{sorted(KL_DEFAULTS)}; got {kl}")
    if not tasks and kl is None:
        raise BadInput("the evaluation set is empty: give evaluation.tasks or evaluation.kl_from_start")
    if KL_ROW in tasks:
        raise BadInput(f"{KL_ROW!r} is the KL row's name; name the task otherwise")
    return {"seed": spec.get("seed", 0), "batch_size": spec.get("batch_size", 16), "tasks": tasks, KL_ROW: kl}



def stage_dir(plan: dict, arm: str, seed: int, k: int) -> str:
    return os.path.join(plan["output_dir"], arm, f"seed-{seed}", f"stage-{k}")


def stage_fields(plan: dict, arm: str, seed: int, k: int, start_path: str) -> dict:
    """The `selfdistill train` fields of stage k (1-based) of `arm` with `seed`: the plan's `train`, then the
    stage's, then the arm's; it starts from the previous stage's folder (stage 1: `start_path`)."""
    fields = {**plan["train"], **plan["stages"][k - 1], **plan["arms"][arm]}
    fields.pop("name")
    if "method" not in fields:  # `selfdistill train` would fall back to its demo's method
        raise BadInput(f"stage {k} of arm {arm!r} has no method: give it in the stage, the arm or `train`")
    previous = start_path if k == 1 else stage_dir(plan, arm, seed, k - 1)
    return {**fields, "model_name_or_path": previous, "output_dir": stage_dir(plan, arm, seed, k), "seed": seed,
            "eval_tasks": []}


def prepare_stage(fields: dict):
    """`(method, run, config, dataset)` of a stage, parsed from `fields` as `selfdistill train` parses a YAML recipe
    and checked as it checks one (the resolved fields are recorded in the stage's `run_args.json` when it trains)."""
    from .cli import check_inputs, load_train_data, parse_train_args, peek_method

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(fields, f)
        f.flush()
        argv = ["--config", f.name]
        method = peek_method(argv)[0]
        run, config = parse_train_args(argv, method, use_demo=False)
    dataset = load_train_data(run, config)
    check_inputs(method, run, config, dataset)
    return method, run, config, dataset


def train_stage(method: str, run, config, dataset) -> None:
    """Train one stage with `cli.build_trainer` and save its model (and tokenizer) to the stage folder, resuming
    from the folder's newest checkpoint when there is one."""
    from .cli import build_trainer, load_rewards, write_run_args

    rewards = load_rewards(run) if method != "sft" else []
    trainer = build_trainer(method, run, config, run.model_name_or_path, dataset, rewards)
    write_run_args(config.output_dir, run, config)
    checkpoint = last_complete_checkpoint(config.output_dir)
    if checkpoint:
        print(f"resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    trainer.state.save_to_json(os.path.join(config.output_dir, "trainer_state.json"))
    del trainer
    gc.collect()


def last_complete_checkpoint(folder: str) -> str | None:
    """The newest `checkpoint-N` in `folder` that was written to the end: the Trainer writes a checkpoint's
    `trainer_state.json` last, and not atomically, so a process killed while saving leaves one without it."""
    if not os.path.isdir(folder):
        return None
    steps = sorted((int(name.split("-")[1]) for name in os.listdir(folder)
                    if name.startswith("checkpoint-") and name.split("-")[1].isdigit()), reverse=True)
    complete = [os.path.join(folder, f"checkpoint-{step}") for step in steps
                if os.path.exists(os.path.join(folder, f"checkpoint-{step}", "trainer_state.json"))]
    return complete[0] if complete else None


def load_model(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def sample_start(model, tokenizer, spec: dict, seed: int, batch_size: int) -> list[dict]:
    """The starting model's completions of the first `spec["n"]` prompts of `spec["task"]` (held-out split), sampled
    at `spec["temperature"]` with `seed` (in a forked RNG), kept up to and including the first EOS: per batch the
    left-padded prompt ids and mask and the right-padded completion ids and mask, the layout `ModelTeacher` scores."""
    from .evaluate import _generated, eval_mode
    from .tasks import load_task

    prompts = load_task(spec["task"], split="test", n=spec["n"], seed=seed, **spec["options"])["prompt"]
    eos = model.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    samples = []
    with torch.random.fork_rng(devices=[]), eval_mode(model):
        torch.manual_seed(seed)
        for batch, ids in _generated(model, tokenizer, prompts, max_new_tokens=spec["max_new_tokens"],
                                     temperature=spec["temperature"], batch_size=batch_size, desc="sample start"):
            completion = ids[:, batch["input_ids"].shape[1] :]
            is_eos = torch.isin(completion, eos).long()
            mask = ((is_eos.cumsum(1) - is_eos) == 0).long()  # up to and including the first EOS
            samples.append({"prompt_ids": batch["input_ids"], "prompt_mask": batch["attention_mask"],
                            "completion_ids": completion * mask + tokenizer.pad_token_id * (1 - mask),
                            "completion_mask": mask})
    return samples


@torch.no_grad()
def kl_from_start(start, model, samples: list[dict], temperature: float = 1.0) -> dict:
    """`{"kl", "tokens"}`: KL(π_start ‖ π_θ) per token (module docstring) on the start's `samples`, at the sampling
    temperature, over the full vocabulary (`losses.jsd`, β=0: forward KL(T‖S) with T = π_start, S = π_θ)."""
    from .evaluate import eval_mode
    from .losses import jsd
    from .teachers import ModelTeacher

    total, tokens = 0.0, 0
    with eval_mode(start, model):
        for s in samples:
            args = (s["prompt_ids"], s["prompt_mask"], s["completion_ids"], s["completion_mask"])
            hidden = [ModelTeacher(m, temperature, len(s["prompt_ids"]), return_hidden=True).score(*args).hidden_BTH
                      for m in (model, start)]
            kl_BT = jsd(hidden[0], hidden[1], s["completion_mask"].bool(), beta=0.0, temperature=temperature,
                        student_head=model.get_output_embeddings(), teacher_head=start.get_output_embeddings())
            total += kl_BT.sum().item()
            tokens += int(s["completion_mask"].sum())
    return {"kl": total / max(tokens, 1), "tokens": tokens}


def evaluate_model(model, tokenizer, evaluation: dict, start=None, samples=None) -> dict:
    """`{row: {"pass@1", "mean_reward", "n"}}` for every graded row (`evaluate.evaluate`, greedy), and
    `{"kl_from_start": {"kl", "tokens"}}` against `start` on its `samples` when the set has the KL row."""
    from .evaluate import evaluate

    results = {}
    for name, row in evaluation["tasks"].items():
        results[name] = evaluate(model, tokenizer, [row["task"]], n=row["n"], seed=evaluation["seed"],
                                 max_new_tokens=row["max_new_tokens"], batch_size=evaluation["batch_size"],
                                 task_options={row["task"]: row["options"]},
                                 reward_options=row["reward_options"])[row["task"]]
    if evaluation[KL_ROW] is not None:
        results[KL_ROW] = kl_from_start(start if start is not None else model, model, samples,
                                        evaluation[KL_ROW]["temperature"])
    return results


def _write_json(path: str, value) -> None:
    """Write JSON all or nothing (a temporary file renamed into place), so a crash never leaves half a state."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def _check_recorded(cell: dict, spec: dict, what: str) -> None:
    if cell["spec"] != spec:
        changed = sorted(k for k in spec.keys() | cell["spec"].keys() if spec.get(k) != cell["spec"].get(k))
        raise BadInput(f"{what} already ran with other settings ({', '.join(changed)} differ); use another "
                       "output_dir, or restore the plan it ran with")


def _cell_file(root: str, key: str) -> str:
    """`state/start.json`, or `state/ARM.seed-S.stage-K.json` for the cell "ARM/S/K"."""
    if key == "start":
        return os.path.join(root, "state", "start.json")
    arm, seed, k = key.split("/")
    return os.path.join(root, "state", f"{arm}.seed-{seed}.stage-{k}.json")


def _read_json(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_state(plan: dict) -> dict:
    """What is recorded in `output_dir/state/`: `{"start": cell, "cells": {"ARM/SEED/K": cell}}`, each cell
    `{"spec", "trained"?, "results"?}`, for the plan's arms and seeds (a missing cell is absent)."""
    root = plan["output_dir"]
    keys = [f"{arm}/{seed}/{k}" for seed in plan["seeds"] for arm in plan["arms"] for k in range(1, len(plan["stages"]) + 1)]
    cells = {key: _read_json(_cell_file(root, key)) for key in keys}
    return {"start": _read_json(_cell_file(root, "start")), "cells": {k: c for k, c in cells.items() if c is not None}}


@contextmanager
def _locked(path: str):
    """An exclusive lock on `path` for the block: processes running other seeds of one plan (`--seeds`) share its
    start, which the first of them evaluates while the others wait."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run(plan: dict) -> dict:
    """Run the plan (module docstring), resuming from what `output_dir/state/` records; write and return the
    report (of every seed of the plan whose stages are all done, whichever process ran them)."""
    from .cli import resolve_model
    from .plot import plot_forgetting

    root = plan["output_dir"]
    state = read_state(plan)
    start_path = resolve_model(plan["model_name_or_path"])
    cells = [(seed, arm, k) for seed in plan["seeds"] for arm in plan["arms"] for k in range(1, len(plan["stages"]) + 1)]
    fields = {cell: stage_fields(plan, cell[1], cell[0], cell[2], start_path) for cell in cells}
    prepared = {cell: prepare_stage(fields[cell]) for cell in cells}  # all checked before any model is loaded
    start_spec = {"model_name_or_path": plan["model_name_or_path"], "evaluation": plan["evaluation"]}
    for seed, arm, k in cells:
        if (cell := state["cells"].get(f"{arm}/{seed}/{k}")) is not None:
            _check_recorded(cell, fields[seed, arm, k], f"stage {k} of arm {arm!r} with seed {seed}")
    if state["start"] is not None:
        _check_recorded(state["start"], start_spec, "the start's evaluation")

    os.makedirs(os.path.join(root, "state"), exist_ok=True)
    start, tokenizer = load_model(start_path)
    kl = plan["evaluation"][KL_ROW]
    samples_path = os.path.join(root, "start_kl_samples.pt")
    with _locked(os.path.join(root, "state", "start.lock")):
        if _read_json(_cell_file(root, "start")) is None:
            if kl is not None:  # the samples first: a recorded start always has its samples
                torch.save(sample_start(start, tokenizer, kl, plan["evaluation"]["seed"],
                                        plan["evaluation"]["batch_size"]), samples_path)
            samples = torch.load(samples_path, weights_only=True) if kl is not None else None
            print("evaluating the start")
            results = evaluate_model(start, tokenizer, plan["evaluation"], start, samples)
            _write_json(_cell_file(root, "start"), {"spec": start_spec, "results": results})
    samples = torch.load(samples_path, weights_only=True) if kl is not None else None
    for (seed, arm, k), (method, run_args, config, dataset) in prepared.items():
        key, label = f"{arm}/{seed}/{k}", f"arm {arm!r}, seed {seed}, stage {k}/{len(plan['stages'])}"
        cell = state["cells"].get(key)
        if cell is not None and "results" in cell:
            print(f"{label} ({plan['stages'][k - 1]['name']}): done, skipped")
            continue
        if cell is None:
            print(f"{label} ({plan['stages'][k - 1]['name']}): training, method {method}")
            train_stage(method, run_args, config, dataset)
            cell = {"spec": fields[seed, arm, k], "trained": True}
            _write_json(_cell_file(root, key), cell)
        print(f"{label}: evaluating")
        model, stage_tokenizer = load_model(config.output_dir)
        cell["results"] = evaluate_model(model, stage_tokenizer, plan["evaluation"], start, samples)
        del model
        _write_json(_cell_file(root, key), cell)
        _write_json(os.path.join(root, "forgetting.json"), report(plan, read_state(plan)))
    result = report(plan, read_state(plan))
    _write_json(os.path.join(root, "forgetting.json"), result)
    print(format_report(result))
    if result["summary"]:
        print(f"plot: {plot_forgetting(result, os.path.join(root, 'forgetting.png'))}")
    return result


def forgetting(scores: list[float]) -> float:
    """The drop from a task's best score to its final one, `max_s a_s − a_S` over the stages s = 0..S (the start
    included): Chaudhry et al. 2018's forgetting, `max_{l<S} a_l − a_S`, floored at 0."""
    return max(scores) - scores[-1]


def run_summary(table: dict[str, list[float]], old_tasks: list[str]) -> dict:
    """Per-run derived metrics of a table `{row: [value at stage 0, 1, ..., S]}`: `change` (final − start) of every
    row, `forgetting` of every graded row (not the KL row, where lower is better), and `average_forgetting`, the
    mean forgetting over `old_tasks` (None without any)."""
    graded = {row: scores for row, scores in table.items() if row != KL_ROW}
    per_task = {row: forgetting(scores) for row, scores in graded.items()}
    return {"change": {row: scores[-1] - scores[0] for row, scores in table.items()}, "forgetting": per_task,
            "average_forgetting": statistics.mean(per_task[r] for r in old_tasks) if old_tasks else None}


def _spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "values": []}
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def report(plan: dict, state: dict) -> dict:
    """The forgetting report: stage labels, rows, old tasks; per arm and seed with finished stages their table
    (pass@1 per graded row, KL per token for the KL row) and `run_summary`; per arm the mean and standard deviation
    over its complete seeds of every cell and metric."""
    rows = list(plan["evaluation"]["tasks"]) + ([KL_ROW] if plan["evaluation"][KL_ROW] is not None else [])
    last_task = plan["stages"][-1].get("dataset_name")
    old = [r for r, row in plan["evaluation"]["tasks"].items() if row["task"] != last_task]
    stages = ["start"] + [f"{k} {s['name']}" for k, s in enumerate(plan["stages"], 1)]
    start = state["start"]["results"] if state.get("start") else None
    out = {"stages": stages, "rows": rows, "old_tasks": old, "runs": {}, "summary": {}}
    for arm in plan["arms"]:
        runs = out["runs"][arm] = {}
        for seed in plan["seeds"]:
            cells = [start] + [state["cells"].get(f"{arm}/{seed}/{k}", {}).get("results")
                               for k in range(1, len(plan["stages"]) + 1)]
            done = [c for c in cells if c is not None]
            if start is None or len(done) < 2:
                continue
            table = {row: [_value(c[row]) for c in done] for row in rows}
            runs[str(seed)] = {"complete": len(done) == len(cells), "table": table, **run_summary(table, old)}
        complete = [r for r in runs.values() if r["complete"]]
        if complete:
            out["summary"][arm] = {
                "seeds": len(complete),
                "table": {row: [_spread([r["table"][row][s] for r in complete]) for s in range(len(stages))]
                          for row in rows},
                "change": {row: _spread([r["change"][row] for r in complete]) for row in rows},
                "forgetting": {row: _spread([r["forgetting"][row] for r in complete]) for row in rows if row != KL_ROW},
                "average_forgetting": _spread([r["average_forgetting"] for r in complete]),
            }
    return out


def _value(result: dict) -> float:
    return result["kl"] if "kl" in result else result["pass@1"]


def format_report(result: dict) -> str:
    """Markdown: per arm, the table row × stage (mean ± std over seeds), the change since the start and the
    forgetting per row, and the average forgetting over the old tasks."""
    lines = []
    for arm, summary in result["summary"].items():
        lines += [f"### {arm} ({summary['seeds']} seeds; pass@1, KL in nats/token; mean ± std)", "",
                  "| task | " + " | ".join(result["stages"]) + " | change | forgetting |",
                  "|---|" + "---:|" * (len(result["stages"]) + 2)]
        for row in result["rows"]:
            cells = [_pm(c) for c in summary["table"][row]] + [_pm(summary["change"][row], signed=True),
                                                               _pm(summary["forgetting"][row]) if row in summary["forgetting"] else ""]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines += ["", f"average forgetting over {', '.join(result['old_tasks']) or 'no old task'}: "
                      f"{_pm(summary['average_forgetting'])}", ""]
    return "\n".join(lines)


def _pm(spread: dict, signed: bool = False) -> str:
    if spread["mean"] is None:
        return "n/a"
    return f"{spread['mean']:{'+' if signed else ''}.3f} ± {spread['std']:.3f}"


def main(argv: list[str]) -> dict:
    """`selfdistill continual`: load the plan, run (or resume) it, print and write the report."""
    args = parse_args(argv)
    return run(load_plan(args.config, args.output_dir, args.seeds))
