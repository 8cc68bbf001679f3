"""MLX backend: ``scale_grad`` as an ``mx.custom_function`` with a custom ``vjp``.

Works under ``mx.grad``, ``mx.value_and_grad``, ``mx.compile``, ``mx.vmap`` and
``mlx.nn.value_and_grad``. The primitive takes two inputs (``x`` and the weight), so the vjp
always receives a tuple of primals (the single-input form receives bare arrays). float64 exists
on the CPU only; on Metal use float32 or bfloat16.
"""

from __future__ import annotations

from typing import Any

try:
    import mlx.core as mx
except ImportError as err:  # pragma: no cover - exercised only without mlx
    raise ImportError(
        "gategrad.backends.mlx needs MLX: pip install 'gategrad[mlx]' "
        "(mlx[cpu] on Linux, mlx on Apple Silicon)"
    ) from err

import numpy as np


@mx.custom_function
def _scale_grad(x: mx.array, weight: mx.array) -> mx.array:
    return x


@_scale_grad.vjp
def _scale_grad_vjp(
    primals: tuple[mx.array, mx.array], cotangent: Any, output: Any
) -> tuple[mx.array, mx.array]:
    _, weight = primals
    if isinstance(cotangent, (list, tuple)):
        (cotangent,) = cotangent
    weight = mx.stop_gradient(weight)
    grad = (cotangent.astype(weight.dtype) * weight).astype(cotangent.dtype)
    return grad, mx.zeros_like(weight)


_NP_DTYPES = {mx.float32: np.float32, mx.float16: np.float16, mx.float64: np.float64}


class MlxOps:
    """:class:`gategrad._xp.ArrayOps` for ``mlx.core.array``."""

    name = "mlx"

    def scale_grad(self, x: mx.array, weight: mx.array) -> mx.array:
        return _scale_grad(x, mx.stop_gradient(weight))  # type: ignore[return-value]

    def stop_gradient(self, x: mx.array) -> mx.array:
        return mx.stop_gradient(x)

    def is_concrete(self, x: mx.array) -> bool:
        # MLX cannot tell whether it is tracing; value checks catch the error it raises then.
        return True

    def to_numpy(self, x: mx.array) -> np.ndarray:
        if x.dtype == mx.bfloat16:
            x = x.astype(mx.float32)
        return np.array(x)

    def from_numpy(self, a: np.ndarray, like: mx.array) -> mx.array:
        if a.dtype == np.float64:
            dtype = mx.float64 if like.dtype == mx.float64 else mx.float32
            return mx.array(a.astype(np.float32) if dtype == mx.float32 else a, dtype=dtype)
        return mx.array(a)

    def compute_dtype(self, x: mx.array) -> Any:
        return mx.float64 if x.dtype == mx.float64 else mx.float32

    def astype(self, x: mx.array, dtype: Any) -> mx.array:
        return x.astype(dtype)

    def is_floating(self, x: mx.array) -> bool:
        return bool(mx.issubdtype(x.dtype, mx.floating))

    def bool_mask(self, mask: mx.array) -> mx.array:
        return mask if mask.dtype == mx.bool_ else mask != 0

    def exp(self, x: mx.array) -> mx.array:
        return mx.exp(x)

    def log(self, x: Any) -> mx.array:
        return mx.log(x)

    def sigmoid(self, x: mx.array) -> mx.array:
        return mx.sigmoid(x)

    def where(self, cond: Any, a: Any, b: Any) -> mx.array:
        return mx.where(cond, a, b)

    def minimum(self, a: mx.array, b: mx.array) -> mx.array:
        return mx.minimum(a, b)

    def sum(self, x: mx.array, axis: int = -1) -> mx.array:
        return mx.sum(x, axis=axis)

    def min(self, x: mx.array, axis: int = -1) -> mx.array:
        return mx.min(x, axis=axis)

    def sort(self, x: mx.array, axis: int = -1) -> mx.array:
        return mx.sort(x, axis=axis)

    def take_along_axis(self, x: mx.array, idx: mx.array, axis: int = -1) -> mx.array:
        return mx.take_along_axis(x, idx, axis=axis)

    def full_like(self, x: mx.array, value: float) -> mx.array:
        return mx.full(x.shape, value, dtype=x.dtype)

    def isnan(self, x: mx.array) -> mx.array:
        return mx.isnan(x)

    def any(self, x: mx.array) -> bool:
        try:
            return bool(mx.any(x).item())
        except (RuntimeError, ValueError):  # tracing (mx.compile / vmap): values unavailable
            return False

    def nonzero_rows(self, x: mx.array) -> list[int]:
        return [int(i) for i in np.flatnonzero(np.array(x))]

    def logsumexp(self, x: mx.array, axis: int = -1) -> mx.array:
        return mx.logsumexp(x, axis=axis)

    def log_sigmoid(self, x: mx.array) -> mx.array:
        return -mx.logaddexp(mx.zeros_like(x), -x)

    def maximum(self, a: mx.array, b: mx.array) -> mx.array:
        return mx.maximum(a, b)

    def mean(self, x: mx.array, axis: int | None = None) -> mx.array:
        return mx.mean(x) if axis is None else mx.mean(x, axis=axis)

    def concatenate(self, xs: list[mx.array], axis: int = 0) -> mx.array:
        return mx.concatenate(list(xs), axis=axis)

    def as_index(self, x: mx.array) -> mx.array:
        return x

    def checkpoint(self, fn: Any, *args: mx.array) -> mx.array:
        return mx.checkpoint(fn)(*args)


ops = MlxOps()
