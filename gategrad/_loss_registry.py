"""The loss registry: every loss type of the DPO family declared once.

A [`LossSpec`][] holds everything that differs between loss types: its parameters (with
defaults and validators), whether it uses the reference model, whether it needs token counts,
the per-example formula and the implicit rewards. [`gategrad.preference_loss`][], the typed
functions of [`gategrad.losses`][], the closed-form gradients of the test kit and the docs all
read this table; nothing else lists loss types.

Notation: ``pi_w``, ``pi_l`` the policy's summed log-probs of the chosen and rejected responses,
``ref_w``, ``ref_l`` the reference model's, ``h = pi - ref``, ``|y|`` a token count and
``ls(z) = log sigmoid(z)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._backend import Array, Backend

__all__ = ["LOSSES", "LOSS_PARAMS", "LOSS_TYPES", "LossParam", "LossSpec", "Terms"]


@dataclass(frozen=True)
class Terms:
    """The per-example inputs of a formula, ``(B,)`` in compute dtype (``None`` if unused)."""

    pi_w: Array
    pi_l: Array
    ref_w: Array | None
    ref_l: Array | None
    len_w: Array | None
    len_l: Array | None

    @property
    def h_w(self) -> Array:
        return self.pi_w - self.ref_w

    @property
    def h_l(self) -> Array:
        return self.pi_l - self.ref_l


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _in_range(
    lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = True
) -> Callable[[str, Any, str], Any]:
    """A validator of a number in an interval; traced arrays pass unchecked."""

    def check(name: str, value: Any, loss_type: str) -> Any:
        from ._validate import scalar  # NumPy scalars, 0-d arrays; bools refused

        use, v = scalar(name, value)
        if v is None:
            return use
        value = v
        ok = math.isfinite(value) and (value > lo if lo_open else value >= lo)
        ok = ok and (value < hi if hi_open else value <= hi)
        if not ok:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise ValueError(
                f"{name} must lie in {left}{lo:g}, {hi:g}{right} for loss_type={loss_type!r}, "
                f"got {value!r}"
            )
        return use

    return check


def _boolean(name: str, value: Any, loss_type: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


@dataclass(frozen=True)
class LossParam:
    """A loss type's own parameter: name, default, validator ``(name, value, loss_type)``."""

    name: str
    default: Any
    #: validates the value and returns the one to compute with (NumPy scalars as floats)
    check: Callable[[str, Any, str], Any]
    doc: str


@dataclass(frozen=True)
class LossSpec:
    """One loss type.

    ``formula(ops, terms, beta, params) -> (B,)`` per-example losses; ``rewards(terms, beta)``
    TRL's implicit rewards ``(chosen, rejected)``; ``needs_lengths(params)`` whether the formula
    divides by token counts.
    """

    name: str
    title: str
    formula: Callable[[Backend, Terms, Any, dict[str, Any]], Array]
    params: tuple[LossParam, ...] = ()
    uses_ref: bool = True
    needs_lengths: Callable[[dict[str, Any]], bool] = field(default=lambda p: False)
    rewards: Callable[[Terms, Any], tuple[Array, Array]] = field(
        default=lambda t, beta: (beta * t.h_w, beta * t.h_l)
    )

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


# --------------------------------------------------------------------------------------------
# the formulas, written once


def _sigmoid(ops: Backend, t: Terms, beta: Any, p: dict[str, Any]) -> Array:
    eps = p["label_smoothing"]
    z = beta * (t.h_w - t.h_l)
    if _is_number(eps) and eps == 0.0:
        return -ops.log_sigmoid(z)
    return -(1.0 - eps) * ops.log_sigmoid(z) - eps * ops.log_sigmoid(-z)


