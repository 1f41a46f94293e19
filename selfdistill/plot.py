"""PNG curves of a run from the trainer's log history (`trainer_state.json`) and its eval points (`eval.json`).

`selfdistill plot RUN_DIR [--output PNG]` is `main(argv)`; a run of any method (GRPO, the distillation trainers, SFT)
gets a panel per curve it logged and one for its held-out pass@1; a `selfdistill continual` folder (with
`forgetting.json`) gets its forgetting plot (`plot_forgetting`).
"""

import argparse
import glob
import json
import os
import sys

# Panels: title → the logged keys drawn in it (DenseDistillTrainer's docstring says what each metric is).
PANELS = {
    "training loss": ["loss"],
    "reward": ["reward"],
    "KL to the starting model (SFT)": ["kl_to_start"],
    "reverse KL (sampled tokens)": ["distill/reverse_kl"],
    "acceptance estimate": ["distill/acceptance"],
    "share with a teacher signal": ["distill/frac_with_teacher", "distill/frac_tokens_with_teacher"],
    "teacher − student log-prob": ["distill/logp_gap"],
    "advantage RMS": ["distill/adv_rms_policy", "distill/adv_rms_distill"],
    "gradient norm at the logits": ["distill/grad_norm_logits_policy", "distill/grad_norm_logits_distill"],
    "top-k support mass": ["distill/support_mass_student", "distill/support_mass_teacher"],
    "teacher context points the right way": ["self_distill/teacher_helps_failed",
                                             "self_distill/teacher_helps_succeeded"],
    "context leakage (share of completions)": ["self_distill/context_leakage"],
}
COLUMNS = 4


def log_history(run_dir: str) -> list[dict]:
    """The log history in `run_dir/trainer_state.json`, or in its newest checkpoint's."""
    candidates = [os.path.join(run_dir, "trainer_state.json")]
    candidates += sorted(glob.glob(os.path.join(run_dir, "checkpoint-*", "trainer_state.json")),
                         key=lambda p: int(p.split("checkpoint-")[-1].split(os.sep)[0]), reverse=True)
    for path in candidates:
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)["log_history"]
    raise FileNotFoundError(f"no trainer_state.json in {run_dir} or its checkpoints")


def panels_of(history: list[dict]) -> dict[str, dict[str, list[tuple]]]:
    """`{panel title: {key: [(step, value)]}}` for the `PANELS` whose keys a log history holds. A curve that never
    moves (pure distillation: reward 0, every rollout with a teacher) says nothing and is left out."""
    panels = {}
    for title, keys in PANELS.items():
        curves = {key: [(h["step"], h[key]) for h in history if key in h] for key in keys}
        curves = {key: points for key, points in curves.items()
                  if points and (len(points) < 2 or len({v for _, v in points}) > 1 or key == "loss")}
        if curves:
            panels[title] = curves
    return panels


