"""Integrations with training stacks: TRL, mlx-lm, mlx-lm-lora (imported on use)."""
