"""The distillation families side by side, for real on CPU: a depth-pruned SmolLM2 student distilled from the full
SmolLM2-135M-Instruct by (a) best-of-N synthetic data then SFT, (b) on-policy distillation, (c) SFT then on-policy
distillation, each with the same number of teacher samples, and each student measured before and after as a task
model and as the teacher's speculative-decoding draft.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/distill_families.py                 # SmolLM2, the README table
    python benchmarks/distill_families.py --teacher T_DIR --student S_DIR --budget 16 ...   # any pair (the test)

Set-up (defaults): two-digit addition ("Answer with just the number.", graded by the last number written, the
demo's grading, `MathAccuracy(last_number=True)`); teacher SmolLM2-135M-Instruct (30 layers); student its copy with 8
layers (0, 1 and 24-29: of the contiguous "first a + last 8 − a" cuts, the one whose per-token NLL of the teacher's
own samples was lowest, 7.8 nats against 1.0 for the full model; a 15-layer draft costs c ≈ 0.6 of a target step and
cannot pay at τ ≈ 2, this one measured c ≈ 0.4). The teacher budget B = 384 samples per arm:
- (a) best-of-N SFT: the teacher samples N = 8 completions for each of B/N = 48 training prompts at T = 0.7
  (`selfdistill.generate`, HF back-end), the best correct one is kept (`selection="best"`; prompts with none are
  dropped), and the student is fine-tuned on those rows (`SFTKLTrainer`, completion-only loss, no KL penalty);
- (b) on-policy distillation (`OnPolicyDistillTrainer`, pure reverse KL as `recipes/cpu/opd_pruned_smollm2.yaml`):
  B/16 = 24 steps of 16 student rollouts, each scored by the teacher (a "teacher sample" here is one rollout the
  teacher scores: the same count, not the same compute; the arms' wall times are reported);
- (c) SFT then OPD: best-of-N SFT on the first B/2 samples (24 prompts, the first half of (a)'s data: generation
  resumes from (c)'s folder to (a)'s), then B/2 rollouts of OPD (12 steps) from the SFT checkpoint.
Measured for the untrained student ("before") and each arm ("after"), on held-out problems never trained on:
- accuracy: greedy pass@1 on `--eval_n` problems (`evaluate.evaluate`);
- reverse KL to the teacher and the estimated acceptance (`evaluate.distill_metrics`, the training metrics
  `distill/reverse_kl`, `distill/acceptance`, on the student's samples at T = 0.7);
- as the teacher's draft (`speculative.speculative_eval`, HF assisted generation, batch size 1, k = 2 draft tokens
  per step) on the first `--spec_n` of those problems at T = 0 and T = 0.7: measured per-position acceptance α
  (and the estimate on the same prompts), mean accepted length τ, the wall-clock speed-up over the target alone,
  the cost ratio c and τ / (c·k + 1). k = 2: with c ≈ 0.4 the expected speed-up
  (1 − α^{k+1}) / ((1 − α)(ck + 1)) is highest at k = 1–2 for α in 0.5–0.7, and k = 3 is below 1 for α < 0.6.
One seed: this measures the pipeline and the families on one run, it does not rank them (that needs ≥ 3 seeds).

Everything lands in `--output_dir` (default `runs/distill_families`): each arm's model, the generated data,
`results.json` (written after each arm's training and each of its measurements, so a rerun continues where it
stopped), `table.md` and the figure (`--figure`, default `docs/distill_families.png`).
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASK = "arithmetic"
TASK_OPTIONS = {"difficulty": 2, "instruction": "Answer with just the number."}
REWARD_OPTIONS = {"accuracy": {"last_number": True}}
DRAFT_LAYERS = [0, 1, 24, 25, 26, 27, 28, 29]
MODELS = ("before", "a: best-of-N SFT", "b: OPD", "c: SFT then OPD")


def parse_args(argv):
    parser = argparse.ArgumentParser(description="The distillation families on CPU (see the module docstring).")
    parser.add_argument("--teacher", default="smollm2", help="checkpoint or 'smollm2' (default)")
    parser.add_argument("--student", default="smollm2-pruned",
                        help="checkpoint, or 'smollm2-pruned' (SmolLM2 keeping --keep_layers; default)")
    parser.add_argument("--keep_layers", type=int, nargs="+", default=DRAFT_LAYERS)
    parser.add_argument("--budget", type=int, default=384, help="teacher samples per arm (default: 384)")
    parser.add_argument("--num_samples", type=int, default=8, help="best-of-N's N (default: 8)")
    parser.add_argument("--pass_threshold", type=float, default=1.0,
                        help="best-of-N keeps samples whose accuracy reward is at least this (default: 1, correct)")
    parser.add_argument("--rollouts_per_step", type=int, default=16, help="OPD rollouts per step (default: 16)")
    parser.add_argument("--num_generations", type=int, default=4, help="OPD rollouts per prompt (default: 4)")
    parser.add_argument("--temperature", type=float, default=0.7, help="teacher and rollout sampling (default: 0.7)")
    parser.add_argument("--max_new_tokens", type=int, default=32, help="every generation's length (default: 32)")
    parser.add_argument("--sft_epochs", type=float, default=3.0)
    parser.add_argument("--sft_learning_rate", type=float, default=1e-4)
    parser.add_argument("--opd_learning_rate", type=float, default=1e-4)
    parser.add_argument("--eval_n", type=int, default=50, help="held-out problems for accuracy and KL (default: 50)")
    parser.add_argument("--spec_n", type=int, default=20, help="held-out problems for speculative decoding (20)")
    parser.add_argument("--k", type=int, default=2, help="draft tokens per speculative step (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, a shared 2-core machine)")
    parser.add_argument("--output_dir", default="runs/distill_families")
    parser.add_argument("--figure", default=str(ROOT / "docs" / "distill_families.png"))
    return parser.parse_args(argv)


def sft(student: str, data_file: str, out: str, args) -> str:
    """Plain SFT (completion-only loss) of `student` on best-of-N rows; the model is saved to `out`."""
    from datasets import load_dataset

    from selfdistill.sft import SFTKLConfig, SFTKLTrainer

    rows = load_dataset("json", data_files=data_file, split="train")
    config = SFTKLConfig(output_dir=out, num_train_epochs=args.sft_epochs, learning_rate=args.sft_learning_rate,
                         per_device_train_batch_size=8, logging_steps=1, save_strategy="no", report_to="none",
                         use_cpu=True, bf16=False, seed=args.seed, kl_to_start=0.0)
    trainer = SFTKLTrainer(model=student, args=config, train_dataset=rows)
    trainer.train()
    trainer.save_model(out)
    return out


def opd(student: str, teacher: str, steps: int, out: str, args) -> str:
    """On-policy distillation of `student` from `teacher` for `steps` steps of `--rollouts_per_step` rollouts on
    training prompts (pure reverse KL, no task reward); the model is saved to `out`."""
    from selfdistill.tasks import arithmetic
    from selfdistill.trainers import OnPolicyDistillConfig, OnPolicyDistillTrainer

    prompts = arithmetic(512, seed=args.seed + 1, **TASK_OPTIONS)  # other training prompts than best-of-N's
    config = OnPolicyDistillConfig(
        output_dir=out, max_steps=steps, learning_rate=args.opd_learning_rate,
        per_device_train_batch_size=args.rollouts_per_step, gradient_accumulation_steps=1,
        num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, kl_coef=1.0, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, seed=args.seed)
    trainer = OnPolicyDistillTrainer(model=student, teacher_model=teacher, args=config, train_dataset=prompts)
    trainer.train()
    trainer.save_model(out)
    return out


def best_of_n(teacher: str, n_prompts: int, out: str, args, grow_from: str | None = None):
    """Best-of-N rows for the first `n_prompts` training prompts in `out` (`selfdistill.generate`); with
    `grow_from`, the samples already drawn there (a prefix of these prompts) are reused, not drawn again."""
    from selfdistill.generate import HFSampler, Sampling, generate_best_of_n
    from selfdistill.rewards import MathAccuracy
    from selfdistill.tasks import arithmetic

    if grow_from and not os.path.exists(os.path.join(out, "samples.jsonl")):
        os.makedirs(out, exist_ok=True)
        for name in ("samples.jsonl", "generation.json"):
            shutil.copy(os.path.join(grow_from, name), out)
    sampling = Sampling(num_samples=args.num_samples, temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens, seed=args.seed)
    return generate_best_of_n(HFSampler(teacher), arithmetic(n_prompts, seed=args.seed, **TASK_OPTIONS),
                              [MathAccuracy(**REWARD_OPTIONS["accuracy"])], out, sampling=sampling,
                              reward_options=REWARD_OPTIONS, pass_threshold=args.pass_threshold, batch_size=4)


def held_out(model_dir: str, teacher: str, args) -> dict:
    """Held-out greedy accuracy, and the reverse KL and estimated acceptance on the student's samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfdistill.evaluate import distill_metrics, evaluate

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    options = dict(n=args.eval_n, seed=args.seed, max_new_tokens=args.max_new_tokens, task_options={TASK: TASK_OPTIONS})
    accuracy = evaluate(student, tokenizer, [TASK], **options, reward_options=REWARD_OPTIONS)[TASK]["pass@1"]
    close = distill_metrics(student, teacher_model, tokenizer, [TASK], **options, temperature=args.temperature)[TASK]
    return {"accuracy": accuracy, "reverse_kl": close["reverse_kl"], "estimated_acceptance": close["acceptance"]}


