"""MLX forward passes of the test-kit models (pure functions of a dict of ``mx.array``).

Works under ``mx.grad``, ``mx.value_and_grad`` and ``mx.compile`` (close over ``cfg``). float32
runs on any device, Metal included; MLX float64 exists on the CPU only, so use it with
``mx.set_default_device(mx.cpu)``. MLX float64 transcendental functions are only ~1e-7 accurate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import numpy as np

from gategrad.testing.models._params import (
    GELU_C,
    LN_EPS,
    MASK_VALUE,
    TransformerConfig,
    check_dtype,
    check_tokens_shape,
)

__all__ = ["params_from_numpy", "softmax_logits", "to_numpy", "transformer_logits"]

Params = Mapping[str, mx.array]


def params_from_numpy(np_params: Mapping[str, Any], dtype: str = "float64") -> dict[str, mx.array]:
    """Convert a NumPy parameter dict to ``mx.array`` of ``dtype``.

    The dtype is passed explicitly: ``mx.array(np_float64)`` alone would silently give float32.
    Raises ``RuntimeError`` for ``'float64'`` when the default device is a GPU (unsupported there).
    """
    name = check_dtype(dtype)
    if name == "float64" and mx.default_device().type == mx.DeviceType.gpu:
        raise RuntimeError("MLX float64 is CPU-only: call mx.set_default_device(mx.cpu) first")
    dt = mx.float64 if name == "float64" else mx.float32
    return {k: mx.array(np.asarray(v), dtype=dt) for k, v in np_params.items()}


def to_numpy(tree: Any) -> Any:
    """Return ``tree`` (array, dict, list or tuple of arrays) with leaves as ``np.ndarray``."""
    if isinstance(tree, Mapping):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_numpy(v) for v in tree)
    return np.array(tree)


def softmax_logits(params: Params, contexts: mx.array) -> mx.array:
    """``(N, D) -> (N, V)``: ``logits = contexts @ W + b`` (contexts cast to ``W.dtype``)."""
    w = params["W"]
    return contexts.astype(w.dtype) @ w + params["b"]


def layer_norm(x: mx.array, g: mx.array, b: mx.array) -> mx.array:
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + 1e-5) * g + b`` (biased var)."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / mx.sqrt(var + LN_EPS) * g + b


def gelu(x: mx.array) -> mx.array:
    """tanh GELU: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + mx.tanh(GELU_C * (x + 0.044715 * (x * x * x))))


def _attention(
    params: Params, prefix: str, h: mx.array, allowed: mx.array, n_heads: int
) -> mx.array:
    """Multi-head self-attention ``(B, T, d) -> (B, T, d)``; ``allowed``: ``(B, 1, T, T)``."""
    bsz, seq, d = h.shape
    dh = d // n_heads

    def heads(x: mx.array) -> mx.array:  # (B, T, d) -> (B, H, T, dh)
        return x.reshape(bsz, seq, n_heads, dh).transpose(0, 2, 1, 3)

    q = heads(h @ params[prefix + "wq"])
    k = heads(h @ params[prefix + "wk"])
    v = heads(h @ params[prefix + "wv"])
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(dh))
    probs = mx.softmax(mx.where(allowed, scores, MASK_VALUE), axis=-1, precise=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(bsz, seq, d)
    return out @ params[prefix + "wo"]


def _mlp(params: Params, prefix: str, h: mx.array) -> mx.array:
    """``gelu(h @ w1 + b1) @ w2 + b2``."""
    u = gelu(h @ params[prefix + "w1"] + params[prefix + "b1"])
    return u @ params[prefix + "w2"] + params[prefix + "b2"]


def _allowed_mask(seq: int, attention_mask: mx.array | None) -> mx.array:
    """``(B|1, 1, T, T)`` bool: query ``i`` sees key ``j`` iff ``j <= i`` and ``j`` not padded."""
    allowed = mx.tril(mx.ones((seq, seq), dtype=mx.bool_))[None, None]
    if attention_mask is not None:
        allowed = mx.logical_and(allowed, (attention_mask != 0)[:, None, None, :])
    return allowed


def transformer_logits(
    params: Params,
    tokens: mx.array,
    cfg: TransformerConfig,
    attention_mask: mx.array | None = None,
) -> mx.array:
    """Logits ``(B, T, V)`` of the pre-LN causal transformer for int ``tokens`` ``(B, T)``.

    ``x = tok_emb[tokens] + pos_emb[:T]``; per layer ``x += attn(LN1(x))``, ``x += mlp(LN2(x))``;
    ``logits = LN_f(x) @ tok_emb.T``. ``attention_mask`` ``(B, T)`` of 0/1 hides padded keys.
    """
    seq = check_tokens_shape(
        tokens.shape, cfg, None if attention_mask is None else attention_mask.shape
    )
    emb = params["tok_emb"]
    x = mx.take(emb, tokens, axis=0) + params["pos_emb"][:seq]
    allowed = _allowed_mask(seq, attention_mask)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = layer_norm(x, params[p + "ln1.g"], params[p + "ln1.b"])
        x = x + _attention(params, p + "attn.", h, allowed, cfg.n_heads)
        h = layer_norm(x, params[p + "ln2.g"], params[p + "ln2.b"])
        x = x + _mlp(params, p + "mlp.", h)
    x = layer_norm(x, params["ln_f.g"], params["ln_f.b"])
    return x @ emb.T
