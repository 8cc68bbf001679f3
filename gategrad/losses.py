"""The DPO loss family, written once against [`gategrad.Backend`][].

Every loss here runs on NumPy, PyTorch, JAX and MLX arrays alike. Each loss type is declared
once, in the registry ``gategrad._loss_registry.LOSSES`` (parameters, formula, rewards).
Notation: ``pi_w = log pi(y_w | x)`` and ``pi_l = log pi(y_l | x)`` are the policy's summed
log-probs of the chosen and rejected responses, ``ref_w``/``ref_l`` the reference
model's, ``h_w = pi_w - ref_w``, ``h_l = pi_l - ref_l``, ``n_w``, ``n_l`` the responses' token
counts and
``ls(z) = log sigmoid(z)``. Per example:

| loss type | per-example loss |
|---|---|
| ``sigmoid`` | ``-(1 - eps) ls(beta (h_w - h_l)) - eps ls(-beta (h_w - h_l))``  (DPO; eps=0) |
| ``ipo`` | ``(h_w / n_w - h_l / n_l - 1 / (2 beta))^2``  (length-normalised, as TRL) |
| ``cal_dpo`` | ``-ls(h_w - h_l) + w ((h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2)``, w=0.5 |
| ``dpo_shift`` | ``-ls(beta h_w - lam beta h_l)`` |
| ``simpo`` | ``-ls(beta pi_w / n_w - beta pi_l / n_l - gamma)``  (no reference) |
| ``dpop`` | ``-ls(beta (h_w - h_l - dpop_lambda max(0, ref_w - pi_w)))`` |
| ``hinge`` | ``max(0, 1 - beta (h_w - h_l))`` |
| ``robust`` | ``(-(1 - eps) ls(beta (h_w - h_l)) + eps ls(-beta (h_w - h_l))) / (1 - 2 eps)`` |

The loss is the batch mean, plus ``sft_weight * mean(-pi_w / |y_w|)`` when ``sft_weight > 0``
(the RPO-style NLL term). See ``docs/losses.md`` for the sources.

**The gate.** ``gate=Gate(...)`` passes only ``policy_rejected_logps`` through
[`gategrad.gate_rejected`][]: the loss value and every other gradient are bitwise those of
``gate=None``; the gradient reaching the rejected log-probs is multiplied by ``g`` per example
(or per token, with ``granularity='token'`` and per-token inputs).

**Inputs.** Each log-prob argument is either per sequence ``(B,)`` (already summed over the
response) or per token ``(B, T)``, summed here over ``chosen_mask`` / ``rejected_mask``
(``None``: every position counts). Token counts come from the masks for per-token inputs and
from ``chosen_lengths`` / ``rejected_lengths`` for per-sequence ones; they are needed by
``ipo``, ``simpo``, ``sft_weight > 0`` and the ``seq`` gate estimator on ``(B,)`` inputs. The loss
is computed in ``promote_types(dtype, float32)``.

**Checks.** Static problems (unknown ``loss_type`` or parameter, ``beta <= 0``, shapes, batch
sizes, an empty batch ``B = 0``) raise ``ValueError`` always, also under tracing. Numeric
parameters may be Python or NumPy numbers or 0-d arrays (read when concrete); bools are refused.
Value problems (NaN or +-inf log-probs inside the mask, policy log-probs above 0 beyond a
rounding slack, zero-length responses) raise ``ValueError`` in eager mode only; under
``jax.jit``, ``torch.compile``, ``mx.compile`` or ``vmap`` they are not inspected (that would
need a device sync or is impossible): NaN or inf log-probs propagate into the loss, and a
zero-length response counts as one token (its gate weight is 1), so no ``0 / 0`` occurs. See
[`gategrad.value_checks`][].
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypedDict, cast

import numpy as np

from . import _validate as check
from ._backend import Array, Backend
from ._core import gate_rejected
from ._dispatch import backend_for
from ._gate import Gate
from ._loss_registry import LOSS_PARAMS, LOSS_TYPES, LOSSES, Terms, resolve

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from typing import Unpack
    else:
        from typing_extensions import Unpack

__all__ = [
    "LOSS_PARAMS",
    "LOSS_TYPES",
    "LossOptions",
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
    "stacked_preference_loss",
]

METRIC_KEYS: tuple[str, ...] = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
GATE_METRIC_KEYS: tuple[str, ...] = ("gate/mean", "gate/frac_below_half", "gate/p_mean")

LossResult = tuple[Array, dict[str, Array]]


class LossOptions(TypedDict, total=False):
    """The keyword arguments every loss of the family shares (see [`preference_loss`][])."""

    beta: float
    gate: Gate | None
    chosen_mask: Array | None
    rejected_mask: Array | None
    chosen_lengths: Array | int | None
    rejected_lengths: Array | int | None
    sft_weight: float


# --------------------------------------------------------------------------------------------
# validation of the inputs of one response side


class _Side:
    """One response side (chosen or rejected): its argument names."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.mask_name = f"{name}_mask"
        self.lengths_name = f"{name}_lengths"


