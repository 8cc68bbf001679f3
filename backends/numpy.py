"""NumPy reference backend: the identity forward, no autograd.

NumPy has no autograd, so ``scale_grad`` is the identity; the backward rule it stands for is
stated by [`gategrad.gate_rejected_vjp`][] (the tests' oracle). Overrides only what
differs from [`gategrad.Backend`][]: warnings silenced where ``-inf`` and
underflow are expected values, and the functions NumPy lacks (``sigmoid``, ``logsumexp``).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from gategrad._backend import Array, Backend, DTypeName


class NumpyBackend(Backend):
    """[`gategrad.Backend`][] for ``numpy.ndarray``: the reference, without
    autograd (``scale_grad`` is the identity; [`gategrad.gate_rejected_vjp`][] states its
    backward), with NumPy's warnings silenced where ``-inf`` and underflow are expected."""

    name = "numpy"
    xp = np
    framework = np
    has_autograd = False

    def exp(self, x: Array) -> Array:
        with np.errstate(over="ignore", under="ignore"):
            return np.exp(x)

    def log(self, x: Array) -> Array:
        with np.errstate(divide="ignore"):
            return np.log(x)

    def sigmoid(self, x: Array) -> Array:
        with np.errstate(over="ignore", under="ignore"):
            return 1.0 / (1.0 + np.exp(-x))

    def log_sigmoid(self, x: Array) -> Array:
        with np.errstate(invalid="ignore", over="ignore"):
            return -np.logaddexp(0.0, -x)

    def logsumexp(self, x: Array, axis: int = -1) -> Array:
        m = np.max(x, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        with np.errstate(divide="ignore", under="ignore"):
            out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
        return np.squeeze(out, axis=axis)

    def dtype(self, name: DTypeName) -> Any:
        if name == "bfloat16":
            raise ValueError("NumPy has no bfloat16")
        return np.dtype(bool) if name == "bool_" else np.dtype(name)

    def astype(self, x: Array, dtype: Any) -> Array:
        return np.asarray(x).astype(dtype, copy=False)

    def is_floating(self, x: Array) -> bool:
        return bool(np.issubdtype(np.asarray(x).dtype, np.floating))

    def bool_mask(self, mask: Array) -> Array:
        return np.asarray(mask) != 0

    def as_index(self, x: Array) -> Array:
        return np.asarray(x)

    def scale_grad(self, x: Array, weight: Array) -> Array:
        return x

    def stop_gradient(self, x: Array) -> Array:
        return x

    def is_concrete(self, x: Array) -> bool:
        return True

    def to_numpy(self, x: Array) -> Any:
        return np.asarray(x)

    def asarray(self, a: Any, dtype: DTypeName | None, like: Array | None) -> Array:
        return a if dtype is None else a.astype(self.dtype(dtype))


backend = NumpyBackend()


def __getattr__(name: str) -> Any:
    """``vjp`` and ``scale_grad_vjp`` moved to the core; the old names warn and forward."""
    if name in ("vjp", "scale_grad_vjp"):
        warnings.warn(
            f"gategrad.backends.numpy.{name} is deprecated; use gategrad.gate_rejected_vjp",
            DeprecationWarning,
            stacklevel=2,
        )
        from gategrad._core import gate_rejected_vjp

        return gate_rejected_vjp if name == "vjp" else _scale_grad_vjp
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _scale_grad_vjp(cotangent: Any, weight: Any) -> Any:
    """``v * w`` in ``promote_types(v.dtype, float32)``, cast back (the old oracle)."""
    v = np.asarray(cotangent)
    dtype = backend.compute_dtype(v)
    return (v.astype(dtype) * np.asarray(weight, dtype=dtype)).astype(v.dtype)
