"""The `selfdistill` command: train | eval | plot.

    selfdistill train [--config recipes/....yaml] [--any_config_field value ...]
    selfdistill eval --model PATH --task arithmetic [--task humaneval ...] [--n 50] [--output results.json]
    selfdistill plot RUN_DIR

`train` is built on TRL's `TrlParser`: every field of the method's trainer config (GRPOConfig and ours) is a YAML
key or a flag, next to the run fields of `RunArguments`. With no `--config` it runs the embedded CPU demo
(`DEMO`): self-distillation (SDPO) of SmolLM2-135M-Instruct on two-digit addition with math-verify feedback,
against plain GRPO from the same start with the same rollout budget. It works under `accelerate launch`.
"""

import json
import os
import sys
from dataclasses import dataclass, field

import yaml

METHODS = ("opd", "sdpo", "sdft", "opsd", "grpo")

# The main job's embedded default: the CPU demo (see README, "Demo").
DEMO = {
    "method": "sdpo",
    "baseline": "grpo",
    "model_name_or_path": "smollm2",
    "dataset_name": "arithmetic",
    # SmolLM2-135M ignores \boxed{} and answers "17 + 25 = 32."; grade the last number it writes (training and eval).
    "dataset_options": {"difficulty": 2, "instruction": "Answer with just the number."},
    "train_size": 96,
    "eval_tasks": ["arithmetic"],
    "eval_size": 50,
    "reward_funcs": ["accuracy"],
    "reward_options": {"accuracy": {"reveal_solution": True, "last_number": True}},
    "output_dir": "runs/demo",
    "learning_rate": 2.0e-5,
    "max_steps": 12,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "num_generations": 8,
    "max_completion_length": 32,
    "temperature": 0.7,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "bf16": False,  # a CPU demo: fp32 (GRPOConfig's bf16 default needs a GPU)
}


@dataclass
class RunArguments:
    """What to train and how to judge it; the trainer's own fields come from its config class."""

    method: str = field(default="sdpo", metadata={"help": f"One of {METHODS}."})
    model_name_or_path: str = field(default="smollm2", metadata={"help": "Path, hub id, 'smollm2' or 'smollm2-pruned'."})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "Teacher for method 'opd'."})
    dataset_name: str = field(default="arithmetic", metadata={"help": "Built-in task or hub dataset (selfdistill.tasks)."})
    dataset_options: dict | None = field(default=None, metadata={"help": "Keyword arguments for the task builder."})
    train_size: int | None = field(default=None, metadata={"help": "Number of training problems (None: the task's)."})
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy"],
                                    metadata={"help": "Registry names (selfdistill.rewards.get_reward) or dotted paths."})
    reward_options: dict | None = field(default=None, metadata={"help": "Per-reward keyword arguments, by name."})
    eval_tasks: list[str] = field(default_factory=list, metadata={"help": "Held-out tasks evaluated before/after."})
    eval_size: int = field(default=50, metadata={"help": "Held-out problems per eval task."})
    baseline: str | None = field(default=None, metadata={"help": "'grpo': also train plain GRPO, same start and budget."})
    pruned_layers: int = field(default=15, metadata={"help": "Layers kept by model 'smollm2-pruned' (of 30)."})
    pruned_keep_layers: list[int] | None = field(
        default=None, metadata={"help": "Explicit indices of the layers 'smollm2-pruned' keeps (overrides pruned_layers)."})


def resolve_model(name: str, pruned_layers: int = 15, keep_layers: list[int] | None = None) -> str:
    """'smollm2' is the offline SmolLM2-135M-Instruct checkpoint; 'smollm2-pruned' its depth-pruned copy, keeping
    `keep_layers` (explicit indices) or else `pruned_layers` layers chosen by `assets.default_layers`."""
    if name not in ("smollm2", "smollm2-pruned"):
        return name
    from .assets import layer_pruned, smollm2_path

    path = smollm2_path()
    if name == "smollm2":
        return path
    suffix = f"{pruned_layers}L" if not keep_layers else "L" + "-".join(str(i) for i in keep_layers)
    return layer_pruned(path, list(keep_layers) if keep_layers else pruned_layers,
                        os.path.join(os.path.dirname(path), f"{os.path.basename(path)}-{suffix}"))


