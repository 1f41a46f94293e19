"""Best-of-N synthetic data: sample N completions per prompt from a teacher, score each with the training rewards,
keep the best, and write a dataset that SFT takes directly (rejection-sampling fine-tuning, as in STaR / RFT).

    selfdistill generate --teacher smollm2 --dataset_name arithmetic --n_prompts 64 --num_samples 8 --output_dir bon
    selfdistill generate --backend openai --base_url http://127.0.0.1:8000/v1 --teacher MODEL --output_dir bon
    selfdistill train --config recipes/cpu/sft_smollm2.yaml --train_file bon/data.jsonl

The entry points are `generate_best_of_n` (Python) and `main(argv)` (`selfdistill generate`).

Teachers (samplers), each giving N completions per prompt as text, so the teacher's tokenizer never matters to the
student (cross-tokenizer distillation comes free):
- `HFSampler`: `model.generate` with `num_return_sequences=N` (the CPU fallback);
- `VLLMSampler`: an offline `vllm.LLM`, `LLM.chat` (or `LLM.generate` for plain prompts) with `SamplingParams(n=N)`;
- `OpenAISampler`: any OpenAI-compatible endpoint (`/chat/completions` or `/completions` with `n`), a black box
  with its own tokenizer; a vLLM server (`python -m vllm.entrypoints.openai.api_server --model MODEL`) is one.

Scoring: every sample goes through the reward functions exactly as `trl.GRPOTrainer` calls them
(`f(prompts=, completions=, completion_ids=, **columns)`, the completion as one assistant message after a chat
prompt), with the feedback slot of `selfdistill.rewards` (`rollout_feedback`), so each sample keeps its feedback. A
sample's reward is the sum of the rewards (TRL's default weights of 1; rewards returning None are skipped as TRL's
nansum does, None when all are); it *passes* when that sum is at least `pass_threshold` (default 1.0: the full
accuracy reward, the pass@1 criterion of `selfdistill eval`).

Selection (`selection`): `best` keeps the highest-reward passing sample of each prompt (best-of-N), `top_m` the `m`
highest, `all_passing` every passing one; identical completions of one prompt are kept once; ties go to the earlier
sample. A prompt with no passing sample is dropped, and counted.

Output in `output_dir`:
- `data.jsonl` and `dataset/` (`datasets.save_to_disk`): one row per kept sample, columns `prompt`, `completion`
  (an assistant message list after a chat prompt, else a string: TRL's prompt/completion format, which
  `trl.SFTTrainer` and `selfdistill train --method sft --train_file` read as they are), `reward`, `pass_rate`
  (passing samples / N of its prompt), `feedback`, `sample` (which of the N), `teacher`, `sampling` (JSON: N,
  temperature, top_p, max_new_tokens, seed), and the prompt's other dataset columns (e.g. `solution`);
- `samples.jsonl`: every sample of every prompt with its reward and feedback, one line per prompt, appended batch by
  batch (flushed and fsynced): the record that makes a run resumable. A rerun into the same folder skips the prompts
  already there, so a crash loses at most the batch in flight (a line cut short by the crash is discarded); the
  selection is re-applied to all of it, so a rerun with another `--selection` samples nothing new;
- `generation.json` (the teacher, back-end, sampling and rewards: a rerun with other settings is refused rather than
  mix two distributions), `summary.json` (prompts, samples, pass rate, kept, dropped, rows, teacher tokens).

Seeding: a batch of prompts (HF) or each prompt (vLLM, API: the request's `seed`) draws from a generator seeded by
`seed` and the index of its (first) prompt, so a resumed run samples what an uninterrupted one would have (HF: for
the same `batch_size`, as batches sit on a fixed grid of prompt indices).
"""

import argparse
import hashlib
import json
import math
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from .cli import BadInput

SELECTIONS = ("best", "top_m", "all_passing")
BACKENDS = ("hf", "vllm", "openai")


