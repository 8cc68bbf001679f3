"""The lab's methods: a base preference loss, ungated or with one of the gates.

Gate variants (``--gates``):

- ``none``: the base loss, ungated;
- ``seq``: the paper's gate ``sigmoid(alpha (p - tau))`` with ``p`` the geometric mean of the
  rejected response's token probabilities, per example;
- ``q10``: the same gate with ``p`` the 10th percentile of the token probabilities;
- ``token``: ours, the log-space gate ``sigmoid((log p - log tau) / T)`` applied to every
  rejected token with that token's own probability;
- ``zero``: ``g = 0``, the rejected gradient dropped entirely (a baseline, not a method).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gategrad._gate import SHAPE_DEFAULTS, Gate
from gategrad._loss_registry import resolve

__all__ = [
    "BASE_LOSSES",
    "GATE_KINDS",
    "GateParams",
    "Method",
    "build_methods",
    "canonical_loss",
]

#: Accepted loss names on the command line, mapped to ``preference_loss`` loss types.
LOSS_ALIASES: dict[str, str] = {
    "dpo": "sigmoid",
    "sigmoid": "sigmoid",
    "ipo": "ipo",
    "cal_dpo": "cal_dpo",
    "cal-dpo": "cal_dpo",
    "caldpo": "cal_dpo",
    "dpo_shift": "dpo_shift",
    "dpo-shift": "dpo_shift",
    "simpo": "simpo",
    "dpop": "dpop",
    "hinge": "hinge",
    "robust": "robust",
}

#: Display names of the loss types (the paper's row labels).
LOSS_LABELS: dict[str, str] = {
    "sigmoid": "DPO",
    "ipo": "IPO",
    "cal_dpo": "Cal-DPO",
    "dpo_shift": "DPO-Shift",
    "simpo": "SimPO",
    "dpop": "DPOP",
    "hinge": "Hinge",
    "robust": "Robust-DPO",
}

#: The paper's four base losses, the lab's default.
BASE_LOSSES: tuple[str, ...] = ("sigmoid", "ipo", "cal_dpo", "dpo_shift")

GATE_KINDS: tuple[str, ...] = ("none", "seq", "q10", "token", "zero")
GATE_LABELS: dict[str, str] = {"seq": "seq", "q10": "q10", "token": "tok-log"}


def canonical_loss(name: str) -> str:
    """``'dpo'`` -> ``'sigmoid'`` etc.; raises ``ValueError`` listing the accepted names."""
    key = name.strip().lower()
    if key not in LOSS_ALIASES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSS_ALIASES)}")
    return LOSS_ALIASES[key]


@dataclass(frozen=True)
class GateParams:
    """Parameters of the lab's gates; ``None`` takes :data:`gategrad.SHAPE_DEFAULTS`.

    ``alpha``/``tau``: the paper's probability-space sigmoid (``seq`` and ``q10``);
    ``log_tau``/``temperature``: the per-token log-space gate (``token``).
    """

    alpha: float | None = None
    tau: float | None = None
    log_tau: float | None = None
    temperature: float | None = None

    def resolved(self) -> GateParams:
        sig, log = SHAPE_DEFAULTS["sigmoid"], SHAPE_DEFAULTS["log_sigmoid"]
        return GateParams(
            alpha=sig["alpha"] if self.alpha is None else float(self.alpha),
            tau=sig["tau"] if self.tau is None else float(self.tau),
            log_tau=log["tau"] if self.log_tau is None else float(self.log_tau),
            temperature=log["temperature"] if self.temperature is None else float(self.temperature),
        )

    def gate(self, kind: str) -> Gate | None:
        """The :class:`gategrad.Gate` of a gate kind (``None`` for ``none`` and ``zero``)."""
        p = self.resolved()
        if kind in ("seq", "q10"):
            return Gate("sigmoid", alpha=p.alpha, tau=p.tau, estimator=kind)
        if kind == "token":
            return Gate(
                "log_sigmoid", tau=p.log_tau, temperature=p.temperature, granularity="token"
            )
        if kind in ("none", "zero"):
            return None
        raise ValueError(f"unknown gate kind {kind!r}; choose from {GATE_KINDS}")


@dataclass(frozen=True)
class Method:
    """One row of the lab's table: a loss type, a gate kind and the gate itself."""

    loss_type: str
    gate_kind: str = "none"
    gate: Gate | None = None
    loss_params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    #: Optional suffix that tells apart methods of the same kind (the sweep's settings).
    tag: str = ""

    @property
    def name(self) -> str:
        base = LOSS_LABELS.get(self.loss_type, self.loss_type)
        if self.gate_kind == "none":
            name = base
        elif self.gate_kind == "zero":
            name = f"{base} (g=0)"
        else:
            name = f"Gate-{base} ({GATE_LABELS.get(self.gate_kind, self.gate_kind)})"
        return f"{name} [{self.tag}]" if self.tag else name

    @property
    def key(self) -> str:
        """A short identifier, e.g. ``sigmoid+seq`` (``sigmoid+seq@tag`` with a tag)."""
        key = self.loss_type if self.gate_kind == "none" else f"{self.loss_type}+{self.gate_kind}"
        return f"{key}@{self.tag}" if self.tag else key

    def to_dict(self) -> dict[str, Any]:
        gate = None
        if self.gate is not None:
            g = self.gate
            gate = {
                "shape": g.shape,
                **g.params,
                "estimator": g.estimator,
                "granularity": g.granularity,
            }
        return {
            "name": self.name,
            "key": self.key,
            "loss_type": self.loss_type,
            "loss_params": dict(self.loss_params),
            "gate_kind": self.gate_kind,
            "gate": gate,
            "tag": self.tag,
        }


def build_methods(
    losses: tuple[str, ...] | list[str],
    gates: tuple[str, ...] | list[str],
    gate_params: GateParams | None = None,
    loss_params: dict[str, dict[str, Any]] | None = None,
) -> list[Method]:
    """Every ``loss x gate`` combination, grouped by loss, in the order given."""
    gp = gate_params or GateParams()
    lp = loss_params or {}
    out = []
    for loss in losses:
        lt = canonical_loss(loss)
        resolve(lt, dict(lp.get(lt, {})))  # the registry's checks (e.g. lam in (0, 1])
        for kind in gates:
            if kind not in GATE_KINDS:
                raise ValueError(f"unknown gate kind {kind!r}; choose from {GATE_KINDS}")
            out.append(Method(lt, kind, gp.gate(kind), dict(lp.get(lt, {}))))
    return out