def load_reward(name: str, options: dict):
    """A reward by registry name, or a callable by dotted import path (`package.module.function`)."""
    from .rewards import get_reward

    if "." in name:
        import importlib

        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    return get_reward(name, **options)


def config_class(method: str):
    from trl import GRPOConfig

    from .trainers import OnPolicyDistillConfig, SelfDistillConfig

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return {"opd": OnPolicyDistillConfig, "grpo": GRPOConfig}.get(method, SelfDistillConfig)


def peek_method(argv: list[str]) -> tuple[str, dict | None]:
    """The method (from the flags, the YAML, or the demo) and the YAML config, before the full parse."""
    config = None
    if "--config" in argv:
        with open(argv[argv.index("--config") + 1]) as f:
            config = yaml.safe_load(f)
    if "--method" in argv:
        return argv[argv.index("--method") + 1], config
    return (config or DEMO).get("method", "sdpo"), config


def build_trainer(method: str, run: "RunArguments", config, model_path: str, train_dataset):
    from trl import GRPOTrainer

    from .trainers import OnPolicyDistillTrainer, SelfDistillTrainer

    rewards = [load_reward(name, (run.reward_options or {}).get(name, {})) for name in run.reward_funcs]
    if method == "grpo":
        return GRPOTrainer(model=model_path, reward_funcs=rewards, args=config, train_dataset=train_dataset)
    if method == "opd":
        if config.teacher_server_url is not None:  # a teacher served by vLLM
            teacher = None
        elif run.teacher_model_name_or_path is None:
            raise ValueError("method 'opd' needs teacher_model_name_or_path or --teacher_server_url")
        else:
            teacher = resolve_model(run.teacher_model_name_or_path, run.pruned_layers)
        return OnPolicyDistillTrainer(model=model_path, teacher_model=teacher, reward_funcs=rewards or None,
                                      args=config, train_dataset=train_dataset)
    return SelfDistillTrainer(model=model_path, reward_funcs=rewards, args=config, train_dataset=train_dataset)


def _held_out(run: "RunArguments", config) -> dict:
    """The held-out problems and generation length every evaluation of a run uses (model, baseline and teacher)."""
    return dict(n=run.eval_size, seed=config.seed, max_new_tokens=config.max_completion_length,
                task_options={run.dataset_name: run.dataset_options or {}})


def _evaluate_into(run_dir: str, label_step: int, model, tokenizer, run: "RunArguments", config,
                   teacher=None) -> dict:
    """Evaluate and append `{task: [{step, pass@1, mean_reward}]}` to `run_dir/eval.json`; with a `teacher` (method
    'opd'), also the held-out reverse KL and acceptance of the student's samples (`evaluate.distill_metrics`)."""
    from .evaluate import distill_metrics, evaluate

    results = evaluate(model, tokenizer, run.eval_tasks, **_held_out(run, config), reward_options=run.reward_options)
    if teacher is not None:
        close = distill_metrics(model, teacher, tokenizer, run.eval_tasks, **_held_out(run, config),
                                temperature=config.temperature)
        for task in results:
            results[task].update(close[task])
    path = os.path.join(run_dir, "eval.json")
    history = json.load(open(path)) if os.path.exists(path) else {}
    for task, r in results.items():
        history.setdefault(task, []).append({"step": label_step, **r})
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(history, f, indent=2)
    return results


def parse_train_args(argv: list[str], method: str, use_demo: bool):
    """`(RunArguments, config)` for `method`. A baseline is parsed from the same arguments with its own config
    class, so it gets the same GRPO fields (same rollout budget); fields it lacks are ignored."""
    from trl import TrlParser

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    parser = TrlParser((RunArguments, config_class(method)))
    if use_demo:
        parser.set_defaults_with_config(**DEMO)
    if method in ("sdpo", "sdft", "opsd"):
        parser.set_defaults(mode=method)  # the preset is resolved when the config is built
    run, config = parser.parse_args_and_config(args=argv, fail_with_unknown_args=method == peek_method(argv)[0])[:2]
    return run, config


