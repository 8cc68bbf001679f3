"""The DPO loss family, written once against :class:`gategrad._xp.ArrayOps`.

Every loss here runs on NumPy, PyTorch, JAX and MLX arrays alike: the formulas below are the
only copy. Notation: ``pi_w = log pi(y_w | x)`` and ``pi_l = log pi(y_l | x)`` are the policy's
summed log-probs of the chosen and rejected responses, ``ref_w``/``ref_l`` the reference
model's, ``h_w = pi_w - ref_w``, ``h_l = pi_l - ref_l``, ``|y|`` a response's token count and
``ls(z) = log sigmoid(z)``. Per example:

===============  ===========================================================================
``sigmoid``      ``-(1 - eps) ls(beta (h_w - h_l)) - eps ls(-beta (h_w - h_l))``  (DPO; eps=0)
``ipo``          ``(h_w / |y_w| - h_l / |y_l| - 1 / (2 beta))^2``  (length-normalised, as TRL)
``cal_dpo``      ``-ls(h_w - h_l) + (h_w - 1 / (2 beta))^2 + (h_l + 1 / (2 beta))^2``
``dpo_shift``    ``-ls(beta h_w - lam beta h_l)``
``simpo``        ``-ls(beta pi_w / |y_w| - beta pi_l / |y_l| - gamma)``  (no reference)
``dpop``         ``-ls(beta (h_w - h_l - dpop_lambda max(0, ref_w - pi_w)))``
``hinge``        ``max(0, 1 - beta (h_w - h_l))``
``robust``       ``(-(1 - eps) ls(beta (h_w - h_l)) + eps ls(-beta (h_w - h_l))) / (1 - 2 eps)``
===============  ===========================================================================

The loss is the batch mean, plus ``sft_weight * mean(-pi_w / |y_w|)`` when ``sft_weight > 0``
(the RPO-style NLL term). See ``docs/losses.md`` for the sources.

**The gate.** ``gate=Gate(...)`` passes only ``policy_rejected_logps`` through
:func:`gategrad.gate_rejected`: the loss value and every other gradient are bitwise those of
``gate=None``; the gradient reaching the rejected log-probs is multiplied by ``g`` per example
(or per token, with ``granularity='token'`` and per-token inputs).

**Inputs.** Each log-prob argument is either per sequence ``(B,)`` (already summed over the
response) or per token ``(B, T)``, summed here over ``chosen_mask`` / ``rejected_mask``
(``None``: every position counts). Token counts come from the masks for per-token inputs and
from ``chosen_lengths`` / ``rejected_lengths`` for per-sequence ones; they are needed by
``ipo``, ``simpo``, ``sft_weight > 0`` and the ``seq`` gate estimator on ``(B,)`` inputs. The loss
is computed in ``promote_types(dtype, float32)``.

**Checks.** Static problems (unknown ``loss_type`` or parameter, ``beta <= 0``, shapes, batch
sizes) raise ``ValueError`` always, also under tracing. Value problems (NaN or +-inf log-probs
inside the mask, zero-length responses) raise ``ValueError`` in eager mode only; under
``jax.jit``, ``torch.compile``, ``mx.compile`` or ``vmap`` they are not inspected (that would
need a device sync or is impossible) and propagate as NaN or inf into the loss. See
:func:`gategrad.value_checks`.
"""

from __future__ import annotations

import math
from typing import Any

from ._core import _eager, _require_gate, _rows, gate_rejected
from ._dispatch import common_framework, get_ops
from ._gate import Gate
from ._xp import Array, ArrayOps

__all__ = [
    "LOSS_TYPES",
    "cal_dpo_loss",
    "dpo_loss",
    "dpo_shift_lambda",
    "dpo_shift_loss",
    "dpop_loss",
    "hinge_loss",
    "ipo_loss",
    "preference_loss",
    "robust_dpo_loss",
    "simpo_loss",
]

#: The loss types :func:`preference_loss` accepts (TRL's names where TRL has the loss).
LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "ipo",
    "cal_dpo",
    "dpo_shift",
    "simpo",
    "dpop",
    "hinge",
    "robust",
)

