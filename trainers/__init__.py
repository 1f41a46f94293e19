"""TRL trainer subclasses: on-policy distillation and self-distillation."""
