"""TRL trainer subclasses: on-policy distillation and self-distillation, sharing one core (`core.py`)."""

from .core import DenseDistillTrainer, DistillConfig
from .opd import OnPolicyDistillConfig, OnPolicyDistillTrainer
from .self_distill import SelfDistillConfig, SelfDistillTrainer

__all__ = [
    "DenseDistillTrainer",
    "DistillConfig",
    "OnPolicyDistillConfig",
    "OnPolicyDistillTrainer",
    "SelfDistillConfig",
    "SelfDistillTrainer",
]
