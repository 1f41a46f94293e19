"""Teacher back-ends: score the student's exact completion tokens under a teacher.

A teacher is anything with `score(prompt_ids, prompt_mask, completion_ids, completion_mask) -> TeacherScores`.
The trainers only call that method, so a teacher served elsewhere (e.g. by vLLM) drops in without touching them.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model

from .losses import token_logprobs


@dataclass
class TeacherScores:
    """Teacher log-probs of the completion tokens, `(B, T)`, zero where masked; and, when asked for, what the
    logit-level term needs: a local teacher's last hidden states at the positions that predict them, `(B, T, H)`
    (its `head` projects them to logits), or a served teacher's top-k token ids and log-probs, `(B, T, K)`."""

    logp_BT: torch.Tensor
    hidden_BTH: torch.Tensor | None = None
    topk_ids_BTK: torch.Tensor | None = None
    topk_logp_BTK: torch.Tensor | None = None

    def logit_inputs(self) -> dict[str, torch.Tensor]:
        """The batch entries the logit-level term reads (see `DenseDistillTrainer._compute_loss`)."""
        if self.hidden_BTH is not None:
            return {"teacher_hidden": self.hidden_BTH}
        if self.topk_ids_BTK is not None:
            return {"teacher_topk_ids": self.topk_ids_BTK, "teacher_topk_logps": self.topk_logp_BTK}
        raise ValueError("The logit-level term needs the teacher's hidden states or its top-k log-probs; this teacher "
                         "returned neither.")


def causal_lm_parts(model):
    """`(backbone, head)` of a Hugging Face causal LM, through accelerate/DeepSpeed wrappers and PEFT.

    The backbone maps token ids to last hidden states (`model.base_model` for HF models); the head is the output
    embedding. Calling them separately lets us project only completion positions, in chunks.
    """
    model = getattr(model, "module", model)  # DDP / DeepSpeed engine
    if is_peft_model(model):
        model = model.get_base_model()
    return model.base_model, model.get_output_embeddings()


