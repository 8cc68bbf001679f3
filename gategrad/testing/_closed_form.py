"""Closed-form NumPy gradients of the preference losses and the toy softmax (NumPy has no
autograd): the test kit's reference, used by [`gategrad.testing.softmax_reference`][] and the
NumPy lab.

Two layers, both float64 and free of any deep-learning framework:

1. **Loss derivatives.** [`loss_grads`][] returns, for every loss type of
   [`gategrad.losses.preference_loss`][], the batch-mean loss and its derivatives with respect to
   the policy's *summed* log-probs ``pi_w = log pi(y_w|x)`` and ``pi_l = log pi(y_l|x)``, shape
   ``(B,)``. The reference log-probs are constants. [`gate_grad`][] then applies a
   [`gategrad.Gate`][] to the rejected derivative: the gate multiplies the rejected branch's
   ``d loss / d pi_l`` only; the loss value and ``d loss / d pi_w`` do not change.

2. **The softmax model.** [`softmax_grads`][] back-propagates derivatives with respect to
   class log-probs through ``log_softmax(contexts @ W + b)`` (the toy model of
   [`gategrad.testing.models.softmax_logits`][]):
   ``d z_i = sum_k d_ik (e_{t_ik} - softmax(z_i))``, ``dW = X^T dZ``, ``db = sum_i dZ_i``.

Notation as [`gategrad.losses`][]: ``h_w = pi_w - ref_w``, ``h_l = pi_l - ref_l``, ``|y|`` a
response's token count, ``s(z) = sigmoid(z)`` and ``ls(z) = log sigmoid(z)``, with
``d/dz [-ls(z)] = -s(-z)``.

Per example (before the ``1/B`` of the batch mean), ``d/d pi_w`` and ``d/d pi_l`` are:

- ``sigmoid``: with ``z = beta (h_w - h_l)`` and ``c = -(1 - eps) s(-z) + eps s(z)``:
  ``beta c`` and ``-beta c``;
- ``robust``: ``c = (-(1 - eps) s(-z) - eps s(z)) / (1 - 2 eps)``: ``beta c``, ``-beta c``;
- ``hinge``: ``c = -1[1 - z > 0]``: ``beta c``, ``-beta c``;
- ``ipo``: with ``d = h_w/|y_w| - h_l/|y_l| - 1/(2 beta)``: ``2d/|y_w|`` and ``-2d/|y_l|``
  (``length_normalize=False``: the lengths are taken as 1);
- ``cal_dpo``: with ``w = calibration_weight``: ``-s(-(h_w - h_l)) + 2 w (h_w - 1/(2 beta))``
  and ``s(-(h_w - h_l)) + 2 w (h_l + 1/(2 beta))``;
- ``dpo_shift``: with ``u = beta h_w - lam beta h_l``: ``-beta s(-u)`` and ``lam beta s(-u)``;
- ``simpo``: with ``u = beta pi_w/|y_w| - beta pi_l/|y_l| - gamma``: ``-s(-u) beta/|y_w|`` and
  ``s(-u) beta/|y_l|``;
- ``dpop``: with ``u = beta (h_w - h_l - lambda max(0, ref_w - pi_w))``:
  ``-s(-u) beta (1 + lambda 1[ref_w > pi_w])`` and ``s(-u) beta``.

``sft_weight > 0`` adds ``sft_weight * mean(-pi_w / |y_w|)``, whose derivative is
``-sft_weight / (B |y_w|)`` on ``pi_w``. At the kinks of ``hinge`` and ``dpop`` the derivative
used is the one-sided value of the indicator as written (``1[...] = 0`` at equality).

Example (one gated DPO step of a softmax classifier):

```python
from gategrad import Gate
from gategrad.testing import _closed_form as ng

logits = contexts @ W + b
logp = ng.log_softmax(logits)
pi_w, pi_l = ng.pick(logp, chosen), ng.pick(logp, rejected)
lg = ng.loss_grads("sigmoid", pi_w, pi_l, ref_w, ref_l, beta=0.1)
d_l, g = ng.gate_grad(lg.d_rejected, pi_l, Gate("log_sigmoid"), lengths=1)
grads = ng.softmax_grads(contexts, logits, np.stack([chosen, rejected], 1),
                         np.stack([lg.d_chosen, d_l], 1))
W -= lr * grads["W"]; b -= lr * grads["b"]
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gategrad._loss_registry import LOSS_PARAMS, LOSS_TYPES, LOSSES

__all__ = [
    "GRAD_LOSS_TYPES",
    "LossGrads",
    "gate_grad",
    "log_sigmoid",
    "log_softmax",
    "loss_grads",
    "pick",
    "sigmoid",
    "softmax_grads",
]

#: Loss types with closed-form derivatives here: every loss type of the registry
#: (:data:`gategrad.losses.LOSS_TYPES`); :func:`loss_grads` has a branch for each.
GRAD_LOSS_TYPES: tuple[str, ...] = LOSS_TYPES

#: Each loss type's own parameters and their defaults (:data:`gategrad.losses.LOSS_PARAMS`).
_DEFAULTS: dict[str, dict[str, Any]] = LOSS_PARAMS


@dataclass(frozen=True)
class LossGrads:
    """Value and derivatives of a batch-mean preference loss.

    ``loss``: the batch mean (plus the SFT term), a float; ``losses``: per-example values
    ``(B,)`` (without the SFT term); ``d_chosen``, ``d_rejected``: ``d loss / d pi_w`` and
    ``d loss / d pi_l``, shape ``(B,)``, already including the ``1/B`` of the mean.
    """

    loss: float
    losses: np.ndarray
    d_chosen: np.ndarray
    d_rejected: np.ndarray


def sigmoid(z: Any) -> np.ndarray:
    """Numerically stable ``1 / (1 + exp(-z))`` in float64."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def log_sigmoid(z: Any) -> np.ndarray:
    """Numerically stable ``log sigmoid(z) = -log(1 + exp(-z))`` in float64."""
    return -np.logaddexp(0.0, -np.asarray(z, dtype=np.float64))