#: Extra parameters each loss type takes, with their defaults.
LOSS_PARAMS: dict[str, dict[str, Any]] = {
    "sigmoid": {"label_smoothing": 0.0},
    "ipo": {"length_normalize": True},
    "cal_dpo": {},
    "dpo_shift": {"lam": 0.95},
    "simpo": {"gamma": 0.5},
    "dpop": {"dpop_lambda": 50.0},
    "hinge": {},
    "robust": {"label_smoothing": 0.0},
}

#: Loss types that use the reference model's log-probs.
_USES_REF = frozenset(LOSS_TYPES) - {"simpo"}

METRIC_KEYS: tuple[str, ...] = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
GATE_METRIC_KEYS: tuple[str, ...] = ("gate/mean", "gate/frac_below_half", "gate/p_mean")


# --------------------------------------------------------------------------------------------
# validation helpers


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_params(loss_type: str, beta: Any, sft_weight: Any, params: dict[str, Any]) -> dict:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    allowed = LOSS_PARAMS[loss_type]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = f"takes {sorted(allowed)}" if allowed else "takes no extra parameters"
        raise ValueError(f"loss_type={loss_type!r} {takes}; got unexpected {unknown}")
    out = {**allowed, **params}
    if _is_number(beta):
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    elif isinstance(beta, bool) or beta is None:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if not _is_number(sft_weight) or not (math.isfinite(sft_weight) and sft_weight >= 0):
        raise ValueError(f"sft_weight must be a finite number >= 0, got {sft_weight!r}")
    eps = out.get("label_smoothing")
    if eps is not None and _is_number(eps):
        upper = 0.5 if loss_type == "robust" else 1.0
        if not 0.0 <= eps < upper:
            raise ValueError(
                f"label_smoothing must lie in [0, {upper:g}) for loss_type={loss_type!r}, "
                f"got {eps!r}"
            )
    lam = out.get("lam")
    if lam is not None and _is_number(lam) and not 0.0 < lam <= 1.0:
        raise ValueError(f"lam (DPO-Shift's lambda) must lie in (0, 1], got {lam!r}")
    for name in ("dpop_lambda", "gamma"):
        value = out.get(name)
        if value is not None and _is_number(value) and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if "length_normalize" in out and not isinstance(out["length_normalize"], bool):
        raise ValueError(f"length_normalize must be a bool, got {out['length_normalize']!r}")
    return out


def _check_finite(ops: ArrayOps, x: Array, mask: Array | None, name: str) -> None:
    """NaN or +-inf log-probs (inside the mask) raise ``ValueError`` (eager mode only)."""
    if not _eager(ops, x):
        return
    bad = ops.isnan(x) | (x == float("inf")) | (x == float("-inf"))
    if mask is not None and x.ndim == 2:
        bad = bad & mask
    # ``x`` may be a concrete constant closed over by a traced function (jax.jit): then ``bad``
    # is traced, and its values cannot be inspected.
    if ops.is_concrete(bad) and ops.any(bad):
        per_row = bad if bad.ndim == 1 else ops.sum(ops.astype(bad, x.dtype), axis=-1) > 0
        raise ValueError(
            f"{name} holds NaN or +-inf at {_rows(ops, per_row)}; preference losses need "
            "finite log-probs (a -inf log-prob means a token of probability 0: check the labels, "
            "the masks and the model's logits)"
        )


def _check_lengths(ops: ArrayOps, lengths: Array, name: str) -> None:
    if not _eager(ops, lengths):
        return
    bad = ~(lengths > 0)
    if ops.is_concrete(bad) and ops.any(bad):
        raise ValueError(
            f"{name} has no tokens at {_rows(ops, bad)}; every response needs at least one "
            "token (drop zero-length responses from the batch)"
        )


class _Side:
    """One response side (chosen or rejected): the summed log-probs and the token counts."""

    def __init__(self, name: str, mask_name: str, lengths_name: str) -> None:
        self.name = name
        self.mask_name = mask_name
        self.lengths_name = lengths_name


_CHOSEN = _Side("chosen", "chosen_mask", "chosen_lengths")
_REJECTED = _Side("rejected", "rejected_mask", "rejected_lengths")


