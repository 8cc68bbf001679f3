"""JAX forward passes of the test-kit models (pure functions of a dict of ``jax.Array``).

Works under ``jax.jit`` and ``jax.grad``. ``cfg`` is a hashable frozen dataclass:
close over it or mark it static, e.g. ``jax.jit(transformer_logits, static_argnames="cfg")``.
float64 needs ``jax.config.update("jax_enable_x64", True)`` before arrays are created.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
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

Params = Mapping[str, jax.Array]


def params_from_numpy(np_params: Mapping[str, Any], dtype: str = "float64") -> dict[str, jax.Array]:
    """Convert a NumPy parameter dict to ``jax.Array`` of ``dtype`` on the default device.

    Raises ``RuntimeError`` for ``'float64'`` unless ``jax_enable_x64`` is on (JAX would otherwise
    silently produce float32).
    """
    name = check_dtype(dtype)
    if name == "float64" and not jax.config.read("jax_enable_x64"):
        raise RuntimeError(
            "float64 JAX arrays need jax.config.update('jax_enable_x64', True) first"
        )
    dt = jnp.dtype(name)
    return {k: jnp.asarray(np.asarray(v), dtype=dt) for k, v in np_params.items()}


def to_numpy(tree: Any) -> Any:
    """Return ``tree`` (array, dict, list or tuple of arrays) with leaves as ``np.ndarray``."""
    if isinstance(tree, Mapping):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_numpy(v) for v in tree)
    return np.asarray(tree)


def softmax_logits(params: Params, contexts: jax.Array) -> jax.Array:
    """``(N, D) -> (N, V)``: ``logits = contexts @ W + b`` (contexts cast to ``W.dtype``)."""
    w = params["W"]
    return contexts.astype(w.dtype) @ w + params["b"]


def layer_norm(x: jax.Array, g: jax.Array, b: jax.Array) -> jax.Array:
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + 1e-5) * g + b`` (biased var)."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)
    return xc / jnp.sqrt(var + LN_EPS) * g + b


def gelu(x: jax.Array) -> jax.Array:
    """tanh GELU: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + jnp.tanh(GELU_C * (x + 0.044715 * (x * x * x))))


def _attention(
    params: Params, prefix: str, h: jax.Array, allowed: jax.Array, n_heads: int
) -> jax.Array:
    """Multi-head self-attention ``(B, T, d) -> (B, T, d)``; ``allowed``: ``(B, 1, T, T)``."""
    bsz, seq, d = h.shape
    dh = d // n_heads

    def heads(x: jax.Array) -> jax.Array:  # (B, T, d) -> (B, H, T, dh)
        return x.reshape(bsz, seq, n_heads, dh).transpose(0, 2, 1, 3)

    q = heads(h @ params[prefix + "wq"])
    k = heads(h @ params[prefix + "wk"])
    v = heads(h @ params[prefix + "wv"])
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(dh))
    probs = jax.nn.softmax(jnp.where(allowed, scores, MASK_VALUE), axis=-1)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(bsz, seq, d)
    return out @ params[prefix + "wo"]


def _mlp(params: Params, prefix: str, h: jax.Array) -> jax.Array:
    """``gelu(h @ w1 + b1) @ w2 + b2``."""
    u = gelu(h @ params[prefix + "w1"] + params[prefix + "b1"])
    return u @ params[prefix + "w2"] + params[prefix + "b2"]


def _allowed_mask(seq: int, attention_mask: jax.Array | None) -> jax.Array:
    """``(B|1, 1, T, T)`` bool: query ``i`` sees key ``j`` iff ``j <= i`` and ``j`` not padded."""
    allowed = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None, None]
    if attention_mask is not None:
        allowed = allowed & (jnp.asarray(attention_mask) != 0)[:, None, None, :]
    return allowed


def transformer_logits(
    params: Params,
    tokens: jax.Array,
    cfg: TransformerConfig,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Logits ``(B, T, V)`` of the pre-LN causal transformer for int ``tokens`` ``(B, T)``.

    ``x = tok_emb[tokens] + pos_emb[:T]``; per layer ``x += attn(LN1(x))``, ``x += mlp(LN2(x))``;
    ``logits = LN_f(x) @ tok_emb.T``. ``attention_mask`` ``(B, T)`` of 0/1 hides padded keys.
    """
    tokens = jnp.asarray(tokens)
    seq = check_tokens_shape(
        tokens.shape, cfg, None if attention_mask is None else jnp.shape(attention_mask)
    )
    emb = params["tok_emb"]
    x = jnp.take(emb, tokens, axis=0) + params["pos_emb"][:seq]
    allowed = _allowed_mask(seq, attention_mask)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = layer_norm(x, params[p + "ln1.g"], params[p + "ln1.b"])
        x = x + _attention(params, p + "attn.", h, allowed, cfg.n_heads)
        h = layer_norm(x, params[p + "ln2.g"], params[p + "ln2.b"])
        x = x + _mlp(params, p + "mlp.", h)
    x = layer_norm(x, params["ln_f.g"], params["ln_f.b"])
    return x @ emb.T
