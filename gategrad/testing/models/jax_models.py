"""JAX forward passes of the test-kit models: [`gategrad.testing.models`][] bound to
``'jax'`` (kept for compatibility; importing it imports JAX).

``cfg`` is a hashable frozen dataclass: close over it or mark it static, e.g.
``jax.jit(transformer_logits, static_argnames="cfg")``. float64 needs
``jax.config.update("jax_enable_x64", True)`` before arrays are created.
"""

from gategrad.testing.models._forward import bind

__all__ = ["params_from_numpy", "softmax_logits", "to_numpy", "transformer_logits"]

params_from_numpy, softmax_logits, transformer_logits, to_numpy = bind("jax")
