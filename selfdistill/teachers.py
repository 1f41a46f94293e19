"""Teacher back-ends: score the student's exact completion tokens under a teacher.

A teacher is anything with `score(prompt_ids, prompt_mask, completion_ids, completion_mask) -> TeacherScores`.
The trainers only call that method, so a teacher served elsewhere (e.g. by vLLM) drops in without touching them.
"""

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model

from .losses import token_logprobs
from .sharding import in_forward, whole_heads


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
    completion positions, `chunk_size` tokens at a time, at the sampling temperature.

    `model` may be wrapped (DDP, a DeepSpeed engine) or sharded (ZeRO-3, FSDP2): the scoring runs inside its forward
    with the head read whole (`selfdistill.sharding`), so the same code serves every strategy."""

    def __init__(self, model, temperature: float, batch_size: int, return_hidden: bool = False):
        self.model, self.temperature, self.batch_size, self.return_hidden = model, temperature, batch_size, return_hidden

    @property
    def head(self):
        return causal_lm_parts(self.model)[1]

    @torch.no_grad()
    def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> TeacherScores:
        return in_forward(self.model, self._score, prompt_ids, prompt_mask, completion_ids, completion_mask)

    def _score(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> TeacherScores:
        logps, hiddens = [], []
        for start in range(0, prompt_ids.shape[0], self.batch_size):
            rows = slice(start, start + self.batch_size)
            hidden = completion_hidden_states(
                self.model, prompt_ids[rows], prompt_mask[rows], completion_ids[rows], completion_mask[rows]
            )
            # Gathered after the backbone ran: under ZeRO-3 a head tied to the embedding is released when it ends.
            with whole_heads(self.head) as ((head,), _):
                logps.append(token_logprobs(hidden, completion_ids[rows], completion_mask[rows], head=head,
                                            temperature=self.temperature))
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

    - `live`: the student's network with its current weights, no extra memory;
    - `ema`: an exponential moving average of the weights, `θ_T ← (1−r)·θ_T + r·θ` after each optimizer step
      (`update`);
    - `base`: the frozen starting weights.

    Without PEFT, `ema` and `base` score with their own network, `copy`: a copy of the student that the trainer
    prepares as TRL prepares GRPO's reference model (a ZeRO-3 inference engine, FSDP2 shards, or a plain copy), so it
    is sharded as the student is. The EMA step is `ema_update`. With PEFT only the adapter trains: `base` disables the adapter, and `ema` averages the adapter
    alone, in a snapshot swapped into the network while scoring (not under ZeRO-3, which shards the adapter too).
    """

    KINDS = ("live", "ema", "base")

    def __init__(self, network, kind: str, update_rate: float, temperature: float, batch_size: int,
                 return_hidden: bool = False, copy=None):
        if kind not in self.KINDS:
            raise ValueError(f"teacher must be one of {self.KINDS}, got {kind!r}")
        network = getattr(network, "module", network)
        peft = is_peft_model(network)
        if kind != "live" and not peft and copy is None:
            raise ValueError(f"a {kind!r} teacher without PEFT scores with its own copy of the network: pass `copy`")
        super().__init__(network if copy is None else copy, temperature, batch_size, return_hidden)
        self.kind, self.update_rate, self.network, self.copy = kind, update_rate, network, copy
        self.adapter: dict[str, torch.Tensor] | None = None
        if kind == "ema" and peft:
            if _is_zero3(network.parameters()):
                raise NotImplementedError("an EMA of a PEFT adapter under DeepSpeed ZeRO-3 (which shards the adapter) "
                                          "is not supported: use teacher='base' (adapter disabled) or 'live'.")
            self.adapter = {n: p.detach().clone() for n, p in self._trainable()}

    def _trainable(self):
        return [(n, p) for n, p in self.network.named_parameters() if p.requires_grad]

    def state(self) -> dict[str, torch.Tensor] | None:
        """The teacher's own weights by name (its copy's parameters, or the adapter snapshot); None when live or a
        PEFT base (the student's network)."""
        if self.adapter is not None:
            return self.adapter
        if self.copy is not None:
            return dict(getattr(self.copy, "module", self.copy).named_parameters())
        return None

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step after an optimizer step (no-op for live and base)."""
        if self.kind != "ema":
            return
        if self.adapter is not None:
            for name, param in self._trainable():
                self.adapter[name].lerp_(param.detach().to(self.adapter[name].dtype), self.update_rate)
            return
        ema_update(getattr(self.copy, "module", self.copy), self.network, self.update_rate)

    @contextmanager
    def _adapter_swapped_in(self):
        params = dict(self._trainable())
        live = {n: params[n].detach().clone() for n in self.adapter}
        try:
            for n, t in self.adapter.items():
                params[n].detach().copy_(t)  # in place: an FSDP2 shard's storage is FSDP2's own buffer
            yield
        finally:
            for n, t in live.items():
                params[n].detach().copy_(t)

    def weights(self):
        """Context in which the network scores with the teacher's weights."""
        if self.adapter is not None:
            return self._adapter_swapped_in()
        if self.kind == "base" and self.copy is None:  # PEFT: the base model is the model with its adapter disabled
            return self.network.disable_adapter()
        return nullcontext()

    @property
    def head(self):
        head = causal_lm_parts(self.model)[1]
        if self.adapter is None:
            return head
        name = next((n for n, p in self.network.named_parameters() if p is head.weight), None)
        return head if name not in self.adapter else _SnapshotHead(self.adapter[name], head.bias)

    def score(self, prompt_ids, prompt_mask, completion_ids, completion_mask) -> TeacherScores:
        was_training = self.network.training
        self.network.eval()  # no dropout in the teacher
        try:
            with self.weights():
                return super().score(prompt_ids, prompt_mask, completion_ids, completion_mask)
        finally:
            self.network.train(was_training)

    def save(self, folder: str, accelerator) -> None:
        """Write the teacher's weights (ema: they change) into a checkpoint folder; every process calls this.
        Replicated weights: one file from the main process. ZeRO-3: gathered, written by the main process. FSDP2:
        each process writes its own shards (a resume needs the same number of processes)."""
        state = self.state()
        if self.kind != "ema" or state is None:
            return
        if _is_sharded(state):
            torch.save({n: t.detach().to_local().clone() for n, t in state.items()},
                       os.path.join(folder, f"{TEACHER_FILE}.rank{accelerator.process_index}"))
            return
        with _zero3_whole(state.values(), modifier_rank=None):
            if accelerator.is_main_process:
                torch.save({n: t.detach().cpu().clone() for n, t in state.items()}, os.path.join(folder, TEACHER_FILE))

    def load(self, folder: str, accelerator) -> None:
        """Restore what `save` wrote, bit for bit; a checkpoint without it leaves the teacher as it is."""
        state = self.state()
        if self.kind != "ema" or state is None:
            return
        if _is_sharded(state):
            path = os.path.join(folder, f"{TEACHER_FILE}.rank{accelerator.process_index}")
            if os.path.exists(path):
                saved = torch.load(path, map_location="cpu")
                for n, t in state.items():
                    t.detach().to_local().copy_(saved[n])
            return
        path = os.path.join(folder, TEACHER_FILE)
        if not os.path.exists(path):
            return
        saved = torch.load(path, map_location="cpu")
        with torch.no_grad(), _zero3_whole(state.values(), modifier_rank=0):
            if accelerator.is_main_process or not _is_zero3(state.values()):
                for n, t in state.items():
                    t.copy_(saved[n])


