"""Framework adapters for tests: NumPy <-> framework arrays, and gradients in each framework.

Each function delegates to the framework's backend object ([`gategrad.get_backend`][]), which
holds everything that differs between frameworks. ``mode='eager'`` runs the function as is;
``mode='compiled'`` runs it under ``torch.compile`` (``fullgraph=True``), ``jax.jit`` or
``mx.compile``. NumPy has no autograd: gradients there come from the caller's closed-form or
explicit VJP oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gategrad._backend import MODES, check_mode
from gategrad._dispatch import OPTIONAL_BACKENDS, framework_of, get_backend

__all__ = [
    "FRAMEWORKS",
    "MODES",
    "from_numpy",
    "require",
    "to_numpy",
    "value_and_grad",
    "vjp",
    "vmap_value_and_grad",
]

#: The frameworks with autograd, compared by the kit: every optional backend of the registry.
FRAMEWORKS: tuple[str, ...] = OPTIONAL_BACKENDS


def require(name: str) -> Any:
    """Import and return the framework module (``numpy``, ``torch``, ``jax``, ``mlx.core``), or
    raise ``ImportError`` naming the pip extra."""
    return get_backend(name).framework


def from_numpy(name: str, a: Any, dtype: str | None = None) -> Any:
    """Convert a NumPy array (or scalar) to framework ``name``.

    ``dtype``: ``'float16' | 'bfloat16' | 'float32' | 'float64'`` for floating arrays, or
    ``None`` to keep the array's dtype. Boolean and integer arrays keep their kind.
    """
    return get_backend(name).from_numpy(np.asarray(a), dtype=dtype)


def to_numpy(x: Any) -> np.ndarray:
    """Any framework's array (or a NumPy scalar, as NumPy losses return) as NumPy (bfloat16
    is widened to float32)."""
    if isinstance(x, np.generic):
        return np.asarray(x)
    name = framework_of(x)
    if name is None:
        return np.asarray(x)
    return np.asarray(get_backend(name).to_numpy(x))


def value_and_grad(
    name: str,
    fn: Callable[..., Any],
    args: Sequence[Any],
    argnums: Sequence[int] = (0,),
    mode: str = "eager",
) -> tuple[Any, tuple[Any, ...]]:
    """``(fn(*args), (d fn / d args[i] for i in argnums))`` for a scalar-valued ``fn``.

    ``args`` are arrays of framework ``name``; results are that framework's arrays.
    """
    check_mode(mode)
    try:
        return get_backend(name).value_and_grad(fn, args, tuple(argnums), mode)
    except NotImplementedError as err:  # NumPy: no autograd
        raise ValueError(str(err)) from err


def vjp(
    name: str, fn: Callable[[Any], Any], x: Any, cotangent: Any, mode: str = "eager"
) -> tuple[Any, Any]:
    """``(fn(x), v^T d fn/dx)`` for an array-valued ``fn`` of one array, in framework ``name``."""

    def scalar(x_: Any, v_: Any) -> Any:
        return (fn(x_) * v_).sum()

    out = fn(x)
    _, (grad,) = value_and_grad(name, scalar, (x, cotangent), argnums=(0,), mode=mode)
    return out, grad


def vmap_value_and_grad(
    name: str,
    fn: Callable[..., Any],
    args: Sequence[Any],
    argnums: Sequence[int] = (0,),
    batched: Sequence[int] = (),
    mode: str = "eager",
) -> tuple[Any, tuple[Any, ...]]:
    """Per-slice ``value_and_grad`` under the framework's ``vmap``.

    ``args[i]`` for ``i`` in ``batched`` carry a leading axis ``K`` that is mapped over; the
    others are shared by every slice. Returns ``(values (K,), grads)`` with every gradient
    stacked along a leading ``K`` axis: ``torch.func.vmap(torch.func.grad_and_value(...))``,
    ``jax.vmap(jax.value_and_grad(...))`` or ``mx.vmap(mx.value_and_grad(...))``;
    ``mode='compiled'`` compiles the vmapped function as [`value_and_grad`][] does.
    """
    check_mode(mode)
    try:
        return get_backend(name).vmap_value_and_grad(fn, args, tuple(argnums), tuple(batched), mode)
    except NotImplementedError as err:  # NumPy: no vmap
        raise ValueError(str(err)) from err
