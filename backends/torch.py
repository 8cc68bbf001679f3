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
    """Identity forward; backward ``w * grad`` (``w`` is not differentiated).

    The output shares ``x``'s storage (no copy: gating full logits costs no memory) but is not
    a view of it: ``x.detach()`` in the forward, where autograd records no view. A view
    (``x.view_as(x)``) made FSDP2 warn that the wrapped module "returned a view tensor" and made
    any in-place op on the gated output raise ("Output 0 of _ScaleGrad is a view and is being
    modified inplace"). Now in-place ops on the output work and differentiate correctly
    (tests/test_torch_hook.py); they also write into ``x``, like any alias, and autograd's
    version counter (shared by ``detach``) still refuses a backward through an op that saved
    ``x``. In eager mode a leaf that requires grad keeps the view, so an in-place op cannot
    silently change a parameter's data.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # a leaf in eager mode keeps autograd's view checks (dynamo cannot read is_leaf here)
        if not torch.compiler.is_compiling() and x.requires_grad and x.is_leaf:
            return x.view_as(x)
        return x.detach()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return (grad.to(weight.dtype) * weight).to(grad.dtype), None


class _TokenLogps(torch.autograd.Function):
    """``(logps, lse)`` of ``(B, T, V)`` logits at ``idx`` ``(B, T)``, in ``dtype``:
    ``log_softmax(x)[idx]`` and ``logsumexp(x)``, differentiable in ``logps`` only.

    One Function over all the positions: the forward writes no log-softmax of its own (eager:
    each chunk's ``log_softmax`` goes into one reused chunk-sized scratch buffer, of which one
    value per position is read); it saves the logits (a view), ``idx`` and the ``(B, T)``
    log-sum-exp. The backward writes ``g * (onehot - softmax(x))`` chunk by chunk, in place,
    into one preallocated gradient. Under ``torch.compile``, ``torch.func`` and a recorded
    (``create_graph``) backward both passes are out-of-place formulas over the whole tensor
    (the compiler fuses them; autograd differentiates them)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Any, idx: Any, dtype: Any, positions: int) -> Any:
        picked = x.gather(-1, idx[..., None])[..., 0].to(dtype)
        if not _eager(x, idx):
            lse = torch.logsumexp(x.to(dtype), -1)
            return picked - lse, lse
        out = torch.empty(idx.shape, dtype=dtype, device=x.device)
        parts = _Chunks(x, positions)
        scratch = torch.empty(parts.scratch_elements, dtype=dtype, device=x.device)
        out_flat, idx_flat = out.view(-1), idx.reshape(-1)
        for p0, p1 in parts.ranges():
            xc = parts.take(x, p0, p1)
            s = scratch[: (p1 - p0) * xc.shape[-1]].view(xc.shape)
            if xc.dtype == dtype:
                torch.log_softmax(xc, -1, out=s)
            else:  # the cast into the buffer, then in place (log_softmax(dtype=) would copy)
                torch.log_softmax(s.copy_(xc), -1, out=s)
            out_flat[p0:p1] = s.gather(-1, idx_flat[p0:p1, None])[:, 0]
        del scratch
        return out, picked - out

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        x, idx, _, positions = inputs
        _, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(x, idx, lse)
        ctx.positions = positions

    @staticmethod
    def backward(ctx: Any, grad: Any, _grad_lse: Any) -> Any:
        # d logps / d x = onehot(idx) - softmax(x)
        x, idx, lse = ctx.saved_tensors
        g = grad.to(lse.dtype)[..., None]
        if torch.is_grad_enabled():  # create_graph: a formula autograd differentiates
            soft = torch.softmax(x.to(lse.dtype), -1)
            gx = (soft * -g).scatter_add(-1, idx[..., None], g)
            return gx.to(x.dtype), None, None, None
        if not _eager(x, idx, grad):  # torch.compile, torch.func: out of place, fused
            soft = torch.exp(x.to(lse.dtype) - lse[..., None])
            gx = (soft * -g).scatter_add(-1, idx[..., None], g)
            return gx.to(x.dtype), None, None, None
        gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        parts = _Chunks(x, ctx.positions)
        g_flat, idx_flat = g.to(x.dtype).reshape(-1, 1), idx.reshape(-1, 1)
        for p0, p1 in parts.ranges():
            # the softmax written into the gradient itself (low precision: computed in float32
            # by the kernel, rounded once into the gradient's dtype), then scaled in place
            gp = g_flat[p0:p1]
            gc = torch.softmax(parts.take(x, p0, p1), -1, out=parts.take(gx, p0, p1))
            gc.mul_(-gp).scatter_add_(-1, idx_flat[p0:p1], gp)
        return gx, None, None, None


