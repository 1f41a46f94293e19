"""The `selfdistill` command. It only dispatches: each subcommand is a module-level `main(argv)` named in `COMMANDS`.

    selfdistill train [--config recipes/....yaml] [--any_config_field value ...]
    selfdistill eval --model PATH_OR_RUN_DIR [--task arithmetic ...] [--n 50] [--reward_options JSON] [--output FILE]
    selfdistill plot RUN_DIR [--output PNG]
    selfdistill COMMAND --help

`train` (this module's `train(argv)`, the training pipeline) is built on TRL's `TrlParser`: every field of the
method's trainer config (GRPOConfig and ours, or SFTConfig for `method: sft`) is a YAML key or a flag, next to the
run fields of `RunArguments`. With no `--config` it runs the embedded CPU demo (`DEMO`): self-distillation (SDPO) of
SmolLM2-135M-Instruct on two-digit addition with math-verify feedback, against plain GRPO from the same start with
the same rollout budget. It checks its input (method, rewards, dataset, columns) before any model is loaded, writes
the resolved arguments to `run_args.json` in each run folder (which `selfdistill eval` reads), and works under
`accelerate launch -m selfdistill.cli train ...`.
"""

import argparse
import importlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field

import yaml

# Subcommand: ("module:function" taking argv, one-line description). Adding a subcommand is one line here.
COMMANDS = {
    "train": ("selfdistill.cli:train", "train a model (and a baseline), evaluate it before/after, plot its curves"),
    "eval": ("selfdistill.evaluate:main", "held-out pass@1 of a checkpoint or of a `selfdistill train` run folder"),
    "plot": ("selfdistill.plot:main", "draw a run's training curves and held-out evaluations to a PNG"),
    "generate": ("selfdistill.generate:main", "best-of-N synthetic data from a teacher (HF, vLLM, OpenAI API) for SFT"),
    "continual": ("selfdistill.continual:main", "train stages in sequence, evaluate every task after each: forgetting table"),
}

METHODS = ("opd", "sdpo", "sdft", "opsd", "grpo", "sft")
SELF_DISTILL_METHODS = ("sdpo", "sdft", "opsd")

# Dataset columns each registered reward reads (one of each tuple must be present); rewards not listed read none.
REWARD_COLUMNS = {"accuracy": (("solution", "answer"),), "code": (("tests",),)}
# Teacher-context sources of the self-distillation trainer that come from a dataset column (the others, "feedback"
# and "sibling", come from the rollouts).
CONTEXT_COLUMNS = {"solution": "solution", "demonstration": "demonstration", "privileged_context": "privileged_context"}

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


class BadInput(ValueError):
    """A run that cannot start as configured (unknown name, missing column, empty data), found before any compute."""


@dataclass
class RunArguments:
    """What to train and how to judge it; the trainer's own fields come from its config class."""

    method: str = field(default="sdpo", metadata={"help": f"One of {METHODS}."})
    model_name_or_path: str = field(default="smollm2", metadata={"help": "Path, hub id, 'smollm2' or 'smollm2-pruned'."})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "Teacher for method 'opd'."})
    dataset_name: str = field(default="arithmetic", metadata={"help": "Built-in task or hub dataset (selfdistill.tasks)."})
    dataset_options: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments for the task builder (a YAML mapping, or JSON on the "
                                        "command line)."})
    train_file: str | None = field(
        default=None, metadata={"help": "A JSONL file or `save_to_disk` folder to train on instead of dataset_name's "
                                        "train split (e.g. prompt/completion rows for method 'sft')."})
    train_size: int | None = field(default=None, metadata={"help": "Number of training problems (None: the task's)."})
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy"],
                                    metadata={"help": "Registry names (selfdistill.rewards.get_reward) or dotted paths."})
    reward_options: dict | str | None = field(
        default=None, metadata={"help": "Per-reward keyword arguments, by name (YAML mapping or JSON)."})
    eval_tasks: list[str] = field(default_factory=list, metadata={"help": "Held-out tasks evaluated before/after."})
    eval_size: int = field(default=50, metadata={"help": "Held-out problems per eval task."})
    eval_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Tokens generated per held-out problem (None: max_completion_length; 64 for "
                                        "method 'sft', whose config has none)."})
    baseline: str | None = field(default=None, metadata={"help": "'grpo': also train plain GRPO, same start and budget."})
    pruned_layers: int = field(default=15, metadata={"help": "Layers kept by model 'smollm2-pruned' (of 30)."})
    pruned_keep_layers: list[int] | None = field(
        default=None, metadata={"help": "Explicit indices of the layers 'smollm2-pruned' keeps (overrides pruned_layers)."})

    def __post_init__(self):
        for name in ("dataset_options", "reward_options"):  # JSON from the command line, a mapping from YAML
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as error:
                    raise BadInput(f"--{name} must be a JSON object, got {value!r}: {error}") from error
                if not isinstance(value, dict):
                    raise BadInput(f"--{name} must be a JSON object, got {value!r}")
                setattr(self, name, value)


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
        module, _, attr = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as error:
            raise BadInput(f"reward {name!r}: cannot import {attr!r} from {module!r}: {error}") from error
    try:
        return get_reward(name, **options)
    except ValueError as error:  # an unknown name: get_reward's message lists the registered ones
        raise BadInput(str(error)) from error


