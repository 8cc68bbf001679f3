"""The [`Gate`][] value object: shape, parameters, floor, estimator and granularity.

A gate maps the probability ``p`` of the rejected response (or of one rejected token) to a
weight ``g(p)`` in ``[0, 1]`` that multiplies the gradient flowing into the rejected log-probs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, Literal

from ._dispatch import load_imported

ShapeName = Literal["sigmoid", "log_sigmoid", "hard", "power"]
Shape = ShapeName | Callable[[Any], Any]

SHAPES: tuple[str, ...] = ("sigmoid", "log_sigmoid", "hard", "power")
GRANULARITIES: tuple[str, ...] = ("example", "token")
_QUANTILE_RE = re.compile(r"^q(\d+(?:\.\d*)?)$")

#: Parameters each named shape uses, with their defaults.
#: ``sigmoid`` (alpha=200, tau=0.02: alpha*tau=4, g(0)=0.018) and ``log_sigmoid`` (tau=0.03,
#: T=0.5: g(1)=0.999) come from `gategrad lab sweep` on both the NumPy toy and the transformer:
#: among the settings that recover >= 90% of the chosen log-prob lost to squeezing in both and
#: that are open at p=1 (g >= 0.98) and shut at p=0 (g <= 0.02), they have the largest
#: worst-case margin. See docs/lab.md, "Choosing the gate defaults". ``hard`` and ``power``
#: were not swept.
SHAPE_DEFAULTS: dict[str, dict[str, float]] = {
    "sigmoid": {"alpha": 200.0, "tau": 0.02},
    "log_sigmoid": {"tau": 0.03, "temperature": 0.5},
    "hard": {"tau": 1e-4},
    "power": {"tau": 1e-4, "exponent": 1.0},
}
_PARAMS: tuple[str, ...] = ("alpha", "tau", "temperature", "exponent")


def _finite_number(name: str, value: Any) -> float:
    """A Python or NumPy real number, or a concrete 0-d array (read as a float); bools and
    traced arrays are refused."""
    from ._validate import scalar  # _validate imports this module lazily too

    try:
        _, v = scalar(f"Gate parameter {name}", value)
    except ValueError:
        raise ValueError(f"Gate parameter {name} must be a real number, got {value!r}") from None
    if v is None:
        raise ValueError(
            f"Gate parameter {name} must be a concrete number, got a traced array {value!r}; "
            "to trace gate parameters pass the Gate itself through jax.jit (it is a pytree)"
        )
    if not math.isfinite(v):
        raise ValueError(f"Gate parameter {name} must be finite, got {v!r}")
    return v


def parse_estimator(estimator: str) -> float | None:
    """Return the quantile for ``'qNN'`` estimators (``'q10'`` -> 0.10), else ``None``.

    Raises ``ValueError`` for unknown names or quantiles outside ``[0, 1]``.
    """
    if estimator in ("seq", "mean", "min"):
        return None
    match = _QUANTILE_RE.match(estimator) if isinstance(estimator, str) else None
    if match is None:
        raise ValueError(
            f"Gate estimator must be 'seq', 'mean', 'min' or 'qNN' (a percentile such as 'q10'), "
            f"got {estimator!r}"
        )
    q = float(match.group(1)) / 100.0
    if not 0.0 <= q <= 1.0:
        raise ValueError(
            f"Gate estimator {estimator!r} asks for quantile {q:g}; the quantile must lie in "
            f"[0, 1] (percentiles q0 to q100)"
        )
    return q


@dataclasses.dataclass(frozen=True)
class Gate:
    """A validated, immutable gate specification.

    Math, with ``p`` the estimated probability of the rejected response (or token):

    - ``sigmoid``:     ``g = sigmoid(alpha * (p - tau))``  (the paper's gate)
    - ``log_sigmoid``: ``g = sigmoid((log p - log tau) / temperature)``
    - ``hard``:        ``g = 1[p >= tau]``
    - ``power``:       ``g = min(1, (p / tau) ** exponent)``
    - a callable ``f``: ``g = f(p)``, written with array operators of the input's framework;
      it must return values in ``[0, 1]`` and be non-decreasing in ``p``, as an array of
      ``p``'s shape (``(B,)`` or ``(B, T)``: no broadcasting) or a number. Eager calls raise
      ``ValueError`` for another shape or values outside ``[0, 1]``; under tracing the values
      are clipped to ``[0, 1]`` (NaN gives 0).
    - ``floor``: ``g <- floor + (1 - floor) * g``.

    ``estimator`` reduces a rejected response's token log-probs to one ``p`` per example
    (``granularity='example'``, the paper's): ``seq`` (geometric mean of token probabilities),
    ``qNN`` (the NN-th percentile of token probabilities, ``q10`` in the paper), ``min`` or
    ``mean`` (arithmetic mean of token probabilities). With ``granularity='token'`` every
    rejected token is gated by its own probability and the estimator is not used.

    Parameters left as ``None`` take the shape's default from [`SHAPE_DEFAULTS`][] (and
    [`Gate.replace`][gategrad.Gate.replace] with a new ``shape`` takes the new shape's defaults
    for them). Parameters may be Python or NumPy numbers or concrete 0-d arrays; invalid values
    raise ``ValueError`` naming the parameter and its allowed range, bools ``TypeError``. The
    gate is computed with ``alpha``, ``temperature`` and ``exponent`` clamped to
    ``[1e-30, 1e30]`` (``gategrad._math.PARAM_MIN``/``PARAM_MAX``), so extreme values give the
    exact step gate in float32 instead of ``inf * 0``.
    """

    shape: Shape = "sigmoid"
    alpha: float | None = None
    tau: float | None = None
    temperature: float | None = None
    exponent: float | None = None
    floor: float = 0.0
    estimator: str = "seq"
    granularity: Literal["example", "token"] = "example"

    def __post_init__(self) -> None:
        shape = self.shape
        if callable(shape):
            for name in _PARAMS:
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"Gate parameter {name} is not used by a callable shape; "
                        "put it inside the callable instead"
                    )
        elif shape not in SHAPES:
            raise ValueError(f"Gate shape must be one of {SHAPES} or a callable, got {shape!r}")
        else:
            defaults = SHAPE_DEFAULTS[shape]
            filled = []
            for name in _PARAMS:
                value = getattr(self, name)
                if name not in defaults:
                    if value is not None:
                        raise ValueError(
                            f"Gate parameter {name} is not used by shape={shape!r}, which takes "
                            f"{sorted(defaults)}"
                        )
                    continue
                if value is None:
                    filled.append(name)
                value = defaults[name] if value is None else _finite_number(name, value)
                object.__setattr__(self, name, value)
            # which parameters came from SHAPE_DEFAULTS (not a field: replace(shape=) drops them)
            object.__setattr__(self, "_filled", frozenset(filled))
            self._check_ranges()
        floor = _finite_number("floor", self.floor)
        if not 0.0 <= floor < 1.0:
            raise ValueError(f"Gate parameter floor must lie in [0, 1), got {floor!r}")
        object.__setattr__(self, "floor", floor)
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"Gate granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        parse_estimator(self.estimator)
        load_imported()  # e.g. the JAX backend makes Gate a pytree once JAX is loaded

    def _check_ranges(self) -> None:
        tau = self.tau
        assert tau is not None
        if not 0.0 < tau <= 1.0:
            raise ValueError(
                f"Gate parameter tau must lie in (0, 1] for a probability gate, got {tau!r}"
            )
        if self.alpha is not None and self.alpha <= 0.0:
            raise ValueError(f"Gate parameter alpha must be > 0, got {self.alpha!r}")
        if self.temperature is not None and self.temperature <= 0.0:
            raise ValueError(f"Gate parameter temperature must be > 0, got {self.temperature!r}")
        if self.exponent is not None and self.exponent <= 0.0:
            raise ValueError(f"Gate parameter exponent must be > 0, got {self.exponent!r}")

    @property
    def quantile(self) -> float | None:
        """The quantile of a ``qNN`` estimator (``q10`` -> 0.1), else ``None``."""
        return parse_estimator(self.estimator)

    @property
    def params(self) -> dict[str, Any]:
        """The numeric parameters the shape uses, plus ``floor``."""
        out = {n: getattr(self, n) for n in _PARAMS if getattr(self, n) is not None}
        out["floor"] = self.floor
        return out

    def replace(self, **changes: Any) -> Gate:
        """A copy with ``changes`` applied, validated again.

        Changing ``shape`` drops the parameters the old shape filled in from
        ``SHAPE_DEFAULTS`` (the new shape takes its own defaults); parameters set
        explicitly are kept (and must suit the new shape) unless ``changes`` resets them.
        """
        if "shape" in changes and changes["shape"] is not self.shape:
            filled: frozenset[str] = getattr(self, "_filled", frozenset())
            changes = {**{n: None for n in filled if n not in changes}, **changes}
        return dataclasses.replace(self, **changes)

    @classmethod
    def _unchecked(cls, **fields: Any) -> Gate:
        """Build without validation (for traced parameters, e.g. JAX pytrees)."""
        obj = object.__new__(cls)
        for f in dataclasses.fields(cls):
            object.__setattr__(obj, f.name, fields[f.name])
        return obj


#: Fields that hold numbers (pytree leaves in JAX) versus static structure.
NUMERIC_FIELDS: tuple[str, ...] = (*_PARAMS, "floor")
STATIC_FIELDS: tuple[str, ...] = ("shape", "estimator", "granularity")
