"""NumPy reference forward passes (float64 by default) for the test-kit models.

Same maths as ``torch_models``, ``jax_models`` and ``mlx_models``; these are the ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

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

Params = Mapping[str, np.ndarray]


def params_from_numpy(
    np_params: Mapping[str, Any], dtype: str = "float64"
) -> dict[str, np.ndarray]:
    """Copy a parameter dict, casting every array to ``dtype`` ('float32' or 'float64')."""
    dt = np.dtype(check_dtype(dtype))
    return {k: np.array(v, dtype=dt, copy=True) for k, v in np_params.items()}


def to_numpy(tree: Any) -> Any:
    """Return ``tree`` (array, dict, list or tuple of arrays) with leaves as ``np.ndarray``."""
    if isinstance(tree, Mapping):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_numpy(v) for v in tree)
    return np.asarray(tree)


def softmax_logits(params: Params, contexts: np.ndarray) -> np.ndarray:
    """``(N, D) -> (N, V)``: ``logits = contexts @ W + b`` (contexts cast to ``W.dtype``)."""
    w = params["W"]
    return np.asarray(contexts, dtype=w.dtype) @ w + params["b"]


def layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + 1e-5) * g + b`` (biased var)."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / np.sqrt(var + LN_EPS) * g + b


def gelu(x: np.ndarray) -> np.ndarray:
    """tanh GELU: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + 0.044715 * (x * x * x))))


def _softmax(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _attention(
    params: Params, prefix: str, h: np.ndarray, allowed: np.ndarray, n_heads: int
) -> np.ndarray:
    """Multi-head self-attention ``(B, T, d) -> (B, T, d)``; ``allowed``: ``(B, 1, T, T)``."""
    bsz, seq, d = h.shape
    dh = d // n_heads

    def heads(x: np.ndarray) -> np.ndarray:  # (B, T, d) -> (B, H, T, dh)
        return x.reshape(bsz, seq, n_heads, dh).transpose(0, 2, 1, 3)

    q = heads(h @ params[prefix + "wq"])
    k = heads(h @ params[prefix + "wk"])
    v = heads(h @ params[prefix + "wv"])
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(dh))
    probs = _softmax(np.where(allowed, scores, MASK_VALUE))
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(bsz, seq, d)
    return out @ params[prefix + "wo"]


def _mlp(params: Params, prefix: str, h: np.ndarray) -> np.ndarray:
    """``gelu(h @ w1 + b1) @ w2 + b2``."""
    u = gelu(h @ params[prefix + "w1"] + params[prefix + "b1"])
    return u @ params[prefix + "w2"] + params[prefix + "b2"]


def _allowed_mask(seq: int, attention_mask: np.ndarray | None) -> np.ndarray:
    """``(B|1, 1, T, T)`` bool: query ``i`` sees key ``j`` iff ``j <= i`` and ``j`` not padded."""
    allowed = np.tril(np.ones((seq, seq), dtype=bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & (np.asarray(attention_mask) != 0)[:, None, None, :]
    return allowed


def transformer_logits(
    params: Params,
    tokens: np.ndarray,
    cfg: TransformerConfig,
    attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Logits ``(B, T, V)`` of the pre-LN causal transformer for int ``tokens`` ``(B, T)``.

    ``x = tok_emb[tokens] + pos_emb[:T]``; per layer ``x += attn(LN1(x))``, ``x += mlp(LN2(x))``;
    ``logits = LN_f(x) @ tok_emb.T``. ``attention_mask`` ``(B, T)`` of 0/1 hides padded keys.
    """
    tokens = np.asarray(tokens)
    seq = check_tokens_shape(
        tokens.shape, cfg, None if attention_mask is None else np.shape(attention_mask)
    )
    emb = params["tok_emb"]
    x = emb[tokens] + params["pos_emb"][:seq]
    allowed = _allowed_mask(seq, attention_mask)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = layer_norm(x, params[p + "ln1.g"], params[p + "ln1.b"])
        x = x + _attention(params, p + "attn.", h, allowed, cfg.n_heads)
        h = layer_norm(x, params[p + "ln2.g"], params[p + "ln2.b"])
        x = x + _mlp(params, p + "mlp.", h)
    x = layer_norm(x, params["ln_f.g"], params["ln_f.b"])
    return x @ emb.T