def plot_run(run_dir: str, output: str | None = None) -> str:
    """Write one PNG with a panel per logged curve (and eval pass@1 points when `eval.json` exists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panels_of(log_history(run_dir))
    eval_path = os.path.join(run_dir, "eval.json")
    evals = json.load(open(eval_path)) if os.path.exists(eval_path) else {}
    count = len(panels) + bool(evals)
    if count == 0:
        raise ValueError(f"nothing to plot in {run_dir}: none of {sum(PANELS.values(), [])} was logged")
    rows, columns = -(-count // COLUMNS), min(count, COLUMNS)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[count:]:
        ax.set_visible(False)
    for ax, (title, curves) in zip(axes, panels.items()):
        for key, points in curves.items():
            ax.plot(*zip(*points), marker=".", label=key.split("/")[-1] if len(curves) > 1 else "training batches")
            field = key.split("/")[-1]  # held-out reverse_kl / acceptance, in eval.json for method 'opd'
            for task, evaluated in evals.items():
                held_out = [(p["step"], p[field]) for p in evaluated if field in p]
                if held_out:
                    ax.plot(*zip(*held_out), marker="o", linestyle="--", label=f"held-out {task}")
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
    if evals:
        ax = axes[count - 1]
        for task, points in evals.items():
            ax.plot([p["step"] for p in points], [p["pass@1"] for p in points], marker="o", label=task)
        ax.set_title("held-out pass@1")
        ax.set_xlabel("step")
        ax.legend()
    return _save(fig, output or os.path.join(run_dir, "curves.png"))


def plot_comparison(root: str, methods: list[str], output: str | None = None) -> str:
    """One PNG comparing runs `root/<method>` (a method and its baseline): training reward and held-out pass@1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (reward_ax, eval_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    for method in methods:
        run_dir = os.path.join(root, method)
        points = [(h["step"], h["reward"]) for h in log_history(run_dir) if "reward" in h]
        if points:
            reward_ax.plot(*zip(*points), marker=".", label=method)
        eval_path = os.path.join(run_dir, "eval.json")
        for task, evaluated in (json.load(open(eval_path)) if os.path.exists(eval_path) else {}).items():
            eval_ax.plot([p["step"] for p in evaluated], [p["pass@1"] for p in evaluated], marker="o",
                         label=f"{method} ({task})")
    for ax, title in ((reward_ax, "training reward (batch mean)"), (eval_ax, "held-out pass@1 (greedy)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    return _save(fig, output or os.path.join(root, "curves.png"))


def plot_forgetting(result: dict | str, output: str | None = None) -> str:
    """One PNG for a `selfdistill continual` report (`forgetting.json`, or its dict): a panel per evaluated row,
    its value at the start and after each stage, one line per arm (mean over seeds, error bars ±1 standard
    deviation). `output` defaults to `forgetting.png` next to a report file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(result, str):
        output = output or os.path.join(os.path.dirname(result), "forgetting.png")
        with open(result) as f:
            result = json.load(f)
    if not result["summary"]:
        raise ValueError("nothing to plot: no arm has finished all its stages yet")
    rows, stages, arms = result["rows"], result["stages"], result["summary"]
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.4), squeeze=False)
    for ax, row in zip(axes[0], rows):
        for i, (arm, summary) in enumerate(arms.items()):
            cells, seeds = summary["table"][row], summary["seeds"]
            shift = (i - (len(arms) - 1) / 2) * 0.05  # arms side by side, so their error bars do not overlap
            ax.errorbar([s + shift for s in range(len(stages))], [c["mean"] for c in cells],
                        yerr=[c["std"] for c in cells], marker="o", capsize=3,
                        label=f"{arm} ({seeds} seed{'s' * (seeds != 1)})")
        ax.set_xticks(range(len(stages)), stages, rotation=15)
        if row == "kl_from_start":
            ax.set_title("KL from the start (nats/token)")
        else:
            ax.set_title(f"{row} (pass@1)")
            ax.set_ylim(-0.05, 1.05)
    axes[0][0].legend(fontsize=8)
    return _save(fig, output)


def _save(fig, output: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The arguments of `selfdistill plot`."""
    parser = argparse.ArgumentParser(
        prog="selfdistill plot",
        description="Draw a run's curves (loss, reward, distillation metrics, from trainer_state.json or its newest "
                    "checkpoint's) and held-out pass@1 (eval.json) to a PNG; for a 'selfdistill continual' folder, "
                    "each task's score after each stage, per arm (forgetting.json).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. runs/demo/sdpo")
    parser.add_argument("--output", help="the PNG to write (default: RUN_DIR/curves.png)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> str:
    """`selfdistill plot`: draw `plot_run` of a run folder and print the PNG's path."""
    args = parse_args(argv)
    if not os.path.isdir(args.run_dir):
        print(f"selfdistill plot: error: no run folder {args.run_dir!r}", file=sys.stderr)
        raise SystemExit(2)
    report = os.path.join(args.run_dir, "forgetting.json")  # a `selfdistill continual` folder
    path = plot_forgetting(report, args.output) if os.path.exists(report) else plot_run(args.run_dir, args.output)
    print(path)
    return path
