"""JAX backend: ``scale_grad`` as a ``jax.custom_vjp`` (in the manner of ``optax.scale_gradient``).

Works under ``jit``, ``vmap``, ``grad`` and sharding. The weight is an ordinary (traceable)
argument, never a ``nondiff_argnums`` entry, and is ``stop_gradient``-ed. Forward mode (``jvp``,
``jacfwd``) is impossible through a ``custom_vjp``. Importing this module registers
[`gategrad.Gate`][] as a pytree, so gate parameters can be traced arrays under ``jit``; the
core registers it by importing this module once JAX is loaded ([`gategrad.get_backend`][]).
[`gategrad.GateStats`][] is registered too, so ``return_stats=True`` works under ``jit``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

try:
    import jax
    import jax.numpy as jnp
except ImportError as err:  # pragma: no cover - exercised only without jax
    raise ImportError("gategrad.backends.jax needs JAX: pip install 'gategrad[jax]'") from err

import numpy as np

from gategrad._backend import Array, Backend, CompileJob, DTypeName, GradJob, MemoryJob, PeakMemory
from gategrad._core import GateStats
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


def _stats_flatten(stats: GateStats) -> tuple[tuple[Any, ...], None]:
    return (stats.weight, stats.p, stats.mask), None


def _stats_unflatten(_: None, children: tuple[Any, ...]) -> GateStats:
    return GateStats(*children)


if not getattr(GateStats, "_jax_pytree_registered", False):
    # return_stats=True under jax.jit: GateStats is a pytree (mask None is an empty subtree)
    jax.tree_util.register_pytree_node(GateStats, _stats_flatten, _stats_unflatten)
    GateStats._jax_pytree_registered = True  # type: ignore[attr-defined]

if not getattr(Gate, "_jax_pytree_registered", False):
    jax.tree_util.register_pytree_node(Gate, _gate_flatten, _gate_unflatten)
    Gate._jax_pytree_registered = True  # type: ignore[attr-defined]
assert {f.name for f in dataclasses.fields(Gate)} == set(NUMERIC_FIELDS) | set(STATIC_FIELDS)


def _tiles(total: int, size: int, body: Callable[..., Any], carry: Any) -> Any:
    """``carry = body(carry, start, length)`` over ``[0, total)`` in tiles of ``size``: the
    full tiles in one ``lax.fori_loop`` (``start`` traced), the remainder after it."""
    full, rem = divmod(total, size)
    if full == 1:
        carry = body(carry, 0, size)
    elif full > 1:
        carry = jax.lax.fori_loop(0, full, lambda i, c: body(c, i * size, size), carry)
    if rem:
        carry = body(carry, full * size, rem)
    return carry


def _slice(x: jax.Array, start: Any, length: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, start, length, axis=0)


def _put(x: jax.Array, update: jax.Array, start: Any) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, update, start, axis=0)


def _logits(h: jax.Array, w: jax.Array, b: jax.Array | None, cd: Any) -> jax.Array:
    """One tile ``h @ w.T + b``: the matmul in the input dtype, accumulated into ``cd``."""
    z = jax.lax.dot_general(h, w, (((1,), (1,)), ((), ())), preferred_element_type=cd)
    return z if b is None else z + b.astype(cd)


def _fused_stats(h, w, b, y, tile):  # type: ignore[no-untyped-def]
    """``(logps, lse)`` ``(N,)``: rows of positions by vocabulary tiles, a running
    log-sum-exp in ``promote_types(dtype, float32)``."""
    rows, cols = tile
    n, vocab = h.shape[0], w.shape[0]
    cd = jnp.promote_types(h.dtype, jnp.float32)

    def row_chunk(out: Any, r0: Any, nr: int) -> Any:
        hr, yr = _slice(h, r0, nr), _slice(y, r0, nr)

        def vocab_tile(carry: Any, v0: Any, nc: int) -> Any:
            m, s, target = carry
            z = _logits(hr, _slice(w, v0, nc), None if b is None else _slice(b, v0, nc), cd)
            local = yr - v0
            inside = (local >= 0) & (local < nc)
            picked = jnp.take_along_axis(z, jnp.clip(local, 0, nc - 1)[:, None], axis=1)[:, 0]
            new = jnp.maximum(m, z.max(axis=1))
            s = s * jnp.exp(m - new) + jnp.exp(z - new[:, None]).sum(axis=1)
            return new, s, jnp.where(inside, picked, target)

        init = (jnp.full((nr,), -jnp.inf, cd), jnp.zeros((nr,), cd), jnp.zeros((nr,), cd))
        m, s, target = _tiles(vocab, cols, vocab_tile, init)
        lse = m + jnp.log(s)
        logps, lses = out
        return _put(logps, target - lse, r0), _put(lses, lse, r0)

    init = (jnp.zeros((n,), cd), jnp.zeros((n,), cd))
    return _tiles(n, rows, row_chunk, init)


def _fused_grads(h, w, b, y, lse, g, tile):  # type: ignore[no-untyped-def]
    """Gradients of ``sum(g * logps)`` to ``h``, ``w``, ``b``: each tile recomputed into
    ``g * (onehot - softmax)``; the hidden gradient accumulated across vocabulary tiles and
    the weight rows of a tile across row chunks, in ``promote_types(dtype, float32)``."""
    rows, cols = tile
    n, vocab = h.shape[0], w.shape[0]
    cd = lse.dtype
    g = g.astype(cd)

    def vocab_tile(carry: Any, v0: Any, nc: int) -> Any:
        gh, gw, gb = carry
        wv = _slice(w, v0, nc)
        bv = None if b is None else _slice(b, v0, nc)

        def row_chunk(inner: Any, r0: Any, nr: int) -> Any:
            gh, acc_w, acc_b = inner
            hr, yr = _slice(h, r0, nr), _slice(y, r0, nr)
            gr, lr = _slice(g, r0, nr), _slice(lse, r0, nr)
            p = jnp.exp(_logits(hr, wv, bv, cd) - lr[:, None])
            local = yr - v0
            onehot = jnp.arange(nc)[None, :] == local[:, None]
            d = gr[:, None] * (onehot.astype(cd) - p)
            dl = d.astype(h.dtype)  # the matmuls in the input dtype, accumulated in cd
            part_h = jnp.matmul(dl, wv, preferred_element_type=cd)
            gh = _put(gh, _slice(gh, r0, nr) + part_h, r0)
            acc_w = acc_w + jnp.matmul(dl.T, hr, preferred_element_type=cd)
            return gh, acc_w, acc_b + d.sum(axis=0)

        inner = (gh, jnp.zeros((nc, w.shape[1]), cd), jnp.zeros((nc,), cd))
        gh, acc_w, acc_b = _tiles(n, rows, row_chunk, inner)
        return gh, _put(gw, acc_w.astype(w.dtype), v0), _put(gb, acc_b, v0)

    init = (jnp.zeros(h.shape, cd), jnp.zeros(w.shape, w.dtype), jnp.zeros((vocab,), cd))
    gh, gw, gb = _tiles(vocab, cols, vocab_tile, init)
    return gh.astype(h.dtype), gw, None if b is None else gb.astype(b.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_linear_logps(h, w, b, y, tile):  # type: ignore[no-untyped-def]
    return _fused_stats(h, w, b, y, tile)[0]


def _fused_fwd(h, w, b, y, tile):  # type: ignore[no-untyped-def]
    logps, lse = _fused_stats(h, w, b, y, tile)
    return logps, (h, w, b, y, lse)


def _fused_bwd(tile, res, g):  # type: ignore[no-untyped-def]
    h, w, b, y, lse = res
    gh, gw, gb = _fused_grads(h, w, b, y, lse, g, tile)
    return gh, gw, gb, None


_fused_linear_logps.defvjp(_fused_fwd, _fused_bwd)


class _AdamW:
    """``optax.adamw``: a pure update, its state passed in and out."""

    def __init__(self, lr: float, weight_decay: float) -> None:
        try:
            import optax
        except ImportError as err:
            raise ImportError(
                "the JAX backend's AdamW needs optax: pip install 'gategrad[optax]'"
            ) from err
        self.optax = optax
        self.tx = optax.adamw(lr, weight_decay=weight_decay)

    def init(self, params: dict[str, Array]) -> Any:
        return self.tx.init(params)

    def update(
        self, params: dict[str, Array], grads: dict[str, Array], state: Any
    ) -> tuple[dict[str, Array], Any]:
        updates, state = self.tx.update(grads, state, params)
        return self.optax.apply_updates(params, updates), state

    def zero_grad(self) -> None:
        pass


def _is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def _concrete(x: Any) -> Any:
    """``x`` as a concrete array, or ``None`` when it is abstract (``jit``, ``vmap``).

    Eager ``jax.grad``/``jax.vjp``/``jax.jvp`` wrap their inputs in tracers whose primal values
    are concrete (``Tracer.to_concrete_value``): the value checks see those, so eager
    differentiation refuses bad input exactly as a plain call does."""
    if not _is_tracer(x):
        return x
    to_concrete = getattr(x, "to_concrete_value", None)
    return None if to_concrete is None else to_concrete()


class JaxBackend(Backend):
    """[`gategrad.Backend`][] for ``jax.Array`` (tracers included): a
    ``custom_vjp`` for ``scale_grad``, ``jax.jit`` to compile."""

    name = "jax"
    xp = jnp
    framework = jax
    traces = True

    def sigmoid(self, x: Array) -> Array:
        return jax.nn.sigmoid(x)

    def log_sigmoid(self, x: Array) -> Array:
        return jax.nn.log_sigmoid(x)

    def logsumexp(self, x: Array, axis: int = -1) -> Array:
        return jax.nn.logsumexp(x, axis=axis)

    def softmax(self, x: Array, axis: int = -1) -> Array:
        return jax.nn.softmax(x, axis=axis)

    def log_softmax(self, x: Array, axis: int = -1) -> Array:
        return jax.nn.log_softmax(x, axis=axis)

    def dtype(self, name: DTypeName) -> Any:
        return jnp.dtype(bool) if name == "bool_" else jnp.dtype(name)

    def compute_dtype(self, x: Array) -> Any:
        return jnp.promote_types(x.dtype, jnp.float32)

    def astype(self, x: Array, dtype: Any) -> Array:
        return jnp.asarray(x).astype(dtype)

    def is_floating(self, x: Array) -> bool:
        return bool(jnp.issubdtype(x.dtype, jnp.floating))

    def scale_grad(self, x: Array, weight: Array) -> Array:
        return _scale_grad(x, jax.lax.stop_gradient(weight))

    def stop_gradient(self, x: Array) -> Array:
        return jax.lax.stop_gradient(x)

    def checkpoint(self, fn: Callable[..., Array], *args: Array) -> Array:
        return jax.checkpoint(fn)(*args)

    def is_concrete(self, x: Array) -> bool:
        # A concrete constant closed over by a traced function still yields traced results:
        # the checks test the value they inspect, so abstract tracers are never inspected.
        return _concrete(x) is not None

    def to_numpy(self, x: Array) -> Any:
        x = _concrete(x) if _is_tracer(x) and _concrete(x) is not None else x
        if x.dtype == jnp.bfloat16:
            x = x.astype(jnp.float32)
        return np.asarray(x)

    def device_scope(self, dtype: DTypeName) -> contextlib.AbstractContextManager[None]:
        """float64 needs JAX's 64-bit mode: it is switched on (for the whole process, as
        ``jax.config.update('jax_enable_x64', True)`` does; JAX has no scoped switch that jit
        caches respect)."""
        if dtype == "float64" and not jax.config.read("jax_enable_x64"):
            jax.config.update("jax_enable_x64", True)
        return contextlib.nullcontext()

    def asarray(self, a: Any, dtype: DTypeName | None, like: Array | None) -> Array:
        if dtype == "float64" and not jax.config.read("jax_enable_x64"):
            raise RuntimeError("float64 JAX arrays need jax.config.update('jax_enable_x64', True)")
        return jnp.asarray(a) if dtype is None else jnp.asarray(a, dtype=jnp.dtype(dtype))

    def token_logps(
        self, logits: Array, labels: Array, cdtype: Any, chunk: tuple[int, int], explicit: bool
    ) -> Array:
        """Under ``jit``/``grad``, one ``logsumexp`` that XLA reduces without a ``(B, T, V)``
        temporary (slices would add a zero-padded gradient per chunk); eager arrays and an
        explicit ``chunk_size`` take the chunked slices."""
        if explicit or self.is_concrete(logits):
            return self.chunked_logps(logits, labels, cdtype, *chunk)
        return self.fused_logps(logits, labels, cdtype)

    def fused_linear_logps(
        self,
        hidden: Array,
        weight: Array,
        bias: Array | None,
        labels: Array,
        cdtype: Any,
        tile: tuple[int, int],
    ) -> Array:
        """A ``jax.custom_vjp`` over ``lax.fori_loop`` tiles (full tiles in the loop, the
        remainder after it): the forward saves the inputs and the ``(N,)`` log-sum-exp, the
        backward recomputes each tile; XLA updates the loop carries (the gradients) in place.
        Works under ``jit``, ``grad``, ``vmap`` and sharded inputs."""
        return _fused_linear_logps(hidden, weight, bias, labels, tuple(tile))

    # --- tooling ----------------------------------------------------------------------------
    def _compile(self, fn: Callable[..., Any], job: CompileJob) -> Callable[..., Any]:
        """``jax.jit(fn, donate_argnums=donate)``, compiled ahead of time for
        ``example_args`` when given (then it takes arguments of their shapes only);
        ``compiler``, ``fullgraph`` and ``reset`` are ignored."""
        jitted = jax.jit(fn, donate_argnums=job.donate)
        return jitted if job.example_args is None else jitted.lower(*job.example_args).compile()

    def _value_and_grad(self, job: GradJob) -> Any:
        run = self._maybe_compile(jax.value_and_grad(job.fn, argnums=job.argnums), job)
        value, grads = run(*job.args)
        return value, tuple(grads)

    def _vmap_value_and_grad(self, job: GradJob) -> Any:
        run = jax.vmap(jax.value_and_grad(job.fn, argnums=job.argnums), in_axes=list(job.axes))
        value, grads = self._maybe_compile(run, job)(*job.args)
        return value, tuple(grads)

    def vjp(self, fn: Callable[[Any], Array], primal: Any) -> tuple[Array, Callable[[Array], Any]]:
        out, pullback = jax.vjp(fn, primal)
        return out, lambda cot: pullback(cot)[0]

    def evaluate(self, *arrays: Any) -> None:
        jax.block_until_ready(arrays)

    def tree_map(self, fn: Callable[..., Array], *trees: dict[str, Array]) -> dict[str, Array]:
        return jax.tree_util.tree_map(fn, *trees)

    def adamw(self, params: dict[str, Array], lr: float, weight_decay: float = 0.01) -> _AdamW:
        """``optax.adamw`` (optax is an optional dependency: ``gategrad[optax]``)."""
        return _AdamW(lr, weight_decay)

    def default_device_is_gpu(self) -> bool:
        return jax.default_backend() in ("gpu", "cuda", "rocm")

    def _peak_memory(self, job: MemoryJob) -> PeakMemory | None:
        """XLA's ``memory_analysis()`` of ``compiled`` (from ``compile(example_args=...)``):
        its temporary buffers, without calling ``run``; with the device's
        ``peak_bytes_in_use`` where it reports one."""
        analysis = getattr(job.compiled, "memory_analysis", lambda: None)()
        if analysis is None:
            return None
        stats = jax.devices()[0].memory_stats() or {}
        return PeakMemory(
            "XLA memory_analysis", analysis.temp_size_in_bytes, stats.get("peak_bytes_in_use")
        )

    def describe(self) -> dict[str, Any]:
        return {"jax_backend": jax.default_backend()}


backend = JaxBackend()
