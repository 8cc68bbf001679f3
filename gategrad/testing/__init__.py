"""The public verification kit: check that a loss or a training step gives the same values
and gradients in every framework, with Hypothesis strategies and tiny reference models.

Frameworks are imported only when a function needs them.
"""

from __future__ import annotations

from ._adapters import FRAMEWORKS, MODES, from_numpy, require, to_numpy, value_and_grad, vjp

__all__ = [
    "FRAMEWORKS",
    "MODES",
    "from_numpy",
    "require",
    "to_numpy",
    "value_and_grad",
    "vjp",
]