def _robust(ops: Backend, t: Terms, beta: Any, p: dict[str, Any]) -> Array:
    eps = p["label_smoothing"]
    z = beta * (t.h_w - t.h_l)
    return (-(1.0 - eps) * ops.log_sigmoid(z) + eps * ops.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def _relu(ops: Backend, x: Array) -> Array:
    """``max(x, 0)`` with derivative 0 at ``x = 0`` on every backend (``torch.relu``'s
    convention; ``maximum``'s subgradient at a tie is 1 in torch's ``clamp`` and 0.5 in JAX,
    and DPOP's penalty sits exactly at 0 on the first step, where the policy is the reference)."""
    return ops.where(x > 0, x, 0.0)


def _hinge(ops: Backend, t: Terms, beta: Any, p: dict[str, Any]) -> Array:
    return _relu(ops, 1.0 - beta * (t.h_w - t.h_l))


def _ipo(ops: Backend, t: Terms, beta: Any, p: dict[str, Any]) -> Array:
    h_w, h_l = t.h_w, t.h_l
    if p["length_normalize"]:
        h_w, h_l = h_w / t.len_w, h_l / t.len_l
    d = h_w - h_l - 1.0 / (2.0 * beta)
    return d * d


def _cal_dpo(ops: Backend, t: Terms, beta: Any, p: dict[str, Any]) -> Array:
    """``-ls(h_w - h_l) + w ((h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2)``, ``w`` =
    ``calibration_weight``. The official code (tengxiao1/Cal-DPO, ``scripts/dpo_trainer.py``,
    lines 1212-1216 at commit 7d16b46) computes ``DPO_loss + 0.5 * Cal_loss`` with ``Cal_loss``
    two ``F.mse_loss`` batch means; the batch mean of this per-example form is the same."""
    target = 1.0 / (2.0 * beta)
    cw = t.h_w - target
    cl = t.h_l + target
    return -ops.log_sigmoid(t.h_w - t.h_l) + p["calibration_weight"] * (cw * cw + cl * cl)


def _dpo_shift(ops: Backend, t: Terms, beta: Any, p: dict[str, Any]) -> Array:
    return -ops.log_sigmoid(beta * t.h_w - p["lam"] * beta * t.h_l)


def _simpo(ops: Backend, t: Terms, beta: Any, p: dict[str, Any]) -> Array:
    return -ops.log_sigmoid(beta * (t.pi_w / t.len_w) - beta * (t.pi_l / t.len_l) - p["gamma"])


def _dpop(ops: Backend, t: Terms, beta: Any, p: dict[str, Any]) -> Array:
    penalty = _relu(ops, t.ref_w - t.pi_w)
    return -ops.log_sigmoid(beta * (t.h_w - t.h_l - p["dpop_lambda"] * penalty))


def _simpo_rewards(t: Terms, beta: Any) -> tuple[Array, Array]:
    """SimPO's rewards as TRL's CPO: ``beta * pi / |y|``."""
    return beta * (t.pi_w / t.len_w), beta * (t.pi_l / t.len_l)


_SMOOTHING = "label smoothing epsilon"

_SPECS: tuple[LossSpec, ...] = (
    LossSpec(
        "sigmoid",
        "DPO; cDPO with label_smoothing > 0",
        _sigmoid,
        (LossParam("label_smoothing", 0.0, _in_range(0.0, 1.0), _SMOOTHING),),
    ),
    LossSpec(
        "ipo",
        "IPO, length-normalised as TRL",
        _ipo,
        (LossParam("length_normalize", True, _boolean, "divide h by |y| (TRL)"),),
        needs_lengths=lambda p: bool(p["length_normalize"]),
    ),
    LossSpec(
        "cal_dpo",
        "Cal-DPO (the official code's weight 0.5)",
        _cal_dpo,
        (
            LossParam(
                "calibration_weight",
                0.5,
                _in_range(0.0, math.inf),
                "weight of the calibration terms (0.5: official code; 1: the paper's equation)",
            ),
        ),
    ),
    LossSpec(
        "dpo_shift",
        "DPO-Shift",
        _dpo_shift,
        (LossParam("lam", 0.95, _in_range(0.0, 1.0, lo_open=True, hi_open=False), "lambda"),),
    ),
    LossSpec(
        "simpo",
        "SimPO (no reference)",
        _simpo,
        (LossParam("gamma", 0.5, _in_range(0.0, math.inf), "target margin"),),
        uses_ref=False,
        needs_lengths=lambda p: True,
        rewards=_simpo_rewards,
    ),
    LossSpec(
        "dpop",
        "DPOP / DPO-Positive",
        _dpop,
        (LossParam("dpop_lambda", 50.0, _in_range(0.0, math.inf), "penalty weight"),),
    ),
    LossSpec("hinge", "hinge (SLiC-HF)", _hinge),
    LossSpec(
        "robust",
        "robust DPO",
        _robust,
        (LossParam("label_smoothing", 0.0, _in_range(0.0, 0.5), _SMOOTHING),),
    ),
)

#: loss type -> its ``LossSpec`` (TRL's names where TRL has the loss).
LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in _SPECS}
LOSS_TYPES: tuple[str, ...] = tuple(LOSSES)
"""The loss types [`gategrad.preference_loss`][] accepts, in the order of the table in
[`gategrad.losses`][]."""
LOSS_PARAMS: dict[str, dict[str, Any]] = {name: spec.defaults for name, spec in LOSSES.items()}
"""The extra parameters each loss type takes, with their defaults, e.g.
``LOSS_PARAMS["simpo"] == {"gamma": 0.5}``."""


def resolve(loss_type: Any, params: dict[str, Any]) -> tuple[LossSpec, dict[str, Any]]:
    """The spec of ``loss_type`` and its parameters with defaults, validated."""
    if not isinstance(loss_type, str) or loss_type not in LOSSES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    spec = LOSSES[loss_type]
    allowed = spec.defaults
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        takes = f"takes {sorted(allowed)}" if allowed else "takes no extra parameters"
        raise ValueError(f"loss_type={loss_type!r} {takes}; got unexpected {unknown}")
    out = {**allowed, **params}
    for p in spec.params:
        out[p.name] = p.check(p.name, out[p.name], loss_type)
    return spec, out
