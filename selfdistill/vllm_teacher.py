"""A teacher served by vLLM (`vllm serve MODEL` or `trl vllm-serve --model MODEL`), over its OpenAI-compatible API.

The trainer sends the student's **exact token ids** (prompt + completion, no re-tokenisation) to `/v1/completions`
with `max_tokens=1` and `prompt_logprobs=k`, and reads back the log-prob the teacher gives each completion token.

Temperature. vLLM (checked on 0.32: `_get_prompt_logprobs_dict` in `vllm/v1/worker/gpu_model_runner.py`) computes
prompt log-probs from the raw logits and ignores the request's temperature, so the server always returns the τ=1
distribution. At the sampling temperature τ ≠ 1 we rescale on the client:
`log p_τ(x) = l_x/τ − log(Σ_{v∈K} e^{l_v/τ} + n·(r/n)^{1/τ})`, with `l` the returned τ=1 log-probs, K the returned
support (the top-`TEMPERATURE_SUPPORT` plus the sampled token), and the tail's τ=1 mass `r = 1 − Σ_K e^{l_v}` spread
evenly over its `n = V − |K|` tokens. It is exact at τ = 1 and for an even tail; an uneven tail makes the true
normaliser larger for τ < 1 and smaller for τ > 1, by at most the tail's share, which a top-20 support keeps small
for peaked language-model distributions.
"""

import math
import time

import requests
import torch

from .teachers import TeacherScores

TEMPERATURE_SUPPORT = 20


class VLLMServerTeacher:
    """Teacher log-probs of completion tokens from a vLLM server at `base_url`.

    - Start: waits up to `timeout` seconds for `/health`, then fails with a ConnectionError naming the URL; checks
      that the served model tokenises like the student (`/tokenize`), else a ValueError.
    - Each request is retried `retries` times with exponential backoff (`backoff`·2^i seconds) on connection
      errors, timeouts and 5xx answers, then fails with a RuntimeError naming the URL. It never returns zero or
      stale log-probs: a response without a finite log-prob for every completion token is an error too.
    """

    def __init__(self, base_url: str, tokenizer, temperature: float, *, timeout: float = 240.0, retries: int = 4,
                 backoff: float = 2.0, request_timeout: float = 600.0):
        self.base_url, self.temperature = base_url.rstrip("/"), temperature
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
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
        completions = [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids, completion_mask)]
        k = 1 if self.temperature == 1.0 else TEMPERATURE_SUPPORT
        payload = {"model": self.model, "prompt": [p + c for p, c in zip(prompts, completions)], "max_tokens": 1,
                   "temperature": 1.0, "prompt_logprobs": k}
        choices = self._request("post", "/v1/completions", payload)["choices"]
        logp_BT = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for b, (choice, prompt, completion) in enumerate(zip(choices, prompts, completions, strict=True)):
            positions = choice.get("prompt_logprobs") or []
            for t, token in enumerate(completion):
                entry = positions[len(prompt) + t] if len(prompt) + t < len(positions) else None
                logp_BT[b, t] = self._tempered(entry, token)
        values = logp_BT[completion_mask.bool().cpu()]
        if not torch.isfinite(values).all():
            raise RuntimeError(f"The vLLM teacher at {self.base_url} returned no finite log-prob for some completion "
                               "tokens; refusing to train on missing teacher scores.")
        return TeacherScores(logp_BT.to(completion_ids.device))

    def _tempered(self, entry: dict | None, token: int) -> float:
        """`log p_τ(token)` from one position's returned τ=1 log-probs (see the module docstring)."""
        if not entry or str(token) not in entry:
            return math.nan
        actual = entry[str(token)]["logprob"]
        if self.temperature == 1.0:
            return actual
        support = torch.tensor([v["logprob"] for v in entry.values()], dtype=torch.float64)
        tail_mass = (-torch.logsumexp(support, 0).exp().clamp(max=1.0)).log1p()  # log r, r = 1 − Σ_K p
        n_tail = math.log(max(self.vocab_size - len(support), 1))
        tail = n_tail + (tail_mass - n_tail) / self.temperature
        normaliser = torch.logsumexp(torch.cat([support / self.temperature, tail.reshape(1)]), 0)
        return actual / self.temperature - normaliser.item()
