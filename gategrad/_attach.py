"""Attach the gate to an existing loss function in one call: [`attach`][]."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from ._core import gate_rejected
from ._gate import Gate
from ._validate import require_gate

__all__ = ["attach"]

_MARK = "__gategrad_attach__"


def _attached_gate(fn: Any) -> Gate | None:
    """The gate of an [`attach`][] wrapper anywhere down ``fn``'s wrapper chain, else None.

    Follows ``__wrapped__`` (``functools.wraps`` decorators), ``__func__`` (bound methods) and
    ``func`` (``functools.partial``).
    """
    seen: set[int] = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        info = getattr(fn, _MARK, None)
        if isinstance(info, dict):
            return info["gate"]
        nxt = None
        for attr in ("__wrapped__", "__func__"):
            nxt = getattr(fn, attr, None)
            if nxt is not None:
                break
        if nxt is None and isinstance(fn, functools.partial):
            nxt = fn.func
        fn = nxt
    return None


def _check_name(sig: inspect.Signature, name: Any, role: str, fn_name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"{role}= must be the name of an argument (a str), got {name!r}")
    param = sig.parameters.get(name)
    if param is not None and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
        return
    if param is None and any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return  # reaches **kwargs: it must be passed by keyword
    names = [p.name for p in sig.parameters.values()]
    raise TypeError(
        f"attach: {fn_name}{sig} has no argument {name!r} (given as {role}=); its arguments "
        f"are {names}. Name the argument that holds the policy's rejected log-probs "
        f"(and, for per-token inputs, the rejected mask)."
    )


def _get(bound: inspect.BoundArguments, sig: inspect.Signature, name: str | None) -> Any:
    if name is None:
        return None
    if name in sig.parameters:
        return bound.arguments.get(name)
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            return bound.arguments.get(p.name, {}).get(name)
    return None


def _set(bound: inspect.BoundArguments, sig: inspect.Signature, name: str, value: Any) -> None:
    if name in sig.parameters:
        bound.arguments[name] = value
        return
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            bound.arguments[p.name][name] = value
            return


def attach(
    loss_fn: Callable[..., Any],
    gate: Gate,
    rejected: str = "policy_rejected_logps",
    mask: str | None = None,
    lengths: str | None = None,
) -> Callable[..., Any]:
    """Wrap an existing loss function so that it gates the policy's rejected log-probs.

    ``attach(dpo_loss, gate)`` returns a function with ``loss_fn``'s signature and docstring
    (``functools.wraps``; ``inspect.signature`` shows the original) that, on every call, passes
    the argument named ``rejected`` through [`gategrad.gate_rejected`][] and then calls
    ``loss_fn``. The loss value and every other gradient are unchanged.

    Args:
        loss_fn: a plain function, a bound method (``obj.loss``), or a function taken from a
            class (``Cls.loss``, then assign it back). The named arguments may be passed by
            keyword or by position.
        gate: a [`gategrad.Gate`][].
        rejected: name of the argument holding the policy's rejected log-probs, ``(B,)`` summed
            per sequence or ``(B, T)`` per token.
        mask: name of the argument holding the rejected ``(B, T)`` mask of per-token inputs.
        lengths: name of the argument holding the rejected token counts ``(B,)`` of
            per-sequence inputs (the ``seq`` estimator needs them).

    If an argument is not passed at a call (its default is used) or is ``None``, that call is
    not gated / uses no mask or lengths. Names that reach ``**kwargs`` are accepted and must
    then be passed by keyword.

    Raises:
        TypeError: at attach time, if ``loss_fn`` is not callable, ``gate`` is not a ``Gate``,
            or a named argument does not exist.
        ValueError: if ``loss_fn`` is already gated by ``attach`` (anywhere down its
            ``__wrapped__`` / ``__func__`` chain). Attaching twice is **refused**, never
            silently gated twice; to change the gate, attach to ``fn.__wrapped__``.

    The wrapper exposes ``__wrapped__`` (the original) and ``gate``.
    """
    if not callable(loss_fn):
        raise TypeError(f"attach: loss_fn must be callable, got {type(loss_fn).__name__}")
    gate = require_gate(gate)
    existing = _attached_gate(loss_fn)
    if existing is not None:
        raise ValueError(
            f"attach: {getattr(loss_fn, '__qualname__', loss_fn)!r} is already gated by "
            f"gategrad.attach (gate={existing!r}); attaching twice would gate twice. Attach to "
            "the original (fn.__wrapped__) to change the gate"
        )
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError) as err:
        raise TypeError(f"attach: cannot read the signature of {loss_fn!r}: {err}") from None
    fn_name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
    _check_name(sig, rejected, "rejected", fn_name)
    if mask is not None:
        _check_name(sig, mask, "mask", fn_name)
    if lengths is not None:
        _check_name(sig, lengths, "lengths", fn_name)
    if mask is not None and lengths is not None:
        raise TypeError(
            "attach: give mask= (per-token inputs) or lengths= (per-sequence inputs), not both"
        )

    @functools.wraps(loss_fn)
    def gated(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        value = _get(bound, sig, rejected)
        if value is not None:
            value = gate_rejected(
                value, gate, _get(bound, sig, mask), lengths=_get(bound, sig, lengths)
            )
            _set(bound, sig, rejected, value)
        return loss_fn(*bound.args, **bound.kwargs)

    gated.__signature__ = sig  # type: ignore[attr-defined]
    gated.gate = gate  # type: ignore[attr-defined]
    setattr(gated, _MARK, {"gate": gate, "rejected": rejected, "mask": mask, "lengths": lengths})
    return gated
