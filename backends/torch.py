"""PyTorch backend: the custom-gradient primitive, the token-log-prob kernel and the tooling.

``scale_grad`` is a new-style ``autograd.Function`` whose backward scales the cotangent. It works
in eager mode, under ``torch.compile`` (``fullgraph=True``), ``torch.func.grad`` / ``vmap``
(``generate_vmap_rule``) and activation checkpointing, for float16/bfloat16/float32/float64.
The weight is computed in the forward (stop-gradient) and saved; the backward is
``grad_x = (grad_out.to(w.dtype) * w).to(grad_out.dtype)``.

Both autograd Functions are defined at import time (never inside a compiled region, where
dynamo cannot build a class).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from typing import Any

try:
    import torch
except ImportError as err:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "gategrad.backends.torch needs PyTorch: pip install 'gategrad[torch]'"
    ) from err

import numpy as np

from gategrad._backend import (
    Array,
    Backend,
    CompileJob,
    DTypeName,
    GradJob,
    MemoryJob,
    PeakMemory,
    tree_leaves,
)

_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)


def _is_functorch_wrapped(*xs: torch.Tensor) -> bool:
    return _functorch_wrapped is not None and any(bool(_functorch_wrapped(x)) for x in xs)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward ``w * grad`` (``w`` is not differentiated)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return (grad.to(weight.dtype) * weight).to(grad.dtype), None


class _ChunkLogps(torch.autograd.Function):
    """``(log_softmax(block)[idx], logsumexp(block))`` in ``dtype``; differentiable in the first
    output only. Saves ``block`` (a view of the logits), ``idx`` and the ``logsumexp``
    ``(rows, cols)``: nothing of size ``B * T * V``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(block: Any, idx: Any, dtype: Any) -> Any:
        out = block.log_softmax(-1, dtype=dtype).gather(-1, idx)[..., 0]
        return out, block.gather(-1, idx)[..., 0].to(dtype) - out

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        block, idx, _ = inputs
        _, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(block, idx, lse)

    @staticmethod
    def backward(ctx: Any, grad: Any, _grad_lse: Any) -> Any:
        # d out / d block = onehot(idx) - softmax(block)
        block, idx, lse = ctx.saved_tensors
        g = grad[..., None]
        if torch.is_grad_enabled():  # create_graph: a formula autograd differentiates
            soft = torch.softmax(block.to(lse.dtype), -1)
            gx = (soft * -g).scatter_add(-1, idx, g)
        elif torch.compiler.is_compiling() or _is_functorch_wrapped(grad, block):
            soft = torch.exp(block.to(lse.dtype) - lse[..., None])  # out of place
            gx = (soft * -g).scatter_add(-1, idx, g)
        else:  # eager: one (rows, cols, V) allocation, the rest in place
            soft = block.to(lse.dtype).sub(lse[..., None]).exp_()
            gx = soft.mul_(-g).scatter_add_(-1, idx, g)
        return gx.to(block.dtype), None, None


class _AdamW:
    """``torch.optim.AdamW`` (``foreach``), updating the parameters in place (no state)."""

    def __init__(self, params: dict[str, Array], lr: float, weight_decay: float) -> None:
        self.opt = torch.optim.AdamW(
            list(params.values()), lr=lr, weight_decay=weight_decay, foreach=True
        )

    def init(self, params: dict[str, Array]) -> None:
        return None

    def update(
        self, params: dict[str, Array], grads: dict[str, Array], state: Any
    ) -> tuple[dict[str, Array], Any]:
        for k, p in params.items():
            p.grad = grads[k]
        self.opt.step()
        return params, state

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)