def load_rewards(run: RunArguments) -> list:
    return [load_reward(name, (run.reward_options or {}).get(name, {})) for name in run.reward_funcs]


def config_class(method: str):
    if method not in METHODS:
        raise BadInput(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "sft":
        from .sft import SFTKLConfig

        return SFTKLConfig
    from trl import GRPOConfig

    from .trainers import OnPolicyDistillConfig, SelfDistillConfig

    return {"opd": OnPolicyDistillConfig, "grpo": GRPOConfig}.get(method, SelfDistillConfig)


def _flag(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` in argv, if given."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def peek_method(argv: list[str]) -> tuple[str, dict | None]:
    """The method (from the flags, the YAML, or the demo) and the YAML config, before the full parse."""
    config = None
    if (path := _flag(argv, "--config")) is not None:
        with open(path) as f:
            config = yaml.safe_load(f)
    return _flag(argv, "--method") or (config or DEMO).get("method", "sdpo"), config


def build_trainer(method: str, run: RunArguments, config, model_path: str, train_dataset, rewards: list):
    """The method's trainer on `train_dataset` with the reward functions `rewards` (unused by 'sft')."""
    if method == "sft":
        from .sft import SFTKLTrainer

        return SFTKLTrainer(model=model_path, args=config, train_dataset=train_dataset)
    from trl import GRPOTrainer

    from .trainers import OnPolicyDistillTrainer, SelfDistillTrainer

    if method == "grpo":
        return GRPOTrainer(model=model_path, reward_funcs=rewards, args=config, train_dataset=train_dataset)
    if method == "opd":  # a local teacher, or None for one served by vLLM (teacher_server_url)
        teacher = None if config.teacher_server_url is not None else resolve_model(run.teacher_model_name_or_path,
                                                                                   run.pruned_layers)
        return OnPolicyDistillTrainer(model=model_path, teacher_model=teacher, reward_funcs=rewards or None,
                                      args=config, train_dataset=train_dataset)
    return SelfDistillTrainer(model=model_path, reward_funcs=rewards, args=config, train_dataset=train_dataset)


def load_train_data(run: RunArguments, config):
    """The training rows: `run.train_file` (JSONL or a `save_to_disk` folder) or the train split of the task
    `run.dataset_name`; shuffled with the run's seed and cut to `train_size` rows when given. Refuses an empty one."""
    from .tasks import TASKS, load_task

    if run.train_file is None:
        if run.dataset_name not in TASKS:
            raise BadInput(f"unknown dataset {run.dataset_name!r}; choose from {', '.join(sorted(TASKS))}, or give "
                           "train_file")
        try:
            dataset = load_task(run.dataset_name, split="train", n=run.train_size, seed=config.seed,
                                **(run.dataset_options or {}))
        except StopIteration as error:  # datasets' JSON reader on an empty file
            raise BadInput(f"dataset {run.dataset_name!r} with {run.dataset_options} is empty") from error
        source = f"dataset {run.dataset_name!r}" + (f" with train_size={run.train_size}" if run.train_size == 0 else "")
    else:
        dataset = _load_rows(run.train_file)
        if run.train_size is not None:
            dataset = dataset.shuffle(seed=config.seed).select(range(min(run.train_size, len(dataset))))
        source = f"train_file {run.train_file!r}" + (" with train_size=0" if run.train_size == 0 else "")
    if len(dataset) == 0:
        raise BadInput(f"the training data is empty: {source} has no rows")
    return dataset


def _load_rows(path: str):
    from datasets import DatasetDict, load_dataset, load_from_disk

    if not os.path.exists(path):
        raise BadInput(f"train_file {path!r} does not exist")
    if os.path.isdir(path):
        dataset = load_from_disk(path)
        return dataset["train"] if isinstance(dataset, DatasetDict) else dataset
    if os.path.getsize(path) == 0:  # datasets' JSON reader raises a bare StopIteration on it
        raise BadInput(f"the training data is empty: train_file {path!r} is an empty file")
    return load_dataset("json", data_files=path, split="train")


def check_inputs(method: str, run: RunArguments, config, dataset) -> None:
    """Refuse, before any model is loaded, a dataset without the columns the method, its rewards or its teacher
    contexts read (checked on the first row's columns), an OPD run without a teacher, and unknown held-out tasks."""
    from .evaluate import TASK_REWARDS

    unknown = [task for task in run.eval_tasks if task not in TASK_REWARDS]
    if unknown:
        raise BadInput(f"unknown eval_tasks {unknown}; choose from {', '.join(sorted(TASK_REWARDS))}")
    columns = set(dataset[0])
    if method == "sft":
        from .sft import as_prompt_completion

        try:
            as_prompt_completion(dataset.select(range(1)))
        except ValueError as error:
            raise BadInput(str(error)) from error
        return
    if "prompt" not in columns:
        raise BadInput(f"method {method!r} needs a 'prompt' column; the dataset has {sorted(columns)}")
    if method == "opd" and config.teacher_server_url is None and run.teacher_model_name_or_path is None:
        raise BadInput("method 'opd' needs teacher_model_name_or_path or --teacher_server_url")
    for name in run.reward_funcs:
        for choices in REWARD_COLUMNS.get(name, ()):
            if not columns & set(choices):
                raise BadInput(f"reward {name!r} needs a dataset column {' or '.join(map(repr, choices))}; the "
                               f"dataset has {sorted(columns)}")
    if method in SELF_DISTILL_METHODS:
        sources = config.context_sources
        needed = {CONTEXT_COLUMNS[s] for s in sources if s in CONTEXT_COLUMNS}
        if needed and len(needed) == len(sources) and not columns & needed:
            raise BadInput(f"context_sources {list(sources)} read the column(s) {sorted(needed)}, none of which the "
                           f"dataset has ({sorted(columns)}): the teacher would never see a context")


def _held_out(run: RunArguments, config) -> dict:
    """The held-out problems and generation length every evaluation of a run uses (model, baseline and teacher)."""
    from .evaluate import MAX_NEW_TOKENS

    max_new_tokens = run.eval_max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = getattr(config, "max_completion_length", None) or MAX_NEW_TOKENS
    return dict(n=run.eval_size, seed=config.seed, max_new_tokens=max_new_tokens,
                task_options={run.dataset_name: run.dataset_options or {}})


def _evaluate_into(run_dir: str, label_step: int, model, tokenizer, run: RunArguments, config,
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


def write_run_args(run_dir: str, run: RunArguments, config) -> str:
    """`run_dir/run_args.json`: the resolved run fields, the trainer config, and the held-out evaluation settings
    (`evaluation`: tasks, n, seed, max_new_tokens, task_options, reward_options), which `selfdistill eval` reads
    when given this folder, so it grades as the run did."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "run_args.json")
    evaluation = {"tasks": run.eval_tasks, **_held_out(run, config), "reward_options": run.reward_options or {}}
    with open(path, "w") as f:
        json.dump({"run": asdict(run), "config": json.loads(config.to_json_string()), "evaluation": evaluation}, f,
                  indent=2)
    return path


TRAIN_DESCRIPTION = (
    "Train a model with one method (and optionally a baseline), evaluate it on held-out problems before and after, "
    "and plot its curves. Every field of the method's config is a flag or a YAML key (--config); the fields listed "
    "are those of the method given by --method or the YAML (default: the embedded CPU demo, SDPO vs GRPO on "
    "SmolLM2): see 'selfdistill train --method sft --help' for another method's. Methods: " + ", ".join(METHODS) + "."
)


def parse_train_args(argv: list[str], method: str, use_demo: bool):
    """`(RunArguments, config)` for `method`. A baseline is parsed from the same arguments with its own config
    class, so it gets the same GRPO fields (same rollout budget); fields it lacks are ignored."""
    from trl import TrlParser

    parser = TrlParser((RunArguments, config_class(method)), prog="selfdistill train", description=TRAIN_DESCRIPTION)
    if use_demo:  # the demo's baseline belongs to the demo's method; another method on the demo's defaults has none
        parser.set_defaults_with_config(**{k: v for k, v in DEMO.items() if k != "baseline" or method == DEMO["method"]})
    if method in SELF_DISTILL_METHODS:
        parser.set_defaults(mode=method)  # the preset is resolved when the config is built
    try:
        run, config = parser.parse_args_and_config(args=argv, fail_with_unknown_args=method == peek_method(argv)[0])[:2]
    except ValueError as error:  # unknown fields, or a config's own checks (__post_init__): all bad input
        hint = ""
        if "divisible by num_generations" in str(error):  # GRPOConfig's check of the generation batch
            hint = (" Each prompt's num_generations rollouts must fit whole in a generation batch, which is "
                    "per_device_train_batch_size x steps_per_generation (default: gradient_accumulation_steps) x the "
                    "number of processes, unless generation_batch_size is set.")
        raise BadInput(f"{error}{hint}") from error
    return run, config


def train(argv: list[str]) -> dict:
    """Parse and check the input, train the method (and the baseline), evaluate before/after, write run_args.json,
    eval.json and curves.png."""
    from .evaluate import evaluate, format_table
    from .plot import plot_comparison, plot_run

    method, config_yaml = peek_method(argv)
    run, config = parse_train_args(argv, method, config_yaml is None)
    methods = [run.method] + ([run.baseline] if run.baseline else [])
    configs = {name: config if name == run.method else parse_train_args(argv, name, config_yaml is None)[1]
               for name in methods}  # a bad baseline fails here, not after the method has trained
    train_dataset = load_train_data(run, config)
    rewards = load_rewards(run) if any(name != "sft" for name in methods) else []
    for name in methods:
        check_inputs(name, run, configs[name], train_dataset)
    model_path = resolve_model(run.model_name_or_path, run.pruned_layers, run.pruned_keep_layers)
    root = config.output_dir
    table = {}
    for name in methods:
        method_config = configs[name]
        method_config.output_dir = os.path.join(root, name)
        trainer = build_trainer(name, run, method_config, model_path, train_dataset, rewards)
        teacher = getattr(trainer, "teacher_model", None)  # a local OPD teacher: also measure closeness to it
        is_main = trainer.accelerator.is_main_process
        if is_main:
            write_run_args(method_config.output_dir, run, method_config)
        if run.eval_tasks and is_main:
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


def command_parser() -> argparse.ArgumentParser:
    """The top-level parser: it reads the subcommand only (the subcommand parses the rest)."""
    listing = "\n".join(f"  {name:<7} {description}" for name, (_, description) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="selfdistill", usage="selfdistill {" + ",".join(COMMANDS) + "} [ARGS ...]",
        description="On-policy distillation and self-distillation for TRL: train, evaluate and plot.",
        epilog=f"commands:\n{listing}\n\n'selfdistill COMMAND --help' describes one.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = command_parser().parse_args(argv[:1]).command  # exits on --help, a missing or an unknown command
    module, _, function = COMMANDS[command][0].partition(":")
    try:
        getattr(importlib.import_module(module), function)(argv[1:])
    except BadInput as error:
        print(f"selfdistill {command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
