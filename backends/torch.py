"""PyTorch backend: a new-style ``autograd.Function`` whose backward scales the cotangent.

Works in eager mode, under ``torch.compile`` (``fullgraph=True``), ``torch.func.grad`` / ``vmap``
(``generate_vmap_rule``) and activation checkpointing, for float16/bfloat16/float32/float64.
The weight is computed in the forward (stop-gradient) and saved; backward is
``grad_x = (grad_out.to(w.dtype) * w).to(grad_out.dtype)``.
"""

from __future__ import annotations

from typing import Any

try:
    import torch
except ImportError as err:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "gategrad.backends.torch needs PyTorch: pip install 'gategrad[torch]'"
    ) from err

import numpy as np


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward ``w * grad`` (``w`` is not differentiated)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return (grad.to(weight.dtype) * weight).to(grad.dtype), None


def _is_functorch_wrapped(x: torch.Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


class TorchOps:
    """:class:`gategrad._xp.ArrayOps` for ``torch.Tensor``."""

    name = "torch"

    def scale_grad(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _ScaleGrad.apply(x, weight.detach())

    def stop_gradient(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()

    def is_concrete(self, x: torch.Tensor) -> bool:
        if torch.compiler.is_compiling() or x.device.type == "meta":
            return False
        return not _is_functorch_wrapped(x)

    def to_numpy(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.cpu().numpy()

    def from_numpy(self, a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(like.device)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32)

    def astype(self, x: torch.Tensor, dtype: Any) -> torch.Tensor:
        return x.to(dtype)

    def is_floating(self, x: torch.Tensor) -> bool:
        return bool(x.is_floating_point())

    def bool_mask(self, mask: torch.Tensor) -> torch.Tensor:
        return mask if mask.dtype == torch.bool else mask != 0

    def exp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)

    def log(self, x: Any) -> torch.Tensor:
        return torch.log(x)

    def sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)

    def where(self, cond: Any, a: Any, b: Any) -> torch.Tensor:
        return torch.where(cond, a, b)

    def minimum(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.minimum(a, b)

    def sum(self, x: torch.Tensor, axis: int = -1) -> torch.Tensor:
        return torch.sum(x, dim=axis)

    def min(self, x: torch.Tensor, axis: int = -1) -> torch.Tensor:
        return torch.amin(x, dim=axis)

    def sort(self, x: torch.Tensor, axis: int = -1) -> torch.Tensor:
        return torch.sort(x, dim=axis).values

    def take_along_axis(self, x: torch.Tensor, idx: torch.Tensor, axis: int = -1) -> torch.Tensor:
        return torch.take_along_dim(x, idx, dim=axis)

    def full_like(self, x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full_like(x, value)

    def isnan(self, x: torch.Tensor) -> torch.Tensor:
        return torch.isnan(x)

    def any(self, x: torch.Tensor) -> bool:
        return bool(torch.any(x))

    def nonzero_rows(self, x: torch.Tensor) -> list[int]:
        return [int(i) for i in torch.nonzero(x.reshape(-1)).reshape(-1).tolist()]

    def logsumexp(self, x: torch.Tensor, axis: int = -1) -> torch.Tensor:
        return torch.logsumexp(x, dim=axis)

    def log_sigmoid(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.logsigmoid(x)

    def maximum(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.maximum(a, b)

    def mean(self, x: torch.Tensor, axis: int | None = None) -> torch.Tensor:
        return torch.mean(x) if axis is None else torch.mean(x, dim=axis)

    def concatenate(self, xs: list[torch.Tensor], axis: int = 0) -> torch.Tensor:
        return torch.cat(list(xs), dim=axis)

    def as_index(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == torch.int64 else x.to(torch.int64)

    def checkpoint(self, fn: Any, *args: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and any(a.requires_grad for a in args):
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


ops = TorchOps()
