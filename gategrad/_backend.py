"""The backend base class (in the manner of einops' ``_backends``): one object per framework.

A backend is one object per framework, defined in ``gategrad.backends.<name>`` (the only module
that names that framework's API). [`Backend`][] gives NumPy-like defaults written against
``self.xp``, the framework's own array namespace (``numpy``, ``torch``, ``jax.numpy``,
``mlx.core``); a backend overrides only what differs, and implements the abstract methods that
must differ (the custom-gradient primitive, conversion, autograd tooling). mypy refuses to
instantiate a backend that leaves an abstract method out.

Dispatch (which backend an array belongs to) lives in ``gategrad._dispatch``. Adding a
framework: one file in ``backends/`` and one line in ``gategrad.backends.REGISTRY``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

MODES: tuple[str, ...] = ("eager", "compiled")
Array = Any  # an array of whichever framework the backend wraps
DTypeName = str  # 'float16' | 'bfloat16' | 'float32' | 'float64'

__all__ = [
    "MODES",
    "Array",
    "Backend",
    "Optimizer",
    "PeakMemory",
]


@dataclasses.dataclass(frozen=True)
class GradJob:
    """One [`Backend.value_and_grad`][] (or vmapped) request, as the backends' hooks get it."""

    fn: Callable[..., Any]
    args: list[Any]
    argnums: tuple[int, ...]
    axes: tuple[int | None, ...]  # vmap: 0 for mapped arguments, None for shared ones
    mode: str  # 'eager' | 'compiled'


Params = dict[str, Any]  # named arrays: model parameters, their gradients


class Optimizer(Protocol):
    """A framework's optimizer as a pure update, whatever its own API: ``state`` in, ``state``
    out, so that a compiled step can take the state as an argument (see [`Backend.adamw`][]).
    """

    def init(self, params: Params) -> Any:
        """The optimizer state for ``params`` (``None`` where the optimizer keeps it itself)."""
        ...

    def update(self, params: Params, grads: Params, state: Any) -> tuple[Params, Any]:
        """``(params, state)`` after one step with ``grads`` (the same keys as ``params``)."""
        ...

    def zero_grad(self) -> None:
        """Release the last step's gradients (before the next forward, as torch's
        ``zero_grad``); a no-op where gradients are plain return values."""
        ...


@dataclasses.dataclass(frozen=True)
class PeakMemory:
    """One call's peak memory from a framework's own counter ([`Backend.peak_memory`][])."""

    #: what measured it, e.g. ``'torch.profiler'``, ``'XLA memory_analysis'``
    counter: str
    #: bytes the call needed on top of what was live before it
    increment_bytes: float
    #: the device's peak bytes in use since it started, where it reports one
    device_peak_bytes: float | None = None


@dataclasses.dataclass(frozen=True)
class CompileJob:
    """One [`Backend.compile`][] request, as the backends' ``_compile`` hook gets it."""

    donate: tuple[int, ...] = ()
    compiler: str | None = None
    fullgraph: bool = True
    reset: bool = True
    example_args: tuple[Any, ...] | None = None


@dataclasses.dataclass(frozen=True)
class MemoryJob:
    """One [`Backend.peak_memory`][] request, as the backends' ``_peak_memory`` hook gets
    it."""

    run: Callable[[], None]
    compiled: Any = None
    device: str = "cpu"
    tries: int = 1


def tree_leaves(tree: Any) -> list[Any]:
    """The leaves of a tree of dicts, lists and tuples (``None`` leaves dropped)."""
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in tree_leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in tree_leaves(v)]
    return [] if tree is None else [tree]


