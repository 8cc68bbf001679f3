"""The forward passes of the test-kit models, written once for every framework.

Each function finds its backend from the parameters' arrays (``gategrad._dispatch.backend_for``)
and computes with that backend's operations only, so NumPy, PyTorch, JAX and MLX run the same
maths: ``x @ W`` matmuls, LayerNorm with the biased variance and [`LN_EPS`][], the tanh GELU
with [`GELU_C`][], masked attention scores set to [`MASK_VALUE`][] and the backend's
``softmax`` (MLX: ``precise=True``). Nothing here imports a framework: a framework is loaded only
when [`params_from_numpy`][] names it.

The functions are pure (dicts of arrays in, arrays out), so they run under ``torch.compile``,
``torch.func``, ``jax.jit`` / ``jax.grad`` (close over ``cfg``, or mark it static) and
``mx.compile`` / ``mx.grad``. NumPy ``tokens`` and ``attention_mask`` are converted to the
parameters' framework.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from gategrad._backend import Array, Backend
from gategrad._dispatch import backend_for, get_backend
from gategrad.testing._adapters import to_numpy as array_to_numpy
from gategrad.testing.models._params import (
    GELU_C,
    LN_EPS,
    MASK_VALUE,
    TransformerConfig,
    check_dtype,
    check_tokens_shape,
)

__all__ = [
    "bind",
    "gelu",
    "layer_norm",
    "params_from_numpy",
    "softmax_logits",
    "to_numpy",
    "transformer_logits",
]

Params = Mapping[str, Array]


# ------------------------------------------------------------------------------------------
# conversion


def params_from_numpy(
    np_params: Mapping[str, Any],
    backend: str,
    dtype: str = "float64",
    device: Any = None,
) -> dict[str, Array]:
    """Copy a NumPy parameter dict to arrays of framework ``backend`` (``'numpy'``, ``'torch'``,
    ``'jax'``, ``'mlx'``) and ``dtype`` (``'float32'`` or ``'float64'``).

    The arrays never share memory with ``np_params`` (an in-place update does not reach the
    NumPy source) and do not require gradients. ``device``: where the arrays live, for a
    framework whose arrays move with ``.to(device)`` (PyTorch); ``None`` is the default device.

    Raises:
        ValueError: an unknown backend or dtype, or a ``device`` the framework cannot take.
        ImportError: the framework is not installed (the message names the pip extra).
        RuntimeError: the framework cannot compute ``dtype`` on its default device: JAX
            float64 without ``jax_enable_x64``, MLX float64 on a GPU.
    """
    name = check_dtype(dtype)
    ops = get_backend(backend)
    # float64 first: exact for float32 sources, and a fresh copy that torch.from_numpy may share
    out = {
        k: ops.from_numpy(np.array(v, dtype=np.float64), dtype=name) for k, v in np_params.items()
    }
    if device is not None:
        out = {k: _to_device(ops, v, device) for k, v in out.items()}
    if name == "float64" and out:
        _check_computable(ops, next(iter(out.values())))
    return out


def _to_device(ops: Backend, x: Array, device: Any) -> Array:
    move = getattr(x, "to", None)
    if move is None:
        raise ValueError(
            f"device={device!r}: {ops.name} arrays are placed by the framework's default device"
        )
    return move(device)


def _check_computable(ops: Backend, x: Array) -> None:
    """Raise ``RuntimeError`` when the backend cannot compute with ``x``'s dtype where ``x``
    lives (MLX float64 on a GPU: the array is made, but evaluating anything with it fails)."""
    try:
        ops.evaluate(x + x)
    except (ValueError, RuntimeError) as err:
        raise RuntimeError(
            f"{ops.name} cannot compute float64 on its default device ({err}); MLX float64 is "
            "CPU-only: call mx.set_default_device(mx.cpu) first"
        ) from err


def to_numpy(tree: Any) -> Any:
    """``tree`` (an array, or a dict, list or tuple of arrays) with every leaf as ``np.ndarray``
    (any framework's; bfloat16 is widened to float32)."""
    if isinstance(tree, Mapping):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_numpy(v) for v in tree)
    return array_to_numpy(tree)


def _native(ops: Backend, x: Any, like: Array) -> Array:
    """``x`` as an array of ``ops``' framework (NumPy input converted, on ``like``'s device)."""
    return ops.from_numpy(x, like=like) if isinstance(x, np.ndarray) else x


# ------------------------------------------------------------------------------------------
# the toy softmax


def softmax_logits(params: Params, contexts: Array) -> Array:
    """``(N, D) -> (N, V)``: ``logits = contexts @ W + b`` (contexts cast to ``W.dtype``)."""
    w = params["W"]
    ops = backend_for(W=w)
    return ops.astype(_native(ops, contexts, w), w.dtype) @ w + params["b"]


# ------------------------------------------------------------------------------------------
# the tiny transformer


