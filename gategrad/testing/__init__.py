"""The public verification kit: check that a loss or a training step gives the same values
and gradients in every framework, with Hypothesis strategies and tiny reference models.

- [`assert_backends_agree`][] runs one scalar function per framework from shared NumPy inputs,
  with its gradients, and raises [`BackendDisagreement`][] naming the worst tensor and pair.
- [`gategrad.testing.models`][]: a toy softmax and a tiny transformer, written once for
  every framework; [`softmax_logps`][], [`transformer_logps`][] and [`PreferenceSpec`][] turn
  them into preference losses end to end.
- [`gategrad.testing.strategies`][]: Hypothesis strategies (``gates``, ``preference_batches``,
  ``preference_specs``, ``transformer_batches``, ...; they need
  ``pip install 'gategrad[test]'``).

Frameworks are imported only when a function needs them, and Hypothesis only when a strategy
is first used.
"""

from __future__ import annotations

from typing import Any

from ._adapters import (
    FRAMEWORKS,
    MODES,
    from_numpy,
    require,
    to_numpy,
    value_and_grad,
    vjp,
    vmap_value_and_grad,
)
from ._agree import (
    FLOAT32_TOL,
    FLOAT64_TOL,
    Agreement,
    BackendDisagreement,
    TensorDiff,
    assert_backends_agree,
    compare_results,
    run_backend,
    run_backend_vmapped,
    tolerance,
)
from .models import SoftmaxConfig, TransformerConfig, make_shared_contexts
from .models._params import init_softmax_params, init_transformer_params, transformer_param_shapes
from .preference import (
    GateParts,
    PreferenceLogps,
    PreferenceSpec,
    gate_gradient_parts,
    make_softmax_batch,
    make_transformer_batch,
    model_module,
    preference_loss_fn,
    softmax_logps,
    softmax_reference,
    transformer_logps,
)

#: Names served lazily from :mod:`gategrad.testing.strategies` (imports Hypothesis).
_STRATEGIES = (
    "ESTIMATORS",
    "SOFTMAX_CONFIGS",
    "TRANSFORMER_CONFIGS",
    "gates",
    "loss_params",
    "preference_batches",
    "preference_specs",
    "softmax_batches",
    "softmax_configs",
    "transformer_batches",
    "transformer_configs",
)

__all__ = [
    "FLOAT32_TOL",
    "FLOAT64_TOL",
    "FRAMEWORKS",
    "MODES",
    "Agreement",
    "BackendDisagreement",
    "GateParts",
    "PreferenceLogps",
    "PreferenceSpec",
    "SoftmaxConfig",
    "TensorDiff",
    "TransformerConfig",
    "assert_backends_agree",
    "compare_results",
    "from_numpy",
    "gate_gradient_parts",
    "init_softmax_params",
    "init_transformer_params",
    "make_shared_contexts",
    "make_softmax_batch",
    "make_transformer_batch",
    "model_module",
    "preference_loss_fn",
    "require",
    "run_backend",
    "run_backend_vmapped",
    "softmax_logps",
    "softmax_reference",
    "to_numpy",
    "tolerance",
    "transformer_logps",
    "transformer_param_shapes",
    "value_and_grad",
    "vjp",
    "vmap_value_and_grad",
    *_STRATEGIES,
]


def __getattr__(name: str) -> Any:
    if name in _STRATEGIES or name == "strategies":
        import importlib

        try:
            module = importlib.import_module(f"{__name__}.strategies")
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"gategrad.testing.{name} needs Hypothesis: pip install 'gategrad[test]'"
            ) from err
        return module if name == "strategies" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
