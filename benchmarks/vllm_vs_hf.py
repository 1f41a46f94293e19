"""vLLM against Hugging Face on CPU, for the two jobs vLLM can take from the trainer: sampling the rollouts, and scoring
completion tokens under a teacher (the live self-teacher on the generation engine, or a served teacher).

    python benchmarks/vllm_vs_hf.py                         # tiny fixture model + SmolLM2-135M-Instruct
    python benchmarks/vllm_vs_hf.py --models tiny           # the tests' tiny model only
    python benchmarks/vllm_vs_hf.py --hf-threads 1          # skip HF at 2 threads, by far the slowest part here

Measured on the shared 2-core machine at load average 8-13: 37 min for the default run (vLLM engine starts of 90 s and
254 s, most of the rest HF at 2 threads), 2.5 min for `--models tiny --rounds 1 --length 16`.

What runs, per model, on the same `--rollouts` chat prompts (one per rollout, arithmetic questions):
- (a) rollouts: HF `model.generate` (one batched call, as TRL's HF path does) against vLLM `LLM.generate` (TRL's
  colocate path), both sampling at temperature 1 with no top-k/top-p, exactly `--length` new tokens per rollout
  (EOS ignored / suppressed, so both produce the same number of tokens), vLLM also returning the sampled log-probs as
  TRL asks. Throughput = new tokens / wall time.
- (b) teacher scoring of `--rollouts` × `--length` completion tokens after their prompts: `ModelTeacher` (HF forward,
  logits only at completion positions, in chunks) against `VLLMEngineTeacher` (vLLM prompt log-probs), at τ = 1 and
  at τ = 0.7 (vLLM returns a top-20 support per position and the log-prob is rescaled on the client, in Python).
  Throughput = scored tokens / wall time.
Precision, as the trainer runs them on CPU: HF in fp32 (the tests' `bf16=False`), vLLM in its "auto" dtype, which is bf16 for these fp32 checkpoints (TRL's colocate engine passes no
dtype). vLLM runs its engine core in a subprocess here (its default), so its CPU thread binding does not touch the HF
measurements in this process; it gets a 1 GiB KV cache (`VLLM_CPU_KVCACHE_SPACE=1`). On 2 cores vLLM's worker
computes with one OpenMP thread bound to core 0 and leaves core 1 to its front end (its log: "reserved_cpus=[1]"), so
HF at 1 thread is the like-for-like comparison.

How it is measured: one warm-up call of each, then `--rounds` rounds in a rotating order (so load from other jobs on a
shared machine hits all alike); the median wall time per call is reported. HF is timed with each of `--hf-threads`
torch thread counts (default 1 and the default count) and the ratio is taken against the faster: on a busy 2-core
machine two threads can be far slower than one (measured here on the tiny model: 600 ms against 4-10 ms per
decoding step at load average 10). The 1-minute load average before and after is printed: on a busy machine the
ratios are more trustworthy than the absolute numbers.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from conftest import build_model, build_tokenizer  # noqa: E402  (also switches the hub off)
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402

from selfdistill.teachers import ModelTeacher  # noqa: E402
from selfdistill.vllm_teacher import VLLMEngineTeacher  # noqa: E402

TEACHER_TEMPERATURES = (1.0, 0.7)


def model_dir(name: str, workdir: str) -> str:
    """A checkpoint folder: the tests' tiny student (hidden 64, 2 layers, vocabulary 400), written into `workdir`, or
    the cached SmolLM2-135M-Instruct."""
    if name == "smollm2":
        from selfdistill.assets import smollm2_path

        return smollm2_path()
    tokenizer = build_tokenizer()
    build_model(tokenizer, hidden_size=64, num_layers=2, seed=0).save_pretrained(workdir)
    tokenizer.save_pretrained(workdir)
    return workdir


def prompt_ids(tokenizer, n: int) -> list[list[int]]:
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": f"What is {17 * i + 3} + {29 * i + 11}?"}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
        for i in range(n)
    ]


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def with_threads(fn, threads: int):
    """`fn` run with `threads` torch intra-op threads in this process (vLLM's engine core has its own process)."""
    def run():
        torch.set_num_threads(threads)
        return fn()
    return run


def compare(fns: dict, rounds: int) -> dict[str, float]:
    """Median wall seconds per call of each function, after one warm-up call each; the order rotates every round, so
    load from other jobs on a shared machine hits all alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(timed(fns[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def timings(hf_fn, vllm_fn, hf_threads: list[int], rounds: int) -> dict[str, float]:
    fns = {f"hf@{n}": with_threads(hf_fn, n) for n in hf_threads}
    return compare({**fns, "vllm": vllm_fn}, rounds)


def bench_model(name: str, path: str, rollouts: int, length: int, rounds: int, hf_threads: list[int]) -> list[dict]:
    """Jobs (a) and (b) of the module docstring for the checkpoint at `path`, with one vLLM engine."""
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = prompt_ids(tokenizer, rollouts)
    input_ids, attention_mask = left_padded(prompts, pad_id)
    # min_new_tokens = max_new_tokens suppresses EOS, so every rollout has exactly `length` new tokens, as vLLM's
    # ignore_eos gives; top_k=0 and top_p=1 sample from the full distribution, like TRL's defaults.
    generation_config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=length,
                                         min_new_tokens=length, pad_token_id=pad_id,
                                         eos_token_id=tokenizer.eos_token_id)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    started = time.perf_counter()
    llm = LLM(model=path, max_model_len=max(map(len, prompts)) + length + 8, max_num_seqs=max(rollouts, 16),
              seed=0, logprobs_mode="processed_logprobs")
    engine_start = time.perf_counter() - started
    dtype = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
    sampling = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, max_tokens=length, ignore_eos=True, logprobs=0)

    def hf_generate():
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                 generation_config=generation_config)
        assert out.shape[1] - input_ids.shape[1] == length

    def vllm_generate():
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == length for o in outs)

    results = [dict(model=name, job="rollouts", tokens=rollouts * length, dtype=dtype,
                    seconds=timings(hf_generate, vllm_generate, hf_threads, rounds))]

    # Completions to score: sampled once by vLLM, so both teachers score the same realistic tokens.
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
    completion_ids = torch.tensor([list(o.outputs[0].token_ids) for o in outs])
    completion_mask = torch.ones_like(completion_ids)
    batch = (input_ids, attention_mask, completion_ids, completion_mask)
    for temperature in TEACHER_TEMPERATURES:
        hf_teacher = ModelTeacher(model, temperature, batch_size=rollouts)
        vllm_teacher = VLLMEngineTeacher(llm, temperature)
        seconds = timings(lambda: hf_teacher.score(*batch), lambda: vllm_teacher.score(*batch), hf_threads, rounds)
        results.append(dict(model=name, job=f"teacher scoring, τ={temperature:g}", tokens=rollouts * length,
                            dtype=dtype, seconds=seconds))
    print(f"{name}: vLLM engine start {engine_start:.0f} s ({dtype})", flush=True)
    llm.llm_engine.engine_core.shutdown()  # one engine at a time: stop this one before the next model's
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--rollouts", type=int, default=16, help="rollouts (= prompts) per call")
    parser.add_argument("--length", type=int, default=64, help="new tokens per rollout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hf-threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}),
                        help="torch thread counts to time HF with; the ratio uses the fastest")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    results = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix=f"vllm_vs_hf_{name}_") as workdir:
            results += bench_model(name, model_dir(name, workdir), args.rollouts, args.length, args.rounds,
                                   args.hf_threads)
    load_after = os.getloadavg()[0]

    print(f"\n{args.rollouts} rollouts x {args.length} tokens, median of {args.rounds} rounds, {os.cpu_count()} CPUs, "
          f"1-min load average {load_before:.1f} before and {load_after:.1f} after.\n")
    hf_columns = [f"HF fp32 tokens/s, {n} thread{'s' * (n > 1)}" for n in args.hf_threads]
    print(f"| model | job | {' | '.join(hf_columns)} | vLLM tokens/s | vLLM / best HF |")
    print("|---|---|" + "---:|" * (len(hf_columns) + 2))
    for r in results:
        rate = {name: r["tokens"] / seconds for name, seconds in r["seconds"].items()}
        hf = [rate[f"hf@{n}"] for n in args.hf_threads]
        cells = " | ".join(f"{x:,.0f}" for x in hf)
        print(f"| {r['model']} | {r['job']} | {cells} | {rate['vllm']:,.0f} ({r['dtype']}) | "
              f"{rate['vllm'] / max(hf):.1f}x |")


if __name__ == "__main__":
    main()