TEACHER_FILE = "self_teacher_weights.pt"


@torch.no_grad()
def ema_update(target, source, rate: float) -> None:
    """`θ_T ← (1−r)·θ_T + r·θ` for each pair of parameters, the formula of TRL's `SyncRefModelCallback`.

    Elementwise, so FSDP2 shards update shard by shard with no communication. ZeRO-3 partitions are gathered as TRL
    updates a ZeRO-3 target (`GatheredParameters(..., modifier_rank=0)`: rank 0 writes, its value is partitioned
    again on exit), but one pair of parameters at a time rather than both whole models at once: for an 8B model in
    bf16 that is a ~1 GiB temporary (the largest matrix) instead of 33 GiB.
    """
    for target_param, param in zip(target.parameters(), source.parameters(), strict=True):
        with _zero3_whole([target_param, param], modifier_rank=0):
            if not _is_zero3([param]) or torch.distributed.get_rank() == 0:
                target_param.data.mul_(1.0 - rate).add_(param.data, alpha=rate)


def _is_sharded(state: dict) -> bool:
    return any(hasattr(t, "to_local") for t in state.values())


def _is_zero3(params) -> bool:
    """Whether any of `params` is partitioned by DeepSpeed ZeRO-3."""
    return any(getattr(p, "ds_id", None) is not None for p in params)


def _zero3_whole(params, modifier_rank):
    """ZeRO-3: the parameters gathered whole (and, with `modifier_rank`, broadcast from it on exit)."""
    params = list(params)
    if not _is_zero3(params):
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


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