@dataclass(frozen=True)
class Sampling:
    """How each prompt is sampled: `num_samples` completions at `temperature` with nucleus `top_p` (no top-k), at
    most `max_new_tokens` tokens each, seeded by `seed` (see the module docstring)."""

    num_samples: int = 8
    temperature: float = 1.0  # the teacher's own distribution
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1:
            raise BadInput(f"num_samples must be >= 1, got {self.num_samples}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_new_tokens < 1:
            raise BadInput(f"need temperature >= 0, 0 < top_p <= 1 and max_new_tokens >= 1, got {self}")
        if self.temperature == 0 and self.num_samples > 1:
            raise BadInput("temperature 0 is greedy: all num_samples samples would be the same completion")

    def seed_for(self, index: int) -> int:
        """The seed of the prompt (or batch starting at prompt) `index`."""
        return (self.seed * 1_000_003 + index) % 2**31


@dataclass
class Sample:
    """One teacher completion: its text, its token ids when the back-end exposes them (not over HTTP), and the
    number of tokens the teacher generated for it (None when the endpoint does not say)."""

    text: str
    token_ids: list[int] | None
    tokens: int | None


@dataclass
class PromptSamples:
    """The N samples of one prompt and the prompt's tokens as the teacher counted them (None when unknown)."""

    samples: list[Sample]
    prompt_tokens: int | None


def _is_chat(prompt) -> bool:
    return isinstance(prompt, list)


class HFSampler:
    """A Hugging Face causal LM sampled with `generate` (fp32, left-padded batches, `num_return_sequences=N`)."""

    backend = "hf"

    def __init__(self, model: str, name: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name or model
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def sample(self, prompts: list, first_index: int, sampling: Sampling) -> list[PromptSamples]:
        import torch

        tok = self.tokenizer
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if _is_chat(p) else p
                 for p in prompts]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        options = (dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
                   if sampling.temperature > 0 else dict(do_sample=False))
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(sampling.seed_for(first_index))
            ids = self.model.generate(**batch, max_new_tokens=sampling.max_new_tokens,
                                      num_return_sequences=sampling.num_samples, pad_token_id=tok.pad_token_id,
                                      **options)[:, batch["input_ids"].shape[1]:]
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])
        out = []
        for i, prompt_mask in enumerate(batch["attention_mask"]):
            samples = []
            for row in ids[i * sampling.num_samples : (i + 1) * sampling.num_samples].tolist():
                end = next((t + 1 for t, token in enumerate(row) if token in eos), len(row))  # up to the first EOS
                samples.append(Sample(tok.decode(row[:end], skip_special_tokens=True), row[:end], end))
            out.append(PromptSamples(samples, int(prompt_mask.sum())))
        return out


class VLLMSampler:
    """An offline `vllm.LLM` (`engine_options` go to its constructor, e.g. `max_model_len`); each prompt is one
    request with `SamplingParams(n=N, seed=...)`. On CPU set `VLLM_CPU_KVCACHE_SPACE` (GiB) first."""

    backend = "vllm"

    def __init__(self, model: str, name: str | None = None, **engine_options):
        from vllm import LLM

        self.name = name or model
        self.llm = LLM(model=model, **engine_options)

    def sample(self, prompts: list, first_index: int, sampling: Sampling) -> list[PromptSamples]:
        from vllm import SamplingParams

        params = [SamplingParams(n=sampling.num_samples, temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, seed=sampling.seed_for(first_index + i))
                  for i in range(len(prompts))]
        if all(_is_chat(p) for p in prompts):
            outputs = self.llm.chat(prompts, params, use_tqdm=False)
        else:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [PromptSamples([Sample(o.text, list(o.token_ids), len(o.token_ids)) for o in out.outputs],
                              len(out.prompt_token_ids)) for out in outputs]


class RateLimit:
    """At most `per_second` request starts per second, across threads (requests are spaced 1/per_second apart)."""

    def __init__(self, per_second: float):
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self.next_start = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        time.sleep(max(0.0, start - now))


