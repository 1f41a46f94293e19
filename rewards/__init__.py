"""TRL-compatible reward functions that also explain themselves (per-rollout feedback)."""