_CHOSEN = _Side("chosen")
_REJECTED = _Side("rejected")


def _batch_size(x: Array, name: str) -> int:
    if x.ndim not in (1, 2):
        raise ValueError(
            f"{name} must have shape (B,) (summed per sequence) or (B, T) (per token), "
            f"got {tuple(x.shape)}"
        )
    return int(x.shape[0])


def _prepare_side(
    ops: Backend,
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
        if isinstance(lengths, (bool, np.bool_)):
            raise TypeError(f"{side.lengths_name} must be token counts, got the bool {lengths!r}")
        if check.is_number(lengths):
            counts = ops.full_like(ops.astype(ops.stop_gradient(policy), cdtype), float(lengths))
        else:
            check.require_counts(lengths, side.lengths_name)
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
        check.check_counts(ops, counts, side.mask_name if lengths is None else side.lengths_name)
    return maskb, counts


def _safe_counts(ops: Backend, counts: Array | None) -> Array | None:
    """Under tracing (no check) an empty response counts as 1 token: ``h / n`` stays finite."""
    return None if counts is None else ops.where(counts > 0, counts, 1.0)


def _reduce(ops: Backend, x: Array, mask: Array | None, cdtype: Any) -> Array:
    """Per-sequence sums in ``cdtype``: ``(B,)`` passes, ``(B, T)`` is summed over the mask."""
    x = ops.astype(x, cdtype)
    if x.ndim == 1:
        return x
    if mask is not None:
        x = ops.where(mask, x, 0.0)
    return ops.sum(x, axis=-1)


def _masked_mean(ops: Backend, x: Array, mask: Array | None) -> Array:
    """Mean of every element, or of the elements inside the boolean ``mask``."""
    if mask is None:
        return ops.mean(x)
    kept = ops.where(mask, x, 0.0)
    count = ops.sum(ops.sum(ops.astype(mask, x.dtype), axis=-1), axis=-1)
    count = ops.maximum(count, 1.0)  # no token at all (traced only): 0, not 0 / 0
    return ops.sum(ops.sum(kept, axis=-1), axis=-1) / count


def _gate_metrics(ops: Backend, stats: Any, cdtype: Any) -> dict[str, Array]:
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
        loss_type: one of [`LOSS_TYPES`][] (formulas in the module docstring).
        policy_chosen_logps: the policy's log-probs of the chosen responses, ``(B,)`` summed
            per sequence or ``(B, T)`` per token (summed here over ``chosen_mask``).
        policy_rejected_logps: the same for the rejected responses (summed over
            ``rejected_mask``); the gate acts on this input only.
        ref_chosen_logps: the reference model's log-probs of the chosen responses, in the
            layout of ``policy_chosen_logps`` (per-token ones share ``chosen_mask``). Required
            except for ``simpo``, which uses no reference and rejects it.
        ref_rejected_logps: the same for the rejected responses (``rejected_mask``).
        beta: the loss' temperature (> 0). A Python number, or an array (then unchecked).
        gate: ``None`` (the plain loss) or a [`gategrad.Gate`][] applied to
            ``policy_rejected_logps`` only. ``(B,)`` inputs support only
            ``estimator='seq'`` with ``granularity='example'`` (and need token counts);
            other gates need per-token log-probs. Do not also pass the same gate to
            [`gategrad.token_logps`][]: that would gate twice.
        chosen_mask: ``(B, T)`` mask of per-token chosen inputs (nonzero = counts);
            ``None``: every position counts.
        rejected_mask: the same for the rejected inputs.
        chosen_lengths: token counts ``(B,)`` (or one int) of per-sequence chosen inputs,
            where the loss, the SFT term or the gate needs them.
        rejected_lengths: the same for the rejected inputs.
        sft_weight: weight of the RPO-style term ``mean(-pi_w / |y_w|)`` (0 disables it).
        **loss_params: the loss type's own parameters ([`LOSS_PARAMS`][]; the typed
            functions such as [`dpo_loss`][] name them): ``label_smoothing``
            (``sigmoid``: conservative DPO, in [0, 1); ``robust``: in [0, 0.5)),
            ``length_normalize`` (``ipo``, default ``True`` as TRL), ``lam`` (``dpo_shift``,
            default 0.95; see [`dpo_shift_lambda`][]), ``gamma`` (``simpo``, default 0.5),
            ``dpop_lambda`` (``dpop``, default 50).

    Returns:
        The pair ``(loss, metrics)``. ``loss`` is the mean loss, a scalar array of the inputs'
        framework in ``promote_types(dtype, float32)``; ``metrics`` a dict of scalar arrays
        without gradient:
        ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``,
        ``logps/chosen``, ``logps/rejected`` (TRL's names and definitions) and, with a gate,
        ``gate/mean``, ``gate/frac_below_half`` (fraction of examples, or of masked tokens,
        with ``g < 0.5``) and ``gate/p_mean`` (the estimator's mean ``p``).
    """
    spec, params = resolve(loss_type, loss_params)
    beta = check.positive_number("beta", beta)
    try:
        sft_weight = check.number_in("sft_weight", sft_weight, 0.0, float("inf"))
        _, sft_value = check.scalar("sft_weight", sft_weight)
    except ValueError:
        raise ValueError(f"sft_weight must be a finite number >= 0, got {sft_weight!r}") from None
    if sft_value is None:
        raise ValueError(
            f"sft_weight must be a concrete finite number >= 0 (it switches a term on), got "
            f"{sft_weight!r}"
        )
    if gate is not None:
        gate = check.require_gate(gate)
    uses_ref = spec.uses_ref
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
    ops = backend_for(
        **arrays,
        chosen_mask=chosen_mask,
        rejected_mask=rejected_mask,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    sizes = {}
    for name, x in arrays.items():
        if x is None:
            continue
        check.require_array(x, name)
        check.require_floating(ops, x, name)
        sizes[name] = _batch_size(x, name)
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(f"batch sizes differ ({shown}); every input needs the same B")
    if 0 in sizes.values():
        raise ValueError(
            "the batch is empty (B = 0): a mean loss over no pairs is undefined; skip the step "
            "(or filter empty batches out of the data loader)"
        )
    for name in ("chosen_mask", "rejected_mask"):
        value = chosen_mask if name == "chosen_mask" else rejected_mask
        if value is not None:
            check.require_mask(value, name)

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
        if x is None:
            continue
        # NaN / inf first (their messages are part of the contract), then "> 0" (logits)
        check.check_log_probs(
            ops,
            x,
            name,
            mask=mask_w if "chosen" in name else mask_l,
            allow_neg_inf=False,
            hint="a -inf log-prob means a token of probability 0; check the labels, the "
            "masks and the model's logits",
        )
        if name.startswith("policy"):
            check.check_not_logits(
                ops,
                x,
                name,
                mask=mask_w if "chosen" in name else mask_l,
                counts=len_w if "chosen" in name else len_l,
            )
    if spec.needs_lengths(params) and (len_w is None or len_l is None):
        raise ValueError(
            f"loss_type={loss_type!r} normalises by length: pass chosen_lengths= and "
            "rejected_lengths= with per-sequence (B,) log-probs, or per-token (B, T) log-probs "
            "with chosen_mask= and rejected_mask="
        )
    if sft_value > 0 and len_w is None:
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
                rejected = ops.where(mask_l, rejected, 0.0)
            rejected, stats = gate_rejected(rejected, gate, mask_l, return_stats=True)

    len_w, len_l = _safe_counts(ops, len_w), _safe_counts(ops, len_l)
    pi_w = _reduce(ops, policy_chosen_logps, mask_w, cdtype)
    pi_l = _reduce(ops, rejected, mask_l, cdtype)
    ref_w = None if ref_chosen_logps is None else _reduce(ops, ref_chosen_logps, mask_w, cdtype)
    ref_l = None if ref_rejected_logps is None else _reduce(ops, ref_rejected_logps, mask_l, cdtype)

    loss = ops.mean(spec.formula(ops, Terms(pi_w, pi_l, ref_w, ref_l, len_w, len_l), beta, params))
    if sft_value > 0:
        loss = loss + sft_weight * ops.mean(-(pi_w / len_w))

    sg = ops.stop_gradient
    r_w, r_l = spec.rewards(
        Terms(
            sg(pi_w),
            sg(pi_l),
            None if ref_w is None else sg(ref_w),
            None if ref_l is None else sg(ref_l),
            len_w,
            len_l,
        ),
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


def stacked_preference_loss(
    loss_type: str,
    policy_logps: Array,
    ref_logps: Array | None = None,
    *,
    mask: Array | None = None,
    lengths: Array | int | None = None,
    **options: Any,
) -> LossResult:
    """[`preference_loss`][] on a stacked ``[chosen; rejected]`` batch.

    The layout of a concatenated forward pass (TRL's, mlx-lm's): rows ``:B`` hold the chosen
    responses and rows ``B:`` the rejected ones of the same prompts.

    Args:
        loss_type: one of [`LOSS_TYPES`][].
        policy_logps: ``(2B, T)`` per-token or ``(2B,)`` per-sequence log-probs.
        ref_logps: the reference model's, same layout (``None`` for ``simpo``).
        mask: ``(2B, T)`` mask of per-token inputs.
        lengths: ``(2B,)`` token counts (or one int) of per-sequence inputs.
        **options: every other keyword of [`preference_loss`][] (``beta``, ``gate``, the loss
            type's own parameters...).

    Returns:
        The pair ``(loss, metrics)``, as [`preference_loss`][] returns it.
    """
    rows = int(policy_logps.shape[0]) if getattr(policy_logps, "ndim", 0) >= 1 else -1
    if rows < 0 or rows % 2:
        raise ValueError(
            f"policy_logps must stack [chosen; rejected] rows, an even number, got shape "
            f"{tuple(getattr(policy_logps, 'shape', ()))}"
        )
    n = rows // 2

    def halves(x: Any) -> tuple[Any, Any]:
        return (None, None) if x is None else (x[:n], x[n:])

    (pc, pr), (rc, rr), (mc, mr) = halves(policy_logps), halves(ref_logps), halves(mask)
    lc, lr = (lengths, lengths) if lengths is None or check.is_number(lengths) else halves(lengths)
    return preference_loss(
        loss_type,
        pc,
        pr,
        rc,
        rr,
        chosen_mask=mc,
        rejected_mask=mr,
        chosen_lengths=lc,
        rejected_lengths=lr,
        **options,
    )


# --------------------------------------------------------------------------------------------
# one typed function per loss type: its own parameters by name, the shared ones as LossOptions

_P = ParamSpec("_P")
#: The type of a named loss: the four log-prob arrays, then the stub's keyword parameters.
NamedLoss = Callable[Concatenate[Array, Array, "Array | None", "Array | None", _P], LossResult]
_ARRAYS = (
    inspect.Parameter("policy_chosen_logps", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("policy_rejected_logps", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("ref_chosen_logps", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
    inspect.Parameter("ref_rejected_logps", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
)


def _named(loss_type: str) -> Callable[[Callable[_P, None]], NamedLoss[_P]]:
    """Turn a stub that declares a loss type's own keyword parameters into the public loss.

    The result takes the four log-prob arrays (positionally or by name) and every keyword of
    [`preference_loss`][]; its signature (``inspect.signature``, IDEs) lists them all, and the
    stub's defaults must equal the registry's (checked here, at import).
    """
    spec = LOSSES[loss_type]

    def wrap(stub: Callable[_P, None]) -> NamedLoss[_P]:
        own = inspect.signature(stub).parameters
        declared = {
            k: v.default for k, v in own.items() if v.kind is inspect.Parameter.KEYWORD_ONLY
        }
        if declared != spec.defaults:
            raise AssertionError(f"{stub.__name__}: {declared} != registry {spec.defaults}")

        def loss(
            policy_chosen_logps: Array,
            policy_rejected_logps: Array,
            ref_chosen_logps: Array | None = None,
            ref_rejected_logps: Array | None = None,
            **kwargs: Any,
        ) -> LossResult:
            return preference_loss(
                loss_type,
                policy_chosen_logps,
                policy_rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                **kwargs,
            )

        functools.update_wrapper(loss, stub)
        common = inspect.signature(preference_loss).parameters
        keywords = [v for k, v in common.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
        keywords += [v for v in own.values() if v.kind is inspect.Parameter.KEYWORD_ONLY]
        loss.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [*_ARRAYS, *keywords], return_annotation="tuple[Array, dict[str, Array]]"
        )
        return cast("NamedLoss[_P]", loss)  # a real signature is set just above

    return wrap


@_named("sigmoid")
def dpo_loss(*, label_smoothing: float = 0.0, **options: Unpack[LossOptions]) -> None:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290): ``-ls(beta (h_w - h_l))``.

    With ``label_smoothing=eps > 0``: conservative DPO (cDPO, Mitchell 2023),
    ``-(1 - eps) ls(z) - eps ls(-z)``. Called as
    ``dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
    **options)``, the same as ``preference_loss("sigmoid", ...)``.
    """


@_named("ipo")
def ipo_loss(*, length_normalize: bool = True, **options: Unpack[LossOptions]) -> None:
    """IPO (Azar et al. 2023, arXiv 2310.12036): ``(h_w / |y_w| - h_l / |y_l| - 1 / (2 beta))^2``.

    Length-normalised like TRL's ``ipo``; ``length_normalize=False`` gives the paper's
    unnormalised ``(h_w - h_l - 1 / (2 beta))^2``. ``preference_loss("ipo", ...)``.
    """


@_named("cal_dpo")
def cal_dpo_loss(*, calibration_weight: float = 0.5, **options: Unpack[LossOptions]) -> None:
    """Cal-DPO (Xiao et al. 2024, arXiv 2412.14516):
    ``-ls(h_w - h_l) + w ((h_w - 1 / (2 beta))^2 + (h_l + 1 / (2 beta))^2)`` with
    ``w = calibration_weight`` (no beta inside the sigmoid).

    The default ``w = 0.5`` is the authors' code (tengxiao1/Cal-DPO,
    ``scripts/dpo_trainer.py`` lines 1212-1216: ``losses = DPO_loss + 0.5*Cal_loss``, whose
    two ``F.mse_loss`` terms are batch means, so the batch means agree); ``w = 1`` is the
    equation as the paper prints it. ``preference_loss("cal_dpo", ...)``.
    """


@_named("dpo_shift")
def dpo_shift_loss(*, lam: float = 0.95, **options: Unpack[LossOptions]) -> None:
    """DPO-Shift (Yang et al. 2025, arXiv 2502.07599): ``-ls(beta h_w - lam beta h_l)``.

    ``lam`` in (0, 1]; pass ``lam=dpo_shift_lambda(step, total_steps, ...)`` for a schedule.
    ``preference_loss("dpo_shift", ...)``.
    """


@_named("simpo")
def simpo_loss(*, gamma: float = 0.5, **options: Unpack[LossOptions]) -> None:
    """SimPO (Meng et al. 2024, arXiv 2405.14734):
    ``-ls(beta pi_w / |y_w| - beta pi_l / |y_l| - gamma)``; no reference model.

    The paper uses beta around 2 to 2.5. ``preference_loss("simpo", ...)``.
    """


@_named("dpop")
def dpop_loss(*, dpop_lambda: float = 50.0, **options: Unpack[LossOptions]) -> None:
    """DPOP / DPO-Positive (Pal et al. 2024, arXiv 2402.13228):
    ``-ls(beta (h_w - h_l - dpop_lambda max(0, ref_w - pi_w)))``. ``preference_loss("dpop", ...)``.
    """


@_named("hinge")
def hinge_loss(**options: Unpack[LossOptions]) -> None:
    """Hinge (SLiC-HF, Zhao et al. 2023, arXiv 2305.10425; TRL's ``hinge``):
    ``max(0, 1 - beta (h_w - h_l))``. ``preference_loss("hinge", ...)``.
    """


@_named("robust")
def robust_dpo_loss(*, label_smoothing: float = 0.0, **options: Unpack[LossOptions]) -> None:
    """Robust DPO (Chowdhury et al. 2024, arXiv 2403.00409; TRL's ``robust``):
    ``(-(1 - eps) ls(z) + eps ls(-z)) / (1 - 2 eps)`` with ``z = beta (h_w - h_l)`` and
    ``eps = label_smoothing`` in [0, 0.5). ``preference_loss("robust", ...)``.
    """


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
    [`dpo_shift_loss`][].
    """
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    total_steps = check.integer("total_steps", total_steps, minimum=1)
    _, step_value = check.scalar("step", step)
    if step_value is None or not np.isfinite(step_value):
        raise ValueError(f"step must be a finite number (an optimizer step), got {step!r}")
    step_f = float(step_value)
    values = []
    for name, value in (("lam_min", lam_min), ("lam_max", lam_max)):
        try:
            _, v = check.scalar(name, value)
        except ValueError:
            v = None
        if v is None or not 0.0 < v <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {value!r}")
        values.append(v)
    lam_min, lam_max = values
    if lam_min > lam_max:
        raise ValueError(f"lam_min ({lam_min}) must not exceed lam_max ({lam_max})")
    if schedule == "fixed":
        return float(lam_min)
    frac = min(max(step_f, 0.0), total_steps) / total_steps
    if schedule == "linear_increase":
        return float(lam_min + (lam_max - lam_min) * frac)
    return float(lam_max - (lam_max - lam_min) * frac)