def log_softmax(logits: Any, axis: int = -1) -> np.ndarray:
    """``log softmax`` along ``axis`` in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def pick(logp: np.ndarray, targets: Any) -> np.ndarray:
    """``logp[i, targets[i]]`` for ``logp`` ``(N, V)`` and integer ``targets`` ``(N,)``."""
    targets = np.asarray(targets)
    return logp[np.arange(logp.shape[0]), targets]


def _lengths(value: Any, batch: int, name: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"{name} is needed by this loss (the token count of each response)")
    out = np.broadcast_to(np.asarray(value, dtype=np.float64), (batch,)).copy()
    if np.any(out <= 0):
        raise ValueError(f"{name} must be > 0")
    return out


def loss_grads(
    loss_type: str,
    chosen_logps: Any,
    rejected_logps: Any,
    ref_chosen_logps: Any = None,
    ref_rejected_logps: Any = None,
    *,
    beta: float = 0.1,
    chosen_lengths: Any = None,
    rejected_lengths: Any = None,
    sft_weight: float = 0.0,
    **loss_params: Any,
) -> LossGrads:
    """Batch-mean loss and its derivatives w.r.t. the summed policy log-probs ``(B,)``.

    Arguments mirror [`gategrad.losses.preference_loss`][] for per-sequence inputs: the
    log-probs are ``(B,)`` sums, ``*_lengths`` the token counts (an int or ``(B,)``; needed by
    ``ipo`` with ``length_normalize=True``, ``simpo`` and ``sft_weight > 0``), and
    ``loss_params`` the loss type's extra parameters (``label_smoothing``, ``length_normalize``,
    ``lam``, ``gamma``, ``dpop_lambda``) with the same defaults. Everything is float64.
    """
    if loss_type not in GRAD_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {GRAD_LOSS_TYPES}, got {loss_type!r}")
    unknown = sorted(set(loss_params) - set(_DEFAULTS[loss_type]))
    if unknown:
        raise ValueError(f"loss_type={loss_type!r} got unexpected parameters {unknown}")
    p = {**_DEFAULTS[loss_type], **loss_params}
    pi_w = np.asarray(chosen_logps, dtype=np.float64)
    pi_l = np.asarray(rejected_logps, dtype=np.float64)
    if pi_w.ndim != 1 or pi_w.shape != pi_l.shape:
        raise ValueError(
            f"chosen_logps and rejected_logps must both be (B,), got {pi_w.shape} and {pi_l.shape}"
        )
    batch = pi_w.shape[0]
    if LOSSES[loss_type].uses_ref:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type={loss_type!r} needs the reference log-probs")
        ref_w = np.asarray(ref_chosen_logps, dtype=np.float64)
        ref_l = np.asarray(ref_rejected_logps, dtype=np.float64)
        h_w, h_l = pi_w - ref_w, pi_l - ref_l

    if loss_type in ("sigmoid", "robust", "hinge"):
        z = beta * (h_w - h_l)
        if loss_type == "sigmoid":
            eps = p["label_smoothing"]
            losses = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
            c = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z)
        elif loss_type == "robust":
            eps = p["label_smoothing"]
            losses = (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps)
            c = (-(1.0 - eps) * sigmoid(-z) - eps * sigmoid(z)) / (1.0 - 2.0 * eps)
        else:
            losses = np.maximum(1.0 - z, 0.0)
            c = -((1.0 - z) > 0).astype(np.float64)
        d_w, d_l = beta * c, -beta * c
    elif loss_type == "ipo":
        if p["length_normalize"]:
            len_w = _lengths(chosen_lengths, batch, "chosen_lengths")
            len_l = _lengths(rejected_lengths, batch, "rejected_lengths")
        else:
            len_w = len_l = np.ones(batch)
        d = h_w / len_w - h_l / len_l - 1.0 / (2.0 * beta)
        losses = d * d
        d_w, d_l = 2.0 * d / len_w, -2.0 * d / len_l
    elif loss_type == "cal_dpo":
        t = 1.0 / (2.0 * beta)
        m = h_w - h_l
        w = p["calibration_weight"]
        losses = -log_sigmoid(m) + w * ((h_w - t) ** 2 + (h_l + t) ** 2)
        d_w = -sigmoid(-m) + 2.0 * w * (h_w - t)
        d_l = sigmoid(-m) + 2.0 * w * (h_l + t)
    elif loss_type == "dpo_shift":
        lam = p["lam"]
        u = beta * h_w - lam * beta * h_l
        losses = -log_sigmoid(u)
        d_w, d_l = -beta * sigmoid(-u), lam * beta * sigmoid(-u)
    elif loss_type == "simpo":
        len_w = _lengths(chosen_lengths, batch, "chosen_lengths")
        len_l = _lengths(rejected_lengths, batch, "rejected_lengths")
        u = beta * pi_w / len_w - beta * pi_l / len_l - p["gamma"]
        losses = -log_sigmoid(u)
        d_w, d_l = -sigmoid(-u) * beta / len_w, sigmoid(-u) * beta / len_l
    else:  # dpop
        lam = p["dpop_lambda"]
        short = ref_w - pi_w
        u = beta * (h_w - h_l - lam * np.maximum(short, 0.0))
        losses = -log_sigmoid(u)
        d_w = -sigmoid(-u) * beta * (1.0 + lam * (short > 0))
        d_l = sigmoid(-u) * beta

    loss = float(np.mean(losses))
    d_w = d_w / batch
    d_l = d_l / batch
    if sft_weight > 0:
        len_w = _lengths(chosen_lengths, batch, "chosen_lengths")
        loss += sft_weight * float(np.mean(-pi_w / len_w))
        d_w = d_w - sft_weight / (batch * len_w)
    return LossGrads(loss, np.asarray(losses), np.asarray(d_w), np.asarray(d_l))


def gate_grad(
    d_rejected: np.ndarray,
    rejected_logps: np.ndarray,
    gate: Any,
    *,
    mask: Any = None,
    lengths: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``gate`` to the rejected branch's derivative: ``(g * d_rejected, g)``.

    ``rejected_logps`` are the policy's rejected log-probs as [`gategrad.gate_weights`][]
    takes them: ``(B,)`` sums with ``lengths`` (the ``seq`` estimator), or ``(B, T)`` per-token
    with ``mask``. ``d_rejected`` has the shape of ``rejected_logps`` (per token: the derivative
    of the loss w.r.t. each token's log-prob, which for summed log-probs is ``d_rejected[:, None]``
    on masked tokens). Per-example weights ``(B,)`` broadcast over tokens; token weights (with
    ``granularity='token'``) scale each masked token, and unmasked tokens pass unscaled.
    ``gate=None`` returns ``(d_rejected, ones)``.
    """
    from gategrad import gate_weights

    d = np.asarray(d_rejected, dtype=np.float64)
    if gate is None:
        return d, np.ones(d.shape[:1] if d.ndim == 1 else d.shape)
    if isinstance(lengths, (int, float)):
        lengths = np.full(np.shape(rejected_logps)[:1], float(lengths))
    x = np.asarray(rejected_logps, dtype=np.float64)
    stats = gate_weights(x, gate, mask, lengths=lengths)
    g = np.asarray(stats.weight, dtype=np.float64)
    if stats.mask is not None:  # token granularity: outside the mask the weight is 1
        g = np.where(stats.mask, g, 1.0)
        return d * g, g
    return (d * g[:, None] if d.ndim == 2 else d * g), g