def as_draft(model_dir: str, teacher: str, args) -> dict:
    """The student as the teacher's draft (`speculative_eval`) at T=0 and at the sampling temperature."""
    from selfdistill.speculative import speculative_eval

    spec = speculative_eval(teacher, model_dir, [TASK], n=args.spec_n, seed=args.seed, k=args.k,
                            temperatures=(0.0, args.temperature), max_new_tokens=args.max_new_tokens,
                            task_options={TASK: TASK_OPTIONS}, cost_prompts=2)
    return {"speculative": spec[TASK], "cost": spec["cost"]}


def run(args) -> dict:
    from selfdistill.cli import resolve_model
    from selfdistill.evaluate import evaluate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    results_path = root / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["settings"] = vars(args)

    def save():
        results_path.write_text(json.dumps(results, indent=2))

    teacher = resolve_model(args.teacher)
    student = (resolve_model(args.student, keep_layers=args.keep_layers) if args.student == "smollm2-pruned"
               else args.student)
    if "teacher" not in results:
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
        results["teacher"] = {"accuracy": evaluate(model, AutoTokenizer.from_pretrained(teacher), [TASK],
                                                   n=args.eval_n, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                                   task_options={TASK: TASK_OPTIONS},
                                                   reward_options=REWARD_OPTIONS)[TASK]["pass@1"]}
        del model
        save()

    prompts, half = args.budget // args.num_samples, args.budget // 2
    steps, half_steps = args.budget // args.rollouts_per_step, half // args.rollouts_per_step
    arms = {  # in the order they run: (a)'s generation continues (c)'s, which holds its first half
        "before": lambda: (student, {}),
        MODELS[3]: lambda: _arm_sft_opd(teacher, student, half, half_steps, args, root),
        MODELS[1]: lambda: _arm_sft(teacher, student, prompts, "a", args, root, grow_from=root / "c" / "data"),
        MODELS[2]: lambda: _arm_opd(student, teacher, steps, root / "b" / "model", args),
    }
    for name, train in arms.items():  # each part is saved when done, so a rerun continues where it stopped
        record = results.setdefault(name, {})
        if "model" not in record:
            started = time.monotonic()
            model_dir, info = train()
            record |= info | {"model": model_dir, "train_seconds": time.monotonic() - started}
            save()
        for key, measure in (("accuracy", held_out), ("speculative", as_draft)):
            if key not in record:
                record |= measure(record["model"], teacher, args)
                save()
        print(f"{name}: {json.dumps({k: v for k, v in record.items() if k != 'speculative'})}", flush=True)
    (root / "table.md").write_text(table(results))
    plot(results, args.figure)
    print(table(results))
    return results


