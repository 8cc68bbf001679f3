"""The gate math, written once against [`gategrad.Backend`][].

Everything here runs on stop-gradient values in ``promote_types(dtype, float32)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._backend import Array, Backend
from ._gate import Gate


def _log_param(value: Any, ops: Backend) -> Any:
    """``log`` of a gate parameter: Python math for numbers, array math for traced values."""
    return math.log(value) if isinstance(value, (int, float)) else ops.log(value)


def gate_value(gate: Gate, logp: Array, ops: Backend) -> Array:
    """``g(p)`` for ``p = exp(logp)``, elementwise, in ``[0, 1]`` and non-decreasing in ``p``.

    ``logp`` may hold ``-inf`` (``p = 0``): every named shape then gives exactly 0 (before the
    floor) and never NaN, because ``log p`` is never formed from ``p``.
    """
    shape = gate.shape
    if shape == "sigmoid":
        g = ops.sigmoid(gate.alpha * (ops.exp(logp) - gate.tau))
    elif shape == "log_sigmoid":
        g = ops.sigmoid((logp - _log_param(gate.tau, ops)) / gate.temperature)
    elif shape == "hard":
        ge = logp >= _log_param(gate.tau, ops)
        g = ops.astype(ge, logp.dtype)
    elif shape == "power":
        z = gate.exponent * (logp - _log_param(gate.tau, ops))
        g = ops.exp(ops.minimum(z, 0.0))
    else:  # a user callable on p
        g = shape(ops.exp(logp))
        g = ops.astype(g, ops.compute_dtype(logp)) if hasattr(g, "dtype") else g
    floor = gate.floor
    if isinstance(floor, (int, float)) and floor == 0.0:
        return g
    return floor + (1.0 - floor) * g


def _quantile_tables(length: int, q: float) -> tuple[np.ndarray, ...]:
    """NumPy's linear-method index arithmetic for every row count ``n = k + 1 <= length``.

    For ``k = n - 1``: the virtual index ``v = k * q`` in float64, ``lo = floor(v)``,
    ``hi = min(lo + 1, k)``, ``t = v - lo`` and ``1 - t``. Tables make every backend (including
    JAX without x64, or Metal without float64) reproduce ``numpy.quantile`` bit for bit.
    """
    k = np.arange(length, dtype=np.float64)
    v = k * np.float64(q)
    lo = np.floor(v)
    hi = np.minimum(lo + 1, k)
    above = v >= k  # numpy takes the last value when the index reaches the end
    lo = np.where(above, k, lo)
    hi = np.where(above, k, hi)
    t = v - np.floor(v)
    return lo.astype(np.int64), hi.astype(np.int64), t, 1.0 - t, t >= 0.5


def masked_quantile(values: Array, mask: Array, q: float, ops: Backend) -> Array:
    """Quantile ``q`` of each row's masked values, as ``numpy.quantile(row[mask], q)``.

    ``values`` and boolean ``mask`` have shape ``(B, T)``; every row needs one valid entry.
    Returns ``(B,)``. Matches NumPy's default (linear) method exactly, including its
    two-sided lerp: ``a + (b - a) * t`` for ``t < 0.5`` and ``b - (b - a) * (1 - t)`` otherwise.
    """
    length = values.shape[-1]
    lo_t, hi_t, t_t, omt_t, upper_t = (
        ops.from_numpy(a, like=values) for a in _quantile_tables(length, float(q))
    )
    dtype = values.dtype
    ordered = ops.sort(ops.where(mask, values, float("inf")), axis=-1)
    count = ops.sum(ops.astype(mask, lo_t.dtype), axis=-1)
    k = count - 1
    k = ops.maximum(k, 0)  # all-masked rows are rejected upstream
    lo = ops.take_along_axis(lo_t, k, axis=-1)
    hi = ops.take_along_axis(hi_t, k, axis=-1)
    t = ops.astype(ops.take_along_axis(t_t, k, axis=-1), dtype)
    omt = ops.astype(ops.take_along_axis(omt_t, k, axis=-1), dtype)
    upper = ops.take_along_axis(upper_t, k, axis=-1)
    a = ops.take_along_axis(ordered, lo[..., None], axis=-1)[..., 0]
    b = ops.take_along_axis(ordered, hi[..., None], axis=-1)[..., 0]
    diff = b - a
    return ops.where(upper, b - diff * omt, a + diff * t)


def estimate_logp(gate: Gate, logps: Array, mask: Array, ops: Backend) -> Array:
    """Per-example ``log p`` of the rejected response from token log-probs.

    ``logps`` ``(B, T)`` in compute dtype, boolean ``mask`` ``(B, T)``; returns ``(B,)``:

    - ``seq``:  ``sum_t m_t log p_t / sum_t m_t`` (log of the geometric mean)
    - ``mean``: ``log(sum_t m_t p_t / sum_t m_t)``
    - ``min``:  ``min_{t: m_t} log p_t``
    - ``qNN``:  ``log quantile_{t: m_t}(p_t, NN/100)`` (NumPy's linear method)
    """
    est = gate.estimator
    if est == "min":
        return ops.min(ops.where(mask, logps, float("inf")), axis=-1)
    if est == "seq":
        count = ops.sum(ops.astype(mask, logps.dtype), axis=-1)
        return ops.sum(ops.where(mask, logps, 0.0), axis=-1) / count
    probs = ops.exp(logps)
    if est == "mean":
        count = ops.sum(ops.astype(mask, logps.dtype), axis=-1)
        return ops.log(ops.sum(ops.where(mask, probs, 0.0), axis=-1) / count)
    quantile = gate.quantile
    assert quantile is not None
    return ops.log(masked_quantile(probs, mask, quantile, ops))
