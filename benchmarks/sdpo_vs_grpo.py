"""Self-distillation (SDPO) against GRPO at an equal rollout budget: arms × tasks × seeds on SmolLM2-135M-Instruct.

Every arm starts from the same checkpoint and gets the same budget (`BUDGET`: steps × rollouts per step, learning
rate, completion length); an arm changes only what it names (`ARMS`: the objective, the teacher, the context, the
feedback text, the templates, the temperature, the group size at the same rollout count). The grader is the hardened
`MathAccuracy` (numeric golds demand one number; `last_number=True` because SmolLM2 answers in sentences, not boxes),
the same in training and evaluation for every arm. Held-out greedy pass@1 is measured at `--eval_steps` on
`--eval_size` problems of the task's test split, drawn with the run's seed (`selfdistill.evaluate.evaluate`).

One result file per (task, arm, seed), `OUT/<task>/<arm>/seed<N>.json`, written atomically when the arm ends: the
held-out curve, the held-out answers before and after (graded, with feedback), tokens, wall and CPU time (training
only, evaluations excluded), the trainer's log history, the exact settings and the resolved trainer config. A finished (task, arm, seed) is never run again, so an interrupted
study resumes where it stopped; a result made with other settings than the script's stops the run (delete it, or
use another `--output`). Arms run in `--workers` parallel processes, each on one torch thread under `nice`
(the machine this was written on has 2 shared cores). `summary_<stage>.md`, `summary_<stage>.json` and `curves_<stage>_<task>.png` (mean
pass@1 per checkpoint, shaded from the worst to the best seed) are rewritten from every result on disk.

`--diagnose` measures before choosing what to sweep: on a few batches of rollouts sampled from the starting model,
what the teacher with each arm's context prefers on the student's tokens, on failed and on successful rollouts,
and where the sampled-token advantage `a_t = log T(x_t | context) − log S(x_t)` has the wrong sign (positive on a
failed rollout's answer, negative on a successful one's); and the teacher's own greedy reply to its context (what
a logit-level term pulls the student towards). All arms score the same rollouts.

The stages of the study (README, "Self-distillation study", says what each found and why the next was chosen):

    python benchmarks/sdpo_vs_grpo.py --diagnose --arms sdpo-paper paper-feedback paper-sibling paper-noreveal \
        paper-steps paper-noreveal-steps sdpo-qlast --seeds 100 101
    python benchmarks/sdpo_vs_grpo.py --stage screen        # the paper's templates or question-last, vs GRPO
    python benchmarks/sdpo_vs_grpo.py --stage screen2       # one change at a time on the question-last templates
    python benchmarks/sdpo_vs_grpo.py --stage sweep --eval_steps 0 12   # the rest of the list, one change at a time
    python benchmarks/sdpo_vs_grpo.py --stage demo          # the chosen preset vs GRPO on the README demo's seeds 0-2
    python benchmarks/sdpo_vs_grpo.py --stage confirm       # the chosen preset vs GRPO, add2 + add3, 5 fresh seeds
    python benchmarks/sdpo_vs_grpo.py --stage confirm-t1    # GRPO at T=1 on the same fresh seeds of add2
    python benchmarks/sdpo_vs_grpo.py --stage word          # the worked-steps word problems, 3 fresh seeds
    python benchmarks/sdpo_vs_grpo.py --stage confirm --summary   # tables and figures only, from the files

Any selection can be given explicitly: `--tasks add2 --arms grpo sdpo --seeds 0 1 2`. Screening seeds (100+) and
confirmation seeds (0-2, 200+) differ, so the reported held-out problems and training draws were never used to choose.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from selfdistill.cli import DEMO
from selfdistill.context import (
    FEEDBACK_TEMPLATE,
    QUESTION_LAST_FEEDBACK_TEMPLATE,
    QUESTION_LAST_REPROMPT_TEMPLATE,
    QUESTION_LAST_SOLUTION_TEMPLATE,
    REPROMPT_TEMPLATE,
    SOLUTION_TEMPLATE,
)

HERE = os.path.dirname(os.path.abspath(__file__))
ANSWER = "Answer with just the number."

# The demo's budget (README, "Demo"): 12 steps × 8 rollouts (one prompt per step), lr 2e-5, 32 completion tokens; the
# study evaluates and seeds its runs itself.
NOT_BUDGET = ("method", "baseline", "dataset_options", "eval_tasks", "eval_size", "output_dir", "seed")
BUDGET = {k: v for k, v in DEMO.items() if k not in NOT_BUDGET} | {"disable_tqdm": True}

TASKS = {  # name: options of the built-in arithmetic task (selfdistill.tasks.arithmetic)
    "add2": {"difficulty": 2, "instruction": ANSWER},
    "add3": {"difficulty": 3, "operations": "+", "instruction": ANSWER},
    # Two-step word problems; the worked solution is a dataset column the teacher may be shown.
    "word": {"difficulty": 5, "worked_steps": True, "instruction": ANSWER},
}

# The `sdpo` preset as it was before this study (the SDPO paper's code and `trl.experimental.sdpo`: feedback and
# sibling context, EMA teacher 0.05, JSD β=0.5 on the student's top-100 with a tail, IS clip 2, the paper's
# templates; policy_weight 1), spelled out so that every arm keeps its meaning whatever the preset becomes.
PAPER = {"method": "sdpo", "context_sources": ["feedback", "sibling"], "teacher": "ema", "teacher_update_rate": 0.05,
         "objective": "logits", "distill_beta": 0.5, "distill_top_k": 100, "distill_add_tail": True,
         "distill_is_clip": 2.0, "success_threshold": 1.0, "policy_weight": 1.0,
         "reprompt_template": REPROMPT_TEMPLATE, "solution_template": SOLUTION_TEMPLATE,
         "feedback_template": FEEDBACK_TEMPLATE}
# Context first, question last: the teacher answers the question itself, as the student does, instead of writing the
# "revised answer" that the paper's reprompt ("Correctly solve the original question") invites.
QLAST = PAPER | {"reprompt_template": QUESTION_LAST_REPROMPT_TEMPLATE,
                 "solution_template": QUESTION_LAST_SOLUTION_TEMPLATE,
                 "feedback_template": QUESTION_LAST_FEEDBACK_TEMPLATE}
NO_REVEAL = {"reward_options": {"accuracy": {"reveal_solution": False, "last_number": True}}}
STEPS = {"dataset_options": {"worked_steps": True}, "context_sources": ["feedback", "sibling", "privileged_context"]}

# Arm name: the method and what it changes from BUDGET.
ARMS = {
    "grpo": {"method": "grpo"},
    "grpo-t1": {"method": "grpo", "temperature": 1.0},
    "sdpo": {"method": "sdpo"},  # the library's `sdpo` preset as it is now (the study's choice)
    "sdpo-steps": {"method": "sdpo", **STEPS},  # the preset, also shown the dataset's worked solution
    "sdpo-paper": PAPER,
    # the context sources and the feedback text (only "incorrect", or why: the worked steps), for --diagnose
    "paper-feedback": PAPER | {"context_sources": ["feedback"]},
    "paper-sibling": PAPER | {"context_sources": ["sibling"]},
    "paper-noreveal": PAPER | NO_REVEAL,
    "paper-steps": PAPER | STEPS,
    "paper-noreveal-steps": PAPER | NO_REVEAL | STEPS,
    # the reprompt template
    "sdpo-qlast": QLAST,
    # stage 2: one change at a time on top of the question-last templates
    "qlast-sampled": QLAST | {"objective": "sampled_token"},  # kl_coef 1, no logit-level term
    "qlast-pw0": QLAST | {"policy_weight": 0.0},
    "qlast-live": QLAST | {"teacher": "live"},
    "qlast-t1": QLAST | {"temperature": 1.0},
    "qlast-feedback": QLAST | {"context_sources": ["feedback"]},
    "qlast-steps": QLAST | STEPS,
    # stage 3 (sweep): the rest of the list, one change at a time on the preset, in order of priority
    "qlast-noreveal": QLAST | NO_REVEAL,  # the feedback says only that the answer is wrong
    "qlast-sibling": QLAST | {"context_sources": ["sibling"]},
    "qlast-base": QLAST | {"teacher": "base", "teacher_update_rate": 0.0},  # the frozen start as teacher
    "qlast-ema0.2": QLAST | {"teacher_update_rate": 0.2},
    "qlast-kl1": QLAST | {"kl_coef": 1.0},  # the sampled-token advantage added to the logit-level term
    "qlast-beta0": QLAST | {"distill_beta": 0.0},  # forward KL(T‖S), SDFT's
    "qlast-beta1": QLAST | {"distill_beta": 1.0},  # reverse KL(S‖T), on-policy distillation's
    "qlast-top20": QLAST | {"distill_top_k": 20},
    "qlast-notail": QLAST | {"distill_add_tail": False},
}

SCREEN_SEEDS, CONFIRM_SEEDS = [100, 101], [200, 201, 202, 203, 204]
STAGES = {  # name: (tasks, arms, seeds); README "Self-distillation study" says why each stage holds what it holds
    # Stage 1: the preset against the template the diagnosis pointed at (leakage 14% -> 2% of the teacher's replies).
    "screen": (["add2"], ["grpo", "sdpo-paper", "sdpo-qlast"], SCREEN_SEEDS),
    # Stage 2: one change at a time on top of it, in order of priority (a cut-short stage keeps the important arms).
    "screen2": (["add2"], ["qlast-sampled", "qlast-pw0", "qlast-live"], SCREEN_SEEDS),
    # Stage 3: the temperature, feedback text, context sources, teacher, kl_coef and objective, one at a time; GRPO
    # and the preset are re-run in it because its runs evaluate at other steps (`--eval_steps 0 12`).
    "sweep": (["add2"], ["grpo", "sdpo", "grpo-t1", "qlast-t1", "qlast-noreveal", "qlast-feedback", "qlast-sibling",
                         "qlast-base", "qlast-ema0.2", "qlast-kl1", "qlast-beta0", "qlast-beta1", "qlast-top20",
                         "qlast-notail"], SCREEN_SEEDS),
    # The chosen preset (the library's `sdpo` now) against GRPO on fresh seeds, on both additions.
    "confirm": (["add2", "add3"], ["grpo", "sdpo"], CONFIRM_SEEDS),
    # GRPO at T=1, which did better than at the budget's 0.7 on the sweep's screening seeds, on the same fresh seeds.
    "confirm-t1": (["add2"], ["grpo-t1"], CONFIRM_SEEDS),
    # The README demo's seeds (`selfdistill train --seed N` trains exactly these runs; it evaluates the first 50).
    "demo": (["add2"], ["grpo", "sdpo"], [0, 1, 2]),
    # Feedback that carries more than the answer: the worked solution shown to the teacher only.
    "word": (["word"], ["grpo", "sdpo-steps"], CONFIRM_SEEDS[:3]),
}


# The resolved trainer fields a result records (besides distill_* and teacher*), whatever the preset said.
RECORDED = ("mode", "policy_weight", "kl_coef", "objective", "context_sources", "success_threshold", "temperature",
            "num_generations", "learning_rate", "max_steps", "per_device_train_batch_size", "max_completion_length",
            "reprompt_template", "solution_template", "feedback_template", "seed")


def settings_of(task: str, arm: str, seed: int, args) -> dict:
    """The full settings of one run: BUDGET, the task's options, the arm's changes, the seed and the CLI's."""
    spec = json.loads(json.dumps(ARMS[arm]))  # a deep copy
    settings = json.loads(json.dumps(BUDGET)) | {"dataset_options": dict(TASKS[task])}
    settings["dataset_options"] |= spec.pop("dataset_options", {})
    settings |= spec
    settings |= {"seed": seed, "max_steps": args.steps, "eval_size": args.eval_size, "held_out_steps": args.eval_steps}
    if args.model:
        settings["model_name_or_path"] = args.model
    return settings