class _Chunks:
    """Chunks of the positions ``p = b * T + t`` of ``(B, T, V)`` ``x``: ranges ``[p0, p1)``
    whose rows :meth:`take` returns as a ``(p1 - p0, V)`` view, without a copy, of ``x`` or of
    any tensor of its shape. Slices of ``x.view(B * T, V)`` when ``x`` is contiguous, else
    chunks within one batch row (``logits[:, :-1]``, say, which no flat view covers)."""

    def __init__(self, x: Any, positions: int) -> None:
        batch, length, vocab = x.shape
        self.shape = (batch, length, vocab)
        self.flat = x.is_contiguous()
        self.step = max(1, min(positions, batch * length if self.flat else length))
        self.scratch_elements = self.step * vocab

    def ranges(self) -> list[tuple[int, int]]:
        batch, length, _ = self.shape
        if self.flat:
            n = batch * length
            return [(p0, min(p0 + self.step, n)) for p0 in range(0, n, self.step)]
        return [
            (b * length + t0, b * length + min(t0 + self.step, length))
            for b in range(batch)
            for t0 in range(0, length, self.step)
        ]

    def take(self, t: Any, p0: int, p1: int) -> Any:
        batch, length, vocab = self.shape
        if self.flat:
            return t.view(batch * length, vocab)[p0:p1]
        b, t0 = divmod(p0, length)
        return t[b, t0 : t0 + (p1 - p0)]


def _tile_logits(h: Any, w: Any, b: Any) -> Any:
    """``h @ w.T + b`` in the input dtype (one matmul; ``addmm`` where there is a bias)."""
    return h @ w.t() if b is None else torch.addmm(b, h, w.t())


def _eager(*xs: Any) -> bool:
    """Whether the fused head may work in place: not under dynamo, functorch or a recorded
    (``create_graph``) backward."""
    return not (
        torch.is_grad_enabled() or torch.compiler.is_compiling() or _is_functorch_wrapped(*xs)
    )