class Backend(abc.ABC):
    """One framework's array operations, custom-gradient primitive and tooling.

    All reductions act along ``axis`` (default ``-1``). Defaults call ``self.xp`` with NumPy's
    names and keywords (``axis``, ``keepdims``), which NumPy, PyTorch, JAX and MLX all accept;
    a subclass overrides only where its framework differs.

    | group | methods |
    |---|---|
    | math | `exp` `log` `sqrt` `tanh` `sigmoid` `log_sigmoid` `logsumexp` `softmax` `log_softmax` |
    | reductions | `sum` `mean` `min` `max` `any` |
    | selection | `where` `minimum` `maximum` `sort` `take` `take_along_axis` |
    | layout | `concatenate` `reshape` `permute_dims` `tril_mask` `full_like` |
    | dtypes | `dtype` `compute_dtype` `astype` `is_floating` `bool_mask` `as_index` |
    | gradients | `scale_grad` `stop_gradient` `checkpoint` |
    | inspection | `is_concrete` `nonzero_rows` |
    | conversion | `to_numpy` `from_numpy` |
    | kernels | `token_logps` `fused_linear_logps` |
    | tooling | `compile` `value_and_grad` `vmap_value_and_grad` `vjp` `tree_map` |
    | training | `value_and_grad_fn` `adamw` `evaluate` |
    | machine | `device_like` `default_device_is_gpu` `peak_memory` `describe` `set_threads` |
    """

    #: the registry name: 'numpy' | 'torch' | 'jax' | 'mlx'
    name: str = ""
    #: the framework's NumPy-like namespace
    xp: Any = None
    #: the framework's top-level module (``numpy``, ``torch``, ``jax``, ``mlx.core``)
    framework: Any = None
    #: whether the framework's training convention keeps a call's gradients allocated until
    #: the next call releases them (torch's ``.grad``); memory measurements mirror it
    keeps_grads: bool = False
    #: whether the framework differentiates (NumPy: no; its gradients come from closed forms)
    has_autograd: bool = True
    #: whether its autograd traces the function (JAX: abstract values, so compiling a pass once
    #: pays) rather than running it on concrete arrays (torch, MLX: eager is the fast path)
    traces: bool = False
    #: the scale-relative accuracy of its float64 maths, for cross-framework tolerances (MLX's
    #: float64 transcendental functions are about 1e-7 accurate, not 1e-16)
    float64_tol: float = 1e-12

    # --- math (NumPy-like defaults) ---------------------------------------------------------
    def exp(self, x: Array) -> Array:
        return self.xp.exp(x)

    def log(self, x: Array) -> Array:
        """Natural log; ``log(0) = -inf`` without warnings."""
        return self.xp.log(x)

    def sqrt(self, x: Array) -> Array:
        return self.xp.sqrt(x)

    def tanh(self, x: Array) -> Array:
        return self.xp.tanh(x)

    def sigmoid(self, x: Array) -> Array:
        return self.xp.sigmoid(x)

    def log_sigmoid(self, x: Array) -> Array:
        """Numerically stable ``log(sigmoid(x)) = -softplus(-x)``."""
        return -self.xp.logaddexp(self.xp.zeros_like(x), -x)

    def logsumexp(self, x: Array, axis: int = -1) -> Array:
        return self.xp.logsumexp(x, axis=axis)

    def softmax(self, x: Array, axis: int = -1) -> Array:
        return self.exp(x - self.logsumexp(x, axis=axis)[..., None])

    def log_softmax(self, x: Array, axis: int = -1) -> Array:
        """``x - logsumexp(x)`` along ``axis`` (the framework's fused kernel where it has one)."""
        return x - self.xp.expand_dims(self.logsumexp(x, axis=axis), axis)

    # --- reductions ------------------------------------------------------------------------
    def sum(self, x: Array, axis: int | None = -1, keepdims: bool = False) -> Array:
        return self.xp.sum(x, axis=axis, keepdims=keepdims)

    def mean(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array:
        """Mean over ``axis``, or over every element when ``axis`` is ``None``."""
        return self.xp.mean(x, axis=axis, keepdims=keepdims)

    def min(self, x: Array, axis: int = -1) -> Array:
        return self.xp.min(x, axis=axis)

    def max(self, x: Array, axis: int = -1) -> Array:
        return self.xp.max(x, axis=axis)

    def any(self, x: Array) -> bool:
        """Python bool of ``x.any()``; only called when [`is_concrete`][] is true."""
        return bool(self.xp.any(x))

    # --- structure -------------------------------------------------------------------------
    def where(self, cond: Array, a: Array | float, b: Array | float) -> Array:
        """Elementwise select; ``a`` or ``b`` may be a Python number (it takes the other's
        dtype), never both."""
        return self.xp.where(cond, a, b)

    def minimum(self, a: Array, b: Array | float) -> Array:
        return self.xp.minimum(a, b)

    def maximum(self, a: Array, b: Array | float) -> Array:
        return self.xp.maximum(a, b)

    def sort(self, x: Array, axis: int = -1) -> Array:
        return self.xp.sort(x, axis=axis)

    def take(self, x: Array, idx: Array, axis: int = 0) -> Array:
        """``x`` indexed by the integer array ``idx`` along ``axis`` (an embedding lookup)."""
        return self.xp.take(x, idx, axis=axis)

    def take_along_axis(self, x: Array, idx: Array, axis: int = -1) -> Array:
        return self.xp.take_along_axis(x, idx, axis=axis)

    def concatenate(self, xs: Sequence[Array], axis: int = 0) -> Array:
        return self.xp.concatenate(list(xs), axis=axis)

    def reshape(self, x: Array, shape: tuple[int, ...]) -> Array:
        return x.reshape(shape)

    def permute_dims(self, x: Array, axes: tuple[int, ...]) -> Array:
        return self.xp.transpose(x, axes)

    def tril_mask(self, n: int, like: Array) -> Array:
        """Boolean lower-triangular ``(n, n)`` (``True`` on and below the diagonal)."""
        return self.from_numpy(_np().tril(_np().ones((n, n), dtype=bool)), like=like)

    def full_like(self, x: Array, value: float) -> Array:
        return self.xp.full_like(x, value)

    def isnan(self, x: Array) -> Array:
        return self.xp.isnan(x)

    def isfinite(self, x: Array) -> Array:
        return self.xp.isfinite(x)

    # --- dtypes ----------------------------------------------------------------------------
    def dtype(self, name: DTypeName) -> Any:
        """The framework's dtype called ``name`` (``'float32'``, ``'bfloat16'``, ``'int64'``...)."""
        return getattr(self.xp, name)

    def compute_dtype(self, x: Array) -> Any:
        """``promote_types(x.dtype, float32)``: float64 stays float64, anything else is float32."""
        return self.dtype("float64") if x.dtype == self.dtype("float64") else self.dtype("float32")

    def astype(self, x: Array, dtype: Any) -> Array:
        return x.astype(dtype)

    @abc.abstractmethod
    def is_floating(self, x: Array) -> bool: ...

    def bool_mask(self, mask: Array) -> Array:
        """``mask != 0`` as a boolean array."""
        return mask if mask.dtype == self.dtype("bool_") else mask != 0

    def as_index(self, x: Array) -> Array:
        """An integer array in the dtype ``take_along_axis`` accepts as indices."""
        return x

    # --- gradients -------------------------------------------------------------------------
    @abc.abstractmethod
    def scale_grad(self, x: Array, weight: Array) -> Array:
        """Identity forward; backward ``grad_x = weight * grad_out`` (``weight`` is not
        differentiated). ``weight`` broadcasts against ``x`` and has dtype
        ``promote_types(x.dtype, float32)``; the cotangent is scaled in that precision and cast
        back once."""

    @abc.abstractmethod
    def stop_gradient(self, x: Array) -> Array: ...

    def checkpoint(self, fn: Callable[..., Array], *args: Array) -> Array:
        """``fn(*args)``, recomputed in the backward instead of keeping its intermediates."""
        return fn(*args)

    # --- inspection ------------------------------------------------------------------------
    @abc.abstractmethod
    def is_concrete(self, x: Array) -> bool:
        """True when the values of ``x`` may be inspected now (eager mode, not traced or
        compiled). The one rule per backend that every value check uses."""

    def nonzero_rows(self, x: Array) -> list[int]:
        """Flat indices where the boolean ``x`` is true, for error messages."""
        return [int(i) for i in _np().flatnonzero(self.to_numpy(x))]

    # --- conversion ------------------------------------------------------------------------
    @abc.abstractmethod
    def to_numpy(self, x: Array) -> Any:
        """A NumPy copy of ``x`` without gradient (bfloat16 widened to float32)."""

    def from_numpy(
        self, a: Any, like: Array | None = None, dtype: DTypeName | None = None
    ) -> Array:
        """A NumPy array (or scalar) as this framework's array, on the device of ``like``.

        ``dtype`` names a floating dtype for floating input (``None`` keeps NumPy's, where the
        framework has it); boolean and integer arrays keep their kind.
        """
        a = _np().asarray(a)
        # a.dtype only when a dtype is asked for: dynamo cannot trace ndarray.dtype, and the
        # core converts its (float64) index tables with dtype=None inside compiled regions
        if dtype is not None and not _np().issubdtype(a.dtype, _np().floating):
            dtype = None
        return self.asarray(a, dtype, like)

    @abc.abstractmethod
    def asarray(self, a: Any, dtype: DTypeName | None, like: Array | None) -> Array:
        """``from_numpy`` after the checks: ``a`` a NumPy array, ``dtype`` ``None`` to keep."""

    # --- kernels ---------------------------------------------------------------------------
    def token_logps(
        self, logits: Array, labels: Array, cdtype: Any, chunk: tuple[int, int], explicit: bool
    ) -> Array:
        """``logits[b, t, labels[b, t]] - logsumexp(logits[b, t])`` in ``cdtype``, ``(B, T)``.

        ``labels`` are valid indices; ``chunk`` is ``(rows, cols)`` of one chunk of positions,
        ``explicit`` whether the user chose it. Default: ``logsumexp`` chunk by chunk over
        slices (right for arrays without autograd); frameworks with autograd override it with
        a kernel whose gradient is one array.
        """
        return self.chunked_logps(logits, labels, cdtype, *chunk)

    def _lse_in(self, dtype: Any) -> Any:
        def lse(block: Array) -> Array:
            return self.logsumexp(self.astype(block, dtype), axis=-1)

        return lse

    def chunked_logps(
        self, logits: Array, labels: Array, cdtype: Any, rows: int, cols: int
    ) -> Array:
        """``logits[b, t, labels[b, t]] - logsumexp(logits[b, t])`` chunk by chunk, in ``cdtype``.

        Chunks are slices: for arrays without a gradient (NumPy, concrete JAX) or an explicit
        ``chunk_size``. (Under autograd the gradient of each slice is a zero-padded ``(B, T, V)``
        array, which is why torch and traced JAX/MLX take other kernels.)
        """
        batch, length = int(labels.shape[0]), int(labels.shape[1])
        out_rows = []
        for b0 in range(0, batch, rows):
            b1 = min(b0 + rows, batch)
            pieces = []
            for t0 in range(0, length, cols):
                t1 = min(t0 + cols, length)
                block = logits[b0:b1, t0:t1]
                if block.dtype == cdtype:  # autograd keeps a view of the logits, no copy
                    lse = self.logsumexp(block, axis=-1)
                else:  # low precision: logsumexp in float32 of a cast chunk, recomputed in the
                    # backward rather than kept (else every chunk's float32 copy would be saved)
                    lse = self.checkpoint(self._lse_in(cdtype), block)
                idx = labels[b0:b1, t0:t1][..., None]
                picked = self.take_along_axis(block, idx, axis=-1)[..., 0]
                pieces.append(self.astype(picked, cdtype) - lse)
            out_rows.append(pieces[0] if len(pieces) == 1 else self.concatenate(pieces, axis=1))
        return out_rows[0] if len(out_rows) == 1 else self.concatenate(out_rows, axis=0)

    def fused_logps(self, logits: Array, labels: Array, cdtype: Any) -> Array:
        """One ``logsumexp`` over all the logits, for compilers that fuse it (XLA, MLX).

        XLA (JAX under ``jit`` or ``grad``) and MLX's ``logsumexp`` primitive reduce without a
        ``(B, T, V)`` temporary, and the gradient of one reduction is one ``(B, T, V)`` array;
        slicing would add a zero-padded one per chunk (measured in ``benchmarks/overhead.py``).
        """
        picked = self.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
        if logits.dtype == cdtype:
            lse = self.logsumexp(logits, axis=-1)
        else:  # low precision: the float32 cast is recomputed in the backward, not kept
            lse = self.checkpoint(self._lse_in(cdtype), logits)
        return self.astype(picked, cdtype) - lse

    def fused_linear_logps(
        self,
        hidden: Array,
        weight: Array,
        bias: Array | None,
        labels: Array,
        cdtype: Any,
        tile: tuple[int, int],
    ) -> Array:
        """``log_softmax(hidden @ weight.T + bias)[n, labels[n]]`` in ``cdtype``, ``(N,)``,
        without the ``(N, V)`` logits (:func:`gategrad.fused_token_logps`).

        ``hidden`` is ``(N, D)``, ``weight`` ``(V, D)``, ``bias`` ``(V,)`` or ``None``, ``labels``
        ``(N,)`` valid indices; ``tile`` is ``(rows, cols)``. Default (the NumPy reference,
        no autograd): each tile's logits in the input dtype, a running log-sum-exp in
        ``cdtype`` across the vocabulary tiles. Frameworks with autograd override it with a
        kernel whose backward recomputes the tiles.
        """
        rows, cols = tile
        n, vocab = int(hidden.shape[0]), int(weight.shape[0])
        out = []
        for r0 in range(0, n, rows):
            h, y = hidden[r0 : r0 + rows], labels[r0 : r0 + rows]
            m = s = target = None
            for v0 in range(0, vocab, cols):
                w = weight[v0 : v0 + cols]
                z = h @ self.permute_dims(w, (1, 0))
                if bias is not None:
                    z = z + bias[v0 : v0 + cols]
                z = self.astype(z, cdtype)
                local = y - v0
                inside = (local >= 0) & (local < int(w.shape[0]))
                idx = self.as_index(self.where(inside, local, 0))
                picked = self.take_along_axis(z, idx[:, None], axis=-1)[:, 0]
                top = self.max(z, axis=-1)
                if m is None:
                    m, s, target = top, self.sum(self.exp(z - top[:, None])), picked
                    target = self.where(inside, picked, 0.0)
                    continue
                new = self.maximum(m, top)
                s = s * self.exp(m - new) + self.sum(self.exp(z - new[:, None]))
                m, target = new, self.where(inside, picked, target)
            out.append(target - (m + self.log(s)))
        return out[0] if len(out) == 1 else self.concatenate(out, axis=0)

    # --- tooling (tests, lab, benchmarks) ---------------------------------------------------
    def compile(
        self,
        fn: Callable[..., Any],
        *,
        donate: Sequence[int] = (),
        compiler: str | None = None,
        fullgraph: bool = True,
        reset: bool = True,
        example_args: Sequence[Any] | None = None,
    ) -> Callable[..., Any]:
        """``fn`` compiled by the framework (``torch.compile(fullgraph=True)``, ``jax.jit``,
        ``mx.compile``); NumPy returns ``fn``.

        The options are ignored where the framework has no such notion:

        Args:
            fn: the function to compile.
            donate: positions of arguments whose buffers the result may reuse (JAX's
                ``donate_argnums``).
            compiler: the compiler backend (``torch.compile``'s ``backend``: ``'inductor'``,
                ``'aot_eager'``...; ``None`` for the default).
            fullgraph: refuse graph breaks (``torch.compile``'s ``fullgraph``).
            reset: drop the graphs compiled before (torch's ``dynamo.reset``: tests build new
                closures per example); ``False`` keeps them and raises dynamo's recompile
                limit instead, for several compiled functions alive together.
            example_args: compile ahead of time for these arguments (JAX's
                ``lower(*args).compile()``, whose result has ``memory_analysis()``).
        """
        examples = None if example_args is None else tuple(example_args)
        return self._compile(fn, CompileJob(tuple(donate), compiler, fullgraph, reset, examples))

    def _compile(self, fn: Callable[..., Any], job: CompileJob) -> Callable[..., Any]:
        return fn

    def value_and_grad(
        self,
        fn: Callable[..., Any],
        args: Sequence[Array],
        argnums: Sequence[int] = (0,),
        mode: str = "eager",
    ) -> tuple[Any, tuple[Array, ...]]:
        """``(fn(*args), (d fn / d args[i] for i in argnums))`` for a scalar-valued ``fn``;
        ``mode='compiled'`` runs it under [`compile`][]."""
        check_mode(mode)
        return self._value_and_grad(GradJob(fn, list(args), tuple(argnums), (), mode))

    def vmap_value_and_grad(
        self,
        fn: Callable[..., Any],
        args: Sequence[Array],
        argnums: Sequence[int] = (0,),
        batched: Sequence[int] = (),
        mode: str = "eager",
    ) -> tuple[Any, tuple[Array, ...]]:
        """Per-slice [`value_and_grad`][] under the framework's ``vmap``: ``args[i]`` for ``i``
        in ``batched`` carry a leading axis ``K`` mapped over; values ``(K,)`` and gradients
        stacked along ``K``."""
        check_mode(mode)
        axes = tuple(0 if i in batched else None for i in range(len(args)))
        return self._vmap_value_and_grad(GradJob(fn, list(args), tuple(argnums), axes, mode))

    def _value_and_grad(self, job: GradJob) -> Any:
        raise NotImplementedError(f"backend {self.name!r} has no autograd")

    def _vmap_value_and_grad(self, job: GradJob) -> Any:
        raise NotImplementedError(f"backend {self.name!r} has no vmap")

    def _maybe_compile(self, fn: Callable[..., Any], job: GradJob) -> Callable[..., Any]:
        return self.compile(fn) if job.mode == "compiled" else fn

    def vjp(self, fn: Callable[[Any], Array], primal: Any) -> tuple[Array, Callable[[Array], Any]]:
        """``(fn(primal), pullback)`` where ``pullback(cot)`` is ``cot^T d fn / d primal``
        (``primal`` a dict of arrays)."""
        raise NotImplementedError(f"backend {self.name!r} has no autograd")

    def value_and_grad_fn(
        self, fn: Callable[[Params], Array]
    ) -> Callable[[Params], tuple[Array, Params]]:
        """``params -> (fn(params), d fn / d params)`` for a scalar-valued ``fn`` of a dict of
        arrays: traceable, so usable inside [`compile`][] (unlike [`value_and_grad`][],
        which copies its inputs and evaluates; torch's dynamo breaks the graph at
        ``torch.autograd.grad``, so compile it with ``fullgraph=False`` there). Default: from
        [`vjp`][]."""

        def run(params: Params) -> tuple[Array, Params]:
            value, pullback = self.vjp(fn, params)
            return value, pullback(self.full_like(value, 1.0))

        return run

    def adamw(self, params: Params, lr: float, weight_decay: float = 0.01) -> Optimizer:
        """The framework's own AdamW for ``params`` (betas ``(0.9, 0.999)``, ``eps = 1e-8``,
        bias-corrected moments, decoupled weight decay ``p -= lr * weight_decay * p``)."""
        raise NotImplementedError(f"backend {self.name!r} has no autograd")

    def tree_map(self, fn: Callable[..., Array], *trees: dict[str, Array]) -> dict[str, Array]:
        """``{k: fn(t0[k], t1[k], ...)}`` over dicts of arrays with the same keys."""
        return {k: fn(*(t[k] for t in trees)) for k in trees[0]}

    def evaluate(self, *arrays: Any) -> None:  # noqa: B027 - a default, not abstract
        """Wait until ``arrays`` are computed: MLX's ``mx.eval`` (lazy), JAX's
        ``block_until_ready`` and CUDA's synchronize (asynchronous); a no-op for NumPy."""

    def device_scope(self, dtype: DTypeName) -> contextlib.AbstractContextManager[None]:
        """A context in which arrays of ``dtype`` can be computed (MLX float64: the CPU)."""
        return contextlib.nullcontext()

    def set_threads(self, n: int) -> int:
        """Set the framework's intra-op thread count where it has one; returns the old one."""
        return 0

    def device_like(self, device: str) -> Array | None:
        """An empty array on ``device`` (``'cpu'``, ``'cuda:0'``...), to pass as
        [`from_numpy`][]'s ``like``; ``None`` where the framework takes no device string (its
        arrays go to its default device). Raises ``RuntimeError`` for a device it cannot see."""
        return None

    def default_device_is_gpu(self) -> bool:
        """Whether arrays made without a device go to a GPU."""
        return False

    def peak_memory(
        self,
        run: Callable[[], None],
        *,
        compiled: Any = None,
        device: str = "cpu",
        tries: int = 1,
    ) -> PeakMemory | None:
        """The peak memory of ``run()`` (one synchronised call) from the framework's own
        counter, or ``None`` where it has none.

        Args:
            run: the call to measure.
            compiled: the compiled function ``run`` calls, for frameworks whose counter reads
                the compiled program (XLA's ``memory_analysis``) instead of running it.
            device: the device of ``run``'s arrays (see [`device_like`][]).
            tries: measure this many calls and keep the least (the first may count allocator
                warm-up), where the counter runs ``run``.
        """
        return self._peak_memory(MemoryJob(run, compiled, device, tries))

    def _peak_memory(self, job: MemoryJob) -> PeakMemory | None:
        return None

    def describe(self) -> dict[str, Any]:
        """What a report's machine line says of the framework (threads, devices)."""
        return {}

    def __repr__(self) -> str:
        return f"<gategrad backend {self.name!r}>"


def _np() -> Any:
    import numpy

    return numpy


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