def result_path(out: str, task: str, arm: str, seed: int) -> str:
    return os.path.join(out, task, arm, f"seed{seed}.json")


def write_json(path: str, data) -> None:
    """Write atomically: a crash leaves the old file or none, never half of one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), suffix=".tmp", delete=False) as f:
        json.dump(data, f, indent=1)
    os.replace(f.name, path)


# ---------------------------------------------------------------------------------------------- one run (a child)

def _build(settings: dict, output_dir: str):
    """`(run, config, model_path, train_dataset)` from flat settings, through the CLI's own building blocks."""
    from selfdistill import cli
    from selfdistill.tasks import load_task

    method = settings["method"]
    run_fields = {f.name for f in dataclasses.fields(cli.RunArguments)}
    config_class = cli.config_class(method)
    config_fields = {f.name for f in dataclasses.fields(config_class)} - run_fields
    run = cli.RunArguments(**{k: v for k, v in settings.items() if k in run_fields},
                           eval_tasks=["arithmetic"])
    preset = {"mode": method} if method in ("sdpo", "sdft", "opsd") else {}
    config = config_class(output_dir=output_dir, use_cpu=True, **preset,
                          **{k: v for k, v in settings.items() if k in config_fields})
    model_path = cli.resolve_model(run.model_name_or_path)
    train_dataset = load_task(run.dataset_name, split="train", n=run.train_size, seed=config.seed,
                              **run.dataset_options)
    return run, config, model_path, train_dataset


