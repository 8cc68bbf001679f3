"""Input validation shared by the gate, the losses, [`gategrad.token_logps`][] and the metrics.

Two kinds of check:

- **static** (shapes, dtypes, parameters, mixed frameworks): always, also under tracing;
- **value** (NaN, infinities, empty rows, zero lengths): only when the values may be inspected
  now, i.e. value checks are enabled ([`value_checks`][]) *and* the backend says the array
  is concrete (``Backend.is_concrete``, one rule per backend). Under
  ``jax.jit``, ``torch.compile``, ``mx.compile`` or ``vmap`` they do not run.

Every check raises ``ValueError`` or ``TypeError`` naming the argument, the problem and the fix.
"""

from __future__ import annotations

import math
import os
from types import TracebackType
from typing import Any

import numpy as np

from ._backend import Array, Backend

__all__ = ["value_checks"]

#: How far above 0 a value fed to the gate as a log-prob may lie before it is refused as "not a
#: log-prob" (logits passed by mistake), per token and per input dtype. A log-softmax value is
#: ``x_y - logsumexp(x) <= 0`` in exact arithmetic; computed in float32 its rounding error is
#: about ``eps32 * |logsumexp|`` (6e-8 per unit), so 1e-2 admits logits up to ~1e5 in magnitude;
#: float16 / bfloat16 log-softmax rounds to ``eps * |logsumexp|`` with eps 1e-3 / 8e-3, so 0.1 /
#: 0.5 admit ``|logsumexp|`` up to ~60-100. Per-sequence ``(B,)`` sums get the slack times the
#: token count (``lengths``). The gate itself always reads ``min(logp, 0)`` (so ``p <= 1``).
LOGP_SLACK: dict[str, float] = {"float64": 1e-2, "float32": 1e-2, "float16": 0.1, "bfloat16": 0.5}

_CHECKS = {"enabled": os.environ.get("GATEGRAD_CHECKS", "1") != "0"}


class value_checks:  # noqa: N801 - a function-like context manager, as torch.no_grad
    """Turn the eager value checks (NaN, infinities, empty rows) on or off.

    ``with gategrad.value_checks(False): ...`` turns them off inside the block and restores the
    previous setting after it; ``gategrad.value_checks(False)`` alone sets it until changed;
    ``bool(gategrad.value_checks())`` is the current setting. Checks cost one reduction and, on
    an accelerator, one device sync per call. They never run under tracing (``jax.jit``,
    ``torch.compile``, ``mx.compile``, ``vmap``). ``GATEGRAD_CHECKS=0`` turns them off at import.
    """

    def __init__(self, enabled: bool | value_checks | None = None) -> None:
        self._previous = _CHECKS["enabled"]
        if enabled is not None:
            if not isinstance(enabled, (bool, value_checks)):
                raise TypeError(f"value_checks(enabled) takes a bool or None, got {enabled!r}")
            _CHECKS["enabled"] = bool(enabled)
        self._value = _CHECKS["enabled"]  # the setting this call left, as a bool

    def __bool__(self) -> bool:
        return self._value

    def __eq__(self, other: object) -> bool:
        return bool(self) == other if isinstance(other, bool) else NotImplemented

    def __hash__(self) -> int:
        return hash(bool(self))

    def __repr__(self) -> str:
        return f"value_checks({bool(self)})"

    def __enter__(self) -> value_checks:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _CHECKS["enabled"] = self._previous


def inspectable(backend: Backend, *xs: Array) -> bool:
    """Whether value checks may look at ``xs`` now: enabled, and every array concrete."""
    return _CHECKS["enabled"] and all(backend.is_concrete(x) for x in xs)


def found(backend: Backend, bad: Array) -> bool:
    """``bad.any()`` where ``bad`` may be inspected, else ``False``. ``bad`` is checked itself:
    a concrete constant closed over by a traced function (``jax.jit``) gives traced results."""
    return inspectable(backend, bad) and backend.any(bad)