def _profiler_peak(fn: Callable[[], Any]) -> int | None:
    """Peak of the CPU bytes allocated and still live inside ``fn``, from ``torch.profiler``.

    The profiler's memory events (allocations positive, frees negative) are summed in time
    order; the maximum of the running sum is the memory ``fn`` needs on top of what was live
    before it. ``None`` (with a warning) where the profiler's private event API has moved.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        cpu = torch.autograd.DeviceType.CPU
        mem = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == cpu
        )
    except Exception as err:  # the profiler's event API is private and may move
        warnings.warn(f"torch.profiler memory measurement unavailable: {err!r}", stacklevel=2)
        return None
    live = peak = 0
    for _, nbytes in mem:
        live += nbytes
        peak = max(peak, live)
    return peak


_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "bool_": torch.bool,
    "int32": torch.int32,
    "int64": torch.int64,
}


class TorchBackend(Backend):
    """[`gategrad.Backend`][] for ``torch.Tensor`` on any device: autograd
    Functions for ``scale_grad`` and ``token_logps``, ``torch.compile(fullgraph=True)``,
    ``torch.func`` for ``vmap``."""

    name = "torch"
    xp = torch
    framework = torch
    keeps_grads = True

    def log_sigmoid(self, x: Array) -> Array:
        return torch.nn.functional.logsigmoid(x)

    def softmax(self, x: Array, axis: int = -1) -> Array:
        return torch.softmax(x, dim=axis)

    def log_softmax(self, x: Array, axis: int = -1) -> Array:
        return torch.log_softmax(x, dim=axis)

    def minimum(self, a: Array, b: Array | float) -> Array:
        return torch.clamp(a, max=b) if isinstance(b, (int, float)) else torch.minimum(a, b)

    def maximum(self, a: Array, b: Array | float) -> Array:
        return torch.clamp(a, min=b) if isinstance(b, (int, float)) else torch.maximum(a, b)

    def min(self, x: Array, axis: int = -1) -> Array:
        return torch.amin(x, dim=axis)

    def max(self, x: Array, axis: int = -1) -> Array:
        return torch.amax(x, dim=axis)

    def sort(self, x: Array, axis: int = -1) -> Array:
        return torch.sort(x, dim=axis).values

    def take(self, x: Array, idx: Array, axis: int = 0) -> Array:
        return torch.index_select(x, axis, idx.reshape(-1)).reshape(
            (*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :])
        )

    def take_along_axis(self, x: Array, idx: Array, axis: int = -1) -> Array:
        return torch.take_along_dim(x, idx, dim=axis)

    def permute_dims(self, x: Array, axes: tuple[int, ...]) -> Array:
        return x.permute(axes)

    def tril_mask(self, n: int, like: Array) -> Array:
        return torch.ones(n, n, dtype=torch.bool, device=like.device).tril()

    def dtype(self, name: DTypeName) -> Any:
        return _DTYPES[name]

    def compute_dtype(self, x: Array) -> Any:
        return torch.promote_types(x.dtype, torch.float32)

    def astype(self, x: Array, dtype: Any) -> Array:
        return x.to(dtype)

    def is_floating(self, x: Array) -> bool:
        return bool(x.is_floating_point())

    def as_index(self, x: Array) -> Array:
        return x if x.dtype == torch.int64 else x.to(torch.int64)

    def scale_grad(self, x: Array, weight: Array) -> Array:
        return _ScaleGrad.apply(x, weight.detach())

    def stop_gradient(self, x: Array) -> Array:
        return x.detach()

    def checkpoint(self, fn: Callable[..., Array], *args: Array) -> Array:
        if torch.is_grad_enabled() and any(a.requires_grad for a in args):
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def is_concrete(self, x: Array) -> bool:
        if torch.compiler.is_compiling() or x.device.type == "meta":
            return False
        return not _is_functorch_wrapped(x)

    def nonzero_rows(self, x: Array) -> list[int]:
        return [int(i) for i in torch.nonzero(x.reshape(-1)).reshape(-1).tolist()]

    def to_numpy(self, x: Array) -> Any:
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()

    def asarray(self, a: Any, dtype: DTypeName | None, like: Array | None) -> Array:
        # np.ascontiguousarray makes a 0-d array (1,): reshape it back (dynamo traces
        # ndarray.shape, not ndarray.flags)
        t = torch.from_numpy(np.ascontiguousarray(a)).reshape(a.shape)
        t = t if dtype is None else t.to(_DTYPES[dtype])
        return t if like is None else t.to(like.device)

    def token_logps(
        self, logits: Array, labels: Array, cdtype: Any, chunk: tuple[int, int], explicit: bool
    ) -> Array:
        """Fused ``log_softmax`` + gather per chunk, chunks from ``split``.

        ``split`` has one backward node that concatenates the chunks' gradients (slices would each
        add a zero-padded ``(B, T, V)`` gradient). Each chunk is one autograd function: the forward
        runs the fused ``log_softmax`` kernel (``dtype=float32`` casts bf16/fp16 chunks inside it)
        and keeps no log-softmax; the backward forms ``onehot - softmax`` from the saved
        ``logsumexp`` in one pass.
        """
        rows, cols = chunk
        out_rows = []
        for xb, yb in zip(logits.split(rows, 0), labels.split(rows, 0), strict=True):
            pieces = [
                _ChunkLogps.apply(xc, yc[..., None], cdtype)[0]
                for xc, yc in zip(xb.split(cols, 1), yb.split(cols, 1), strict=True)
            ]
            out_rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
        return out_rows[0] if len(out_rows) == 1 else torch.cat(out_rows, dim=0)

    # --- tooling ----------------------------------------------------------------------------
    def _compile(self, fn: Callable[..., Any], job: CompileJob) -> Callable[..., Any]:
        """``torch.compile(fn, fullgraph=fullgraph, dynamic=False, backend=compiler)``;
        ``donate`` and ``example_args`` are ignored (dynamo compiles on the first call)."""
        dyn = torch._dynamo
        if job.reset:
            # Every call compiles afresh: tests build new closures per example, which would
            # otherwise pile up recompilations of one code object past dynamo's limit.
            dyn.reset()
        else:  # the graphs compiled before stay: let more of them live together
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(dyn.config, knob):
                    setattr(dyn.config, knob, max(64, getattr(dyn.config, knob)))
        backend = job.compiler or "inductor"
        return torch.compile(fn, fullgraph=job.fullgraph, dynamic=False, backend=backend)

    def _value_and_grad(self, job: GradJob) -> Any:
        args = [
            a.detach().clone().requires_grad_(True) if i in job.argnums else a
            for i, a in enumerate(job.args)
        ]
        value = self._maybe_compile(job.fn, job)(*args)
        grads = torch.autograd.grad(value, [args[i] for i in job.argnums], allow_unused=True)
        zeros = [torch.zeros_like(args[i]) for i in job.argnums]
        return value.detach(), tuple(
            z if g is None else g for z, g in zip(zeros, grads, strict=True)
        )

    def _vmap_value_and_grad(self, job: GradJob) -> Any:
        grad_and_value = torch.func.grad_and_value(job.fn, argnums=job.argnums)
        run = torch.func.vmap(grad_and_value, in_dims=job.axes)
        grads, value = self._maybe_compile(run, job)(*job.args)
        return value, tuple(grads)

    def vjp(self, fn: Callable[[Any], Array], primal: Any) -> tuple[Array, Callable[[Array], Any]]:
        leaves = {k: v.detach().requires_grad_(True) for k, v in primal.items()}
        out = fn(leaves)

        def pullback(cot: Array) -> Any:
            grads = torch.autograd.grad(out, list(leaves.values()), cot, allow_unused=True)
            return {
                k: torch.zeros_like(v) if g is None else g
                for (k, v), g in zip(leaves.items(), grads, strict=True)
            }

        return out.detach(), pullback

    def evaluate(self, *arrays: Any) -> None:
        """Wait for the device (CUDA kernels run asynchronously); a no-op on the CPU.
        ``arrays`` may be trees (dicts, lists, tuples) of tensors."""
        leaves = tree_leaves(arrays)
        for device in {a.device for a in leaves if isinstance(a, torch.Tensor)}:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    def adamw(self, params: dict[str, Array], lr: float, weight_decay: float = 0.01) -> _AdamW:
        """``torch.optim.AdamW(foreach=True)``, bound to the tensors of ``params``, which
        ``update`` changes in place (its state is ``None``)."""
        return _AdamW(params, lr, weight_decay)

    def set_threads(self, n: int) -> int:
        old = torch.get_num_threads()
        if n > 0:
            torch.set_num_threads(n)
        return old

    def device_like(self, device: str) -> Array | None:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"torch sees no CUDA device for {device!r}")
        return torch.empty(0, device=dev)

    def default_device_is_gpu(self) -> bool:
        return torch.get_default_device().type == "cuda"

    def _peak_memory(self, job: MemoryJob) -> PeakMemory | None:
        """CUDA: ``max_memory_allocated`` over one call, less what was allocated before it.
        CPU: the least over ``tries`` calls of ``torch.profiler``'s peak of live bytes."""
        dev = torch.device(job.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            job.run()
            peak = torch.cuda.max_memory_allocated(dev) - base
            return PeakMemory("torch.cuda.max_memory_allocated", peak)
        peaks = [p for p in (_profiler_peak(job.run) for _ in range(job.tries)) if p is not None]
        return PeakMemory("torch.profiler", min(peaks)) if peaks else None

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
        return info


backend = TorchBackend()