def _held_out(model, tokenizer, run, config) -> tuple[float, list]:
    """Held-out greedy pass@1 and every answer with its grade and feedback, exactly as the CLI's runs evaluate."""
    from selfdistill import cli
    from selfdistill.evaluate import evaluate

    result = evaluate(model, tokenizer, ["arithmetic"], **cli._held_out(run, config),
                      reward_options=run.reward_options, answers=True)["arithmetic"]
    return result["pass@1"], result["answers"]


def run_one(task: str, arm: str, seed: int, args) -> dict:
    """Train one arm on one task and seed, evaluating at `eval_steps`; write and return its result."""
    from transformers import TrainerCallback

    from selfdistill import cli

    settings = settings_of(task, arm, seed, args)
    with tempfile.TemporaryDirectory(prefix="sdpo_vs_grpo-") as output_dir:
        run, config, model_path, train_dataset = _build(settings, output_dir)
        trainer = cli.build_trainer(settings["method"], run, config, model_path, train_dataset,
                                    cli.load_rewards(run))
        tokenizer = trainer.processing_class
        base_path = os.path.join(args.output, task, "_before", f"seed{seed}.json")
        if os.path.exists(base_path):  # the start is the same for every arm of a (task, seed): evaluated once
            before = json.load(open(base_path))
        else:
            accuracy, answers = _held_out(trainer.model, tokenizer, run, config)
            before = {"pass@1": accuracy, "answers": answers, "settings": {"seed": seed, "task": task}}
            write_json(base_path, before)
        curve = [{"step": 0, "pass@1": before["pass@1"]}]
        timing = {"eval_s": 0.0, "eval_cpu_s": 0.0}

        class HeldOut(TrainerCallback):
            def on_step_end(self, args_, state, control, model=None, **kwargs):
                if state.global_step in settings["held_out_steps"] and state.global_step != 0:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    accuracy, answers = _held_out(model, tokenizer, run, config)
                    curve.append({"step": state.global_step, "pass@1": accuracy})
                    timing["answers"] = answers
                    timing["eval_s"] += time.perf_counter() - start
                    timing["eval_cpu_s"] += time.process_time() - start_cpu

        trainer.add_callback(HeldOut())
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.train()
        wall = time.perf_counter() - start - timing["eval_s"]
        cpu = time.process_time() - start_cpu - timing["eval_cpu_s"]  # steadier than wall time on a shared machine
        history = trainer.state.log_history
    steps = [h for h in history if "reward" in h]
    result = {
        "task": task, "arm": arm, "seed": seed, "settings": settings,
        "curve": curve, "final": curve[-1]["pass@1"],
        "answers_before": before["answers"], "answers_after": timing.get("answers", []),
        "config": {k: v for k, v in config.to_dict().items() if k in RECORDED or k.startswith(("distill", "teacher"))},
        "train_wall_s": wall, "train_cpu_s": cpu, "eval_wall_s": timing["eval_s"],
        "tokens": steps[-1].get("num_tokens") if steps else None,
        "completion_tokens": sum(h["completions/mean_length"] * config.per_device_train_batch_size for h in steps),
        "rollouts": config.max_steps * config.per_device_train_batch_size * config.gradient_accumulation_steps,
        "log_history": history,
    }
    write_json(result_path(args.output, task, arm, seed), result)
    return result


