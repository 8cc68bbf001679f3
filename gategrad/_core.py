"""The public gate calls: [`gate_rejected`][], [`gate_weights`][] and [`scale_grad`][].

Semantics (first order only):

- forward: bitwise the identity;
- backward: ``grad_in = g(stop_gradient(stat)) * grad_out``, with ``g`` computed in
  ``promote_types(dtype, float32)``, the product formed in that precision and cast back once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

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

    Under ``jax.jit`` it is a pytree (registered by the JAX backend), so a jitted function may
    return it. ``mx.compile`` returns only arrays and lists, tuples and dicts of them: inside the
    compiled function use ``stats`` as usual, and return ``stats.as_dict()`` (or its fields).
    """

    weight: Array
    p: Array
    mask: Array | None

    def as_dict(self) -> dict[str, Array]:
        """``{"weight": ..., "p": ...}`` plus ``"mask"`` when it is not ``None`` (what
        ``mx.compile`` can return)."""
        out = {"weight": self.weight, "p": self.p}
        if self.mask is not None:
            out["mask"] = self.mask
        return out


def _prepare_mask(backend: Backend, x: Array, mask: Array | None) -> Array:
    if mask is None:
        return backend.bool_mask(backend.full_like(x, 1.0))
    check.require_mask(mask, "mask")
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
    if isinstance(lengths, (bool, np.bool_)):
        raise TypeError(f"lengths must be token counts, got the bool {lengths!r}")
    if check.is_number(lengths):
        lengths = backend.full_like(backend.astype(x, backend.compute_dtype(x)), float(lengths))
    check.require_counts(lengths, "lengths")
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

    The gate reads ``min(logp, 0)``. Eager checks refuse NaN/``+inf``, values above 0 beyond
    ``gategrad._validate.LOGP_SLACK``, empty rows and ``lengths <= 0``. Under tracing
    (where values cannot be inspected) a row with no token in the mask, or ``lengths <= 0``,
    gets ``p = 1`` and weight exactly 1 (nothing to gate; never ``0 / 0``).

    Raises:
        TypeError: ``gate`` not a ``Gate``, non-array or integer inputs.
        ValueError: shapes (also ``T = 0`` with ``granularity='example'``), and the eager value
            checks above; see docs/errors.md.
    """
    gate = check.require_gate(gate)
    check.require_array(rejected_logps, "rejected_logps")
    ops = backend_for(rejected_logps=rejected_logps, mask=mask, lengths=lengths)
    x = rejected_logps
    check.require_floating(ops, x, "rejected_logps")
    if x.ndim not in (1, 2):
        raise ValueError(
            f"rejected_logps must have shape (B,) or (B, T), got {tuple(x.shape)} "
            f"({x.ndim} dimensions)"
        )
    check.check_log_probs(ops, x, "rejected_logps")
    # the gate reads min(logp, 0): p <= 1 even where values above 0 cannot be inspected
    xs = ops.minimum(ops.astype(ops.stop_gradient(x), ops.compute_dtype(x)), 0.0)
    if x.ndim == 2:
        if gate.granularity == "example" and int(x.shape[1]) == 0 and int(x.shape[0]) > 0:
            raise ValueError(
                f"rejected_logps has shape {tuple(x.shape)}: T = 0 positions, so no rejected "
                "response has a token to estimate p from; drop empty responses (or pass "
                "per-sequence (B,) log-probs with lengths=)"
            )
        maskb = _prepare_mask(ops, x, mask)
        if lengths is not None:
            raise ValueError("lengths= is only for per-sequence (B,) log-probs; use mask=")
        check.check_not_logits(ops, x, "rejected_logps", mask=maskb)
        if gate.granularity == "token":
            return GateStats(_math.gate_value(gate, xs, ops), ops.exp(xs), maskb)
        logp = _math.estimate_logp(gate, xs, maskb, ops)
        empty = ops.sum(ops.astype(maskb, xs.dtype), axis=-1) == 0  # traced only: weight 1
        weight = ops.where(empty, 1.0, _math.gate_value(gate, logp, ops))
        return GateStats(weight, ops.exp(logp), None)
    else:
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
        counts = _prepare_lengths(ops, x, lengths)
        check.check_not_logits(ops, x, "rejected_logps", counts=counts)
        # lengths <= 0 (NaN too) pass only under tracing: log p = 0 and weight 1, no 0 / 0
        empty = ~(counts > 0)
        logp = ops.where(empty, 0.0, xs / ops.where(empty, 1.0, counts))
        weight = ops.where(empty, 1.0, _math.gate_value(gate, logp, ops))
        return GateStats(weight, ops.exp(logp), None)


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
    check.require_array(x, "x")
    if isinstance(weight, (bool, np.bool_)):
        raise TypeError(f"weight must be a number or an array, got the bool {weight!r}")
    if check.is_number(weight):
        weight = float(weight)
    else:
        check.require_array(weight, "weight")
    ops = backend_for(x=x, weight=weight)
    check.require_floating(ops, x, "x")
    dtype = ops.compute_dtype(x)
    w = (
        ops.full_like(ops.astype(x, dtype), weight)
        if isinstance(weight, float)
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
    if isinstance(p_or_logp, (bool, np.bool_)):
        raise TypeError(f"p_or_logp must be a number or an array, got the bool {p_or_logp!r}")
    if check.is_number(p_or_logp):
        p_or_logp = float(p_or_logp)
    if framework_of(p_or_logp) is None:  # a Python number: a float64 NumPy array
        p_or_logp = get_backend("numpy").from_numpy(p_or_logp, dtype="float64")
    ops = backend_for(p_or_logp=p_or_logp)
    x = ops.astype(ops.stop_gradient(p_or_logp), ops.compute_dtype(p_or_logp))
    return _math.gate_value(gate, x if log else ops.log(x), ops)


def masked_quantile(values: Array, mask: Array, q: float) -> Array:
    """Per-row quantile of ``values[mask]`` (``(B, T)`` -> ``(B,)``), as ``numpy.quantile``."""
    try:
        _, qv = check.scalar("quantile q", q)
    except (TypeError, ValueError):  # a bool too: this function's message is pinned
        qv = None
    if qv is None or not 0.0 <= qv <= 1.0:
        raise ValueError(f"quantile q must be a number in [0, 1], got {q!r}")
    check.require_array(values, "values")
    check.require_mask(mask, "mask")
    ops = backend_for(values=values, mask=mask)
    if values.ndim != 2 or tuple(mask.shape) != tuple(values.shape):
        raise ValueError(
            f"values must have shape (B, T) and mask the same shape, got {tuple(values.shape)} "
            f"and {tuple(mask.shape)}"
        )
    maskb = ops.bool_mask(mask)
    if int(values.shape[1]) == 0 and int(values.shape[0]) > 0:
        raise ValueError(f"values has shape {tuple(values.shape)}: T = 0, no value to rank")
    check.check_mask_rows(ops, maskb, "mask")
    return _math.masked_quantile(values, maskb, qv, ops)
