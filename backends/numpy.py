"""NumPy reference backend: the identity forward and an explicit VJP oracle.

NumPy has no autograd, so ``scale_grad`` is the identity and :func:`vjp` states the backward
rule explicitly: ``vjp(x, v) = g(stop_gradient(stat(x))) * v``. Tests use it as the oracle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gategrad._core import broadcast_weight, gate_weights
from gategrad._gate import Gate


class NumpyOps:
    """:class:`gategrad._xp.ArrayOps` for ``numpy.ndarray``."""

    name = "numpy"

    def scale_grad(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x

    def stop_gradient(self, x: np.ndarray) -> np.ndarray:
        return x

    def is_concrete(self, x: np.ndarray) -> bool:
        return True

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def from_numpy(self, a: np.ndarray, like: Any) -> np.ndarray:
        return a

    def compute_dtype(self, x: np.ndarray) -> np.dtype:
        return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)

    def astype(self, x: np.ndarray, dtype: Any) -> np.ndarray:
        return np.asarray(x).astype(dtype, copy=False)

    def is_floating(self, x: np.ndarray) -> bool:
        return bool(np.issubdtype(x.dtype, np.floating))

    def bool_mask(self, mask: np.ndarray) -> np.ndarray:
        return np.asarray(mask) != 0

    def exp(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", under="ignore"):
            return np.exp(x)

    def log(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(x)

    def sigmoid(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", under="ignore"):
            return 1.0 / (1.0 + np.exp(-x))

    def where(self, cond: Any, a: Any, b: Any) -> np.ndarray:
        return np.where(cond, a, b)

    def minimum(self, a: Any, b: Any) -> np.ndarray:
        return np.minimum(a, b)

    def sum(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.sum(x, axis=axis)

    def min(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.min(x, axis=axis)

    def sort(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.sort(x, axis=axis)

    def take_along_axis(self, x: np.ndarray, idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.take_along_axis(x, idx, axis=axis)

    def full_like(self, x: np.ndarray, value: float) -> np.ndarray:
        return np.full_like(x, value)

    def isnan(self, x: np.ndarray) -> np.ndarray:
        return np.isnan(x)

    def any(self, x: np.ndarray) -> bool:
        return bool(np.any(x))

    def nonzero_rows(self, x: np.ndarray) -> list[int]:
        return [int(i) for i in np.flatnonzero(x)]

    def logsumexp(self, x: np.ndarray, axis: int = -1) -> np.ndarray:
        m = np.max(x, axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        with np.errstate(divide="ignore", under="ignore"):
            out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
        return np.squeeze(out, axis=axis)

    def log_sigmoid(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", over="ignore"):
            return -np.logaddexp(0.0, -x)

    def maximum(self, a: Any, b: Any) -> np.ndarray:
        return np.maximum(a, b)

    def mean(self, x: np.ndarray, axis: int | None = None) -> np.ndarray:
        return np.mean(x, axis=axis)

    def concatenate(self, xs: list[np.ndarray], axis: int = 0) -> np.ndarray:
        return np.concatenate(xs, axis=axis)

    def as_index(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def checkpoint(self, fn: Any, *args: np.ndarray) -> np.ndarray:
        return fn(*args)


ops = NumpyOps()


def scale_grad_vjp(cotangent: np.ndarray, weight: Any) -> np.ndarray:
    """The backward of ``scale_grad``: ``v * w`` in ``promote_types(v.dtype, float32)``, cast."""
    v = np.asarray(cotangent)
    dtype = ops.compute_dtype(v)
    return (v.astype(dtype) * np.asarray(weight, dtype=dtype)).astype(v.dtype)


def vjp(
    rejected_logps: np.ndarray,
    cotangent: np.ndarray,
    gate: Gate,
    mask: np.ndarray | None = None,
    *,
    lengths: Any = None,
) -> np.ndarray:
    """Reference VJP of :func:`gategrad.gate_rejected`: the cotangent scaled by ``g``.

    Shapes as in ``gate_rejected``; ``cotangent`` has the shape of ``rejected_logps``.
    """
    stats = gate_weights(rejected_logps, gate, mask, lengths=lengths)
    return scale_grad_vjp(cotangent, broadcast_weight(ops, rejected_logps, stats))
