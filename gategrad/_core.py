"""The public gate calls: :func:`gate_rejected`, :func:`gate_weights` and :func:`scale_grad`.

Semantics (first order only):

- forward: bitwise the identity;
- backward: ``grad_in = g(stop_gradient(stat)) * grad_out``, with ``g`` computed in
  ``promote_types(dtype, float32)``, the product formed in that precision and cast back once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from . import _math
from ._dispatch import common_framework, get_ops
from ._gate import Gate
from ._xp import Array, ArrayOps

__all__ = ["GateStats", "gate_rejected", "gate_weights", "scale_grad", "value_checks"]

_CHECKS = {"enabled": os.environ.get("GATEGRAD_CHECKS", "1") != "0"}


def value_checks(enabled: bool | None = None) -> bool:
    """Get (and optionally set) whether eager value checks run (NaN, empty mask rows).

    Checks cost one reduction and, on an accelerator, one device sync per call. They never run
    under tracing (``jax.jit``, ``torch.compile``, ``mx.compile``, ``vmap``). The environment
    variable ``GATEGRAD_CHECKS=0`` turns them off at import.
    """
    if enabled is not None:
        _CHECKS["enabled"] = bool(enabled)
    return _CHECKS["enabled"]


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


def _require_gate(gate: Any) -> Gate:
    if not isinstance(gate, Gate):
        raise TypeError(f"gate must be a gategrad.Gate, got {type(gate).__name__}")
    return gate


def _rows(ops: ArrayOps, bad: Array) -> str:
    rows = ops.nonzero_rows(bad)
    shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
    return f"row{'s' if len(rows) > 1 else ''} {shown}"


def _eager(ops: ArrayOps, x: Array) -> bool:
    return _CHECKS["enabled"] and ops.is_concrete(x)


def _check_values(ops: ArrayOps, x: Array, name: str) -> None:
    """NaN or +inf in log-probs raise ``ValueError`` naming the rows (eager mode only)."""
    if not _eager(ops, x):
        return
    bad = ops.isnan(x) | (x == float("inf"))
    if ops.any(bad):
        per_row = bad if bad.ndim == 1 else ops.sum(ops.astype(bad, x.dtype), axis=-1) > 0
        raise ValueError(
            f"{name} holds NaN or +inf at {_rows(ops, per_row)}; log-probs must be finite "
            "or -inf: check the model's logits and the loss upstream"
        )


def _prepare_mask(ops: ArrayOps, x: Array, mask: Array | None) -> Array:
    if mask is None:
        return ops.bool_mask(ops.full_like(x, 1.0))
    if tuple(mask.shape) != tuple(x.shape):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but rejected_logps has shape "
            f"{tuple(x.shape)}; they must match (B, T)"
        )
    maskb = ops.bool_mask(mask)
    if _eager(ops, maskb):
        empty = ops.sum(ops.astype(maskb, x.dtype), axis=-1) == 0
        if ops.any(empty):
            raise ValueError(
                f"mask is all zero in {_rows(ops, empty)}; every response needs at least one "
                "token (drop empty responses from the batch)"
            )
    return maskb


def _prepare_lengths(ops: ArrayOps, x: Array, lengths: Any) -> Array:
    if lengths is None:
        raise ValueError(
            "per-sequence rejected_logps of shape (B,) need lengths= (the token count of each "
            "rejected response) for the 'seq' estimator; or pass per-token log-probs (B, T) "
            "with mask="
        )
    if isinstance(lengths, (int, float)):
        lengths = ops.full_like(x, float(lengths))
    if tuple(lengths.shape) != tuple(x.shape):
        raise ValueError(
            f"lengths has shape {tuple(lengths.shape)} but rejected_logps has shape "
            f"{tuple(x.shape)}; they must match (B,)"
        )
    lengths = ops.astype(lengths, ops.compute_dtype(x))
    if _eager(ops, lengths):
        bad = ~(lengths > 0)
        if ops.any(bad):
            raise ValueError(
                f"lengths must be > 0, but {_rows(ops, bad)} have no tokens; drop zero-length "
                "responses from the batch"
            )
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
    gate = _require_gate(gate)
    name = common_framework(rejected_logps=rejected_logps, mask=mask, lengths=lengths)
    ops = get_ops(name)
    x = rejected_logps
    if not ops.is_floating(x):
        raise TypeError(f"rejected_logps must be a floating-point array, got dtype {x.dtype}")
    _check_values(ops, x, "rejected_logps")
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


def broadcast_weight(ops: ArrayOps, x: Array, stats: GateStats) -> Array:
    """The gate weight shaped to scale ``x``'s cotangent: ``(B, 1)``, ``(B,)`` or ``(B, T)``.

    Token granularity: positions outside the mask get weight 1 (they pass unscaled).
    """
    weight = stats.weight
    if stats.mask is not None:
        return ops.where(stats.mask, weight, ops.full_like(weight, 1.0))
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
    ops = get_ops(common_framework(rejected_logps=rejected_logps))
    out = ops.scale_grad(rejected_logps, broadcast_weight(ops, rejected_logps, stats))
    return (out, stats) if return_stats else out


def scale_grad(x: Array, weight: Array | float) -> Array:
    """Identity forward; backward multiplies the cotangent by ``stop_gradient(weight)``.

    ``weight`` must broadcast against ``x``. It is used in ``promote_types(x.dtype, float32)``.
    """
    ops = get_ops(common_framework(x=x, weight=weight))
    if not ops.is_floating(x):
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
    dtype = ops.compute_dtype(x)
    w = (
        ops.full_like(ops.astype(x, dtype), float(weight))
        if isinstance(weight, (int, float))
        else ops.astype(ops.stop_gradient(weight), dtype)
    )
    try:
        _broadcast_shape(tuple(w.shape), tuple(x.shape))
    except ValueError as err:
        raise ValueError(f"weight {err}; reshape it to broadcast against x") from None
    return ops.scale_grad(x, w)


def _broadcast_shape(w: tuple[int, ...], x: tuple[int, ...]) -> None:
    if len(w) > len(x):
        raise ValueError(f"of shape {w} has more dimensions than x {x}")
    for a, b in zip(reversed(w), reversed(x), strict=False):  # w may be shorter than x
        if a not in (1, b):
            raise ValueError(f"of shape {w} does not broadcast against x of shape {x}")
