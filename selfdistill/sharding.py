"""Our chunked projections under DDP, DeepSpeed ZeRO-2/3 and FSDP2 (and PEFT).

The projections (`selfdistill.losses`: the student's log-probs and entropy, the teacher's scores, the logit-level
term) multiply hidden states by the LM head's weight directly, chunk by chunk, instead of calling the head. Sharding
gets in the way in two places (measured on 2 CPU processes over gloo, see ARCHITECTURE.md):
- ZeRO-3 keeps a partitioned weight empty except while its own module runs; read directly it is a `[0]` tensor, in
  the forward and in a backward pass that recomputes the logits. And its gradient reduction only works for a loss
  computed inside the engine's forward.
- FSDP2 turns the weight back into a DTensor shard after the root forward, and a full copy taken then gives per-rank,
  unreduced gradients.
- DDP only all-reduces the gradients of a loss computed through its own forward (trl#7245).

The design, as TRL's fused LM head does it (`add_fused_lm_head`, `_ForwardRedirection`, `maybe_gather_lm_head_ctx`):
**every projection runs inside the wrapped model's forward** (`in_forward`), where DDP arms its reducer, ZeRO-3 its
gathering and reduction hooks, and FSDP2 has the root's parameters (embeddings, final norm, LM head) unsharded; and
the head's weight is read whole through `whole_heads`, which gathers it under ZeRO-3 for the duration, and is entered
again by the loss's backward pass (`losses`, `weights_context=`). So the student's gradient reaches the head and every
other parameter through the engine's own reduction, and the teachers (a separate OPD teacher prepared like TRL's
reference model, or the student's own network) score through the same path.
"""

from contextlib import contextmanager
from types import SimpleNamespace

import torch
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import maybe_gather_lm_head_ctx


def in_forward(model, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, run as the forward of `model`: through its wrapper (DDP, a DeepSpeed engine) into the
    wrapped module, or through the module's own call (FSDP2's and ZeRO-3's hooks on it), with the module's real
    `forward` restored for `fn` to call. `args` and `kwargs` pass through the wrapper (tensors as they are)."""
    module = getattr(model, "module", model)
    return _ForwardRedirection()(model, module, fn, *args, **kwargs)


def zero3_gathered(*params):
    """Context in which ZeRO-3 partitioned `params` hold their whole values (a null context otherwise): TRL's
    `maybe_gather_lm_head_ctx`, which skips parameters already gathered (a tied head inside the embedding's use)."""
    return maybe_gather_lm_head_ctx(*params)


def _whole(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A DTensor (FSDP2 shard) as its full tensor; for a trainable one with gradients averaged back over the ranks,
    FSDP2's own reduction (`Partial("avg")`: a plain `full_tensor()` gives each rank its unreduced gradient)."""
    if tensor is None or not hasattr(tensor, "full_tensor"):
        return tensor
    if not tensor.requires_grad:
        return tensor.full_tensor()
    from torch.distributed.tensor import Partial

    return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)


@contextmanager
def whole_heads(*heads):
    """`(views, context)`: for each head (an `nn.Linear`-like output projection, or None), an object with its whole
    `weight` and `bias` for a direct projection; and the context factory that the projection's backward pass must
    enter again, since ZeRO-3 frees a gathered weight when its context exits (`losses`, `weights_context=`)."""
    params = [p for head in heads if head is not None for p in (head.weight, head.bias)]
    with zero3_gathered(*params):
        views = [None if head is None else SimpleNamespace(weight=_whole(head.weight), bias=_whole(head.bias))
                 for head in heads]
        yield views, lambda: zero3_gathered(*params)