class OpenAISampler:
    """An OpenAI-compatible endpoint at `base_url` (as the OpenAI clients take it, e.g. `http://127.0.0.1:8000/v1`).

    - `model`: the served model's name (None: the first one `GET /models` lists); the API key is read from the
      environment variable `api_key_env` (no key is sent when it is unset, as a local vLLM server needs none).
    - Start: `GET /models` must answer, else a ConnectionError naming the URL.
    - Requests: chat prompts go to `/chat/completions`, plain ones to `/completions`, with `n`, `temperature`,
      `top_p`, `max_tokens` and `seed`; an endpoint that returns fewer than N choices is asked again for the rest.
      At most `concurrency` requests are in flight and at most `requests_per_second` start per second. Connection
      errors, timeouts, HTTP 429 and 5xx are retried `retries` times, waiting `backoff`·2^i seconds (or the
      server's Retry-After), then a RuntimeError names the URL; other HTTP errors fail at once with the body.
    - Tokens: the response's `usage` (prompt tokens once per request, completion tokens per choice).
    """

    backend = "openai"

    def __init__(self, base_url: str, model: str | None = None, *, api_key_env: str = "OPENAI_API_KEY",
                 retries: int = 5, backoff: float = 1.0, timeout: float = 600.0, requests_per_second: float = 8.0,
                 concurrency: int = 4):
        self.base_url = base_url.rstrip("/")
        self.api_key = os.environ.get(api_key_env)
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.rate, self.concurrency = RateLimit(requests_per_second), concurrency
        try:
            served = [m["id"] for m in self._request("GET", "/models", attempts=2)["data"]]
        except RuntimeError as error:
            if isinstance(error.__cause__, urllib.error.HTTPError):  # it answered: say what it said
                raise
            raise ConnectionError(f"The teacher endpoint at {self.base_url} is not reachable (GET {self.base_url}"
                                  f"/models): {error.__cause__ or error}") from error
        if model is not None and served and model not in served:
            raise BadInput(f"The teacher endpoint at {self.base_url} serves {served}, not {model!r}")
        self.model = model or served[0]
        self.name = self.model

    def _request(self, method: str, path: str, payload: dict | None = None, attempts: int | None = None) -> dict:
        url = f"{self.base_url}{path}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        attempts = self.retries + 1 if attempts is None else attempts
        error, wait = None, 0.0
        for attempt in range(attempts):
            if attempt:
                time.sleep(wait)
            wait = self.backoff * 2**attempt
            self.rate.wait()
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method),
                                            timeout=self.timeout) as response:
                    return json.load(response)
            except urllib.error.HTTPError as exc:
                body = exc.read().decode(errors="replace")[:500]
                if exc.code != 429 and exc.code < 500:
                    raise RuntimeError(f"The teacher endpoint at {self.base_url} rejected {method} {path}: HTTP "
                                       f"{exc.code}: {body}") from exc
                retry_after = exc.headers.get("Retry-After")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = float(retry_after)
                error = exc
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                error = exc
        raise RuntimeError(f"The teacher endpoint at {self.base_url} did not answer {method} {path} after {attempts} "
                           f"attempt(s) with backoff; last error: {error}") from error

    def _one_prompt(self, prompt, index: int, sampling: Sampling) -> PromptSamples:
        chat = _is_chat(prompt)
        samples, prompt_tokens = [], 0
        while len(samples) < sampling.num_samples:
            payload = {"model": self.model, "n": sampling.num_samples - len(samples),
                       "temperature": sampling.temperature, "top_p": sampling.top_p,
                       "max_tokens": sampling.max_new_tokens, "seed": sampling.seed_for(index) + len(samples),
                       ("messages" if chat else "prompt"): prompt}
            answer = self._request("POST", "/chat/completions" if chat else "/completions", payload)
            choices = answer.get("choices") or []
            if not choices:
                raise RuntimeError(f"The teacher endpoint at {self.base_url} returned no choices: {str(answer)[:300]}")
            usage = answer.get("usage") or {}
            per_choice = (usage["completion_tokens"] / len(choices) if "completion_tokens" in usage else None)
            if prompt_tokens is not None:
                prompt_tokens = prompt_tokens + usage["prompt_tokens"] if "prompt_tokens" in usage else None
            for choice in choices:
                text = choice["message"]["content"] if chat else choice["text"]
                samples.append(Sample(text or "", None, per_choice))
        return PromptSamples(samples[: sampling.num_samples], prompt_tokens)

    def sample(self, prompts: list, first_index: int, sampling: Sampling) -> list[PromptSamples]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda ip: self._one_prompt(ip[1], first_index + ip[0], sampling),
                                 enumerate(prompts)))


