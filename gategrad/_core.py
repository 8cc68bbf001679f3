"""The public gate calls: [`gate_rejected`][], [`gate_weights`][] and [`scale_grad`][].

Semantics (first order only):

- forward: bitwise the identity;
- backward: ``grad_in = g(stop_gradient(stat)) * grad_out``, with ``g`` computed in
  ``promote_types(dtype, float32)``, the product formed in that precision and cast back once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _math
from . import _validate as check
from ._backend import Array, Backend
from ._dispatch import backend_for, framework_of, get_backend
from ._gate import Gate

__all__ = [
    "GateStats",
    "gate_rejected",
    "gate_rejected_vjp",
    "gate_value",
    "gate_weights",
    "masked_quantile",
    "scale_grad",
]


@dataclass(frozen=True)
class GateStats:
    """What the gate saw, for metrics. Arrays of the input's framework, no gradient.

    ``weight``: the gate ``g`` per example ``(B,)`` or per token ``(B, T)``; ``p``: the
    estimated probability it was computed from (same shape); ``mask``: boolean ``(B, T)`` for
    token granularity, else ``None``.
    """

    weight: Array
    p: Array
    mask: Array | None


def _prepare_mask(backend: Backend, x: Array, mask: Array | None) -> Array:
    if mask is None:
        return backend.bool_mask(backend.full_like(x, 1.0))
    if tuple(mask.shape) != tuple(x.shape):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but rejected_logps has shape "
            f"{tuple(x.shape)}; they must match (B, T)"
        )
    maskb = backend.bool_mask(mask)
    check.check_mask_rows(backend, maskb, "mask")
    return maskb


def _prepare_lengths(backend: Backend, x: Array, lengths: Any) -> Array:
    if lengths is None:
        raise ValueError(
            "per-sequence rejected_logps of shape (B,) need lengths= (the token count of each "
            "rejected response) for the 'seq' estimator; or pass per-token log-probs (B, T) "
            "with mask="
        )
    if isinstance(lengths, (int, float)):
        lengths = backend.full_like(x, float(lengths))
    if tuple(lengths.shape) != tuple(x.shape):
        raise ValueError(
            f"lengths has shape {tuple(lengths.shape)} but rejected_logps has shape "
            f"{tuple(x.shape)}; they must match (B,)"
        )
    lengths = backend.astype(lengths, backend.compute_dtype(x))
    check.check_counts(backend, lengths, "lengths")
    return lengths


def gate_weights(
    rejected_logps: Array,
    gate: Gate,
    mask: Array | None = None,
    *,
    lengths: Array | int | None = None,
) -> GateStats:
    """The gate weights for ``rejected_logps``, without gradient.

    Per-token ``(B, T)`` log-probs with optional ``mask`` ``(B, T)`` give ``(B,)`` weights
    (``granularity='example'``) or ``(B, T)`` weights (``'token'``). Per-sequence ``(B,)``
    log-probs need ``lengths`` ``(B,)`` and use ``log p = logp / lengths`` (the ``seq``
    estimator; other estimators need per-token input).
    """
    gate = check.require_gate(gate)
    ops = backend_for(rejected_logps=rejected_logps, mask=mask, lengths=lengths)
    x = rejected_logps
    check.require_floating(ops, x, "rejected_logps")
    check.check_log_probs(ops, x, "rejected_logps")
    xs = ops.astype(ops.stop_gradient(x), ops.compute_dtype(x))
    if x.ndim == 2:
        maskb = _prepare_mask(ops, x, mask)
        if lengths is not None:
            raise ValueError("lengths= is only for per-sequence (B,) log-probs; use mask=")
        if gate.granularity == "token":
            return GateStats(_math.gate_value(gate, xs, ops), ops.exp(xs), maskb)
        logp = _math.estimate_logp(gate, xs, maskb, ops)
    elif x.ndim == 1:
        if mask is not None:
            raise ValueError(
                "mask= is for per-token (B, T) log-probs; per-sequence (B,) log-probs take lengths="
            )
        if gate.granularity == "token":
            raise ValueError(
                "granularity='token' needs per-token log-probs (B, T) with mask=, not (B,)"
            )
        if gate.estimator != "seq":
            raise ValueError(
                f"estimator {gate.estimator!r} needs per-token log-probs (B, T) with mask=; "
                "per-sequence (B,) log-probs support only estimator='seq'"
            )
        logp = xs / _prepare_lengths(ops, x, lengths)
    else:
        raise ValueError(
            f"rejected_logps must have shape (B,) or (B, T), got {tuple(x.shape)} "
            f"({x.ndim} dimensions)"
        )
    return GateStats(_math.gate_value(gate, logp, ops), ops.exp(logp), None)


def broadcast_weight(ops: Backend, x: Array, stats: GateStats) -> Array:
    """The gate weight shaped to scale ``x``'s cotangent: ``(B, 1)``, ``(B,)`` or ``(B, T)``.

    Token granularity: positions outside the mask get weight 1 (they pass unscaled).
    """
    weight = stats.weight
    if stats.mask is not None:
        return ops.where(stats.mask, weight, 1.0)
    return weight[:, None] if x.ndim == 2 else weight


def gate_rejected(
    rejected_logps: Array,
    gate: Gate,
    mask: Array | None = None,
    *,
    lengths: Array | int | None = None,
    return_stats: bool = False,
) -> Any:
    """Gate the gradient that flows into the policy's rejected log-probs.

    ``rejected_logps``: per-token ``(B, T)`` with ``mask`` ``(B, T)`` (``None``: all valid), or
    per-sequence ``(B,)`` with ``lengths`` ``(B,)``. Returns the same values (bitwise) whose
    gradient is ``g * grad_out``: per example, ``g`` broadcast over the row; per token, each
    masked token by its own ``g``; tokens outside the mask pass unscaled.
    With ``return_stats=True`` returns ``(gated, GateStats)``.
    """
    stats = gate_weights(rejected_logps, gate, mask, lengths=lengths)
    ops = backend_for(rejected_logps=rejected_logps)
    out = ops.scale_grad(rejected_logps, broadcast_weight(ops, rejected_logps, stats))
    return (out, stats) if return_stats else out


def scale_grad(x: Array, weight: Array | float) -> Array:
    """Identity forward; backward multiplies the cotangent by ``stop_gradient(weight)``.

    ``weight`` must broadcast against ``x``. It is used in ``promote_types(x.dtype, float32)``.
    """
    ops = backend_for(x=x, weight=weight)
    check.require_floating(ops, x, "x")
    dtype = ops.compute_dtype(x)
    w = (
        ops.full_like(ops.astype(x, dtype), float(weight))
        if isinstance(weight, (int, float))
        else ops.astype(ops.stop_gradient(weight), dtype)
    )
    check.check_broadcast(tuple(w.shape), tuple(x.shape))
    return ops.scale_grad(x, w)


def gate_rejected_vjp(
    rejected_logps: Array,
    cotangent: Array,
    gate: Gate,
    mask: Array | None = None,
    *,
    lengths: Array | int | None = None,
) -> Array:
    """The backward rule of [`gate_rejected`][], stated explicitly: ``g * cotangent``.

    Shapes as in [`gate_rejected`][]; ``cotangent`` has the shape of ``rejected_logps``. The
    product is formed in ``promote_types(dtype, float32)`` and cast back once, as every
    backend's primitive does. For frameworks without autograd (NumPy) this is the reference
    the tests compare against.
    """
    stats = gate_weights(rejected_logps, gate, mask, lengths=lengths)
    ops = backend_for(rejected_logps=rejected_logps, cotangent=cotangent)
    weight = broadcast_weight(ops, rejected_logps, stats)
    dtype = ops.compute_dtype(cotangent)
    return ops.astype(ops.astype(cotangent, dtype) * weight, cotangent.dtype)


def gate_value(gate: Gate, p_or_logp: Array, *, log: bool = False) -> Array:
    """``g(p)`` elementwise for probabilities ``p`` (or log-probabilities with ``log=True``).

    Any framework's array; computed in ``promote_types(dtype, float32)``, without gradient.
    """
    gate = check.require_gate(gate)
    if framework_of(p_or_logp) is None:  # a Python number: a float64 NumPy array
        p_or_logp = get_backend("numpy").from_numpy(p_or_logp, dtype="float64")
    ops = backend_for(p_or_logp=p_or_logp)
    x = ops.astype(ops.stop_gradient(p_or_logp), ops.compute_dtype(p_or_logp))
    return _math.gate_value(gate, x if log else ops.log(x), ops)


def masked_quantile(values: Array, mask: Array, q: float) -> Array:
    """Per-row quantile of ``values[mask]`` (``(B, T)`` -> ``(B,)``), as ``numpy.quantile``."""
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be a number in [0, 1], got {q!r}")
    ops = backend_for(values=values, mask=mask)
    return _math.masked_quantile(values, ops.bool_mask(mask), float(q), ops)
