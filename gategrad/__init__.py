"""gategrad: Gate-DPO (gradient-gated preference optimization) for every major ML framework.

The loss value never changes; the gradient that reaches the rejected response's log-probs is
multiplied by a gate ``g(p)`` in ``[0, 1]`` that falls to 0 as the rejected response becomes
improbable. Frameworks (torch, jax, mlx) are imported lazily, on first use.

This module only re-exports; each name is defined once, in a private module.
"""

from __future__ import annotations

import warnings
from typing import Any

from ._attach import attach
from ._backend import Backend
from ._core import (
    GateStats,
    gate_rejected,
    gate_rejected_vjp,
    gate_value,
    gate_weights,
    masked_quantile,
    scale_grad,
)
from ._dispatch import BACKENDS, framework_of, get_backend, is_available
from ._fused import fused_token_logps
from ._gate import SHAPE_DEFAULTS, Gate
from ._logps import token_logps
from ._validate import value_checks
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
    stacked_preference_loss,
)

__all__ = [
    "BACKENDS",
    "LOSS_TYPES",
    "SHAPE_DEFAULTS",
    "Backend",
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
    "fused_token_logps",
    "gate_rejected",
    "gate_rejected_vjp",
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
    "stacked_preference_loss",
    "token_logps",
    "value_checks",
]

_SUBMODULES = ("integrations", "lab", "losses", "metrics", "testing", "torch")
#: Old names kept for compatibility: name -> (new name, what to use instead).
_DEPRECATED = {"get_ops": (get_backend, "gategrad.get_backend")}


def __dir__() -> list[str]:
    """The public names and the lazy submodules (``gategrad.metrics``, ``gategrad.torch``...)."""
    return sorted({*globals(), *_SUBMODULES})


def __getattr__(name: str) -> Any:
    """Lazy submodules (``gategrad.torch``, ``gategrad.testing``, ...) and deprecated names."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name in _DEPRECATED:
        value, instead = _DEPRECATED[name]
        warnings.warn(
            f"gategrad.{name} is deprecated; use {instead}", DeprecationWarning, stacklevel=2
        )
        return value
    raise AttributeError(f"module 'gategrad' has no attribute {name!r}")