def _fused_forward(hidden: Any, weight: Any, bias: Any, labels: Any, rows: int, cols: int) -> Any:
    """``(logps, lse, tile_lse)`` in ``cd = promote_types(dtype, float32)``: ``(N,)``,
    ``(N,)`` and the log-sum-exp of each vocabulary tile ``(N, tiles)``.

    One tile alive at a time. Eager: the tile's ``log_softmax`` (one fused pass) is written
    over the tile itself (float32) or into one reused float32 buffer (low precision), and the
    tile's log-sum-exp read off it as ``z[:, 0] - log_softmax(z)[:, 0]``; the log-sum-exp over
    the vocabulary is that of the tiles'."""
    cd = torch.promote_types(hidden.dtype, torch.float32)
    n, vocab = hidden.shape[0], weight.shape[0]
    tiles = -(-vocab // cols)
    inplace = _eager(hidden, weight)
    low = hidden.dtype != cd
    if inplace:
        tile_lse = torch.empty((n, tiles), dtype=cd, device=hidden.device)
        target = torch.empty(n, dtype=cd, device=hidden.device)
        buf = torch.empty((min(n, rows), min(vocab, cols)), dtype=cd, device=hidden.device)
    row_lse, row_target = [], []
    for r0 in range(0, n, rows):
        h, y = hidden[r0 : r0 + rows], labels[r0 : r0 + rows]
        parts, picked_rows = [], None
        for k, v0 in enumerate(range(0, vocab, cols)):
            w = weight[v0 : v0 + cols]
            c = w.shape[0]
            z = _tile_logits(h, w, None if bias is None else bias[v0 : v0 + cols])
            local = y - v0
            inside = (local >= 0) & (local < c)
            picked = z.gather(1, local.clamp(0, c - 1)[:, None])[:, 0].to(cd)
            # each (valid) label is inside exactly one tile, which overwrites the first's pick
            if picked_rows is None:
                picked_rows = picked
            else:
                picked_rows = torch.where(inside, picked, picked_rows)
            if inplace:
                first = z[:, 0].to(cd, copy=True)  # before the tile is overwritten
                ls = buf[: z.shape[0], :c] if low else z
                torch.log_softmax(z, 1, dtype=cd, out=ls)
                tile_lse[r0 : r0 + rows, k] = first - ls[:, 0]
            else:
                parts.append(torch.logsumexp(z.to(cd), 1))
        if inplace:
            target[r0 : r0 + rows] = picked_rows
        else:
            row_lse.append(torch.stack(parts, 1))
            row_target.append(picked_rows)
    if not inplace:
        tile_lse = row_lse[0] if len(row_lse) == 1 else torch.cat(row_lse)
        target = row_target[0] if len(row_target) == 1 else torch.cat(row_target)
    lse = torch.logsumexp(tile_lse, 1)
    return target - lse, lse, tile_lse


def _fused_backward(
    hidden: Any,
    weight: Any,
    bias: Any,
    labels: Any,
    stats: tuple[Any, Any],
    grad: Any,
    needs: Any,
    tile: Any,
) -> tuple[Any, Any, Any]:
    """Gradients of ``sum(grad * logps)`` to ``hidden``, ``weight`` and ``bias`` (``None``
    where not needed), vocabulary tile by tile.

    Each tile is recomputed and turned into ``d = g * (onehot - p)`` with
    ``p = softmax_tile(z) * exp(lse_tile - lse)``; eager, in place (the softmax over the tile
    itself, or into one float32 buffer in low precision, then ``d`` cast back into the tile's
    own buffer for the matmuls). ``d @ w`` accumulates into the hidden gradient (float32 in low
    precision) and ``d.T @ h`` into the weight rows of the tile, written once per tile."""
    rows, cols = tile
    lse, tile_lse = stats
    cd = lse.dtype
    low = hidden.dtype != cd
    inplace = _eager(hidden, weight, grad)
    n, vocab = hidden.shape[0], weight.shape[0]
    g = grad.to(cd)
    need_h, need_w, need_b = needs
    gh: Any = (
        torch.zeros(hidden.shape, dtype=cd, device=hidden.device) if need_h and inplace else None
    )
    h_parts: list[Any] = [None] * -(-n // rows)  # functional mode: per row chunk
    w_parts: list[Any] = []
    b_parts: list[Any] = []
    gw = torch.empty_like(weight) if need_w and inplace else None
    gb = torch.empty(vocab, dtype=cd, device=hidden.device) if need_b and inplace else None
    buf = (
        torch.empty((min(n, rows), min(vocab, cols)), dtype=cd, device=hidden.device)
        if inplace and low
        else None
    )
    for k, v0 in enumerate(range(0, vocab, cols)):
        w = weight[v0 : v0 + cols]
        c = w.shape[0]
        acc_w: Any = None
        acc_b: Any = None
        for r0 in range(0, n, rows):
            h, y = hidden[r0 : r0 + rows], labels[r0 : r0 + rows]
            gr = g[r0 : r0 + rows]
            scale = -gr * torch.exp(tile_lse[r0 : r0 + rows, k] - lse[r0 : r0 + rows])
            z = _tile_logits(h, w, None if bias is None else bias[v0 : v0 + cols])
            local = y - v0
            inside = (local >= 0) & (local < c)
            idx = local.clamp(0, c - 1)[:, None]
            hit = torch.where(inside, gr, 0.0)[:, None]
            if inplace:  # d = g * (onehot - p), in the tile's own buffer
                p = z if buf is None else buf[: z.shape[0], :c]
                torch.softmax(z, 1, dtype=cd, out=p)
                d = p.mul_(scale[:, None]).scatter_add_(1, idx, hit)
                dl = d if buf is None else z.copy_(d)  # the matmuls in the input dtype
            else:
                p = torch.softmax(z.to(cd), 1)
                d = (p * scale[:, None]).scatter_add(1, idx, hit)
                dl = d.to(hidden.dtype)
            if need_h:
                if inplace and not low:
                    gh[r0 : r0 + rows].addmm_(dl, w)
                elif inplace:
                    gh[r0 : r0 + rows] += dl @ w
                else:
                    part = (dl @ w).to(cd)
                    i = r0 // rows
                    h_parts[i] = part if h_parts[i] is None else h_parts[i] + part
            if need_w:
                part_w = dl.t() @ h
                if acc_w is None:
                    acc_w = part_w if not low else part_w.to(cd)
                elif inplace:
                    acc_w += part_w
                else:
                    acc_w = acc_w + part_w
            if need_b:
                part_b = d.sum(0)
                acc_b = part_b if acc_b is None else acc_b + part_b
        if need_w:
            if gw is not None:
                gw[v0 : v0 + c] = acc_w
            else:
                w_parts.append(acc_w.to(weight.dtype))
        if need_b:
            if gb is not None:
                gb[v0 : v0 + c] = acc_b
            else:
                b_parts.append(acc_b)
    if need_w and gw is None:
        gw = w_parts[0] if len(w_parts) == 1 else torch.cat(w_parts)
    if need_b and gb is None:
        gb = b_parts[0] if len(b_parts) == 1 else torch.cat(b_parts)
    if need_h and gh is None:
        gh = h_parts[0] if len(h_parts) == 1 else torch.cat(h_parts)
    return (
        None if gh is None else gh.to(hidden.dtype),
        gw,
        None if gb is None else gb.to(bias.dtype),
    )


class _FusedLinearLogps(torch.autograd.Function):
    """``(logps, lse, tile_lse)`` of ``log_softmax(hidden @ weight.T + bias)`` at ``labels``,
    in tiles; differentiable in ``logps`` (to ``hidden``, ``weight`` and ``bias``). Saves the
    inputs and the log-sum-exps ``(N,)`` and ``(N, tiles)``: nothing of size ``N * V``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden: Any, weight: Any, bias: Any, labels: Any, rows: int, cols: int) -> Any:
        return _fused_forward(hidden, weight, bias, labels, rows, cols)

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        hidden, weight, bias, labels, rows, cols = inputs
        _, lse, tile_lse = output
        ctx.mark_non_differentiable(lse, tile_lse)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, tile_lse)
        ctx.tile = (rows, cols)

    @staticmethod
    def backward(ctx: Any, grad: Any, _grad_lse: Any, _grad_tiles: Any) -> Any:
        hidden, weight, bias, labels, lse, tile_lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: the log-sum-exps as differentiable formulas
            _, lse, tile_lse = _fused_forward(hidden, weight, bias, labels, *ctx.tile)
        stats = (lse, tile_lse)
        gh, gw, gb = _fused_backward(hidden, weight, bias, labels, stats, grad, needs, ctx.tile)
        return gh, gw, gb, None, None, None


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
        """One ``autograd.Function`` over all the ``(B, T)`` positions (``_TokenLogps``).

        Forward: per chunk of ``rows * cols`` positions, the fused ``log_softmax`` written into
        one reused chunk buffer, of which the label's value is read (no log-softmax output, no
        ``(B, T, V)`` temporary). Backward: ``g * (onehot - softmax)`` written chunk by chunk,
        in place, into one preallocated gradient (low precision: through a float32 chunk
        buffer), so the peak is the gradient and one chunk. Under ``torch.compile``,
        ``torch.func`` and ``create_graph`` both are formulas over the whole tensor.
        """
        rows, cols = chunk
        logps, _ = _TokenLogps.apply(logits, labels, cdtype, rows * cols)
        return logps

    def fused_linear_logps(
        self,
        hidden: Array,
        weight: Array,
        bias: Array | None,
        labels: Array,
        cdtype: Any,
        tile: tuple[int, int],
    ) -> Array:
        """One ``autograd.Function`` over all the tiles: the forward keeps one tile (and its
        float32 copy in low precision) alive at a time and saves only the ``(N,)``
        log-sum-exp; the backward recomputes each tile and overwrites it with
        ``g * (onehot - softmax)`` (out of place under ``torch.compile``, ``torch.func`` and
        ``create_graph``), accumulating the weight gradient tile by tile in place."""
        logps, _, _ = _FusedLinearLogps.apply(hidden, weight, bias, labels, *tile)
        return logps

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
