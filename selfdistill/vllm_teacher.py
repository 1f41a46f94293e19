"""Teachers scored by vLLM from prompt log-probs: the student's **exact token ids** (prompt + completion, no
re-tokenisation) go in with `max_tokens=1` and `prompt_logprobs=k`, and the log-prob of each completion token comes
back.

- `VLLMServerTeacher`: a teacher served by vLLM (`python -m vllm.entrypoints.openai.api_server --model MODEL`, or
  `trl vllm-serve --model MODEL`), over its OpenAI-compatible `/v1/completions`.
- `VLLMEngineTeacher`: an in-process `vllm.LLM`, e.g. the trainer's colocated generation engine, which already holds
  the current weights after TRL's sync: the live self-teacher without an HF forward pass.
- `generation_engine_teacher(trainer.vllm_generation, ...)`: whichever of the two scores on the trainer's own vLLM.

Temperature. vLLM (checked on 0.32: `_get_prompt_logprobs_dict` in `vllm/v1/worker/gpu_model_runner.py`) computes
prompt log-probs from the raw logits and ignores the request's temperature, so the server always returns the τ=1
distribution. At the sampling temperature τ ≠ 1 we rescale on the client:
`log p_τ(x) = l_x/τ − log(Σ_{v∈K} e^{l_v/τ} + n·(r/n)^{1/τ})`, with `l` the returned τ=1 log-probs, K the returned
support (the top-`TEMPERATURE_SUPPORT` plus the sampled token), and the tail's τ=1 mass `r = 1 − Σ_K e^{l_v}` spread
evenly over its `n = V − |K|` tokens. It is exact at τ = 1 and for an even tail; an uneven tail makes the true
normaliser larger for τ < 1 and smaller for τ > 1, by at most the tail's share, which a top-20 support keeps small
for peaked language-model distributions. `tempered` does this for both teachers.

Logit-level term. With `top_k`, the server teacher also returns each position's `top_k` most likely tokens and their
log-probs at τ (the server must allow that many: vLLM's `--max-logprobs`, default 20), which `losses.jsd_on_teacher_topk`
turns into the teacher-support top-k JSD.
"""

import math
import time

import requests
import torch

from .teachers import TeacherScores

TEMPERATURE_SUPPORT = 20


def prompt_logprobs_k(temperature: float, top_k: int | None = None) -> int:
    """How many top log-probs to ask for per position: the rescaling at τ ≠ 1 needs a support; τ = 1 uses only the
    scored token's own log-prob, which vLLM returns besides the top k; the logit-level term needs its `top_k`."""
    return max(1 if temperature == 1.0 else TEMPERATURE_SUPPORT, top_k or 0)


def tempered(entry: dict[int, float], temperature: float, vocab_size: int) -> dict[int, float]:
    """`{token: log p_τ(token)}` from one position's τ=1 log-probs `{token id: log-prob}` (see the module docstring).
    Plain float math: it runs once per scored position, on ~21 numbers."""
    if temperature == 1.0:
        return entry
    support = list(entry.values())
    support_mass = math.fsum(math.exp(v) for v in support)
    tail_mass = math.log1p(-support_mass) if support_mass < 1.0 else -math.inf  # log r, r = 1 − Σ_K p
    n_tail = math.log(max(vocab_size - len(support), 1))
    terms = [v / temperature for v in support] + [n_tail + (tail_mass - n_tail) / temperature]
    top = max(terms)
    normaliser = top + math.log(math.fsum(math.exp(v - top) for v in terms))
    return {token: v / temperature - normaliser for token, v in entry.items()}


