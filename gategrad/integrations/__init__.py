"""Integrations with training stacks: TRL, mlx-lm (imported on use)."""
