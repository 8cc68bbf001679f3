"""PyTorch forward passes of the test-kit models: [`gategrad.testing.models`][] bound to
``'torch'`` (kept for compatibility; importing it imports PyTorch)."""

from gategrad.testing.models._forward import bind

__all__ = ["params_from_numpy", "softmax_logits", "to_numpy", "transformer_logits"]

params_from_numpy, softmax_logits, transformer_logits, to_numpy = bind("torch")