def _batch_size(x: Array, name: str) -> int:
    if x.ndim not in (1, 2):
        raise ValueError(
            f"{name} must have shape (B,) (summed per sequence) or (B, T) (per token), "
            f"got {tuple(x.shape)}"
        )
    return int(x.shape[0])


def _prepare_side(
    ops: ArrayOps,
    side: _Side,
    policy: Array,
    ref: Array | None,
    mask: Array | None,
    lengths: Any,
) -> tuple[Array | None, Array | None]:
    """Validate one side; return its boolean mask ``(B, T)`` (or ``None``) and its token counts
    ``(B,)`` in compute dtype (or ``None`` when they cannot be known)."""
    pname = f"policy_{side.name}_logps"
    rname = f"ref_{side.name}_logps"
    per_token = [x for x in (policy, ref) if x is not None and x.ndim == 2]
    if per_token:
        shape = tuple(per_token[0].shape)
        for x, n in ((policy, pname), (ref, rname)):
            if x is not None and x.ndim == 2 and tuple(x.shape) != shape:
                raise ValueError(
                    f"{n} has shape {tuple(x.shape)} but the other per-token {side.name} "
                    f"log-probs have shape {shape}; per-token inputs of one side share a mask"
                )
    cdtype = ops.compute_dtype(policy)
    maskb = None
    if mask is not None:
        if not per_token:
            raise ValueError(
                f"{side.mask_name}= is for per-token (B, T) {side.name} log-probs; per-sequence "
                f"(B,) log-probs take {side.lengths_name}="
            )
        if tuple(mask.shape) != shape:
            raise ValueError(
                f"{side.mask_name} has shape {tuple(mask.shape)} but the per-token {side.name} "
                f"log-probs have shape {shape}; they must match (B, T)"
            )
        maskb = ops.bool_mask(mask)
    if lengths is not None and policy.ndim == 2:
        raise ValueError(
            f"{side.lengths_name}= is for per-sequence (B,) log-probs; per-token {pname} "
            f"counts its tokens from {side.mask_name}="
        )
    if lengths is not None:
        if _is_number(lengths):
            counts = ops.full_like(ops.astype(ops.stop_gradient(policy), cdtype), float(lengths))
        else:
            if tuple(lengths.shape) != (policy.shape[0],):
                raise ValueError(
                    f"{side.lengths_name} has shape {tuple(lengths.shape)}; it must be "
                    f"({policy.shape[0]},), one token count per example"
                )
            counts = ops.astype(ops.stop_gradient(lengths), cdtype)
    elif per_token:
        ones = ops.full_like(ops.astype(ops.stop_gradient(per_token[0]), cdtype), 1.0)
        counts = ops.sum(ones if maskb is None else ops.astype(maskb, cdtype), axis=-1)
    else:
        counts = None
    if counts is not None:
        _check_lengths(ops, counts, side.mask_name if lengths is None else side.lengths_name)
    return maskb, counts


def _reduce(ops: ArrayOps, x: Array, mask: Array | None, cdtype: Any) -> Array:
    """Per-sequence sums in ``cdtype``: ``(B,)`` passes, ``(B, T)`` is summed over the mask."""
    x = ops.astype(x, cdtype)
    if x.ndim == 1:
        return x
    if mask is not None:
        x = ops.where(mask, x, ops.full_like(x, 0.0))
    return ops.sum(x, axis=-1)


# --------------------------------------------------------------------------------------------
# the formulas, written once


