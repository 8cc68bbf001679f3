"""Framework adapters for tests: NumPy <-> framework arrays, and gradients in each framework.

``mode='eager'`` runs the function as is; ``mode='compiled'`` runs it under ``torch.compile``
(``fullgraph=True``), ``jax.jit`` or ``mx.compile``. NumPy has no autograd: gradients there come
from the caller's closed-form or explicit VJP oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

FRAMEWORKS: tuple[str, ...] = ("torch", "jax", "mlx")
MODES: tuple[str, ...] = ("eager", "compiled")


def require(name: str) -> Any:
    """Import and return the framework module (``torch``, ``jax``, ``mlx.core``), or raise
    ``ImportError`` naming the pip extra."""
    from gategrad import get_backend

    get_backend(name)  # raises ImportError naming the extra
    if name == "torch":
        import torch

        return torch
    if name == "jax":
        import jax

        return jax
    if name == "mlx":
        import mlx.core as mx

        return mx
    return np


def from_numpy(name: str, a: Any, dtype: str | None = None) -> Any:
    """Convert a NumPy array (or scalar) to framework ``name``.

    ``dtype``: ``'float16' | 'bfloat16' | 'float32' | 'float64'`` for floating arrays, or
    ``None`` to keep the array's dtype. Boolean and integer arrays keep their kind.
    """
    a = np.asarray(a)
    floating = np.issubdtype(a.dtype, np.floating)
    if name == "numpy":
        if floating and dtype is not None:
            if dtype == "bfloat16":
                raise ValueError("NumPy has no bfloat16")
            return a.astype(dtype)
        return a
    mod = require(name)
    if name == "torch":
        t = mod.from_numpy(np.ascontiguousarray(a))
        return t.to(getattr(mod, dtype)) if floating and dtype is not None else t
    if name == "jax":
        import jax.numpy as jnp

        if floating and dtype is not None:
            return jnp.asarray(a.astype(np.float64), dtype=getattr(jnp, dtype))
        return jnp.asarray(a)
    # mlx: mx.array(float64 ndarray) silently becomes float32 unless the dtype is explicit
    if floating:
        target = dtype or str(a.dtype)
        if target == "float64":
            return mod.array(a.astype(np.float64), dtype=mod.float64)
        return mod.array(a.astype(np.float32)).astype(getattr(mod, target))
    return mod.array(a)


def to_numpy(x: Any) -> np.ndarray:
    """Any framework's array as NumPy (bfloat16 is widened to float32)."""
    from gategrad import framework_of, get_backend

    name = framework_of(x)
    if name is None:
        return np.asarray(x)
    return np.asarray(get_backend(name).to_numpy(x))


def _compile(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if name == "torch":
        import torch

        # Every call compiles afresh: tests build new closures per example, which would
        # otherwise pile up recompilations of one code object past dynamo's limit.
        torch._dynamo.reset()
        return torch.compile(fn, fullgraph=True, dynamic=False)
    if name == "jax":
        import jax

        return jax.jit(fn)
    if name == "mlx":
        import mlx.core as mx

        return mx.compile(fn)
    raise ValueError(f"no compiled mode for {name!r}")


def value_and_grad(
    name: str,
    fn: Callable[..., Any],
    args: Sequence[Any],
    argnums: Sequence[int] = (0,),
    mode: str = "eager",
) -> tuple[Any, tuple[Any, ...]]:
    """``(fn(*args), (d fn / d args[i] for i in argnums))`` for a scalar-valued ``fn``.

    ``args`` are arrays of framework ``name``; results are that framework's arrays.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    argnums = tuple(argnums)
    if name == "torch":
        import torch

        run = _compile(name, fn) if mode == "compiled" else fn
        args = [
            a.detach().clone().requires_grad_(i in argnums) if i in argnums else a
            for i, a in enumerate(args)
        ]
        value = run(*args)
        grads = torch.autograd.grad(value, [args[i] for i in argnums], allow_unused=True)
        grads = tuple(
            torch.zeros_like(args[i]) if g is None else g
            for i, g in zip(argnums, grads, strict=True)
        )
        return value.detach(), grads
    if name == "jax":
        import jax

        vg = jax.value_and_grad(fn, argnums=argnums)
        value, grads = (_compile(name, vg) if mode == "compiled" else vg)(*args)
        return value, tuple(grads)
    if name == "mlx":
        import mlx.core as mx

        vg = mx.value_and_grad(fn, argnums=list(argnums))
        value, grads = (_compile(name, vg) if mode == "compiled" else vg)(*args)
        grads = grads if isinstance(grads, (list, tuple)) else (grads,)
        mx.eval(value, *grads)
        return value, tuple(grads)
    raise ValueError(f"no autograd for backend {name!r}")


def vjp(
    name: str, fn: Callable[[Any], Any], x: Any, cotangent: Any, mode: str = "eager"
) -> tuple[Any, Any]:
    """``(fn(x), v^T d fn/dx)`` for an array-valued ``fn`` of one array, in framework ``name``."""

    def scalar(x_: Any, v_: Any) -> Any:
        return (fn(x_) * v_).sum()

    out = fn(x)
    _, (grad,) = value_and_grad(name, scalar, (x, cotangent), argnums=(0,), mode=mode)
    return out, grad


def vmap_value_and_grad(
    name: str,
    fn: Callable[..., Any],
    args: Sequence[Any],
    argnums: Sequence[int] = (0,),
    batched: Sequence[int] = (),
    mode: str = "eager",
) -> tuple[Any, tuple[Any, ...]]:
    """Per-slice ``value_and_grad`` under the framework's ``vmap``.

    ``args[i]`` for ``i`` in ``batched`` carry a leading axis ``K`` that is mapped over; the
    others are shared by every slice. Returns ``(values (K,), grads)`` with every gradient
    stacked along a leading ``K`` axis: ``torch.func.vmap(torch.func.grad_and_value(...))``,
    ``jax.vmap(jax.value_and_grad(...))`` or ``mx.vmap(mx.value_and_grad(...))``;
    ``mode='compiled'`` compiles the vmapped function as :func:`value_and_grad` does.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    argnums = tuple(argnums)
    axes = [0 if i in batched else None for i in range(len(args))]
    if name == "torch":
        import torch

        gv = torch.func.grad_and_value(fn, argnums=argnums)
        run = torch.func.vmap(gv, in_dims=tuple(axes))
        grads, value = (_compile(name, run) if mode == "compiled" else run)(*args)
        return value, tuple(grads)
    if name == "jax":
        import jax

        run = jax.vmap(jax.value_and_grad(fn, argnums=argnums), in_axes=axes)
        value, grads = (_compile(name, run) if mode == "compiled" else run)(*args)
        return value, tuple(grads)
    if name == "mlx":
        import mlx.core as mx

        vg = mx.value_and_grad(fn, argnums=list(argnums))
        run = mx.vmap(vg, in_axes=tuple(axes))
        value, grads = (_compile(name, run) if mode == "compiled" else run)(*args)
        grads = grads if isinstance(grads, (list, tuple)) else (grads,)
        mx.eval(value, *grads)
        return value, tuple(grads)
    raise ValueError(f"no vmap for backend {name!r}")
