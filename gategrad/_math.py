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


#: Gate slopes, temperatures and exponents are used clamped to ``[PARAM_MIN, PARAM_MAX]``, a
#: range float32 represents with room to spare: a parameter beyond it (``alpha=1e39`` is
#: ``inf`` in float32, ``temperature=1e-50`` is 0) would make ``inf * 0``, ``0 * -inf`` or
#: ``-inf / inf`` (NaN) where ``p = tau`` or ``p = 0``. Clamped, every product is finite or a
#: signed infinity whose sigmoid / exp is exact. The gate changes only where
#: ``|p - tau| < 1e-30`` (``|log p - log tau|`` for the other shapes), i.e. where the exact
#: gate is a step whose value at the step differs.
PARAM_MIN, PARAM_MAX = 1e-30, 1e30
#: Where ``sigmoid(z)`` and ``exp(-z)`` are exactly 0 or 1 in float32 and float64 (``|z| >=
#: 1e4``): arguments are capped there so that ``d / temperature`` and ``exponent * d`` never
#: overflow (a NumPy warning, an ``inf`` product) for any finite parameter.
SATURATE = 1e4


def _clamped(value: Any, ops: Backend) -> Any:
    if isinstance(value, (int, float)):
        return min(max(value, PARAM_MIN), PARAM_MAX)
    return ops.minimum(ops.maximum(value, PARAM_MIN), PARAM_MAX)


def _callable_gate(gate: Gate, logp: Array, ops: Backend) -> Array:
    """A user callable's ``g = f(p)``, checked: a number, or an array of ``p``'s framework and
    shape; values in ``[0, 1]`` (eager: ``ValueError``; traced: clipped, NaN -> 0)."""
    from . import _validate as check  # _validate imports _gate, as this module does

    shape = gate.shape
    assert callable(shape)
    g = shape(ops.exp(logp))
    name = getattr(shape, "__qualname__", type(shape).__name__)
    if check.is_number(g):
        g = ops.full_like(logp, float(g))
    elif not hasattr(g, "shape") or not hasattr(g, "dtype"):
        raise TypeError(
            f"Gate shape callable {name} must return an array like p (or a number), got "
            f"{type(g).__name__}"
        )
    else:
        from ._dispatch import framework_of

        try:
            fw = framework_of(g)
        except TypeError:
            fw = None
        if fw != ops.name:
            raise TypeError(
                f"Gate shape callable {name} returned a {fw or type(g).__name__} array for "
                f"{ops.name} input; write it with {ops.name} operations on p"
            )
        if tuple(g.shape) != tuple(logp.shape):
            raise ValueError(
                f"Gate shape callable {name} returned shape {tuple(g.shape)} for p of shape "
                f"{tuple(logp.shape)}; it must act elementwise and keep p's shape"
            )
        if "complex" in str(g.dtype):
            raise TypeError(f"Gate shape callable {name} returned complex values")
        g = ops.astype(g, logp.dtype)
    if check.inspectable(ops, g):
        bad = ops.isnan(g) | (g < 0.0) | (g > 1.0)
        if check.found(ops, bad):
            seen = np.asarray(ops.to_numpy(g), dtype=np.float64)
            lo, hi = float(np.min(seen)), float(np.max(seen))
            raise ValueError(
                f"Gate shape callable {name} returned values outside [0, 1] or NaN (from {lo:g} "
                f"to {hi:g}); a gate weight lies in [0, 1]: clip it, e.g. with a sigmoid"
            )
    return ops.where(g >= 0.0, ops.minimum(g, 1.0), 0.0)  # traced: clipped, NaN -> 0


def gate_value(gate: Gate, logp: Array, ops: Backend) -> Array:
    """``g(p)`` for ``p = exp(min(logp, 0))``, elementwise, in ``[0, 1]`` and non-decreasing in
    ``p``.

    ``logp`` may hold ``-inf`` (``p = 0``): every named shape then gives exactly 0 (before the
    floor) and never NaN, because ``log p`` is never formed from ``p``. Values above 0 (not
    log-probs; refused eagerly by the callers beyond a rounding slack) are read as 0, ``p = 1``.
    Parameters are used clamped to ``[PARAM_MIN, PARAM_MAX]`` (float32-safe, see there).
    """
    logp = ops.minimum(logp, 0.0)
    shape = gate.shape
    if shape == "sigmoid":  # |alpha (p - tau)| <= PARAM_MAX: no overflow
        g = ops.sigmoid(_clamped(gate.alpha, ops) * (ops.exp(logp) - gate.tau))
    elif shape == "log_sigmoid":
        # |z| capped at SATURATE (sigmoid is exactly 0 or 1 there): d / T never overflows
        temperature = _clamped(gate.temperature, ops)
        bound = SATURATE * temperature
        d = logp - _log_param(gate.tau, ops)
        g = ops.sigmoid(ops.minimum(ops.maximum(d, -bound), bound) / temperature)
    elif shape == "hard":
        ge = logp >= _log_param(gate.tau, ops)
        g = ops.astype(ge, logp.dtype)
    elif shape == "power":  # z >= -SATURATE (exp is exactly 0 below): no overflow
        exponent = _clamped(gate.exponent, ops)
        d = logp - _log_param(gate.tau, ops)
        z = exponent * ops.maximum(d, -SATURATE / exponent)
        g = ops.exp(ops.minimum(z, 0.0))
    else:  # a user callable on p
        g = _callable_gate(gate, logp, ops)
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

    ``values`` and boolean ``mask`` have shape ``(B, T)``; every row needs one valid entry
    (callers refuse empty rows eagerly; under tracing an empty row gives 0). Returns ``(B,)``.
    Matches NumPy's default (linear) method exactly, including its
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
    out = ops.where(upper, b - diff * omt, a + diff * t)
    return ops.where(count > 0, out, 0.0)  # an empty row (traced only) gives 0, not NaN


def estimate_logp(gate: Gate, logps: Array, mask: Array, ops: Backend) -> Array:
    """Per-example ``log p`` of the rejected response from token log-probs.

    ``logps`` ``(B, T)`` in compute dtype, boolean ``mask`` ``(B, T)``; returns ``(B,)``:

    - ``seq``:  ``sum_t m_t log p_t / sum_t m_t`` (log of the geometric mean)
    - ``mean``: ``log(sum_t m_t p_t / sum_t m_t)``
    - ``min``:  ``min_{t: m_t} log p_t``
    - ``qNN``:  ``log quantile_{t: m_t}(p_t, NN/100)`` (NumPy's linear method)
    """
    est = gate.estimator
    # rows with no token in the mask (only under tracing; eager calls refuse them) read as one
    # token of log p = 0, so that no estimator divides 0 by 0 or sorts an all-+inf row; the
    # caller gives them weight 1
    empty = ops.sum(ops.astype(mask, logps.dtype), axis=-1) == 0
    logps = ops.where(empty[:, None], 0.0, logps)
    mask = mask | empty[:, None]
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