def scores_from_prompt_logprobs(positions_B: list[list[dict[int, float] | None]], completions: list[list[int]],
                                completion_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float,
                                vocab_size: int, source: str, top_k: int | None = None) -> TeacherScores:
    """`TeacherScores` from each row's prompt log-probs at its completion positions: `positions_B[b][t]` holds the
    τ=1 log-probs `{token id: log-prob}` returned where completion token t of row b was scored (None, or missing at
    the end, when not returned). With `top_k`, also the `top_k` most likely tokens of each position and their
    log-probs, for the logit-level term. Raises a RuntimeError naming `source` rather than train on a missing score."""
    logp_BT = torch.full(completion_ids.shape, math.nan)
    shape_K = (*completion_ids.shape, top_k or 0)
    topk_ids, topk_logp = torch.zeros(shape_K, dtype=torch.long), torch.full(shape_K, math.nan)
    for b, (positions, completion) in enumerate(zip(positions_B, completions, strict=True)):
        for t, token in enumerate(completion):
            entry = positions[t] if t < len(positions) else None
            if not entry:
                continue
            entry = tempered(entry, temperature, vocab_size)
            logp_BT[b, t] = entry.get(token, math.nan)
            if top_k and len(entry) >= top_k:
                best = sorted(entry.items(), key=lambda item: -item[1])[:top_k]
                topk_ids[b, t] = torch.tensor([token for token, _ in best])
                topk_logp[b, t] = torch.tensor([value for _, value in best])
    mask = completion_mask.bool().cpu()
    if not torch.isfinite(logp_BT[mask]).all() or not torch.isfinite(topk_logp[mask]).all():
        raise RuntimeError(f"{source} returned no finite log-prob for some completion tokens (or fewer than top_k="
                           f"{top_k} candidates); refusing to train on missing teacher scores.")
    device = completion_ids.device
    return TeacherScores(logp_BT.nan_to_num(0.0).to(device),
                         topk_ids_BTK=topk_ids.to(device) if top_k else None,
                         topk_logp_BTK=topk_logp.nan_to_num(0.0).to(device) if top_k else None)


