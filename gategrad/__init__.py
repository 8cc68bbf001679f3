"""gategrad: Gate-DPO (gradient-gated preference optimization) for every major ML framework.

The loss value never changes; the gradient that reaches the rejected response's log-probs is
multiplied by a gate ``g(p)`` in ``[0, 1]`` that falls to 0 as the rejected response becomes
improbable. Frameworks (torch, jax, mlx) are imported lazily, on first use.
"""

from __future__ import annotations

from ._attach import attach
from ._core import GateStats, gate_rejected, gate_weights, scale_grad, value_checks
from ._dispatch import BACKENDS, framework_of, get_ops, is_available
from ._gate import SHAPE_DEFAULTS, Gate
from ._logps import token_logps
from ._version import __version__
from .losses import (
    LOSS_TYPES,
    cal_dpo_loss,
    dpo_loss,
    dpo_shift_lambda,
    dpo_shift_loss,
    dpop_loss,
    hinge_loss,
    ipo_loss,
    preference_loss,
    robust_dpo_loss,
    simpo_loss,
)

__all__ = [
    "BACKENDS",
    "LOSS_TYPES",
    "SHAPE_DEFAULTS",
    "Gate",
    "GateStats",
    "__version__",
    "attach",
    "cal_dpo_loss",
    "dpo_loss",
    "dpo_shift_lambda",
    "dpo_shift_loss",
    "dpop_loss",
    "framework_of",
    "gate_rejected",
    "gate_value",
    "gate_weights",
    "get_backend",
    "hinge_loss",
    "ipo_loss",
    "is_available",
    "masked_quantile",
    "preference_loss",
    "robust_dpo_loss",
    "scale_grad",
    "simpo_loss",
    "token_logps",
    "value_checks",
]


_SUBMODULES = ("integrations", "lab", "losses", "testing", "torch")


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """Lazy submodules: ``gategrad.torch``, ``gategrad.testing``, ... load on first access."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'gategrad' has no attribute {name!r}")


def get_backend(name: str):  # type: ignore[no-untyped-def]
    """The ``gategrad.backends.<name>`` ops object; ``ImportError`` names the pip extra."""
    return get_ops(name)


def gate_value(gate: Gate, p_or_logp, *, log: bool = False):  # type: ignore[no-untyped-def]
    """``g(p)`` elementwise for probabilities ``p`` (or log-probabilities with ``log=True``).

    Any framework's array; computed in ``promote_types(dtype, float32)``.
    """
    from . import _math

    ops = get_ops(framework_of(p_or_logp) or "numpy")
    x = ops.astype(ops.stop_gradient(p_or_logp), ops.compute_dtype(p_or_logp))
    return _math.gate_value(gate, x if log else ops.log(x), ops)


def masked_quantile(values, mask, q: float):  # type: ignore[no-untyped-def]
    """Per-row quantile of ``values[mask]`` (``(B, T)`` -> ``(B,)``), as ``numpy.quantile``."""
    from . import _math
    from ._dispatch import common_framework

    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must lie in [0, 1], got {q!r}")
    ops = get_ops(common_framework(values=values, mask=mask))
    return _math.masked_quantile(values, ops.bool_mask(mask), q, ops)
