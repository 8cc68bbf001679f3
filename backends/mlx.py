"""MLX backend: ``scale_grad`` as an ``mx.custom_function`` with a custom ``vjp``.

Works under ``mx.grad``, ``mx.value_and_grad``, ``mx.compile``, ``mx.vmap`` and
``mlx.nn.value_and_grad``. The primitive takes two inputs (``x`` and the weight), so the vjp
always receives a tuple of primals (the single-input form receives bare arrays). float64 exists
on the CPU only; on Metal use float32 or bfloat16.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from typing import Any

try:
    import mlx.core as mx
except ImportError as err:  # pragma: no cover - exercised only without mlx
    raise ImportError(
        "gategrad.backends.mlx needs MLX: pip install 'gategrad[mlx]' "
        "(mlx[cpu] on Linux, mlx on Apple Silicon)"
    ) from err

import numpy as np

from gategrad._backend import Array, Backend, CompileJob, DTypeName, GradJob, MemoryJob, PeakMemory


@mx.custom_function
def _scale_grad(x: mx.array, weight: mx.array) -> mx.array:
    return x


@_scale_grad.vjp
def _scale_grad_vjp(
    primals: tuple[mx.array, mx.array], cotangent: Any, output: Any
) -> tuple[mx.array, mx.array]:
    _, weight = primals
    if isinstance(cotangent, (list, tuple)):
        (cotangent,) = cotangent
    weight = mx.stop_gradient(weight)
    grad = (cotangent.astype(weight.dtype) * weight).astype(cotangent.dtype)
    return grad, mx.zeros_like(weight)


def _mlx_logits(h: mx.array, w: mx.array, b: mx.array | None, cd: Any) -> mx.array:
    """One tile ``h @ w.T + b`` in the input dtype, cast to ``cd``."""
    z = h @ w.T if b is None else mx.addmm(b, h, w.T)
    return z.astype(cd)


def _mlx_fused_stats(h: mx.array, w: mx.array, b: Any, y: mx.array, tile: Any) -> Any:
    """``(logps, lse)`` ``(N,)`` over rows of positions by vocabulary tiles, a running
    log-sum-exp in ``cd`` (float32, or float64)."""
    rows, cols = tile
    cd = mx.float64 if h.dtype == mx.float64 else mx.float32
    n, vocab = h.shape[0], w.shape[0]
    outs, lses = [], []
    for r0 in range(0, n, rows):
        hr, yr = h[r0 : r0 + rows], y[r0 : r0 + rows]
        m: Any = None
        s: Any = None
        target: Any = None
        for v0 in range(0, vocab, cols):
            wv = w[v0 : v0 + cols]
            nc = wv.shape[0]
            z = _mlx_logits(hr, wv, None if b is None else b[v0 : v0 + cols], cd)
            local = yr - v0
            inside = (local >= 0) & (local < nc)
            idx = mx.clip(local, 0, nc - 1)[:, None]
            picked = mx.take_along_axis(z, idx, axis=1)[:, 0]
            top = mx.max(z, axis=1)
            new = top if m is None else mx.maximum(m, top)
            tile_sum = mx.sum(mx.exp(z - new[:, None]), axis=1)
            if m is None:
                s, target = tile_sum, mx.where(inside, picked, mx.zeros_like(picked))
            else:
                s = s * mx.exp(m - new) + tile_sum
                target = mx.where(inside, picked, target)
            m = new
        lse = m + mx.log(s)
        outs.append(target - lse)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return mx.concatenate(outs), mx.concatenate(lses)


def _mlx_fused_grads(
    h: mx.array, w: mx.array, b: Any, y: mx.array, lse: mx.array, g: mx.array, tile: Any
) -> Any:
    """Gradients of ``sum(g * logps)``: each tile recomputed into ``g * (onehot - softmax)``;
    the weight gradient written tile by tile into one ``(V, D)`` array (slice updates, not
    one array per chunk), the hidden gradient accumulated across vocabulary tiles."""
    rows, cols = tile
    cd = lse.dtype
    n, vocab = h.shape[0], w.shape[0]
    g = g.astype(cd)
    gh = mx.zeros(h.shape, dtype=cd)
    gw = mx.zeros(w.shape, dtype=w.dtype)
    gb: Any = None if b is None else mx.zeros((vocab,), dtype=cd)
    for v0 in range(0, vocab, cols):
        wv = w[v0 : v0 + cols]
        nc = wv.shape[0]
        acc_w: Any = None
        acc_b: Any = None
        for r0 in range(0, n, rows):
            hr, yr = h[r0 : r0 + rows], y[r0 : r0 + rows]
            gr, lr = g[r0 : r0 + rows], lse[r0 : r0 + rows]
            p = mx.exp(
                _mlx_logits(hr, wv, None if b is None else b[v0 : v0 + cols], cd) - lr[:, None]
            )
            onehot = mx.arange(nc)[None, :] == (yr - v0)[:, None]
            d = gr[:, None] * (onehot.astype(cd) - p)
            dl = d.astype(h.dtype)  # the matmuls in the input dtype
            gh[r0 : r0 + rows] = gh[r0 : r0 + rows] + (dl @ wv).astype(cd)
            part_w = (dl.T @ hr).astype(cd)
            acc_w = part_w if acc_w is None else acc_w + part_w
            if gb is not None:
                part_b = mx.sum(d, axis=0)
                acc_b = part_b if acc_b is None else acc_b + part_b
        gw[v0 : v0 + nc] = acc_w.astype(w.dtype)
        if gb is not None:
            gb[v0 : v0 + nc] = acc_b
    return gh.astype(h.dtype), gw, None if gb is None else gb.astype(b.dtype)


@mx.custom_function
def _mlx_fused_linear_logps(h: mx.array, w: mx.array, b: Any, y: mx.array, tile: Any) -> Any:
    return _mlx_fused_stats(h, w, b, y, tile)[0]


@_mlx_fused_linear_logps.vjp
def _mlx_fused_vjp(primals: Any, cotangent: Any, output: Any) -> Any:
    h, w, b, y, tile = primals
    if isinstance(cotangent, (list, tuple)):
        (cotangent,) = cotangent
    lse = _mlx_fused_stats(h, w, b, y, tile)[1]  # (N,): recomputed, MLX keeps no residuals
    gh, gw, gb = _mlx_fused_grads(h, w, b, y, mx.stop_gradient(lse), cotangent, tile)
    return gh, gw, gb, None, None


#: The message of the error MLX raises when an array is evaluated while it is being traced.
_TRACING = "function transformations"


def _evaluated(value: Any, grads: Any) -> tuple[Any, tuple[Any, ...]]:
    """``(value, grads)`` evaluated, with ``grads`` always a tuple (MLX returns a bare array for
    one argnum)."""
    grads = tuple(grads) if isinstance(grads, (list, tuple)) else (grads,)
    mx.eval(value, *grads)
    return value, grads


class _AdamW:
    """``mlx.optimizers.AdamW`` with its state passed in and out (so ``mx.compile`` sees it)."""

    def __init__(self, lr: float, weight_decay: float) -> None:
        import mlx.optimizers

        self.opt = mlx.optimizers.AdamW(
            learning_rate=lr, weight_decay=weight_decay, bias_correction=True
        )

    def init(self, params: dict[str, Array]) -> Any:
        self.opt.init(params)
        return self.opt.state

    def update(
        self, params: dict[str, Array], grads: dict[str, Array], state: Any
    ) -> tuple[dict[str, Array], Any]:
        self.opt.state = state
        return self.opt.apply_gradients(grads, params), self.opt.state

    def zero_grad(self) -> None:
        pass


class MlxBackend(Backend):
    """[`gategrad.Backend`][] for ``mlx.core.array`` (CPU and Metal): an
    ``mx.custom_function`` for ``scale_grad``, ``mx.compile``; float64 on the CPU only."""

    name = "mlx"
    xp = mx
    framework = mx
    float64_tol = 1e-4  # float64 exp/log/tanh are ~1e-7 accurate (measured: docs/verification.md)

    def softmax(self, x: Array, axis: int = -1) -> Array:
        return mx.softmax(x, axis=axis, precise=True)

    def sum(self, x: Array, axis: int | None = -1, keepdims: bool = False) -> Array:
        return mx.sum(x, keepdims=keepdims) if axis is None else mx.sum(x, axis, keepdims)

    def mean(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        return mx.mean(x, keepdims=keepdims) if axis is None else mx.mean(x, axis, keepdims)

    def any(self, x: Array) -> bool:
        return bool(mx.any(x).item())

    def full_like(self, x: Array, value: float) -> Array:
        return mx.full(x.shape, value, dtype=x.dtype)

    def dtype(self, name: DTypeName) -> Any:
        return getattr(mx, name)

    def is_floating(self, x: Array) -> bool:
        return bool(mx.issubdtype(x.dtype, mx.floating))

    def scale_grad(self, x: Array, weight: Array) -> Array:
        return _scale_grad(x, mx.stop_gradient(weight))

    def stop_gradient(self, x: Array) -> Array:
        return mx.stop_gradient(x)

    def checkpoint(self, fn: Callable[..., Array], *args: Array) -> Array:
        return mx.checkpoint(fn)(*args)

    def is_concrete(self, x: Array) -> bool:
        """MLX cannot say whether it is tracing; evaluating ``x`` can. Under ``mx.compile`` and
        ``mx.vmap`` it raises a ``ValueError`` about function transformations: only that error
        means "not concrete", anything else propagates."""
        try:
            mx.eval(x)
        except ValueError as err:
            if _TRACING in str(err):
                return False
            raise
        return True

    def to_numpy(self, x: Array) -> Any:
        if x.dtype == mx.bfloat16:
            x = x.astype(mx.float32)
        return np.array(x)

    def asarray(self, a: Any, dtype: DTypeName | None, like: Array | None) -> Array:
        if not np.issubdtype(a.dtype, np.floating):
            return mx.array(a)
        if dtype is None:  # keep float64 only where `like` is float64 (Metal has none)
            keep64 = a.dtype == np.float64 and (like is None or like.dtype == mx.float64)
            dtype = "float64" if keep64 else "float32"
        # mx.array(float64 ndarray) silently becomes float32 unless the dtype is explicit
        if dtype == "float64":
            return mx.array(a.astype(np.float64), dtype=mx.float64)
        return mx.array(a.astype(np.float32)).astype(getattr(mx, dtype))

    def token_logps(
        self, logits: Array, labels: Array, cdtype: Any, chunk: tuple[int, int], explicit: bool
    ) -> Array:
        """One fused ``logsumexp`` over all the logits (MLX reduces it without a ``(B, T, V)``
        temporary); chunked slices only for an explicit ``chunk_size``."""
        if explicit:
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
        """An ``mx.custom_function`` over Python-loop tiles (``mx.grad``, ``mx.compile``): its
        vjp recomputes the ``(N,)`` log-sum-exp and each tile, and writes the weight gradient
        tile by tile into one ``(V, D)`` array."""
        return _mlx_fused_linear_logps(hidden, weight, bias, labels, tuple(tile))

    # --- tooling ----------------------------------------------------------------------------
    def _compile(self, fn: Callable[..., Any], job: CompileJob) -> Callable[..., Any]:
        """``mx.compile(fn)``; the options are ignored (MLX has none of them)."""
        return mx.compile(fn)

    def _value_and_grad(self, job: GradJob) -> Any:
        run = self._maybe_compile(mx.value_and_grad(job.fn, argnums=list(job.argnums)), job)
        return _evaluated(*run(*job.args))

    def _vmap_value_and_grad(self, job: GradJob) -> Any:
        run = mx.vmap(mx.value_and_grad(job.fn, argnums=list(job.argnums)), in_axes=job.axes)
        return _evaluated(*self._maybe_compile(run, job)(*job.args))

    def vjp(self, fn: Callable[[Any], Array], primal: Any) -> tuple[Array, Callable[[Array], Any]]:
        """``mx.vjp`` takes lists of arrays and returns the outputs with the cotangents, so the
        pullback evaluates ``fn`` again (MLX is lazy: the first evaluation is the returned
        ``out``); the dict is flattened by its keys."""
        keys = list(primal)

        def flat(*leaves: Array) -> Array:
            return fn(dict(zip(keys, leaves, strict=True)))

        def pullback(cot: Array) -> Any:
            _, grads = mx.vjp(flat, [primal[k] for k in keys], [cot])
            return dict(zip(keys, grads, strict=True))

        return fn(primal), pullback

    def value_and_grad_fn(
        self, fn: Callable[[dict[str, Array]], Array]
    ) -> Callable[[dict[str, Array]], tuple[Array, dict[str, Array]]]:
        """``mx.value_and_grad(fn)``: one forward ([`vjp`][] recomputes it)."""
        return mx.value_and_grad(fn)

    def adamw(self, params: dict[str, Array], lr: float, weight_decay: float = 0.01) -> _AdamW:
        """``mlx.optimizers.AdamW`` with ``bias_correction=True`` (MLX's default is ``False``;
        torch and optax correct)."""
        return _AdamW(lr, weight_decay)

    def evaluate(self, *arrays: Any) -> None:
        mx.eval(*arrays)

    def default_device_is_gpu(self) -> bool:
        return bool(mx.default_device().type == mx.DeviceType.gpu)

    def _peak_memory(self, job: MemoryJob) -> PeakMemory | None:
        """``mx.get_peak_memory()`` over one call, less the active memory before it (the
        cache cleared first)."""
        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        job.run()
        return PeakMemory("mx.get_peak_memory", mx.get_peak_memory() - base)

    def describe(self) -> dict[str, Any]:
        return {
            "mlx": str(getattr(mx, "__version__", "?")),
            "mlx_device": str(mx.default_device()),
        }

    @contextlib.contextmanager
    def device_scope(self, dtype: DTypeName) -> Iterator[None]:
        """MLX float64 exists on the CPU only: run it on the CPU stream."""
        if dtype == "float64":
            with mx.stream(mx.cpu):
                yield
        else:
            yield


backend = MlxBackend()