def train(argv: list[str]) -> dict:
    """Parse, train the method (and the baseline), evaluate before/after, write eval.json and curves.png."""
    from .evaluate import evaluate, format_table
    from .plot import plot_comparison, plot_run
    from .tasks import load_task

    method, config_yaml = peek_method(argv)
    run, config = parse_train_args(argv, method, config_yaml is None)
    model_path = resolve_model(run.model_name_or_path, run.pruned_layers, run.pruned_keep_layers)
    train_dataset = load_task(run.dataset_name, split="train", n=run.train_size, seed=config.seed,
                              **(run.dataset_options or {}))
    root = config.output_dir
    table, methods = {}, [run.method] + ([run.baseline] if run.baseline else [])
    for name in methods:
        method_config = config if name == run.method else parse_train_args(argv, name, config_yaml is None)[1]
        method_config.output_dir = os.path.join(root, name)
        trainer = build_trainer(name, run, method_config, model_path, train_dataset)
        teacher = getattr(trainer, "teacher_model", None)  # a local OPD teacher: also measure closeness to it
        if run.eval_tasks and trainer.accelerator.is_main_process:
            if "before" not in table:
                table["before"] = _evaluate_into(method_config.output_dir, 0, trainer.model, trainer.processing_class,
                                                 run, config, teacher)
                if teacher is not None:  # the teacher's own accuracy: the ceiling of pure distillation
                    table["teacher"] = evaluate(teacher, trainer.processing_class, run.eval_tasks,
                                                **_held_out(run, config), reward_options=run.reward_options)
            else:
                _record(method_config.output_dir, 0, table["before"])
        trainer.train()
        trainer.save_model()
        is_main = trainer.accelerator.is_main_process
        if is_main:
            trainer.state.save_to_json(os.path.join(method_config.output_dir, "trainer_state.json"))
            if run.eval_tasks:
                table[f"after {name}"] = _evaluate_into(method_config.output_dir, trainer.state.global_step,
                                                        trainer.model, trainer.processing_class, run, config,
                                                        teacher if name == run.method else None)
            print(f"plot: {plot_run(method_config.output_dir)}")
        del trainer
    if len(methods) > 1 and is_main:
        print(f"plot: {plot_comparison(root, methods)}")
    if table:
        print(format_table(table))
        for label, per_task in table.items():  # held-out closeness to the teacher (method 'opd')
            for task, r in per_task.items():
                if "reverse_kl" in r:
                    print(f"{label} {task}: held-out reverse KL {r['reverse_kl']:.3f} nats/token, "
                          f"acceptance {r['acceptance']:.3f} ({r['tokens']} student tokens)")
        with open(os.path.join(root, "results.json"), "w") as f:
            json.dump(table, f, indent=2)
    return table


def _record(run_dir: str, step: int, results: dict) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "eval.json"), "w") as f:
        json.dump({task: [{"step": step, **r}] for task, r in results.items()}, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "train"
    if command == "train":
        train(argv)
    elif command == "eval":
        import argparse

        from .evaluate import evaluate_path, format_table

        p = argparse.ArgumentParser(prog="selfdistill eval")
        p.add_argument("--model", required=True)
        p.add_argument("--task", action="append", required=True)
        p.add_argument("--n", type=int, default=50)
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy pass@1; >0: one sample each")
        p.add_argument("--max_new_tokens", type=int, default=64)
        p.add_argument("--output", default=None)
        a = p.parse_args(argv)
        results = evaluate_path(resolve_model(a.model), a.task, a.output, n=a.n, temperature=a.temperature,
                                max_new_tokens=a.max_new_tokens)
        print(format_table({a.model: results}))
    elif command == "plot":
        from .plot import plot_run

        if len(argv) != 1:
            raise SystemExit("usage: selfdistill plot RUN_DIR")
        print(plot_run(argv[0]))
    else:
        raise SystemExit(f"unknown command {command!r}; use train, eval or plot")


if __name__ == "__main__":
    main()