def softmax_grads(
    contexts: np.ndarray,
    logits: np.ndarray,
    targets: Any,
    d_logp: Any,
    *,
    probs: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Gradient of ``sum_ik d_logp[i, k] * log_softmax(contexts[i] @ W + b)[targets[i, k]]``.

    ``contexts`` ``(N, D)``, ``logits`` ``(N, V)`` (``contexts @ W + b`` at the current
    parameters), integer ``targets`` ``(N, K)`` and ``d_logp`` ``(N, K)`` (``K = 2`` for a
    chosen and a rejected class; ``(N,)`` is read as ``K = 1``). Returns ``{"W": (D, V),
    "b": (V,)}`` from ``dZ_i = sum_k d_ik (onehot(t_ik) - softmax(z_i))``. The derivatives
    ``d_logp`` usually come from [`loss_grads`][] (and [`gate_grad`][]). ``probs``:
    ``softmax(logits)`` if already computed.
    """
    x = np.asarray(contexts, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(targets)
    d = np.asarray(d_logp, dtype=np.float64)
    if t.ndim == 1:
        t, d = t[:, None], d[:, None]
    n, vocab = z.shape
    if t.shape != d.shape or t.shape[0] != n or x.shape[0] != n:
        raise ValueError(
            f"contexts {x.shape}, logits {z.shape}, targets {t.shape} and d_logp {d.shape} "
            "must agree: (N, D), (N, V), (N, K), (N, K)"
        )
    if probs is None:
        probs = np.exp(log_softmax(z))
    dz = -d.sum(axis=1, keepdims=True) * probs
    rows = np.arange(n)
    for k in range(t.shape[1]):  # one target per row per column: plain fancy indexing adds
        dz[rows, t[:, k]] += d[:, k]
    return {"W": x.T @ dz, "b": dz.sum(axis=0)}