def require_gate(gate: Any, name: str = "gate") -> Any:
    from ._gate import Gate  # _gate imports this module

    if not isinstance(gate, Gate):
        raise TypeError(f"{name} must be a gategrad.Gate, got {type(gate).__name__}")
    return gate


def require_array(x: Any, name: str) -> None:
    """``x`` must be an array with ``.ndim``/``.shape`` (not a list, a number or ``None``)."""
    if not hasattr(x, "shape") or not hasattr(x, "ndim"):
        tp = type(x)  # the wording of _dispatch's message, with the argument's name
        raise TypeError(
            f"{name}: gategrad cannot handle {tp.__module__}.{tp.__qualname__}: pass a "
            "torch.Tensor, jax.Array, mlx.core.array or numpy.ndarray"
        )


def scalar(name: str, value: Any) -> tuple[Any, float | None]:
    """A numeric hyper-parameter: ``(value to compute with, its float or None if traced)``.

    Python ints and floats pass as they are; NumPy scalars and 0-d NumPy arrays become Python
    floats; a 0-d array of another framework is kept (gradients and tracing go on working) and
    its value is read when it may be inspected (``inspectable``), else ``None``. Bools
    (also ``numpy.bool_``) raise ``TypeError``; strings, ``None``, complex numbers, boolean
    arrays and arrays with more than 0 dimensions raise ``ValueError`` naming ``name``.
    """
    if isinstance(value, (bool, np.bool_)):
        # a bool is an int to Python (label_smoothing=True would be 1.0): refused as a type
        raise TypeError(f"{name} must be a number, got the bool {value!r}; pass e.g. 1.0 or 0.0")
    if isinstance(value, (np.generic, np.ndarray)):
        arr = np.asarray(value)
        if arr.ndim != 0 or not (
            np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
        ):
            raise ValueError(
                f"{name} must be a real number or a 0-d real array, got a {arr.dtype} array "
                f"of shape {arr.shape}"
            )
        v = float(arr)
        return v, v
    if isinstance(value, (int, float)):
        return value, float(value)
    from ._dispatch import framework_of, get_backend

    try:
        fw = framework_of(value)
    except TypeError:
        fw = None
    if fw is None:
        raise ValueError(f"{name} must be a real number, got {value!r}")
    ops = get_backend(fw)
    dtype = str(value.dtype)
    if value.ndim != 0 or "bool" in dtype or "complex" in dtype:
        raise ValueError(
            f"{name} must be a real number or a 0-d real array, got a {dtype} array of shape "
            f"{tuple(value.shape)}"
        )
    if not inspectable(ops, value):
        return value, None
    return value, float(np.asarray(ops.to_numpy(value), dtype=np.float64))


def number_in(
    name: str,
    value: Any,
    lo: float,
    hi: float,
    *,
    lo_open: bool = False,
    hi_open: bool = True,
    context: str = "",
) -> Any:
    """``scalar``, then ``value`` in the interval (when it can be read); returns the value
    to compute with. ``hi = inf`` with ``hi_open`` means "finite"."""
    use, v = scalar(name, value)
    if v is None:
        return use
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in {left}{lo:g}, {hi:g}{right}{context}, got {v!r}")
    return use