def score(rewards: list, prompts: list, completions: list[Sample], columns: dict[str, list]) -> list[tuple]:
    """`(reward, feedback)` per completion: each reward function called as `trl.GRPOTrainer` calls it, summed with
    None skipped (None when every reward skipped), and the feedback texts of all rewards joined by newlines."""
    from .rewards import FEEDBACK_KEY

    texts = [[{"role": "assistant", "content": c.text}] if _is_chat(p) else c.text
             for p, c in zip(prompts, completions, strict=True)]
    slots = [[] for _ in completions]
    totals = [None] * len(completions)
    for reward in rewards:
        values = reward(prompts=prompts, completions=texts, completion_ids=[c.token_ids for c in completions],
                        **columns, **{FEEDBACK_KEY: slots})
        for i, value in enumerate(values):
            if value is not None and not math.isnan(value):
                totals[i] = (totals[i] or 0.0) + float(value)
    return [(total, "\n".join(slot) or None) for total, slot in zip(totals, slots)]


def select(samples: list[dict], selection: str, pass_threshold: float, top_m: int = 1) -> list[dict]:
    """The samples kept for one prompt: passing ones (reward >= `pass_threshold`), highest reward first (ties: the
    earlier sample), identical completions once; `best` keeps the first, `top_m` the first `top_m`, `all_passing`
    all of them. An empty list drops the prompt."""
    if selection not in SELECTIONS:
        raise BadInput(f"unknown selection {selection!r}; choose from {', '.join(SELECTIONS)}")
    passing = [s for s in samples if s["reward"] is not None and s["reward"] >= pass_threshold]
    ranked, seen = [], set()
    for s in sorted(passing, key=lambda s: -s["reward"]):  # sorted is stable: ties keep sample order
        if s["completion"] not in seen:
            seen.add(s["completion"])
            ranked.append(s)
    return ranked[: {"best": 1, "top_m": top_m}.get(selection, len(ranked))]


@dataclass
class Summary:
    prompts: int
    samples: int
    passing: int
    pass_rate: float  # passing samples / samples
    kept_prompts: int  # prompts with at least one passing sample
    dropped_prompts: int
    rows: int
    completion_tokens: int | None  # teacher tokens generated (None if the endpoint did not report them)
    prompt_tokens: int | None
    new_prompts: int  # sampled by this call (the others were in samples.jsonl already)
    seconds: float

    def __str__(self):
        tokens = "unknown" if self.completion_tokens is None else f"{self.completion_tokens:,}"
        return (f"{self.prompts} prompts ({self.new_prompts} sampled now) x N: {self.samples} samples, pass rate "
                f"{self.pass_rate:.3f}; kept {self.kept_prompts} prompts ({self.rows} rows), dropped "
                f"{self.dropped_prompts} with no passing sample; teacher tokens: {tokens} generated, "
                f"{'unknown' if self.prompt_tokens is None else f'{self.prompt_tokens:,}'} prompt; "
                f"{self.seconds:.0f} s")


def _reward_name(reward) -> str:
    return getattr(reward, "__name__", type(reward).__name__)


