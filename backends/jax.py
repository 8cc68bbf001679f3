"""JAX backend: ``scale_grad`` as a ``jax.custom_vjp`` (in the manner of ``optax.scale_gradient``).

Works under ``jit``, ``vmap``, ``grad`` and sharding. The weight is an ordinary (traceable)
argument, never a ``nondiff_argnums`` entry, and is ``stop_gradient``-ed. Forward mode (``jvp``,
``jacfwd``) is impossible through a ``custom_vjp``. Importing this module also registers
:class:`gategrad.Gate` as a pytree, so gate parameters can be traced arrays under ``jit``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

try:
    import jax
    import jax.numpy as jnp
except ImportError as err:  # pragma: no cover - exercised only without jax
    raise ImportError("gategrad.backends.jax needs JAX: pip install 'gategrad[jax]'") from err

import numpy as np

from gategrad._gate import NUMERIC_FIELDS, STATIC_FIELDS, Gate


@jax.custom_vjp
def _scale_grad(x: jax.Array, weight: jax.Array) -> jax.Array:
    return x


def _fwd(x: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x, weight


def _bwd(weight: jax.Array, grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    weight = jax.lax.stop_gradient(weight)
    return (grad.astype(weight.dtype) * weight).astype(grad.dtype), jnp.zeros_like(weight)


_scale_grad.defvjp(_fwd, _bwd)


def _gate_flatten(gate: Gate) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return tuple(getattr(gate, f) for f in NUMERIC_FIELDS), tuple(
        getattr(gate, f) for f in STATIC_FIELDS
    )


def _gate_unflatten(static: tuple[Any, ...], numeric: tuple[Any, ...]) -> Gate:
    fields = dict(zip(NUMERIC_FIELDS, numeric, strict=False))
    fields.update(zip(STATIC_FIELDS, static, strict=False))
    return Gate._unchecked(**fields)


if not getattr(Gate, "_jax_pytree_registered", False):
    jax.tree_util.register_pytree_node(Gate, _gate_flatten, _gate_unflatten)
    Gate._jax_pytree_registered = True  # type: ignore[attr-defined]
assert {f.name for f in dataclasses.fields(Gate)} == set(NUMERIC_FIELDS) | set(STATIC_FIELDS)


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


class JaxOps:
    """:class:`gategrad._xp.ArrayOps` for ``jax.Array``."""

    name = "jax"

    def scale_grad(self, x: jax.Array, weight: jax.Array) -> jax.Array:
        return _scale_grad(x, jax.lax.stop_gradient(weight))

    def stop_gradient(self, x: jax.Array) -> jax.Array:
        return jax.lax.stop_gradient(x)

    def is_concrete(self, x: jax.Array) -> bool:
        return not _is_tracer(x)

    def to_numpy(self, x: jax.Array) -> np.ndarray:
        return np.asarray(x)

    def from_numpy(self, a: np.ndarray, like: jax.Array) -> jax.Array:
        return jnp.asarray(a)

    def compute_dtype(self, x: jax.Array) -> Any:
        return jnp.promote_types(x.dtype, jnp.float32)

    def astype(self, x: jax.Array, dtype: Any) -> jax.Array:
        return jnp.asarray(x).astype(dtype)

    def is_floating(self, x: jax.Array) -> bool:
        return bool(jnp.issubdtype(x.dtype, jnp.floating))

    def bool_mask(self, mask: jax.Array) -> jax.Array:
        return mask if mask.dtype == jnp.bool_ else mask != 0

    def exp(self, x: jax.Array) -> jax.Array:
        return jnp.exp(x)

    def log(self, x: Any) -> jax.Array:
        return jnp.log(x)

    def sigmoid(self, x: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(x)

    def where(self, cond: Any, a: Any, b: Any) -> jax.Array:
        return jnp.where(cond, a, b)

    def minimum(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.minimum(a, b)

    def sum(self, x: jax.Array, axis: int = -1) -> jax.Array:
        return jnp.sum(x, axis=axis)

    def min(self, x: jax.Array, axis: int = -1) -> jax.Array:
        return jnp.min(x, axis=axis)

    def sort(self, x: jax.Array, axis: int = -1) -> jax.Array:
        return jnp.sort(x, axis=axis)

    def take_along_axis(self, x: jax.Array, idx: jax.Array, axis: int = -1) -> jax.Array:
        return jnp.take_along_axis(x, idx, axis=axis)

    def full_like(self, x: jax.Array, value: float) -> jax.Array:
        return jnp.full_like(x, value)

    def isnan(self, x: jax.Array) -> jax.Array:
        return jnp.isnan(x)

    def any(self, x: jax.Array) -> bool:
        # Inside jit even ops on constants are staged out: no value to check then.
        result = jnp.any(x)
        return False if _is_tracer(result) else bool(result)

    def nonzero_rows(self, x: jax.Array) -> list[int]:
        return [int(i) for i in np.flatnonzero(np.asarray(x))]

    def logsumexp(self, x: jax.Array, axis: int = -1) -> jax.Array:
        return jax.nn.logsumexp(x, axis=axis)

    def log_sigmoid(self, x: jax.Array) -> jax.Array:
        return jax.nn.log_sigmoid(x)

    def maximum(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.maximum(a, b)

    def mean(self, x: jax.Array, axis: int | None = None) -> jax.Array:
        return jnp.mean(x, axis=axis)

    def concatenate(self, xs: list[jax.Array], axis: int = 0) -> jax.Array:
        return jnp.concatenate(xs, axis=axis)

    def as_index(self, x: jax.Array) -> jax.Array:
        return x

    def checkpoint(self, fn: Any, *args: jax.Array) -> jax.Array:
        return jax.checkpoint(fn)(*args)


ops = JaxOps()