def _arm_sft(teacher, student, n_prompts, name, args, root, grow_from=None):
    summary = best_of_n(teacher, n_prompts, str(root / name / "data"), args, grow_from=grow_from)
    model = sft(student, str(root / name / "data" / "data.jsonl"), str(root / name / "model"), args)
    return model, {"teacher_samples": summary.samples, "sft_rows": summary.rows, "bon_pass_rate": summary.pass_rate}


def _arm_opd(student, teacher, steps, out, args):
    return opd(student, teacher, steps, str(out), args), {"teacher_samples": steps * args.rollouts_per_step,
                                                          "opd_steps": steps}


def _arm_sft_opd(teacher, student, half, half_steps, args, root):
    sft_model, record = _arm_sft(teacher, student, half // args.num_samples, "c", args, root)
    model = opd(sft_model, teacher, half_steps, str(root / "c" / "model_opd"), args)
    record["teacher_samples"] += half_steps * args.rollouts_per_step
    record["opd_steps"] = half_steps
    return model, record


def _fmt(value, spec=".2f"):
    return "–" if value is None else format(value, spec)


def table(results: dict) -> str:
    """The README table: one row per model."""
    t0, t1 = "T=0", f"T={results['settings']['temperature']:g}"
    lines = [f"| student | teacher samples | accuracy | reverse KL | α est. ({t1[2:]}) | α measured ({t1[2:]}) | "
             f"α measured (0) | τ (0) | τ ({t1[2:]}) | speed-up (0) | speed-up ({t1[2:]}) | predicted (0) | c |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in MODELS:
        if name not in results:
            continue
        r, spec = results[name], results[name]["speculative"]
        lines.append(
            f"| {name} | {r.get('teacher_samples', 0)} | {r['accuracy']:.2f} | {r['reverse_kl']:.2f} | "
            f"{r['estimated_acceptance']:.2f} | {_fmt(spec[t1]['alpha'])} | {_fmt(spec[t0]['alpha'])} | "
            f"{_fmt(spec[t0]['tau'])} | {_fmt(spec[t1]['tau'])} | {spec[t0]['speedup']:.2f} | "
            f"{spec[t1]['speedup']:.2f} | {_fmt(spec[t0]['predicted_speedup'])} | {r['cost']['cost_ratio']:.2f} |")
    lines.append(f"| teacher (ceiling) | | {results['teacher']['accuracy']:.2f} | | | | | | | | | | |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> str:
    """Six panels, one bar per model: accuracy, reverse KL, acceptance (estimated and measured), τ, speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in MODELS if n in results]
    t1 = f"T={results['settings']['temperature']:g}"
    spec = [results[n]["speculative"] for n in names]
    x = range(len(names))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))

    def bars(ax, series: dict, title, line=None):
        width = 0.8 / len(series)
        for j, (label, values) in enumerate(series.items()):
            ax.bar([i + (j - (len(series) - 1) / 2) * width for i in x], [v or 0 for v in values], width,
                   label=label)
        if line is not None:
            ax.axhline(line[0], color="k", ls="--", lw=1, label=line[1])
        ax.set_title(title)
        ax.set_xticks(list(x), [n.split(":")[0] for n in names])
        ax.legend(fontsize=8)

    bars(axes[0, 0], {"greedy pass@1": [results[n]["accuracy"] for n in names]}, "held-out accuracy",
         (results["teacher"]["accuracy"], "teacher"))
    bars(axes[0, 1], {"nats/token": [results[n]["reverse_kl"] for n in names]}, "reverse KL to the teacher")
    bars(axes[0, 2], {f"estimated ({t1})": [results[n]["estimated_acceptance"] for n in names],
                      f"measured ({t1})": [s[t1]["alpha"] for s in spec],
                      "measured (T=0)": [s["T=0"]["alpha"] for s in spec]}, "acceptance α")
    bars(axes[1, 0], {"T=0": [s["T=0"]["tau"] for s in spec], t1: [s[t1]["tau"] for s in spec]},
         f"mean accepted length τ (k={results['settings']['k']})")
    bars(axes[1, 1], {"measured T=0": [s["T=0"]["speedup"] for s in spec], f"measured {t1}": [s[t1]["speedup"]
                                                                                            for s in spec],
                      "predicted τ/(ck+1), T=0": [s["T=0"]["predicted_speedup"] for s in spec]},
         "speed-up as the teacher's draft", (1.0, "no speed-up"))
    bars(axes[1, 2], {"c = draft step / target step": [results[n]["cost"]["cost_ratio"] for n in names]},
         "cost ratio c")
    fig.suptitle("Distillation families: pruned SmolLM2 student of SmolLM2-135M-Instruct, "
                 f"{results['settings']['budget']} teacher samples per arm (one seed, 2 shared CPU cores)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    return run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