def completion_hidden_states(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """Last hidden states `(B, T, H)` at the positions that predict each completion token.

    Position `P − 1 + t` (P = padded prompt length) predicts completion token t. Prompts are left-padded and
    completions right-padded, the layout GRPOTrainer produces.

    Rows with identical prompts (a group's rollouts: one prompt in on-policy distillation, and in self-distillation
    the same feedback, solution or demonstration) share one prompt pass: its keys and values are computed once per
    distinct prompt and copied to each of its rows, then only the completion tokens run. The result equals one
    forward over `prompt + completion` (position ids are the same `arange` in both), at the cost of the prompt
    pass divided by the group size.
    """
    backbone, _ = causal_lm_parts(model)
    P, T = prompt_ids.shape[1], completion_ids.shape[1]
    distinct, row_of = torch.unique(torch.cat([prompt_ids, prompt_mask], dim=1), dim=0, return_inverse=True)
    if len(distinct) == len(prompt_ids) or T < 2:
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return hidden[:, P - 1 : P - 1 + T]
    prompts = backbone(input_ids=distinct[:, :P], attention_mask=distinct[:, P:], use_cache=True)
    cache = prompts.past_key_values
    cache.reorder_cache(row_of)  # row b gets the keys and values of its prompt
    rest = backbone(input_ids=completion_ids[:, :-1], attention_mask=torch.cat([prompt_mask, completion_mask[:, :-1]], 1),
                    past_key_values=cache, use_cache=True).last_hidden_state
    # The prompt's last position predicts completion token 0; completion token t − 1 predicts token t.
    return torch.cat([prompts.last_hidden_state[row_of, -1:], rest], dim=1)


class ModelTeacher:
    """A local causal LM as teacher: a separate model (on-policy distillation) or the student itself (self-
    distillation). Runs under `no_grad` in micro-batches of `batch_size` rows; logits are computed only for
    completion positions, `chunk_size` tokens at a time, at the sampling temperature."""

    def __init__(self, model, temperature: float, batch_size: int, return_hidden: bool = False):
        self.model, self.temperature, self.batch_size, self.return_hidden = model, temperature, batch_size, return_hidden

    @property
    def head(self):
        return causal_lm_parts(self.model)[1]

    @torch.no_grad()
    def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> TeacherScores:
        logps, hiddens = [], []
        for start in range(0, prompt_ids.shape[0], self.batch_size):
            rows = slice(start, start + self.batch_size)
            hidden = completion_hidden_states(
                self.model, prompt_ids[rows], prompt_mask[rows], completion_ids[rows], completion_mask[rows]
            )
            logps.append(
                token_logprobs(
                    hidden, completion_ids[rows], completion_mask[rows], head=self.head, temperature=self.temperature
                )
            )
            if self.return_hidden:
                hiddens.append(hidden)
        return TeacherScores(torch.cat(logps), torch.cat(hiddens) if self.return_hidden else None)


class _SnapshotHead(torch.nn.Module):
    """An output projection with weights taken from a teacher snapshot (not registered as parameters)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, hidden):
        return F.linear(hidden, self.weight, self.bias)


class SelfTeacher(ModelTeacher):
    """The student's own network as its teacher, in one of three kinds:

    - `live`: the current weights, no extra memory;
    - `ema`: an exponential moving average of the trainable weights, `θ_T ← (1−r)·θ_T + r·θ` after each optimizer
      step (`update`); with PEFT only the adapter is trainable, so only the adapter is averaged;
    - `base`: the frozen starting weights; with PEFT the adapter is disabled instead of copying the model.

    `ema` and `base` (without PEFT) keep a snapshot of the trainable parameters and swap it into the network while
    scoring. `head` projects with the snapshot's output embedding when it has one, so the logit-level term uses
    the teacher's head, not the student's.
    """

    KINDS = ("live", "ema", "base")

    def __init__(self, model, kind: str, update_rate: float, temperature: float, batch_size: int,
                 return_hidden: bool = False):
        if kind not in self.KINDS:
            raise ValueError(f"teacher must be one of {self.KINDS}, got {kind!r}")
        super().__init__(model, temperature, batch_size, return_hidden)
        self.kind, self.update_rate = kind, update_rate
        self.network = getattr(model, "module", model)
        self.snapshot: dict[str, torch.Tensor] | None = None
        if kind == "ema" or (kind == "base" and not is_peft_model(self.network)):
            if any(getattr(p, "ds_id", None) is not None for p in self.network.parameters()):
                raise NotImplementedError("ema/base teachers keep a weight snapshot, which DeepSpeed ZeRO-3 shards; "
                                          "use teacher='live', or PEFT with teacher='base'.")
            self.snapshot = {n: p.detach().clone() for n, p in self._trainable()}

    def _trainable(self):
        return [(n, p) for n, p in self.network.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step after an optimizer step (no-op for live and base)."""
        if self.kind == "ema":
            for name, param in self._trainable():
                self.snapshot[name].lerp_(param.detach().to(self.snapshot[name].dtype), self.update_rate)

    @contextmanager
    def _swapped_in(self):
        params = dict(self._trainable())
        live = {n: params[n].data for n in self.snapshot}
        try:
            for n, t in self.snapshot.items():
                params[n].data = t
            yield
        finally:
            for n, t in live.items():
                params[n].data = t

    def weights(self):
        """Context in which the network holds the teacher's weights."""
        if self.snapshot is not None:
            return self._swapped_in()
        if self.kind == "base":  # PEFT: the base model is the model with its adapter disabled
            return self.network.disable_adapter()
        return nullcontext()

    @property
    def head(self):
        head = causal_lm_parts(self.model)[1]
        name = next((n for n, p in self.network.named_parameters() if p is head.weight), None)
        if self.snapshot is None or name not in self.snapshot:
            return head
        return _SnapshotHead(self.snapshot[name], head.bias)

    def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> TeacherScores:
        was_training = self.network.training
        self.network.eval()  # no dropout in the teacher
        try:
            with self.weights():
                return super().score(prompt_ids, prompt_mask, completion_ids, completion_mask)
        finally:
            self.network.train(was_training)


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_name: str, teacher_name: str) -> None:
    """Raise a ValueError naming both models and the first differing token unless both tokenizers map the same
    strings to the same ids. Needed because the teacher scores the student's token ids as they are."""
    vocab_s, vocab_t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if vocab_s == vocab_t:
        return
    for token in sorted(set(vocab_s) | set(vocab_t), key=lambda t: (vocab_s.get(t, vocab_t.get(t)), t)):
        if vocab_s.get(token) != vocab_t.get(token):
            raise ValueError(
                f"The student ({student_name}) and teacher ({teacher_name}) tokenizers differ: token {token!r} has id "
                f"{vocab_s.get(token)} in the student and {vocab_t.get(token)} in the teacher. The teacher scores the "
                "student's token ids, so both must share one vocabulary (cross-tokenizer distillation is not supported)."
            )
