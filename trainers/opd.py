"""On-policy distillation: the student samples, a separate teacher scores the student's own tokens, and the
per-token reverse KL becomes a dense negative reward inside GRPO (Agarwal et al. 2024, GKD; Thinking Machines,
"On-Policy Distillation", 2025).

CPU (tiny models, as in the tests):
    python -c "from selfdistill.trainers import OnPolicyDistillTrainer; help(OnPolicyDistillTrainer)"
One GPU, vLLM colocate:
    selfdistill train --config recipes/Qwen3-1.7B/opd/config_math.yaml --use_vllm --vllm_mode colocate
"""

from dataclasses import dataclass, field

from transformers import AutoTokenizer, PreTrainedModel
from trl.trainer.utils import create_model_from_path

from ..teachers import ModelTeacher, check_same_vocabulary
from ..vllm_teacher import VLLMServerTeacher
from .core import DenseDistillTrainer, DistillConfig, no_reward


@dataclass
class OnPolicyDistillConfig(DistillConfig):
    """GRPOConfig plus the distillation fields of `DistillConfig` and how to load the teacher."""

    task_weight: float = field(default=1.0, metadata={"help": "Weight of GRPO's group-normalised reward advantage."})

    teacher_model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for the teacher's from_pretrained (e.g. dtype), like model_init_kwargs."},
    )
    teacher_server_url: str | None = field(
        default=None,
        metadata={"help": "Score with a teacher served by vLLM at this URL (`vllm serve TEACHER`) instead of a local one."},
    )
    teacher_server_timeout: float = field(
        default=240.0, metadata={"help": "Seconds to wait for the teacher server at start before failing."}
    )

    @property
    def group_advantage_weight(self) -> float:
        return self.task_weight


class OnPolicyDistillTrainer(DenseDistillTrainer):
    """`trl.GRPOTrainer` with a teacher's per-token reverse KL added to the advantages.

    Overrides `_generate_and_score_completions` and `_compute_loss` (see `DenseDistillTrainer`); generation (HF or
    vLLM), rewards, tools, loss types, clipping, IS correction, PEFT and distribution are GRPOTrainer's.

    Args:
        model: the student, as for GRPOTrainer.
        teacher_model: a model id/path (loaded with `args.teacher_model_init_kwargs`) or a `PreTrainedModel`; None
            when `args.teacher_server_url` points at a teacher served by vLLM.
        reward_funcs: verifiable rewards, or None for pure distillation (then the KL term is the whole signal).
        teacher_processing_class: the teacher's tokenizer, for the vocabulary check; loaded from the teacher's path
            when None.
        Other arguments are GRPOTrainer's.
    """

    _tag_names = ["trl", "grpo", "selfdistill", "on-policy-distillation"]

    def __init__(self, model, teacher_model=None, reward_funcs=None, args: OnPolicyDistillConfig | None = None,
                 teacher_processing_class=None, **kwargs):
        if args is None:
            raise ValueError("OnPolicyDistillTrainer needs an OnPolicyDistillConfig (args=...).")
        super().__init__(model, reward_funcs=reward_funcs or [no_reward], args=args,
                         **kwargs)
        student_tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        if args.teacher_server_url is not None:
            if teacher_model is not None:
                raise ValueError("Pass either teacher_model or args.teacher_server_url, not both.")
            top_k = None
            if args.distill_loss_weight:  # the server returns the teacher's top-k, not its logits
                if args.distill_top_k is None or args.distill_support != "teacher":
                    raise ValueError("With a vLLM server teacher the logit-level term runs on the teacher's top-k "
                                     "log-probs: set distill_top_k (at most the server's --max-logprobs, default 20) "
                                     "and distill_support='teacher'.")
                top_k = args.distill_top_k
            self.teacher_model = None
            self.teacher = VLLMServerTeacher(args.teacher_server_url, student_tokenizer, self.temperature, top_k=top_k,
                                             timeout=args.teacher_server_timeout)
            return
        if isinstance(teacher_model, str):
            teacher_name = teacher_model
            teacher_model = create_model_from_path(teacher_model, **(args.teacher_model_init_kwargs or {}))
        elif isinstance(teacher_model, PreTrainedModel):
            teacher_name = teacher_model.name_or_path
        else:
            raise TypeError("teacher_model must be a model id/path or a PreTrainedModel (or set args.teacher_server_url), "
                            f"got {type(teacher_model)}")
        if teacher_processing_class is None:
            teacher_processing_class = AutoTokenizer.from_pretrained(teacher_name)
        check_same_vocabulary(student_tokenizer, teacher_processing_class, self.model.name_or_path, teacher_name)
        if args.distill_loss_weight:
            v_s = self.model.get_output_embeddings().weight.shape[0]
            v_t = teacher_model.get_output_embeddings().weight.shape[0]
            if v_s != v_t:
                raise ValueError(f"The logit-level term needs equal vocabulary sizes; student {v_s}, teacher {v_t}.")

        self.teacher_model = teacher_model = self._prepare_teacher_model(teacher_model)
        self.teacher = ModelTeacher(
            teacher_model, self.temperature, args.per_device_train_batch_size, return_hidden=bool(args.distill_loss_weight)
        )

    def _no_teacher_signal_cause(self) -> str:
        return ("every rollout is distilled, so every completion was empty or fully masked (tool_mask?): check "
                "max_completion_length and the generation settings.")

    def _teacher_prompts(self, inputs, batch):
        """The teacher sees exactly the student's prompt; every rollout is distilled."""
        has_teacher_B = batch["completion_mask"].new_ones(batch["completion_mask"].shape[0], dtype=bool)
        return batch["prompt_ids"], batch["prompt_mask"], has_teacher_B
