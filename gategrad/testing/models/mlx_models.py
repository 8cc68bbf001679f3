"""MLX forward passes of the test-kit models: [`gategrad.testing.models`][] bound to
``'mlx'`` (kept for compatibility; importing it imports MLX).

MLX float64 exists on the CPU only (``mx.set_default_device(mx.cpu)``), and its transcendental
functions are only ~1e-7 accurate.
"""

from gategrad.testing.models._forward import bind

__all__ = ["params_from_numpy", "softmax_logits", "to_numpy", "transformer_logits"]

params_from_numpy, softmax_logits, transformer_logits, to_numpy = bind("mlx")
