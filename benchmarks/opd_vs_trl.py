"""On-policy distillation step time and peak memory: selfdistill's OnPolicyDistillTrainer against TRL's
DistillationTrainer, on the same student, teacher, prompts and generation settings, in one process.

    python benchmarks/opd_vs_trl.py                      # tiny and medium, about 5-10 minutes on 2 CPU cores
    python benchmarks/opd_vs_trl.py --sizes tiny         # the test fixtures' models only, under a minute
    python benchmarks/opd_vs_trl.py --sizes medium --profile   # also cProfile both trainers
    python benchmarks/opd_vs_trl.py --device cuda --sizes smollm2-135m qwen2.5-0.5b --rounds 1   # one GPU
    python benchmarks/opd_vs_trl.py --sizes smollm2-135m --layers 1 --steps 2 --rounds 1   # real shapes' path on CPU

What runs. Both trainers sample completions from the student with HF `generate` (temperature 1, no top-k/top-p, the
same `max_completion_length`), score every completion token against the teacher and take one optimizer step per
generation batch of 16 completions:
- ours: GRPO's loss with per-token advantages −(logp_S − logp_T) on the sampled tokens (pure distillation: no
  rewards; 4 prompts × 4 generations);
- TRL: `DistillationTrainer` with beta=1 (reverse KL(S‖T) over the full vocabulary, chunked), 16 prompts × 1.
  TRL 1.16's DistillationTrainer always trains on the student's own generations (there is no `lmbda` any more).
Both in fp32 without gradient checkpointing (TRL's defaults turn both bf16 autocast and checkpointing on; here both are
off for both trainers, as in the tests), with the same seed, learning rate and AdamW.

How it is measured.
- Step time: wall and CPU time (all threads) from `on_step_begin` to `on_step_end` (generation, scoring, forward,
  backward, optimizer); the median over the steps after the first (warm-up), and the CPU minimum, which other jobs on
  a shared machine disturb least. The trainers run in rounds, alternating which goes first, so that such load hits
  both alike; the statistics are over all rounds.
- Peak RSS: a thread samples /proc/self/statm every 2 ms while a trainer is built and trained; reported is the peak
  minus the RSS just before (after `gc.collect()` and `malloc_trim(0)`), the largest over rounds. A discarded first
  run of each trainer pays the process's one-time costs, so they land on neither.
- Sizes (student / teacher; vocabulary 400, the tests' tokenizer):
  tiny:   hidden 64, 2 layers (0.1M) / hidden 96, 3 layers (0.3M) — the test fixtures;
  medium: hidden 512, 8 layers (21M) / hidden 768, 8 layers (48M);
  and the shapes of real checkpoints with random weights built in-process (`_measure.REAL_SHAPES`), tied heads,
  64-token completions, each with a deeper and wider teacher of the same family and vocabulary:
  smollm2-135m: SmolLM2-135M (hidden 576, 30 layers, vocabulary 49,152) / SmolLM2-360M (hidden 960, 32 layers);
  qwen2.5-0.5b: Qwen2.5-0.5B (hidden 896, 24 layers, vocabulary 151,936) / Qwen2.5-1.5B (hidden 1536, 28 layers).
  The embeddings keep the real vocabulary, larger than the tokenizer's (sampled ids past it decode to nothing);
  `--layers` gives student and teacher that many layers, to run the same code on CPU.
- `--device cuda`: both trainers on the GPU with bf16 autocast over fp32 weights (`_measure.trainer_settings`); the
  step clock waits for the GPU at both ends, memory is the peak CUDA allocation above the start of the run
  (`_measure.PeakCUDA`), and no run is discarded: one-time costs (CUDA context, kernel compilation) fall in each run's
  first step, which is never counted, and not in allocated memory.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _measure import alternating_rounds, save_real_shape, train_measured, trainer_settings  # noqa: E402
from _opd_distributed import prompts_dataset  # noqa: E402  (the tests' prompts)
from conftest import build_model, build_tokenizer  # noqa: E402  (also switches the hub off)
from trl import DistillationConfig, DistillationTrainer  # noqa: E402

from selfdistill.trainers import OnPolicyDistillConfig, OnPolicyDistillTrainer  # noqa: E402

# name: (student hidden, layers), (teacher hidden, layers) or `REAL_SHAPES` names, completion length, rollouts per
# step, steps per round
SIZES = {
    "tiny": ((64, 2), (96, 3), 16, 16, 8),
    "medium": ((512, 8), (768, 8), 32, 16, 4),
    "smollm2-135m": ("smollm2-135m", "smollm2-360m", 64, 16, 4),
    "qwen2.5-0.5b": ("qwen2.5-0.5b", "qwen2.5-1.5b", 64, 16, 4),
}
NUM_GENERATIONS = 4
# Functions a step is made of, in both trainers (a regular expression for pstats).
PROFILED = (
    r"\(training_step|\(_prepare_inputs|\(generate\)|\(_generate_and_score_completions|\(score|\(compute_loss|"
    r"\(_compute_loss|\(_get_per_token_logps_and_entropies|\(_get_last_hidden_state|\(backward|\(step\)|"
    r"\(completion_hidden_states|\(token_logprobs|\(_chunked_divergence_loss|\(_calculate_rewards"
)


def save_models(size: str, root: Path, num_layers: int | None, device: str) -> tuple[str, str]:
    student, teacher, *_ = SIZES[size]
    tokenizer = build_tokenizer()
    paths = []
    for name, shape, seed in [("student", student, 0), ("teacher", teacher, 1)]:
        path = root / f"{size}-{name}"
        if isinstance(shape, str):
            paths.append(save_real_shape(shape, tokenizer, path, num_layers, seed, device))
            continue
        hidden, layers = shape
        build_model(tokenizer, hidden, layers, seed).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(str(path))
    return paths[0], paths[1]


def build(kind: str, student: str, teacher: str, size: str, out: Path, device: str, steps: int | None):
    *_, length, rollouts, default_steps = SIZES[size]
    common = dict(trainer_settings(device), output_dir=str(out / kind), max_completion_length=length,
                  max_steps=steps or default_steps)
    if kind == "ours":
        args = OnPolicyDistillConfig(per_device_train_batch_size=rollouts, num_generations=NUM_GENERATIONS, **common)
        return OnPolicyDistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts_dataset(256))
    args = DistillationConfig(per_device_train_batch_size=rollouts, beta=1.0, **common)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompts_dataset(256))


def run_once(kind, student, teacher, size, out, cli, profile=False):
    """Build and train one trainer; return its StepTimes and its peak memory increase in MiB (RSS, or CUDA)."""
    return train_measured(lambda: build(kind, student, teacher, size, out, cli.device, cli.steps), f"{kind}, {size}",
                          PROFILED if profile else None, cli.device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=2, help="rounds per size; the order alternates each round")
    parser.add_argument("--profile", action="store_true", help="cProfile both trainers in the last round")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: bf16 autocast on the GPU, peak CUDA memory (see the module docstring)")
    parser.add_argument("--layers", type=int,
                        help="layers of the real shapes' students and teachers instead of theirs, e.g. 1 to run their "
                             "code path on CPU")
    parser.add_argument("--steps", type=int,
                        help="optimizer steps per run instead of the size's (the first is warm-up)")
    cli = parser.parse_args()

    rows = []  # (size, kind, median wall s, median CPU s, min CPU s, peak MiB)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, size in enumerate(cli.sizes):
            student, teacher = save_models(size, tmp, cli.layers, cli.device)
            if i == 0 and cli.device == "cpu":  # discarded: pays the one-time costs (lazy imports, thread pools)
                for kind in ("ours", "trl"):
                    run_once(kind, student, teacher, size, tmp, cli)
            stats = alternating_rounds(lambda kind, profile: run_once(kind, student, teacher, size, tmp, cli, profile),
                                       cli.rounds, cli.profile, size)
            rows += [(size, kind, *stats[kind]) for kind in ("ours", "trl")]

    cpu, memory = ("CPU", "RSS") if cli.device == "cpu" else ("host CPU", "CUDA")
    print(f"\n| size | trainer | median step s (wall) | median step s ({cpu}) | min step s ({cpu}) | peak {memory} MiB "
          f"| ours/TRL: median wall, median {cpu}, min {cpu}, {memory} |")
    print("|---|---|---|---|---|---|---|")
    trl = {size: stats for size, kind, *stats in rows if kind == "trl"}
    for size, kind, *stats in rows:
        name = "OnPolicyDistillTrainer" if kind == "ours" else "trl.DistillationTrainer (beta=1)"
        ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(stats, trl[size])) if kind == "ours" else ""
        w, c, c_min, m = stats
        print(f"| {size} | {name} | {w:.3f} | {c:.3f} | {c_min:.3f} | {m:.0f} | {ratios} |")


if __name__ == "__main__":
    main()
