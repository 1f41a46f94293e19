"""Self-distillation step time and peak memory: selfdistill's SelfDistillTrainer against TRL 1.16's experimental
SDPOTrainer and SDFTTrainer, on the same model, prompts, contexts and generation settings, in one process.

    python benchmarks/sdpo_vs_trl.py                          # tiny and medium, about 6-10 minutes on 2 busy CPU cores
    python benchmarks/sdpo_vs_trl.py --sizes tiny             # the test fixture's model only, about 2 minutes
    python benchmarks/sdpo_vs_trl.py --sizes medium --pairs sdpo-logits --profile   # also cProfile both trainers
    python benchmarks/sdpo_vs_trl.py --device cuda --sizes smollm2-135m qwen2.5-0.5b --pairs sdpo-logits   # one GPU
    python benchmarks/sdpo_vs_trl.py --sizes smollm2-135m --layers 1 --steps 2   # the real shapes' code path on CPU

What runs. Every trainer samples 4 completions for each of 4 prompts per step from the student with HF `generate`
(temperature 1, no top-k/top-p, the same `max_completion_length`), builds one teacher prompt per rollout, scores the
completion under the self-teacher and takes one AdamW step, fp32, no gradient checkpointing (TRL's defaults turn bf16
autocast and checkpointing on; both are off for every trainer here), same seed and learning rate. Three pairs:
- sdpo-logits: ours `mode="sdpo", objective="logits"` (GRPO's loss + JSD β=0.5 on the student's top-100 with a tail
  bucket, IS clip 2, EMA teacher 0.05) vs `SDPOTrainer(distillation_mode="topk_logits", distillation_topk=100,
  distillation_alpha=0.5, distillation_add_tail=True, distillation_is_clip=2, teacher_model_kind="ema",
  teacher_update_rate=0.05, distillation_weight=0.5)`: weight 0.5 so that TRL too computes its policy loss and its
  distillation loss every step, as ours does.
- sdpo-sampled: ours `objective="sampled_token"` (reverse-KL advantage in GRPO's loss, EMA teacher) vs
  `SDPOTrainer(distillation_mode="sampled_token", distillation_alpha=1, distillation_weight=0.5)`, EMA teacher.
- sdft: ours `mode="sdft"` (demonstration context, forward KL over the full vocabulary, EMA 0.01, no reward) vs
  `SDFTTrainer(distillation_mode="full_logits", distillation_alpha=0, distillation_is_clip=None,
  teacher_model_kind="ema", teacher_update_rate=0.01)` with our demonstration template as its `teacher_prompt_template`.
The contexts are equal: a random model never answers right, so our reward's feedback "The correct answer is N." reaches
every rollout, and TRL SDPO reads the same text from the `privileged_context` column
(`include_environment_feedback=True`); both use the SDPO reprompt templates. SDFT's demonstration is a fixed worked
answer per prompt.

How it is measured (helpers in benchmarks/_measure.py).
- Step time: wall and CPU time (all threads) from `on_step_begin` to `on_step_end` (generation, rewards, teacher,
  forward, backward, optimizer, teacher update); the median over the steps after the first (warm-up) of every run and
  the CPU minimum, which other jobs on a shared machine disturb least. One round per pair by default (ours, then
  TRL), to keep a full run under 10 minutes; `--rounds 2` adds a round in the other order, so that load hits both alike.
- Peak RSS: a thread samples /proc/self/statm every 2 ms while a trainer is built and trained; reported is the peak
  minus the RSS just before (after `gc.collect()` and `malloc_trim(0)`), the largest over rounds. A discarded first
  run of each trainer pays the process's one-time costs (lazy imports, thread pools), so they land on neither.
- Sizes (the tests' 369-token tokenizer for both):
  tiny: hidden 64, 2 layers, vocabulary 369 (0.1M parameters, the test fixture);
  medium: hidden 512, 8 layers, embedding padded to a vocabulary of 32768 as real LMs pad theirs (21M in the layers +
  17M tied embedding = 38M), so that the logits cost what they cost in a real model. Ids past the tokenizer's decode
  to nothing: the random model's completions are short junk strings, which every trainer handles alike;
  smollm2-135m, qwen2.5-0.5b: the shapes of SmolLM2-135M (Llama: hidden 576, 30 layers, 9 heads, 3 KV heads,
  vocabulary 49,152) and Qwen2.5-0.5B (Qwen2: hidden 896, 24 layers, 14 heads, 2 KV heads, vocabulary 151,936), tied
  heads, random weights built in-process (`_measure.REAL_SHAPES`), 64-token completions; `--layers` cuts them down
  to run the same code on CPU.
- One intra-op thread by default on CPU (`--threads`): on 2 shared busy cores two threads mostly wait on each other.
- `--device cuda`: every trainer on the GPU with bf16 autocast over fp32 weights (`_measure.trainer_settings`); the
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

from _measure import REAL_SHAPES, alternating_rounds, save_real_shape, train_measured, trainer_settings  # noqa: E402
from conftest import build_model, build_tokenizer  # noqa: E402  (also switches the hub off)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl.experimental.sdft import SDFTConfig, SDFTTrainer  # noqa: E402
from trl.experimental.sdpo import SDPOConfig, SDPOTrainer  # noqa: E402

from selfdistill.context import DEMONSTRATION_TEMPLATE  # noqa: E402
from selfdistill.rewards import add_feedback, completion_text  # noqa: E402
from selfdistill.trainers import SelfDistillConfig, SelfDistillTrainer  # noqa: E402

# name: (hidden, layers, vocabulary or None for the tokenizer's) or a `REAL_SHAPES` name, completion length, steps
# per run
SIZES = {"tiny": ((64, 2, None), 16, 8), "medium": ((512, 8, 32768), 32, 4),
         "smollm2-135m": ("smollm2-135m", 64, 4), "qwen2.5-0.5b": ("qwen2.5-0.5b", 64, 4)}
PROMPTS_PER_STEP, NUM_GENERATIONS = 4, 4
BATCH = dict(per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS, num_generations=NUM_GENERATIONS)
TRL_SDPO = dict(teacher_model_kind="ema", teacher_update_rate=0.05, distillation_is_clip=2.0,
                include_environment_feedback=True, distillation_weight=0.5)
# pair: (our SelfDistillConfig fields, TRL trainer, TRL config, its fields)
PAIRS = {
    "sdpo-logits": (
        dict(mode="sdpo", objective="logits"),
        SDPOTrainer, SDPOConfig,
        dict(TRL_SDPO, distillation_mode="topk_logits", distillation_topk=100, distillation_alpha=0.5,
             distillation_add_tail=True),
    ),
    "sdpo-sampled": (
        dict(mode="sdpo", objective="sampled_token"),
        SDPOTrainer, SDPOConfig,
        dict(TRL_SDPO, distillation_mode="sampled_token", distillation_alpha=1.0),
    ),
    "sdft": (
        dict(mode="sdft"),
        SDFTTrainer, SDFTConfig,
        dict(teacher_model_kind="ema", teacher_update_rate=0.01, distillation_mode="full_logits",
             distillation_alpha=0.0, distillation_topk=None, distillation_is_clip=None,
             teacher_prompt_template=DEMONSTRATION_TEMPLATE.replace("{demonstration}", "{privileged_context}")),
    ),
}
# Functions a step is made of, in all trainers (a regular expression for pstats).
PROFILED = (
    r"\(training_step|\(_prepare_inputs|\(generate\)|\(_generate_and_score_completions|\(_prepare_training_batch|"
    r"\(score\)|\(_teacher_prompts|\(compute_loss|\(_compute_loss|\(_get_per_token_logps_and_entropies|"
    r"\(_compute_teacher_student_logits|\(_compute_self_distillation_loss|\(jsd|\(token_logprobs|\(backward|"
    r"\(step\)|\(update\)|\(on_step_end|\(_calculate_rewards"
)


def dataset(n: int = 64) -> Dataset:
    """Arithmetic prompts with their answer, the feedback TRL SDPO reads, and the demonstration SDFT shows."""
    rows = []
    for i in range(n):
        a, b = i, 3 * i + 1
        rows.append({
            "prompt": [{"role": "user", "content": f"What is {a} + {b}? Put the final answer in \\boxed{{}}."}],
            "solution": str(a + b),
            "feedback": f"The correct answer is {a + b}.",
            "demonstration": f"<think>\n{a} + {b} = {a + b}\n</think>\nThe answer is \\boxed{{{a + b}}}.",
        })
    return Dataset.from_list(rows)


def accuracy(completions, solution, **kwargs) -> list[float]:
    """1 if the boxed answer is right; otherwise 0 and, for our trainer, the feedback "The correct answer is N."."""
    right = [f"\\boxed{{{s}}}" in completion_text(c) for c, s in zip(completions, solution, strict=True)]
    add_feedback(kwargs, [None if ok else f"The correct answer is {s}." for ok, s in zip(right, solution)])
    return [float(ok) for ok in right]


def build(kind: str, pair: str, model: str, size: str, out: Path, device: str, steps: int | None):
    ours, trl_trainer, trl_config, trl_fields = PAIRS[pair]
    _, length, default_steps = SIZES[size]
    common = dict(trainer_settings(device), **BATCH, output_dir=str(out / kind), max_completion_length=length,
                  max_steps=steps or default_steps)
    data = dataset()
    if kind == "ours":
        args = SelfDistillConfig(**common, **ours)
        rewards = None if pair == "sdft" else [accuracy]  # SDFT has no reward: pure distillation
        return SelfDistillTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=data)
    if pair == "sdft":
        data = data.rename_column("demonstration", "privileged_context")
        return trl_trainer(model=model, args=trl_config(**common, **trl_fields), train_dataset=data)
    data = data.rename_column("feedback", "privileged_context")
    return trl_trainer(model=model, reward_funcs=[accuracy], args=trl_config(**common, **trl_fields), train_dataset=data)


def run_once(kind, pair, model, size, out, cli, profile=False):
    """Build and train one trainer; return its StepTimes and its peak memory increase in MiB (RSS, or CUDA)."""
    return train_measured(lambda: build(kind, pair, model, size, out, cli.device, cli.steps), f"{pair} {kind}, {size}",
                          PROFILED if profile else None, cli.device)


def save_model(size: str, root: Path, num_layers: int | None, device: str) -> str:
    shape, *_ = SIZES[size]
    tokenizer = build_tokenizer()
    if shape in REAL_SHAPES:
        return save_real_shape(shape, tokenizer, root / size, num_layers, seed=0, device=device)
    hidden, layers, vocabulary = shape
    model = build_model(tokenizer, hidden, layers, seed=0)
    if vocabulary:  # padded like a real LM's embedding; sampled ids past the tokenizer's decode to nothing
        model.resize_token_embeddings(vocabulary)
    path = root / size
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=list(SIZES))
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--rounds", type=int, default=1, help="rounds per pair; the order alternates each round")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU only)")
    parser.add_argument("--profile", action="store_true", help="cProfile both trainers in the last round")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: bf16 autocast on the GPU, peak CUDA memory (see the module docstring)")
    parser.add_argument("--layers", type=int, help="layers of the real shapes (smollm2-135m, qwen2.5-0.5b) instead of "
                                                   "theirs, e.g. 1 to run their code path on CPU")
    parser.add_argument("--steps", type=int,
                        help="optimizer steps per run instead of the size's (the first is warm-up)")
    cli = parser.parse_args()
    if cli.device == "cpu":
        torch.set_num_threads(cli.threads)

    rows = []  # (size, pair, kind, median wall s, median CPU s, min CPU s, peak MiB)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for i, size in enumerate(cli.sizes):
            model = save_model(size, tmp, cli.layers, cli.device)
            for j, pair in enumerate(cli.pairs):
                if i == 0 and j == 0 and cli.device == "cpu":  # discarded: pays the process's one-time costs
                    for kind in ("ours", "trl"):
                        run_once(kind, pair, model, size, tmp, cli)
                stats = alternating_rounds(lambda kind, profile: run_once(kind, pair, model, size, tmp, cli, profile),
                                           cli.rounds, cli.profile, f"{size} {pair}")
                rows += [(size, pair, kind, *stats[kind]) for kind in ("ours", "trl")]

    cpu, memory = ("CPU", "RSS") if cli.device == "cpu" else ("host CPU", "CUDA")
    print(f"\n| size | pair | trainer | median step s (wall) | median step s ({cpu}) | min step s ({cpu}) "
          f"| peak {memory} MiB | ours/TRL: median wall, median {cpu}, min {cpu}, {memory} |")
    print("|---|---|---|---|---|---|---|---|")
    trl = {(size, pair): stats for size, pair, kind, *stats in rows if kind == "trl"}
    for size, pair, kind, *stats in rows:
        name = "SelfDistillTrainer" if kind == "ours" else PAIRS[pair][1].__name__
        ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(stats, trl[size, pair])) if kind == "ours" else ""
        w, c, c_min, m = stats
        print(f"| {size} | {pair} | {name} | {w:.3f} | {c:.3f} | {c_min:.3f} | {m:.0f} | {ratios} |")


if __name__ == "__main__":
    main()