def _per_example_loss(
    loss_type: str,
    ops: ArrayOps,
    pi_w: Array,
    pi_l: Array,
    ref_w: Array | None,
    ref_l: Array | None,
    len_w: Array | None,
    len_l: Array | None,
    beta: Any,
    p: dict[str, Any],
) -> Array:
    ls = ops.log_sigmoid
    if loss_type == "simpo":
        return -ls(beta * (pi_w / len_w) - beta * (pi_l / len_l) - p["gamma"])
    h_w = pi_w - ref_w
    h_l = pi_l - ref_l
    if loss_type == "sigmoid":
        eps = p["label_smoothing"]
        z = beta * (h_w - h_l)
        if _is_number(eps) and eps == 0.0:
            return -ls(z)
        return -(1.0 - eps) * ls(z) - eps * ls(-z)
    if loss_type == "robust":
        eps = p["label_smoothing"]
        z = beta * (h_w - h_l)
        return (-(1.0 - eps) * ls(z) + eps * ls(-z)) / (1.0 - 2.0 * eps)
    if loss_type == "hinge":
        z = 1.0 - beta * (h_w - h_l)
        return ops.maximum(z, ops.full_like(z, 0.0))
    if loss_type == "ipo":
        if p["length_normalize"]:
            h_w, h_l = h_w / len_w, h_l / len_l
        d = h_w - h_l - 1.0 / (2.0 * beta)
        return d * d
    if loss_type == "cal_dpo":
        target = 1.0 / (2.0 * beta)
        cw = h_w - target
        cl = h_l + target
        return -ls(h_w - h_l) + cw * cw + cl * cl
    if loss_type == "dpo_shift":
        return -ls(beta * h_w - p["lam"] * beta * h_l)
    if loss_type == "dpop":
        shortfall = ref_w - pi_w
        penalty = ops.maximum(shortfall, ops.full_like(shortfall, 0.0))
        return -ls(beta * (h_w - h_l - p["dpop_lambda"] * penalty))
    raise AssertionError(loss_type)  # pragma: no cover - checked in _check_params


def _rewards(
    loss_type: str,
    pi_w: Array,
    pi_l: Array,
    ref_w: Array | None,
    ref_l: Array | None,
    len_w: Array | None,
    len_l: Array | None,
    beta: Any,
) -> tuple[Array, Array]:
    """TRL's implicit rewards: ``beta * h`` (SimPO: ``beta * pi / |y|``, as TRL's CPO)."""
    if loss_type == "simpo":
        return beta * (pi_w / len_w), beta * (pi_l / len_l)
    return beta * (pi_w - ref_w), beta * (pi_l - ref_l)


def _masked_mean(ops: ArrayOps, x: Array, mask: Array | None) -> Array:
    """Mean of every element, or of the elements inside the boolean ``mask``."""
    if mask is None:
        return ops.mean(x)
    kept = ops.where(mask, x, ops.full_like(x, 0.0))
    count = ops.sum(ops.sum(ops.astype(mask, x.dtype), axis=-1), axis=-1)
    return ops.sum(ops.sum(kept, axis=-1), axis=-1) / count


def _gate_metrics(ops: ArrayOps, stats: Any, cdtype: Any) -> dict[str, Array]:
    """Gate statistics over examples, or over the masked tokens for token granularity."""
    weight = ops.astype(ops.stop_gradient(stats.weight), cdtype)
    p = ops.astype(ops.stop_gradient(stats.p), cdtype)
    return {
        "gate/mean": _masked_mean(ops, weight, stats.mask),
        "gate/frac_below_half": _masked_mean(ops, ops.astype(weight < 0.5, cdtype), stats.mask),
        "gate/p_mean": _masked_mean(ops, p, stats.mask),
    }


# --------------------------------------------------------------------------------------------
# public API