def _read_records(path: str) -> list[dict]:
    """The complete lines of `samples.jsonl`; a last line cut short by a crash is removed from the file."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    good = data[: data.rfind(b"\n") + 1]
    if len(good) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(good))
    return [json.loads(line) for line in good.decode().splitlines() if line]


def _fingerprint(prompt) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True).encode()).hexdigest()[:16]


def _check_settings(output_dir: str, settings: dict) -> None:
    """Write `generation.json`, or refuse to continue a folder sampled with other settings."""
    path = os.path.join(output_dir, "generation.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        changed = sorted(k for k in settings.keys() | before.keys() if settings.get(k) != before.get(k))
        if changed:
            there, now = ({k: s.get(k) for k in changed} for s in (before, settings))
            raise BadInput(f"{output_dir} holds samples drawn with other settings ({', '.join(changed)}: {there} "
                           f"there, {now} now); use another output_dir, or delete it to start over")
        return
    os.makedirs(output_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f, indent=2)


def generate_best_of_n(sampler, dataset, rewards: list, output_dir: str, *, sampling: Sampling = Sampling(),
                       selection: str = "best", top_m: int = 2, pass_threshold: float = 1.0, batch_size: int = 8,
                       reward_options: dict | None = None, progress: bool = True) -> Summary:
    """Sample, score and select (see the module docstring) for every row of `dataset` (a `datasets.Dataset` with a
    `prompt` column; its other columns go to the rewards and into the output rows), resuming from `output_dir`.

    `sampler`: an `HFSampler`, `VLLMSampler` or `OpenAISampler` (anything with `name`, `backend` and
    `sample(prompts, first_index, sampling) -> [PromptSamples]`); `rewards`: TRL reward functions;
    `reward_options`: recorded in `generation.json` (how the rewards were built), so a rerun with other rewards is
    refused. Writes `data.jsonl`, `dataset/`, `samples.jsonl`, `generation.json`, `summary.json`; returns the summary.
    """
    from datasets import Dataset

    from .assets import atomic_dir

    if "prompt" not in dataset.column_names or len(dataset) == 0:
        raise BadInput(f"generation needs a non-empty dataset with a 'prompt' column; got {len(dataset)} rows with "
                       f"columns {dataset.column_names}")
    if not rewards:
        raise BadInput("best-of-N needs at least one reward function to score the samples")
    select([], selection, pass_threshold, top_m)  # an unknown selection fails before any sampling
    started = time.monotonic()
    _check_settings(output_dir, {"teacher": sampler.name, "backend": sampler.backend, "sampling": asdict(sampling),
                                 "rewards": [_reward_name(r) for r in rewards], "reward_options": reward_options or {}})
    samples_path = os.path.join(output_dir, "samples.jsonl")
    records = {r["index"]: r for r in _read_records(samples_path)}
    prompts = dataset["prompt"]
    if records and max(records) >= len(dataset):
        raise BadInput(f"{samples_path} holds prompt {max(records)}, beyond this dataset's {len(dataset)} prompts; use "
                       "another output_dir")
    for index, record in records.items():
        if record["fingerprint"] != _fingerprint(prompts[index]):
            raise BadInput(f"{samples_path} has prompt {index} of another dataset; use another output_dir")
    columns = [c for c in dataset.column_names if c != "prompt"]
    pending = [i for i in range(len(dataset)) if i not in records]
    grid = {}  # batches on a fixed grid of prompt indices, so the HF seed of a batch does not depend on resumption
    for i in pending:
        grid.setdefault(i // batch_size, []).append(i)
    bar = tqdm(total=len(pending), desc=f"best-of-{sampling.num_samples} from {sampler.name}", disable=not progress)
    with open(samples_path, "a") as out:
        for indices in grid.values():
            batch = dataset.select(indices)
            drawn = sampler.sample(batch["prompt"], indices[0], sampling)
            n = sampling.num_samples
            flat = [s for p in drawn for s in p.samples]
            scores = score(rewards, [p for p in batch["prompt"] for _ in range(n)], flat,
                           {c: [v for v in batch[c] for _ in range(n)] for c in columns})
            lines = []
            for j, (index, got) in enumerate(zip(indices, drawn, strict=True)):
                record = {"index": index, "fingerprint": _fingerprint(prompts[index]),
                          "prompt_tokens": got.prompt_tokens,
                          "samples": [{"completion": s.text, "reward": r, "feedback": f, "tokens": s.tokens}
                                      for s, (r, f) in zip(got.samples, scores[j * n : (j + 1) * n])]}
                records[index] = record
                lines.append(json.dumps(record) + "\n")
            out.write("".join(lines))
            out.flush()
            os.fsync(out.fileno())
            bar.update(len(indices))
    bar.close()

    rows, passing, dropped = [], 0, 0
    values = {c: dataset[c] for c in columns}
    sampling_json = json.dumps(asdict(sampling))
    for index in sorted(records):
        samples = [dict(s, sample=k) for k, s in enumerate(records[index]["samples"])]
        n_pass = sum(s["reward"] is not None and s["reward"] >= pass_threshold for s in samples)
        passing += n_pass
        kept = select(samples, selection, pass_threshold, top_m)
        dropped += not kept
        prompt = prompts[index]
        for s in kept:
            rows.append({"prompt": prompt,
                         "completion": [{"role": "assistant", "content": s["completion"]}] if _is_chat(prompt)
                         else s["completion"],
                         "reward": s["reward"], "pass_rate": n_pass / len(samples), "feedback": s["feedback"],
                         "sample": s["sample"], "teacher": sampler.name, "sampling": sampling_json,
                         **{c: values[c][index] for c in columns}})
    tmp = os.path.join(output_dir, "data.jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, os.path.join(output_dir, "data.jsonl"))
    atomic_dir(os.path.join(output_dir, "dataset"), lambda d: Dataset.from_list(rows).save_to_disk(str(d)),
               replace=True)

    def total(counts):  # None when any count is unknown
        counts = list(counts)
        return None if any(c is None for c in counts) else int(sum(counts))

    n_samples = sum(len(r["samples"]) for r in records.values())
    summary = Summary(
        prompts=len(records), samples=n_samples, passing=passing, pass_rate=passing / max(n_samples, 1),
        kept_prompts=len(records) - dropped, dropped_prompts=dropped, rows=len(rows),
        completion_tokens=total((s["tokens"] for r in records.values() for s in r["samples"])),
        prompt_tokens=total((r["prompt_tokens"] for r in records.values())),
        new_prompts=len(pending), seconds=time.monotonic() - started)
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump({**asdict(summary), "selection": selection, "top_m": top_m, "pass_threshold": pass_threshold}, f,
                  indent=2)
    return summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags of `selfdistill generate`."""
    parser = argparse.ArgumentParser(
        prog="selfdistill generate",
        description="Best-of-N synthetic data: sample N completions per prompt from a teacher (HF, offline vLLM, or "
                    "an OpenAI-compatible endpoint), score them with the training rewards, keep the best passing "
                    "ones, write OUTPUT_DIR/data.jsonl and OUTPUT_DIR/dataset for SFT. Resumable: rerun the same "
                    "command to continue.")
    parser.add_argument("--teacher", help="hf/vllm: a checkpoint, hub id or 'smollm2'; openai: the served model's name "
                                          "(default: the first the endpoint lists)")
    parser.add_argument("--backend", choices=BACKENDS, default="hf", help="the teacher's back-end (default: hf)")
    parser.add_argument("--base_url", help="openai: the endpoint, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api_key_env", default="OPENAI_API_KEY",
                        help="openai: the environment variable holding the API key (default: OPENAI_API_KEY; unset: "
                             "no key sent)")
    parser.add_argument("--requests_per_second", type=float, default=8.0, help="openai: rate bound (default: 8)")
    parser.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight (default: 4)")
    parser.add_argument("--retries", type=int, default=5, help="openai: retries per request with backoff (default: 5)")
    parser.add_argument("--dataset_name", default="arithmetic", help="a built-in task (selfdistill.tasks; default: "
                                                                     "arithmetic)")
    parser.add_argument("--dataset_options", type=_json_object, default={},
                        help='task builder options as JSON, e.g. \'{"difficulty": 2}\'')
    parser.add_argument("--split", default="train", help="the task's split (default: train)")
    parser.add_argument("--n_prompts", type=int, help="number of prompts (default: the task's)")
    parser.add_argument("--prompts_file", help="a JSONL file or save_to_disk folder with a 'prompt' column (and the "
                                               "columns the rewards read), instead of --dataset_name")
    parser.add_argument("--num_samples", type=int, default=Sampling.num_samples,
                        help="N samples per prompt (default: 8)")
    parser.add_argument("--temperature", type=float, default=Sampling.temperature, help="default: 1.0")
    parser.add_argument("--top_p", type=float, default=Sampling.top_p, help="default: 1.0")
    parser.add_argument("--max_new_tokens", type=int, default=Sampling.max_new_tokens, help="default: 256")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, and which prompts of a task (default: 0)")
    parser.add_argument("--reward_funcs", nargs="+", default=["accuracy"],
                        help="registry names or dotted paths (default: accuracy)")
    parser.add_argument("--reward_options", type=_json_object, default={},
                        help='per-reward options as JSON, e.g. \'{"accuracy": {"last_number": true}}\'')
    parser.add_argument("--pass_threshold", type=float, default=1.0,
                        help="a sample passes when its summed reward is at least this (default: 1.0)")
    parser.add_argument("--selection", choices=SELECTIONS, default="best", help="default: best (best-of-N)")
    parser.add_argument("--top_m", type=int, default=2, help="samples kept per prompt with --selection top_m")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per batch, the unit written at once")
    parser.add_argument("--output_dir", required=True, help="where data.jsonl, dataset/ and samples.jsonl go")
    args = parser.parse_args(argv)
    if args.backend == "openai" and not args.base_url:
        parser.error("--backend openai needs --base_url")
    if args.backend != "openai" and not args.teacher:
        parser.error(f"--backend {args.backend} needs --teacher")
    return args


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def main(argv: list[str]) -> Summary:
    """`selfdistill generate`: build the prompts, the rewards and the sampler, generate, print the summary."""
    from .cli import _load_rows, load_reward, resolve_model
    from .tasks import TASKS, load_task

    args = parse_args(argv)
    if args.prompts_file:
        dataset = _load_rows(args.prompts_file)
    elif args.dataset_name in TASKS:
        dataset = load_task(args.dataset_name, split=args.split, n=args.n_prompts, seed=args.seed,
                            **args.dataset_options)
    else:
        raise BadInput(f"unknown dataset {args.dataset_name!r}; choose from {', '.join(sorted(TASKS))}, or give "
                       "--prompts_file")
    if args.prompts_file and args.n_prompts is not None:
        dataset = dataset.select(range(min(args.n_prompts, len(dataset))))
    rewards = [load_reward(name, args.reward_options.get(name, {})) for name in args.reward_funcs]
    sampling = Sampling(args.num_samples, args.temperature, args.top_p, args.max_new_tokens, args.seed)
    if args.backend == "openai":
        sampler = OpenAISampler(args.base_url, args.teacher, api_key_env=args.api_key_env, retries=args.retries,
                                requests_per_second=args.requests_per_second, concurrency=args.concurrency)
    elif args.backend == "vllm":
        sampler = VLLMSampler(resolve_model(args.teacher), name=args.teacher, seed=args.seed)
    else:
        sampler = HFSampler(resolve_model(args.teacher), name=args.teacher)
    summary = generate_best_of_n(sampler, dataset, rewards, args.output_dir, sampling=sampling,
                                 selection=args.selection, top_m=args.top_m, pass_threshold=args.pass_threshold,
                                 batch_size=args.batch_size, reward_options=args.reward_options)
    print(f"selfdistill generate: {summary}\nwrote {os.path.join(args.output_dir, 'data.jsonl')} and "
          f"{os.path.join(args.output_dir, 'dataset')}", file=sys.stderr)
    return summary