def unpadded(ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> list[list[int]]:
    """Each row's token ids where its mask is 1 (drops the left padding of prompts and right padding of completions)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(ids_BL, mask_BL)]


class VLLMServerTeacher:
    """Teacher log-probs of completion tokens from a vLLM server at `base_url`.

    - Start: waits up to `timeout` seconds for `/health`, then fails with a ConnectionError naming the URL; checks
      that the served model tokenises like the student (`/tokenize`), else a ValueError.
    - Each request is retried `retries` times with exponential backoff (`backoff`·2^i seconds) on connection
      errors, timeouts and 5xx answers, then fails with a RuntimeError naming the URL. It never returns zero or
      stale log-probs: a response without a finite log-prob for every completion token is an error too.
    - `top_k`: also return each position's `top_k` most likely tokens and log-probs (the logit-level term).
    """

    def __init__(self, base_url: str, tokenizer, temperature: float, *, top_k: int | None = None,
                 timeout: float = 240.0, retries: int = 4, backoff: float = 2.0, request_timeout: float = 600.0):
        self.base_url, self.temperature, self.top_k = base_url.rstrip("/"), temperature, top_k
        self.retries, self.backoff, self.request_timeout = retries, backoff, request_timeout
        self.session = requests.Session()
        self._wait_until_up(timeout)
        self.model = self._request("get", "/v1/models")["data"][0]["id"]
        self._check_vocabulary(tokenizer)
        self.vocab_size = len(tokenizer)

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.session.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() >= deadline:
                raise ConnectionError(f"The vLLM teacher server at {self.base_url} is not reachable after {timeout:.0f} s "
                                      f"(GET {self.base_url}/health). Start it with `vllm serve MODEL` first.")
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.session.request(method, f"{self.base_url}{path}", json=payload,
                                                timeout=self.request_timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                error = exc
                continue
            if response.status_code >= 500:
                error = RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
                continue
            if response.status_code != 200:
                raise RuntimeError(f"The vLLM teacher at {self.base_url} rejected {path}: HTTP {response.status_code}: "
                                   f"{response.text[:500]}")
            return response.json()
        raise RuntimeError(f"The vLLM teacher at {self.base_url} did not answer {path} after {self.retries + 1} attempts "
                           f"with backoff; last error: {error}")

    def _check_vocabulary(self, tokenizer) -> None:
        """The server must map text to the same ids as the student: it scores the student's ids as they are."""
        vocab = tokenizer.get_vocab()
        probe_ids = sorted(vocab.values())[:: max(1, len(vocab) // 2000)]
        text = tokenizer.decode(probe_ids)
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        theirs = self._request("post", "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
        theirs = theirs["tokens"]
        if ours != theirs:
            i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise ValueError(
                f"The vLLM teacher at {self.base_url} serves {self.model!r}, whose tokenizer differs from the student's: "
                f"at token {i} of a probe text the student has id {ours[i] if i < len(ours) else None} "
                f"({tokenizer.decode(ours[i:i + 1])!r}) and the server {theirs[i] if i < len(theirs) else None}. "
                "The teacher scores the student's token ids, so both must share one vocabulary."
            )

    @torch.no_grad()
    def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> TeacherScores:
        prompts, completions = unpadded(prompt_ids, prompt_mask), unpadded(completion_ids, completion_mask)
        payload = {"model": self.model, "prompt": [p + c for p, c in zip(prompts, completions)], "max_tokens": 1,
                   "temperature": 1.0, "prompt_logprobs": prompt_logprobs_k(self.temperature, self.top_k)}
        choices = self._request("post", "/v1/completions", payload)["choices"]
        positions_B = [
            [None if pos is None else {int(k): v["logprob"] for k, v in pos.items()}
             for pos in (choice.get("prompt_logprobs") or [])[len(prompt):]]
            for choice, prompt in zip(choices, prompts, strict=True)
        ]
        return scores_from_prompt_logprobs(positions_B, completions, completion_ids, completion_mask, self.temperature,
                                           self.vocab_size, f"The vLLM teacher at {self.base_url}", self.top_k)


class VLLMEngineTeacher:
    """Teacher log-probs of completion tokens from an in-process `vllm.LLM` (its prompt log-probs).

    Given the trainer's colocated generation engine (`trainer.vllm_generation.llm`) this is the live self-teacher:
    TRL syncs the training weights into the engine right before it generates, and the trainer scores the teacher
    contexts right after that generation in the same step, so the engine holds exactly the weights that sampled the
    rollouts. The engine runs in its own dtype (bf16 for fp32 checkpoints on vLLM's CPU backend), so its log-probs
    differ from an fp32 HF forward by that rounding.
    """

    def __init__(self, llm, temperature: float):
        self.llm, self.temperature = llm, temperature
        self.vocab_size = llm.llm_engine.model_config.get_vocab_size()  # the logits' width, padding rows excluded

    @torch.no_grad()
    def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> TeacherScores:
        from vllm import SamplingParams

        prompts, completions = unpadded(prompt_ids, prompt_mask), unpadded(completion_ids, completion_mask)
        # detokenize=False: vLLM would otherwise decode every returned top-k token of every position, which costs
        # more than the forward pass for small models (measured with benchmarks/vllm_vs_hf.py).
        params = SamplingParams(max_tokens=1, prompt_logprobs=prompt_logprobs_k(self.temperature), detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": p + c} for p, c in zip(prompts, completions)], params,
                                    use_tqdm=False)
        positions_B = [
            [None if pos is None else {token: lp.logprob for token, lp in pos.items()}
             for pos in out.prompt_logprobs[len(prompt):]]
            for out, prompt in zip(outputs, prompts, strict=True)
        ]
        return scores_from_prompt_logprobs(positions_B, completions, completion_ids, completion_mask, self.temperature,
                                           self.vocab_size, "The vLLM engine")


def generation_engine_teacher(generation, tokenizer, temperature: float):
    """The teacher that scores on a GRPOTrainer's own vLLM (`trainer.vllm_generation`), which holds the current
    weights: its colocated engine, or the server it generates with.

    Raises a ValueError for colocated set-ups where the engine does not simply hold the weights for this rank's rows:
    tensor parallelism (every rank of a group would have to send the group's rows together) and sleep mode (the
    weights are discarded after each generation).
    """
    if generation.mode == "server":
        url = generation.server_base_url or f"http://{generation.server_host}:{generation.server_port}"
        return VLLMServerTeacher(url, tokenizer, temperature, timeout=generation.server_timeout)
    if generation.tensor_parallel_size > 1 or generation.enable_sleep_mode:
        raise ValueError("The live teacher cannot score on the colocated vLLM engine with "
                         "vllm_tensor_parallel_size > 1 or vllm_enable_sleep_mode; set teacher_on_vllm=False to score "
                         "it with the HF model.")
    return VLLMEngineTeacher(generation.llm, temperature)