def preference_loss(
    loss_type: str,
    policy_chosen_logps: Array,
    policy_rejected_logps: Array,
    ref_chosen_logps: Array | None = None,
    ref_rejected_logps: Array | None = None,
    *,
    beta: float = 0.1,
    gate: Gate | None = None,
    chosen_mask: Array | None = None,
    rejected_mask: Array | None = None,
    chosen_lengths: Array | int | None = None,
    rejected_lengths: Array | int | None = None,
    sft_weight: float = 0.0,
    **loss_params: Any,
) -> tuple[Array, dict[str, Array]]:
    """A preference loss of the DPO family, with an optional gradient gate.

    Args:
        loss_type: one of :data:`LOSS_TYPES` (formulas in the module docstring).
        policy_chosen_logps, policy_rejected_logps: the policy's log-probs, ``(B,)`` summed per
            sequence or ``(B, T)`` per token (summed here over ``chosen_mask`` /
            ``rejected_mask``).
        ref_chosen_logps, ref_rejected_logps: the reference model's log-probs, same layouts
            (per-token ones share their side's mask). Required except for ``simpo``, which
            uses no reference and rejects them.
        beta: the loss' temperature (> 0). A Python number, or an array (then unchecked).
        gate: ``None`` (the plain loss) or a :class:`gategrad.Gate` applied to
            ``policy_rejected_logps`` only. ``(B,)`` inputs support only
            ``estimator='seq'`` with ``granularity='example'`` (and need token counts);
            other gates need per-token log-probs. Do not also pass the same gate to
            :func:`gategrad.token_logps`: that would gate twice.
        chosen_mask, rejected_mask: ``(B, T)`` masks of per-token inputs (nonzero = counts).
        chosen_lengths, rejected_lengths: token counts ``(B,)`` (or one int) of per-sequence
            inputs, where the loss, the SFT term or the gate needs them.
        sft_weight: weight of the RPO-style term ``mean(-pi_w / |y_w|)`` (0 disables it).
        **loss_params: the loss type's own parameters (:data:`LOSS_PARAMS`): ``label_smoothing``
            (``sigmoid``: conservative DPO, in [0, 1); ``robust``: in [0, 0.5)),
            ``length_normalize`` (``ipo``, default ``True`` as TRL), ``lam`` (``dpo_shift``,
            default 0.95; see :func:`dpo_shift_lambda`), ``gamma`` (``simpo``, default 0.5),
            ``dpop_lambda`` (``dpop``, default 50).

    Returns:
        ``(loss, metrics)``: the mean loss, a scalar array of the inputs' framework in
        ``promote_types(dtype, float32)``, and a dict of scalar arrays without gradient:
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
        ``logps/chosen``, ``logps/rejected`` (TRL's names and definitions) and, with a gate,
        ``gate/mean``, ``gate/frac_below_half`` (fraction of examples, or of masked tokens,
        with ``g < 0.5``) and ``gate/p_mean`` (the estimator's mean ``p``).
    """
    params = _check_params(loss_type, beta, sft_weight, loss_params)
    if gate is not None:
        gate = _require_gate(gate)
    uses_ref = loss_type in _USES_REF
    if uses_ref and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(
            f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps (the "
            "reference model's log-probs)"
        )
    if not uses_ref and (ref_chosen_logps is not None or ref_rejected_logps is not None):
        raise ValueError(f"loss_type={loss_type!r} uses no reference model; drop the ref_* inputs")
    arrays = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    ops = get_ops(
        common_framework(
            **arrays,
            chosen_mask=chosen_mask,
            rejected_mask=rejected_mask,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
    )
    sizes = {}
    for name, x in arrays.items():
        if x is None:
            continue
        if not ops.is_floating(x):
            raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
        sizes[name] = _batch_size(x, name)
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(f"batch sizes differ ({shown}); every input needs the same B")

    mask_w, len_w = _prepare_side(
        ops, _CHOSEN, policy_chosen_logps, ref_chosen_logps, chosen_mask, chosen_lengths
    )
    mask_l, len_l = _prepare_side(
        ops,
        _REJECTED,
        policy_rejected_logps,
        ref_rejected_logps,
        rejected_mask,
        rejected_lengths,
    )
    for name, x in arrays.items():
        if x is not None:
            _check_finite(ops, x, mask_w if "chosen" in name else mask_l, name)
    needs_len = (loss_type == "simpo") or (loss_type == "ipo" and params["length_normalize"])
    if needs_len and (len_w is None or len_l is None):
        raise ValueError(
            f"loss_type={loss_type!r} normalises by length: pass chosen_lengths= and "
            "rejected_lengths= with per-sequence (B,) log-probs, or per-token (B, T) log-probs "
            "with chosen_mask= and rejected_mask="
        )
    if sft_weight > 0 and len_w is None:
        raise ValueError(
            "sft_weight > 0 adds a length-normalised NLL of the chosen response: pass "
            "chosen_lengths= with per-sequence (B,) log-probs, or per-token (B, T) log-probs "
            "with chosen_mask="
        )

    cdtype = ops.compute_dtype(policy_chosen_logps)
    rejected = policy_rejected_logps
    stats = None
    if gate is not None:
        if rejected.ndim == 1:
            if gate.granularity == "token" or gate.estimator != "seq":
                raise ValueError(
                    f"a gate with estimator={gate.estimator!r} and "
                    f"granularity={gate.granularity!r} needs the rejected response's per-token "
                    "log-probs: pass policy_rejected_logps of shape (B, T) with rejected_mask= "
                    "(per-sequence (B,) log-probs support only estimator='seq', "
                    "granularity='example')"
                )
            if len_l is None:
                raise ValueError(
                    "the 'seq' gate estimator on per-sequence (B,) log-probs needs "
                    "rejected_lengths= (the token count of each rejected response); or pass "
                    "per-token (B, T) log-probs with rejected_mask="
                )
            rejected, stats = gate_rejected(rejected, gate, lengths=len_l, return_stats=True)
        else:
            if mask_l is not None:  # padding may hold anything; the gate sees zeros there
                rejected = ops.where(mask_l, rejected, ops.full_like(rejected, 0.0))
            rejected, stats = gate_rejected(rejected, gate, mask_l, return_stats=True)

    pi_w = _reduce(ops, policy_chosen_logps, mask_w, cdtype)
    pi_l = _reduce(ops, rejected, mask_l, cdtype)
    ref_w = None if ref_chosen_logps is None else _reduce(ops, ref_chosen_logps, mask_w, cdtype)
    ref_l = None if ref_rejected_logps is None else _reduce(ops, ref_rejected_logps, mask_l, cdtype)

    losses = _per_example_loss(loss_type, ops, pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, params)
    loss = ops.mean(losses)
    if sft_weight > 0:
        loss = loss + sft_weight * ops.mean(-(pi_w / len_w))

    sg = ops.stop_gradient
    r_w, r_l = _rewards(
        loss_type,
        sg(pi_w),
        sg(pi_l),
        None if ref_w is None else sg(ref_w),
        None if ref_l is None else sg(ref_l),
        len_w,
        len_l,
        beta,
    )
    r_w, r_l = sg(r_w), sg(r_l)
    metrics = {
        "rewards/chosen": ops.mean(r_w),
        "rewards/rejected": ops.mean(r_l),
        "rewards/accuracies": ops.mean(ops.astype(r_w > r_l, cdtype)),
        "rewards/margins": ops.mean(r_w - r_l),
        "logps/chosen": ops.mean(sg(pi_w)),
        "logps/rejected": ops.mean(sg(pi_l)),
    }
    if stats is not None:
        metrics.update(_gate_metrics(ops, stats, cdtype))
    return loss, metrics


def _named(loss_type: str, doc: str):  # type: ignore[no-untyped-def]
    def loss(
        policy_chosen_logps: Array,
        policy_rejected_logps: Array,
        ref_chosen_logps: Array | None = None,
        ref_rejected_logps: Array | None = None,
        *,
        beta: float = 0.1,
        gate: Gate | None = None,
        chosen_mask: Array | None = None,
        rejected_mask: Array | None = None,
        chosen_lengths: Array | int | None = None,
        rejected_lengths: Array | int | None = None,
        sft_weight: float = 0.0,
        **loss_params: Any,
    ) -> tuple[Array, dict[str, Array]]:
        return preference_loss(
            loss_type,
            policy_chosen_logps,
            policy_rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            beta=beta,
            gate=gate,
            chosen_mask=chosen_mask,
            rejected_mask=rejected_mask,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
            sft_weight=sft_weight,
            **loss_params,
        )

    params = LOSS_PARAMS[loss_type]
    extra = ", ".join(f"``{k}={v!r}``" for k, v in params.items()) or "none"
    loss.__doc__ = (
        f"{doc}\n\n``preference_loss({loss_type!r}, ...)``: same arguments and return value "
        f"(see :func:`preference_loss`). Loss parameters: {extra}."
    )
    return loss


dpo_loss = _named(
    "sigmoid",
    "DPO (Rafailov et al. 2023, arXiv 2305.18290): ``-ls(beta (h_w - h_l))``.\n\n"
    "With ``label_smoothing=eps > 0``: conservative DPO (cDPO, Mitchell 2023), "
    "``-(1 - eps) ls(z) - eps ls(-z)``.",
)
ipo_loss = _named(
    "ipo",
    "IPO (Azar et al. 2023, arXiv 2310.12036): ``(h_w / |y_w| - h_l / |y_l| - 1 / (2 beta))^2``."
    "\n\nLength-normalised like TRL's ``ipo``; ``length_normalize=False`` gives the paper's "
    "unnormalised ``(h_w - h_l - 1 / (2 beta))^2``.",
)
cal_dpo_loss = _named(
    "cal_dpo",
    "Cal-DPO (Xiao et al. 2024, arXiv 2412.14516), as the official code: "
    "``-ls(h_w - h_l) + (h_w - 1 / (2 beta))^2 + (h_l + 1 / (2 beta))^2`` (no beta inside the "
    "sigmoid).",
)
dpo_shift_loss = _named(
    "dpo_shift",
    "DPO-Shift (Yang et al. 2025, arXiv 2502.07599): ``-ls(beta h_w - lam beta h_l)``, "
    "``lam`` in (0, 1]. Pass ``lam=dpo_shift_lambda(step, total_steps, ...)`` for a schedule.",
)
simpo_loss = _named(
    "simpo",
    "SimPO (Meng et al. 2024, arXiv 2405.14734): "
    "``-ls(beta pi_w / |y_w| - beta pi_l / |y_l| - gamma)``; no reference model. The paper "
    "uses beta around 2 to 2.5.",
)
dpop_loss = _named(
    "dpop",
    "DPOP / DPO-Positive (Pal et al. 2024, arXiv 2402.13228): "
    "``-ls(beta (h_w - h_l - dpop_lambda max(0, ref_w - pi_w)))``.",
)
hinge_loss = _named(
    "hinge",
    "Hinge (SLiC-HF, Zhao et al. 2023, arXiv 2305.10425; TRL's ``hinge``): "
    "``max(0, 1 - beta (h_w - h_l))``.",
)
robust_dpo_loss = _named(
    "robust",
    "Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409; TRL's ``robust``): "
    "``(-(1 - eps) ls(z) + eps ls(-z)) / (1 - 2 eps)`` with ``z = beta (h_w - h_l)`` and "
    "``eps = label_smoothing`` in [0, 0.5).",
)
for _fn, _name in (
    (dpo_loss, "dpo_loss"),
    (ipo_loss, "ipo_loss"),
    (cal_dpo_loss, "cal_dpo_loss"),
    (dpo_shift_loss, "dpo_shift_loss"),
    (simpo_loss, "simpo_loss"),
    (dpop_loss, "dpop_loss"),
    (hinge_loss, "hinge_loss"),
    (robust_dpo_loss, "robust_dpo_loss"),
):
    _fn.__name__ = _fn.__qualname__ = _name
del _fn, _name

SCHEDULES: tuple[str, ...] = ("fixed", "linear_increase", "linear_decrease")


def dpo_shift_lambda(
    step: int,
    total_steps: int,
    schedule: str = "linear_increase",
    *,
    lam_min: float = 0.5,
    lam_max: float = 1.0,
) -> float:
    """DPO-Shift's ``lambda`` at optimizer step ``step`` (0-based) of ``total_steps``.

    As the authors' code (``dpo_lambda_strategy``, defaults ``lam_min=0.5``, ``lam_max=1.0``):

    - ``linear_increase``: ``lam_min + (lam_max - lam_min) * step / total_steps``;
    - ``linear_decrease``: ``lam_max - (lam_max - lam_min) * step / total_steps``;
    - ``fixed``: ``lam_min`` at every step (the paper's fixed runs set one value).

    ``step`` is clipped to ``[0, total_steps]``. Pass the result as ``lam=`` to
    :func:`dpo_shift_loss`.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    for name, value in (("lam_min", lam_min), ("lam_max", lam_max)):
        if not _is_number(value) or not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
    if lam_min > lam_max:
        raise ValueError(f"lam_min ({lam_min}) must not exceed lam_max ({lam_max})")
    if schedule == "fixed":
        return float(lam_min)
    frac = min(max(step, 0), total_steps) / total_steps
    if schedule == "linear_increase":
        return float(lam_min + (lam_max - lam_min) * frac)
    return float(lam_max - (lam_max - lam_min) * frac)
