"""selfdistill: on-policy distillation and self-distillation for TRL's GRPOTrainer."""

__version__ = "0.1.0"
