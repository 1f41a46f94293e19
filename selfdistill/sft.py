"""Supervised fine-tuning on prompt/completion data, optionally with a KL penalty to the starting model.

The entry point is `SFTKLTrainer`: TRL's `SFTTrainer`, given rows in any of the formats below (normalised by
`as_prompt_completion`), with TRL's completion-only loss (`completion_only_loss`: prompt tokens get the label -100, so
only completion tokens carry loss), and, with `kl_to_start = w > 0`, the loss

    L = (1/N) Σ_t [ −log π_θ(y_t | y_<t, x)  +  w · KL(π_θ(·|y_<t, x) ‖ π_start(·|y_<t, x)) ]

over the N completion tokens of the batch, the KL over the full vocabulary. π_start is a frozen copy of the model
taken when the trainer is built. This is the usual continual-learning baseline "SFT with a KL penalty to the start"
(the penalty keeps the tuned model's next-token distributions near the start's on the new data). The KL is computed
from hidden states with the project's chunked divergence (`losses.jsd` with β=1, reverse KL(S‖T) with S = π_θ,
T = π_start), never materialising `(B, T, V)` logits; the student's hidden states are those of TRL's own loss
forward (one student forward per step, plus one no-grad forward of the start). The penalty costs a second copy of
the weights; under DDP each process keeps its own (ZeRO-3/FSDP2 shard the head, which `losses.jsd` reads whole: not
supported, as for the distillation trainers).

Row formats (`datasets.Dataset`):
- `prompt` + `completion`: plain strings, or chat messages (a list of `{"role", "content"}`);
- `prompt` + `demonstration`, as the `demonstrations` task writes them (the demonstration is the completion);
- `messages`: a conversation whose last turn, an assistant turn, is the completion.
A string completion after a chat prompt becomes one assistant message. Other columns (e.g. `reward`, `pass_rate`,
teacher id, as best-of-N generation writes them) are dropped.

    from selfdistill.sft import SFTKLConfig, SFTKLTrainer
    trainer = SFTKLTrainer(model="Qwen/Qwen3-1.7B", args=SFTKLConfig(output_dir="sft", kl_to_start=0.1),
                           train_dataset=rows)
    trainer.train()
"""

import copy
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from .losses import jsd

FORMATS = "prompt + completion, prompt + demonstration, or messages (last turn from the assistant)"


def as_prompt_completion(dataset: Dataset) -> Dataset:
    """`dataset` as columns `prompt` and `completion` only (the formats in the module docstring); a clear error for
    an empty dataset or one in no known format."""
    columns = dataset.column_names
    if len(dataset) == 0:
        raise ValueError(f"the SFT dataset is empty (columns {columns})")
    if "prompt" in columns and ("completion" in columns or "demonstration" in columns):
        target = "completion" if "completion" in columns else "demonstration"

        def convert(row):
            return _pair(row["prompt"], row[target])
    elif "messages" in columns:

        def convert(row):
            if not row["messages"] or row["messages"][-1]["role"] != "assistant":
                raise ValueError(f"an SFT conversation must end with an assistant turn, got {row['messages']}")
            return _pair(row["messages"][:-1], row["messages"][-1:])
    else:
        raise ValueError(f"an SFT dataset needs columns {FORMATS}; this one has {columns}")
    return dataset.map(convert, remove_columns=columns)


def _pair(prompt, completion) -> dict:
    """One prompt/completion row, both chat messages when either is (TRL applies the chat template to both or none)."""
    if isinstance(prompt, list) or isinstance(completion, list):
        prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        completion = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    return {"prompt": prompt, "completion": completion}


@dataclass
class SFTKLConfig(SFTConfig):
    """TRL's `SFTConfig` plus the weight of the KL penalty to the starting model."""

    kl_to_start: float = field(
        default=0.0,
        metadata={"help": "Weight w of KL(pi_theta || pi_start) per completion token, added to the NLL; 0 is plain "
                          "SFT (and keeps no copy of the model)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.kl_to_start < 0:
            raise ValueError(f"kl_to_start must be >= 0, got {self.kl_to_start}")


class SFTKLTrainer(SFTTrainer):
    """`trl.SFTTrainer` on rows normalised by `as_prompt_completion`, with the optional penalty `kl_to_start`
    (see the module docstring). With `kl_to_start = 0` (or a plain `SFTConfig`) the loss is `SFTTrainer`'s own."""

    def __init__(self, model, args: SFTConfig | None = None, train_dataset: Dataset | None = None,
                 eval_dataset: Dataset | None = None, **kwargs):
        train_dataset = None if train_dataset is None else as_prompt_completion(train_dataset)
        eval_dataset = None if eval_dataset is None else as_prompt_completion(eval_dataset)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)
        self.kl_to_start = getattr(self.args, "kl_to_start", 0.0)
        self.start_model = None
        if self.kl_to_start > 0:
            _check_plain_head(self.model)
            self.start_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            # TRL's fused head is an instance `forward` whose closure calls the *original* model's forward: the copy
            # would run the trained model. Drop it, so the copy runs its own class forward.
            vars(_causal_lm(self.start_model)).pop("forward", None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.start_model is None or self.kl_to_start == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        student = _causal_lm(self.accelerator.unwrap_model(model))
        captured = []  # the backbone's output in TRL's loss forward: the hidden states its fused head projects
        hook = student.base_model.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            hook.remove()
        hidden_BTH = captured[0].last_hidden_state[:, :-1]  # position t predicts token t+1, as in TRL's fused head
        mask_BT = inputs["labels"][:, 1:] != -100
        start = _causal_lm(self.start_model)
        backbone_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        with torch.no_grad():
            start_hidden_BTH = start.base_model(**backbone_inputs, use_cache=False).last_hidden_state[:, :-1]
        kl_BT = jsd(hidden_BTH, start_hidden_BTH, mask_BT, beta=1.0, student_head=student.get_output_embeddings(),
                    teacher_head=start.get_output_embeddings())
        # Normalised as SFTTrainer.compute_loss normalises the NLL, so both terms are means over the same tokens.
        num_tokens = mask_BT.sum() if num_items_in_batch is None else num_items_in_batch
        kl = kl_BT.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            kl = kl * (self.accelerator.num_processes // self.get_tp_size())
        mode = "train" if self.model.training else "eval"
        kl_sum = self.accelerator.gather_for_metrics(kl_BT.detach().sum()).sum()
        tokens = self.accelerator.gather_for_metrics(mask_BT.sum()).sum()
        self._metrics[mode]["kl_to_start"].append((kl_sum / tokens.clamp(min=1)).item())
        if return_outputs:
            loss, outputs = result
            return loss + self.kl_to_start * kl, outputs
        return result + self.kl_to_start * kl


def _causal_lm(model):
    """The causal LM whose forward TRL patched with its fused head (under a PEFT wrapper, the wrapped model)."""
    return model.get_base_model() if is_peft_model(model) else model


def _check_plain_head(model) -> None:
    """`losses.jsd` projects `head(h)`: a model that rescales or soft-caps its logits would get a wrong KL."""
    config = _causal_lm(model).config.get_text_config()
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"kl_to_start does not support a model with {name}={getattr(config, name)}")