# ------------------------------------------------------------------------------------------- the study (parent)

def _existing(path: str, settings: dict) -> bool:
    if not os.path.exists(path):
        return False
    done = json.load(open(path))["settings"]
    if done != settings:
        changed = sorted(k for k in set(done) | set(settings) if done.get(k) != settings.get(k))
        raise SystemExit(f"{path} was made with other settings ({', '.join(changed)} differ); delete it or use "
                         "another --output")
    return True


def _child_argv(args, task: str, arm: str, seed: int) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--output", args.output, "--steps", str(args.steps),
            "--eval_size", str(args.eval_size), "--eval_steps", *map(str, args.eval_steps),
            "--run_one", task, arm, str(seed)]
    return argv + (["--model", args.model] if args.model else [])


def run_study(args, jobs: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Run the jobs not yet on disk, `args.workers` at a time, each in its own process on one torch thread under
    nice; a job's output goes to its log file. Returns the jobs that were run."""
    from tqdm.auto import tqdm

    todo = [job for job in jobs if not _existing(result_path(args.output, *job), settings_of(*job, args))]
    print(f"{len(jobs)} runs selected, {len(jobs) - len(todo)} already done, {len(todo)} to run", flush=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "HF_HUB_OFFLINE": "1"}
    failed = []

    def launch(job):
        if args.workers == 0:  # in this process (debugging, tests): its output on this terminal
            try:
                run_one(*job, args)
            except Exception as error:  # noqa: BLE001 - reported with the other failures below
                failed.append((job, repr(error)))
            return job
        log_path = result_path(args.output, *job).replace(".json", ".log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "w") as log:
            code = subprocess.run(_child_argv(args, *job), stdout=log, stderr=subprocess.STDOUT, env=env,
                                  preexec_fn=lambda: os.nice(args.nice)).returncode
        if code != 0:
            failed.append((job, log_path))
        return job

    with ThreadPoolExecutor(max(1, args.workers)) as pool, tqdm(total=len(todo), desc="runs") as bar:
        # --workers 0 runs in this thread: a trainer is happier on the main thread
        for task, arm, seed in map(launch, todo) if args.workers == 0 else pool.map(launch, todo):
            path = result_path(args.output, task, arm, seed)
            if os.path.exists(path):
                bar.write(f"done {task} {arm} seed {seed}: held-out pass@1 {json.load(open(path))['final']}")
            else:
                bar.write(f"FAILED {task} {arm} seed {seed}: see its log")
            bar.update()
    if failed:
        raise SystemExit("failed runs (see their logs): " + "; ".join(f"{j} {why}" for j, why in failed))
    return todo


def load_results(out: str) -> list[dict]:
    results = []
    for task in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        for arm in sorted(os.listdir(os.path.join(out, task))) if task in TASKS else []:
            folder = os.path.join(out, task, arm)
            for name in sorted(os.listdir(folder)) if arm in ARMS else []:
                if name.startswith("seed") and name.endswith(".json"):
                    results.append(json.load(open(os.path.join(folder, name))))
    return results


def summarize(results: list[dict]) -> dict:
    """`{task: {arm: {...}}}`: held-out pass@1 per checkpoint over seeds (mean, min, max, median, per seed), tokens
    and training wall time per run (means)."""
    import statistics

    table: dict = {}
    for r in results:
        table.setdefault(r["task"], {}).setdefault(r["arm"], []).append(r)
    summary = {}
    for task, arms in table.items():
        summary[task] = {}
        for arm, runs in arms.items():
            runs.sort(key=lambda r: r["seed"])
            steps = sorted({p["step"] for r in runs for p in r["curve"]})
            at = {s: [p["pass@1"] for r in runs for p in r["curve"] if p["step"] == s] for s in steps}
            summary[task][arm] = {
                "seeds": [r["seed"] for r in runs],
                "final": [r["final"] for r in runs],
                "curve": {s: {"mean": statistics.mean(v), "min": min(v), "max": max(v),
                              "median": statistics.median(v), "n": len(v)} for s, v in at.items()},
                "tokens": statistics.mean(r["tokens"] or 0 for r in runs),
                "completion_tokens": statistics.mean(r["completion_tokens"] for r in runs),
                "train_wall_s": statistics.mean(r["train_wall_s"] for r in runs),
                "train_cpu_s": statistics.mean(r.get("train_cpu_s", float("nan")) for r in runs),
            }
    return summary


def format_summary(summary: dict) -> str:
    lines = []
    for task, arms in summary.items():
        steps = sorted({s for a in arms.values() for s in a["curve"]})
        lines += [f"\n### {task}", "",
                  "| arm | seeds | " + " | ".join(f"step {s} mean [min, max]" for s in steps)
                  + " | final per seed | tokens/run | completion tokens/run | train wall s/run | train CPU s/run |",
                  "|---|---|" + "---:|" * len(steps) + "---|---:|---:|---:|---:|"]
        for arm, a in sorted(arms.items(), key=lambda item: -item[1]["curve"][steps[-1]]["mean"]
                             if steps[-1] in item[1]["curve"] else 0):
            cells = [f"{c['mean']:.3f} [{c['min']:.2f}, {c['max']:.2f}]" if (c := a["curve"].get(s)) else ""
                     for s in steps]
            lines.append(f"| {arm} | {len(a['seeds'])} | " + " | ".join(cells)
                         + f" | {', '.join(f'{v:.2f}' for v in a['final'])} | {a['tokens']:.0f} | "
                         f"{a['completion_tokens']:.0f} | {a['train_wall_s']:.0f} | {a['train_cpu_s']:.0f} |")
    return "\n".join(lines)


def plot_curves(summary: dict, prefix: str) -> list[str]:
    """One PNG per task: mean held-out pass@1 per checkpoint, shaded between the worst and the best seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from selfdistill.plot import _save

    paths = []
    for task, per_arm in summary.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, a in per_arm.items():
            steps = sorted(a["curve"], key=int)
            mean = [a["curve"][s]["mean"] for s in steps]
            line, = ax.plot([int(s) for s in steps], mean, marker="o", label=f"{arm} ({len(a['seeds'])} seeds)")
            ax.fill_between([int(s) for s in steps], [a["curve"][s]["min"] for s in steps],
                            [a["curve"][s]["max"] for s in steps], color=line.get_color(), alpha=0.15)
        ax.set_title(f"{task}: held-out pass@1 (greedy), mean and min-max over seeds")
        ax.set_xlabel("step")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        paths.append(_save(fig, f"{prefix}_{task}.png"))
    return paths


def report(args, jobs: list[tuple[str, str, int]]) -> dict:
    """Summary of the selected jobs found on disk: printed, and saved as summary.md/.json and curves PNGs."""
    selected = set(jobs)
    results = [r for r in load_results(args.output) if (r["task"], r["arm"], r["seed"]) in selected]
    summary = summarize(results)
    text = format_summary(summary)
    print(text)
    name = args.stage or "selection"
    with open(os.path.join(args.output, f"summary_{name}.md"), "w") as f:
        f.write(text + "\n")
    write_json(os.path.join(args.output, f"summary_{name}.json"), summary)
    for path in plot_curves(summary, os.path.join(args.output, f"curves_{name}")):
        print(f"plot: {path}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stage", choices=sorted(STAGES), help="a predefined selection of tasks, arms and seeds")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS))
    p.add_argument("--arms", nargs="+", choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--output", default="runs/sdpo_vs_grpo")
    p.add_argument("--model", default=None, help="a model path instead of SmolLM2 (the tests' fixture)")
    p.add_argument("--steps", type=int, default=BUDGET["max_steps"])
    p.add_argument("--eval_steps", nargs="+", type=int, default=[0, 4, 12])
    p.add_argument("--eval_size", type=int, default=100)
    p.add_argument("--workers", type=int, default=2,
                   help="parallel runs, each its own process on one torch thread; 0: one at a time in this process")
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--summary", action="store_true", help="only summarize what is on disk")
    p.add_argument("--diagnose", action="store_true", help="the teacher's signal on sampled rollouts (no training)")
    p.add_argument("--batches", type=int, default=4, help="--diagnose: prompts (groups of rollouts) per seed")
    p.add_argument("--run_one", nargs=3, metavar=("TASK", "ARM", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_one:  # a child of run_study
        import torch

        torch.set_num_threads(1)
        task, arm, seed = args.run_one
        return run_one(task, arm, int(seed), args)
    tasks, arms, seeds = STAGES[args.stage] if args.stage else ([], [], [])
    tasks, arms, seeds = args.tasks or tasks, args.arms or arms, args.seeds or seeds
    if not (tasks and arms and seeds):
        p.error("choose a --stage, or --tasks, --arms and --seeds")
    if args.diagnose:
        sys.path.insert(0, HERE)
        from sdpo_diagnose import diagnose

        return diagnose(args, tasks, arms, seeds)
    jobs = [(task, arm, seed) for arm in arms for task in tasks for seed in seeds]  # arm by arm, in stage order
    ran = [] if args.summary else run_study(args, jobs)
    summary = report(args, jobs)
    return {"ran": ran, "summary": summary}


if __name__ == "__main__":
    main()
