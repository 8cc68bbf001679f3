"""The small array namespace every backend provides.

The gate math in :mod:`gategrad._math` is written once against this protocol. A backend module
(``gategrad.backends.<name>``) exposes an object ``ops`` that implements it, plus the one thing
that really differs per framework: ``scale_grad``, the custom-gradient primitive.
"""

from __future__ import annotations

from typing import Any, Protocol

Array = Any  # an array of whichever framework the backend wraps


class ArrayOps(Protocol):
    """Operations the backend-neutral math needs. All are elementwise or along ``axis=-1``."""

    name: str

    # --- the framework-specific mechanism -------------------------------------------------
    def scale_grad(self, x: Array, weight: Array) -> Array:
        """Identity forward; backward ``grad_x = weight * grad_out`` (weight is not differentiated).

        ``weight`` broadcasts against ``x`` and has dtype ``promote_types(x.dtype, float32)``;
        the cotangent is scaled in that precision and cast back once.
        """
        ...

    def stop_gradient(self, x: Array) -> Array: ...

    def is_concrete(self, x: Array) -> bool:
        """True when values of ``x`` may be inspected (eager mode, not traced or compiled)."""
        ...

    # --- conversion -----------------------------------------------------------------------
    def to_numpy(self, x: Array) -> Any: ...

    def from_numpy(self, a: Any, like: Array) -> Array:
        """Convert a NumPy array to this framework, on the device of ``like``."""
        ...

    def compute_dtype(self, x: Array) -> Any:
        """``promote_types(x.dtype, float32)``: float64 stays float64, anything else is float32."""
        ...

    def astype(self, x: Array, dtype: Any) -> Array: ...

    def is_floating(self, x: Array) -> bool: ...

    def bool_mask(self, mask: Array) -> Array:
        """``mask != 0`` as a boolean array."""
        ...

    # --- math -----------------------------------------------------------------------------
    def exp(self, x: Array) -> Array: ...

    def log(self, x: Array) -> Array:
        """Natural log; ``log(0) = -inf`` without warnings."""
        ...

    def sigmoid(self, x: Array) -> Array: ...

    def where(self, cond: Array, a: Array, b: Array) -> Array: ...

    def minimum(self, a: Array, b: Array) -> Array: ...

    def sum(self, x: Array, axis: int = -1) -> Array: ...

    def min(self, x: Array, axis: int = -1) -> Array: ...

    def sort(self, x: Array, axis: int = -1) -> Array: ...

    def take_along_axis(self, x: Array, idx: Array, axis: int = -1) -> Array: ...

    def full_like(self, x: Array, value: float) -> Array: ...

    def isnan(self, x: Array) -> Array: ...

    def any(self, x: Array) -> bool:
        """Python bool of ``x.any()`` (only called when :meth:`is_concrete`)."""
        ...

    def nonzero_rows(self, x: Array) -> list[int]:
        """Row indices where the boolean ``x`` (shape ``(B,)``) is true, for error messages."""
        ...

    def logsumexp(self, x: Array, axis: int = -1) -> Array: ...

    # --- added for the losses and token_logps (gategrad.losses, gategrad._logps) -------------
    def log_sigmoid(self, x: Array) -> Array:
        """Numerically stable ``log(sigmoid(x)) = -softplus(-x)``."""
        ...

    def maximum(self, a: Array, b: Array) -> Array: ...

    def mean(self, x: Array, axis: int | None = None) -> Array:
        """Mean over ``axis``, or over every element when ``axis`` is ``None``."""
        ...

    def concatenate(self, xs: list[Array], axis: int = 0) -> Array: ...

    def as_index(self, x: Array) -> Array:
        """An integer array converted to the dtype ``take_along_axis`` accepts as indices."""
        ...

    def checkpoint(self, fn: Any, *args: Array) -> Array:
        """``fn(*args)``, recomputed in the backward instead of keeping its intermediates
        (activation checkpointing); plain ``fn(*args)`` where nothing needs a gradient."""
        ...