def layer_norm(ops: Backend, x: Array, g: Array, b: Array) -> Array:
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + 1e-5) * g + b`` (biased var)."""
    mu = ops.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = ops.mean(xc * xc, axis=-1, keepdims=True)
    return xc / ops.sqrt(var + LN_EPS) * g + b


def gelu(ops: Backend, x: Array) -> Array:
    """tanh GELU: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + ops.tanh(GELU_C * (x + 0.044715 * (x * x * x))))


def _attention(
    ops: Backend, params: Params, prefix: str, h: Array, allowed: Array, n_heads: int
) -> Array:
    """Multi-head self-attention ``(B, T, d) -> (B, T, d)``; ``allowed``: ``(B|1, 1, T, T)``."""
    bsz, seq, d = h.shape
    dh = d // n_heads

    def heads(x: Array) -> Array:  # (B, T, d) -> (B, H, T, dh)
        return ops.permute_dims(ops.reshape(x, (bsz, seq, n_heads, dh)), (0, 2, 1, 3))

    q = heads(h @ params[prefix + "wq"])
    k = heads(h @ params[prefix + "wk"])
    v = heads(h @ params[prefix + "wv"])
    scores = (q @ ops.permute_dims(k, (0, 1, 3, 2))) * (1.0 / math.sqrt(dh))
    probs = ops.softmax(ops.where(allowed, scores, MASK_VALUE), axis=-1)
    out = ops.reshape(ops.permute_dims(probs @ v, (0, 2, 1, 3)), (bsz, seq, d))
    return out @ params[prefix + "wo"]


def _mlp(ops: Backend, params: Params, prefix: str, h: Array) -> Array:
    """``gelu(h @ w1 + b1) @ w2 + b2``."""
    u = gelu(ops, h @ params[prefix + "w1"] + params[prefix + "b1"])
    return u @ params[prefix + "w2"] + params[prefix + "b2"]


def _allowed_mask(ops: Backend, seq: int, attention_mask: Array | None, like: Array) -> Array:
    """``(B|1, 1, T, T)`` bool: query ``i`` sees key ``j`` iff ``j <= i`` and ``j`` not padded."""
    allowed = ops.tril_mask(seq, like)[None, None]
    if attention_mask is not None:
        # a logical and; not `&`, which mx.vmap (MLX 0.32) gets wrong for an unbatched left
        # operand broadcast against a batched right one
        allowed = ops.where(allowed, ops.bool_mask(attention_mask)[:, None, None, :], False)
    return allowed


def transformer_logits(
    params: Params,
    tokens: Array,
    cfg: TransformerConfig,
    attention_mask: Array | None = None,
) -> Array:
    """Logits ``(B, T, V)`` of the pre-LN causal transformer for int ``tokens`` ``(B, T)``.

    ``x = tok_emb[tokens] + pos_emb[:T]``; per layer ``x += attn(LN1(x))``, ``x += mlp(LN2(x))``;
    ``logits = LN_f(x) @ tok_emb.T`` (a tied head). ``attention_mask`` ``(B, T)`` of 0/1 hides
    padded keys.
    """
    emb = params["tok_emb"]
    ops = backend_for(tok_emb=emb)
    tokens = _native(ops, tokens, emb)
    if attention_mask is not None:
        attention_mask = _native(ops, attention_mask, emb)
    seq = check_tokens_shape(
        tuple(tokens.shape), cfg, None if attention_mask is None else tuple(attention_mask.shape)
    )
    x = ops.take(emb, ops.as_index(tokens), axis=0) + params["pos_emb"][:seq]
    allowed = _allowed_mask(ops, seq, attention_mask, x)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = layer_norm(ops, x, params[p + "ln1.g"], params[p + "ln1.b"])
        x = x + _attention(ops, params, p + "attn.", h, allowed, cfg.n_heads)
        h = layer_norm(ops, x, params[p + "ln2.g"], params[p + "ln2.b"])
        x = x + _mlp(ops, params, p + "mlp.", h)
    x = layer_norm(ops, x, params["ln_f.g"], params["ln_f.b"])
    return x @ ops.permute_dims(emb, (1, 0))


ParamsFromNumpy = Callable[..., dict[str, Array]]
Forward = Callable[..., Array]


def bind(backend: str) -> tuple[ParamsFromNumpy, Forward, Forward, Callable[[Any], Any]]:
    """``(params_from_numpy, softmax_logits, transformer_logits, to_numpy)`` with the framework
    bound, as ``gategrad.testing.models.<backend>_models`` exports them:
    ``params_from_numpy(np_params, dtype="float64", device=None)``. Imports the framework now
    (``ImportError`` naming the pip extra when it is missing)."""
    get_backend(backend)

    def bound_params_from_numpy(
        np_params: Mapping[str, Any], dtype: str = "float64", device: Any = None
    ) -> dict[str, Array]:
        return params_from_numpy(np_params, backend, dtype, device)

    bound_params_from_numpy.__doc__ = (
        f"``params_from_numpy(np_params, {backend!r}, dtype, device)``: see "
        ":func:`gategrad.testing.models.params_from_numpy`."
    )
    return bound_params_from_numpy, softmax_logits, transformer_logits, to_numpy