def integer(name: str, value: Any, *, minimum: int | None = None) -> int:
    """A Python or NumPy integer (not a bool), ``>= minimum``; returned as an int."""
    what = "an int" if minimum is None else f"an int >= {minimum}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def require_floating(backend: Backend, x: Array, name: str) -> None:
    if not backend.is_floating(x):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def is_number(x: Any) -> bool:
    """A Python or NumPy real scalar (not a bool)."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
        x, (bool, np.bool_)
    )


def positive_number(name: str, value: Any) -> Any:
    """A finite number ``> 0`` (``scalar``: also a 0-d array, read when concrete; traced
    arrays pass unchecked). Returns the value to compute with."""
    use, v = scalar(name, value)
    if v is not None and not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return use


def rows(backend: Backend, bad: Array) -> str:
    """``'row 3'`` or ``'rows 0, 4, ...'`` for the true entries of ``bad`` ``(B,)``; for a
    ``(B, T, ...)`` array, ``'positions (1, 2), ...'``: the true multi-indices, never a flat
    index."""
    if bad.ndim > 1:
        where = np.argwhere(np.asarray(backend.to_numpy(bad))).tolist()
        shown = ", ".join(str(tuple(i)) for i in where[:8]) + (", ..." if len(where) > 8 else "")
        return f"position{'s' if len(where) > 1 else ''} {shown}"
    found = backend.nonzero_rows(bad)
    shown = ", ".join(map(str, found[:8])) + (", ..." if len(found) > 8 else "")
    return f"row{'s' if len(found) > 1 else ''} {shown}"


def _per_row(backend: Backend, bad: Array) -> Array:
    """``(B, ...)`` -> ``(B,)``: whether each row holds a true entry."""
    while bad.ndim > 1:
        bad = backend.sum(backend.astype(bad, backend.dtype("int32")), axis=-1) > 0
    return bad


def logp_slack(backend: Backend, x: Array) -> float:
    """``LOGP_SLACK`` for the dtype of ``x``."""
    dtype = str(x.dtype)
    for name in ("bfloat16", "float16", "float64"):
        if name in dtype:
            return LOGP_SLACK[name]
    return LOGP_SLACK["float32"]


def check_not_logits(
    backend: Backend, x: Array, name: str, *, mask: Array | None = None, counts: Any = None
) -> None:
    """Values above ``LOGP_SLACK`` (times ``counts`` ``(B,)`` for per-sequence sums)
    cannot be log-probs: ``ValueError`` naming the rows (value check)."""
    if not inspectable(backend, x):
        return
    slack = logp_slack(backend, x)
    limit: Any = slack
    if counts is not None and x.ndim == 1:
        limit = backend.maximum(backend.astype(counts, backend.compute_dtype(x)), 1.0) * slack
    xc = backend.astype(x, backend.compute_dtype(x))
    # +inf is reported by check_log_probs (its own message), not as "> 0"
    bad = (xc > limit) & (xc < float("inf"))
    if mask is not None and x.ndim == 2:
        bad = bad & mask
    if found(backend, bad):
        raise ValueError(
            f"{name} holds values > 0 at {rows(backend, _per_row(backend, bad))} (more than the "
            f"rounding slack {slack:g} per token); log-probs are <= 0: pass log-probs (for "
            "example from gategrad.token_logps), not logits or rewards"
        )


def check_log_probs(
    backend: Backend,
    x: Array,
    name: str,
    *,
    mask: Array | None = None,
    allow_neg_inf: bool = True,
    hint: str = "check the model's logits and the loss upstream",
) -> None:
    """NaN or ``+inf`` (and ``-inf`` unless ``allow_neg_inf``) inside ``mask`` raise
    ``ValueError`` naming the rows (value check)."""
    if not inspectable(backend, x):
        return
    bad = backend.isnan(x) | (x == float("inf"))
    if not allow_neg_inf:
        bad = bad | (x == float("-inf"))
    if mask is not None and x.ndim == 2:
        bad = bad & mask
    if found(backend, bad):
        what = "NaN or +inf" if allow_neg_inf else "NaN or +-inf"
        allowed = "finite or -inf" if allow_neg_inf else "finite"
        raise ValueError(
            f"{name} holds {what} at {rows(backend, _per_row(backend, bad))}; log-probs must be "
            f"{allowed}: {hint}"
        )


def check_counts(backend: Backend, counts: Array, name: str) -> None:
    """Token counts ``(B,)`` must be ``> 0`` (value check)."""
    if not inspectable(backend, counts):
        return
    bad = ~(counts > 0)
    if found(backend, bad):
        raise ValueError(
            f"{name} has no tokens at {rows(backend, bad)}; every response needs at least one "
            "token (drop empty responses from the batch)"
        )


def check_mask_rows(backend: Backend, mask: Array, name: str) -> None:
    """A boolean ``(B, T)`` mask needs one true entry per row (value check)."""
    if not inspectable(backend, mask):
        return
    empty = backend.sum(backend.astype(mask, backend.dtype("int32")), axis=-1) == 0
    if found(backend, empty):
        raise ValueError(
            f"{name} is all zero in {rows(backend, empty)}; every response needs at least one "
            "token (drop empty responses from the batch)"
        )


def require_mask(mask: Any, name: str) -> None:
    """A mask is an array of bools or real numbers (nonzero = counts)."""
    require_array(mask, name)
    dtype = str(mask.dtype)
    if not any(k in dtype for k in ("bool", "int", "float")) or "complex" in dtype:
        raise TypeError(
            f"{name} must hold bools or numbers (nonzero = counts), got dtype {mask.dtype}"
        )


def require_counts(lengths: Any, name: str) -> None:
    """Token counts are an array of integers or real numbers (not bools, strings, complex)."""
    require_array(lengths, name)
    dtype = str(lengths.dtype)
    if not any(k in dtype for k in ("int", "float")) or "complex" in dtype:
        raise TypeError(f"{name} must be real token counts, got dtype {lengths.dtype}")


def check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None and (
        isinstance(chunk_size, (bool, np.bool_))
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")


def check_broadcast(weight_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> None:
    """``weight`` must broadcast against ``x`` without adding dimensions."""
    problem = None
    if len(weight_shape) > len(x_shape):
        problem = f"of shape {weight_shape} has more dimensions than x {x_shape}"
    else:
        for a, b in zip(reversed(weight_shape), reversed(x_shape), strict=False):
            if a not in (1, b):
                problem = f"of shape {weight_shape} does not broadcast against x of shape {x_shape}"
                break
    if problem:
        raise ValueError(f"weight {problem}; reshape it to broadcast against x")


def check_logits_labels(backend: Backend, logits: Array, labels: Array, mask: Array | None) -> None:
    """Static checks of ``(B, T, V)`` logits with ``(B, T)`` integer labels and mask."""
    require_array(logits, "logits")
    require_array(labels, "labels")
    if mask is not None:
        require_mask(mask, "mask")
    if logits.ndim != 3:
        raise ValueError(f"logits must have shape (B, T, V), got {tuple(logits.shape)}")
    require_floating(backend, logits, "logits")
    if int(logits.shape[2]) == 0:
        raise ValueError(
            f"logits have V = 0 classes (shape {tuple(logits.shape)}); a vocabulary needs at "
            "least one entry"
        )
    if int(logits.shape[0]) == 0:
        raise ValueError(
            f"logits have B = 0 rows (shape {tuple(logits.shape)}): an empty batch has nothing "
            "to score; skip the call for an empty micro-batch"
        )
    if int(logits.shape[1]) == 0:
        raise ValueError(
            f"logits have T = 0 positions (shape {tuple(logits.shape)}): there is no token to "
            "score; drop empty sequences from the batch"
        )
    _check_labels_mask(backend, labels, mask, logits, "logits")


def check_linear_head(
    backend: Backend,
    hidden: Array,
    weight: Array,
    bias: Array | None,
    labels: Array,
    mask: Array | None,
) -> None:
    """Static checks of [`gategrad.fused_token_logps`][]: ``hidden (B, T, D)``, an output head
    ``weight (V, D)`` and ``bias (V,)`` of the dtype of ``hidden``, ``(B, T)`` integer labels and
    mask."""
    if hidden.ndim != 3:
        raise ValueError(
            f"hidden must have shape (B, T, D) (the last hidden state), got {tuple(hidden.shape)}"
        )
    require_floating(backend, hidden, "hidden")
    if weight.ndim != 2 or int(weight.shape[1]) != int(hidden.shape[2]):
        raise ValueError(
            f"weight must have shape (V, D) with D = {int(hidden.shape[2])} (the last dimension "
            f"of hidden {tuple(hidden.shape)}), got {tuple(weight.shape)}; pass the output "
            "head's weight as stored by nn.Linear (vocabulary first)"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"weight has dtype {weight.dtype} but hidden has {hidden.dtype}; the matmuls run "
            "in the input dtype: cast one to the other"
        )
    if bias is not None:
        if bias.ndim != 1 or int(bias.shape[0]) != int(weight.shape[0]):
            raise ValueError(
                f"bias must have shape (V,) = ({int(weight.shape[0])},) to match weight "
                f"{tuple(weight.shape)}, got {tuple(bias.shape)}"
            )
        if bias.dtype != hidden.dtype:
            raise TypeError(
                f"bias has dtype {bias.dtype} but hidden has {hidden.dtype}: cast it to "
                f"{hidden.dtype}"
            )
    _check_labels_mask(backend, labels, mask, hidden, "hidden")


def check_label_range(backend: Backend, out_of_range: Array, vocab: int, ignore_index: int) -> None:
    """Labels that count must be token ids in ``[0, V)`` (value check); ``out_of_range``
    ``(B, T)`` marks the counted labels outside it."""
    if found(backend, out_of_range):
        raise ValueError(
            f"labels hold token ids outside [0, {vocab}) at "
            f"{rows(backend, _per_row(backend, out_of_range))} "
            f"(V = {vocab} is weight.shape[0]); mark positions to ignore with ignore_index = "
            f"{ignore_index} or mask=, and check that weight is the model's output head"
        )


def _check_labels_mask(
    backend: Backend, labels: Array, mask: Array | None, like: Array, like_name: str
) -> None:
    """``labels`` integer ``(B, T)`` matching the first two axes of ``like`` (``like_name``:
    the logits or the hidden state), and ``mask``, when given, of the shape of ``labels``."""
    if labels.ndim != 2 or tuple(labels.shape) != tuple(like.shape[:2]):
        raise ValueError(
            f"labels must have shape (B, T) = {tuple(like.shape[:2])} to match {like_name} "
            f"{tuple(like.shape)}, got {tuple(labels.shape)}"
        )
    if backend.is_floating(labels) or "int" not in str(labels.dtype):  # bool, str, complex
        raise TypeError(f"labels must be integer token ids, got dtype {labels.dtype}")
    if mask is not None and tuple(mask.shape) != tuple(labels.shape):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but labels have shape {tuple(labels.shape)}; "
            "they must match (B, T)"
        )


def valid_labels(
    backend: Backend, labels: Array, valid: Array, vocab: int, ignore_index: int
) -> Array:
    """``valid`` restricted to labels in ``[0, vocab)``.

    Eager: a counted label (``valid``) outside ``[0, vocab)`` raises ``ValueError`` naming the
    rows. Under tracing such labels are masked: they contribute 0 and are left out of the
    returned mask (and so of every count taken from it)."""
    in_range = (labels >= 0) & (labels < vocab)
    bad = valid & ~in_range
    if found(backend, bad):
        where = np.argwhere(np.asarray(backend.to_numpy(bad)))
        values = np.asarray(backend.to_numpy(labels))
        shown = ", ".join(
            f"labels[{i}, {j}] = {int(values[i, j])}" for i, j in where[:4].tolist()
        ) + (f" ({len(where)} positions in all)" if len(where) > 4 else "")
        raise ValueError(
            f"labels hold token ids outside the valid range [0, {vocab}) (other than "
            f"ignore_index={ignore_index}): {shown}; the logits have V = {vocab} classes: check "
            f"the tokenizer / vocabulary size, or mark ignored positions with {ignore_index}"
        )
    return valid & in_range
