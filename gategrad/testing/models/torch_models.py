"""PyTorch forward passes of the test-kit models (pure functions of a dict of tensors).

Works eagerly and under ``torch.func.grad`` and ``torch.compile``; the computation runs on whatever
device the parameters and inputs live on (no device is assumed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gategrad.testing.models._params import (
    GELU_C,
    LN_EPS,
    MASK_VALUE,
    TransformerConfig,
    check_dtype,
    check_tokens_shape,
)

__all__ = ["params_from_numpy", "softmax_logits", "to_numpy", "transformer_logits"]

Params = Mapping[str, torch.Tensor]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def params_from_numpy(
    np_params: Mapping[str, Any],
    dtype: str = "float64",
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Copy a NumPy parameter dict to tensors of ``dtype`` on ``device`` (``requires_grad=False``).

    Call ``.requires_grad_()`` on the values (or use ``torch.func.grad``) to differentiate.
    """
    dt = _DTYPES[check_dtype(dtype)]
    return {k: torch.tensor(np.asarray(v), dtype=dt, device=device) for k, v in np_params.items()}


def to_numpy(tree: Any) -> Any:
    """Return ``tree`` (tensor, dict, list or tuple of tensors) with leaves as ``np.ndarray``."""
    if isinstance(tree, Mapping):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_numpy(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().numpy()
    return np.asarray(tree)


def softmax_logits(params: Params, contexts: torch.Tensor) -> torch.Tensor:
    """``(N, D) -> (N, V)``: ``logits = contexts @ W + b`` (contexts cast to ``W.dtype``)."""
    w = params["W"]
    return contexts.to(dtype=w.dtype) @ w + params["b"]


def layer_norm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis: ``(x - mean) / sqrt(var + 1e-5) * g + b`` (biased var)."""
    mu = x.mean(dim=-1, keepdim=True)
    xc = x - mu
    var = (xc * xc).mean(dim=-1, keepdim=True)
    return xc / torch.sqrt(var + LN_EPS) * g + b


def gelu(x: torch.Tensor) -> torch.Tensor:
    """tanh GELU: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + torch.tanh(GELU_C * (x + 0.044715 * (x * x * x))))


def _attention(
    params: Params, prefix: str, h: torch.Tensor, allowed: torch.Tensor, n_heads: int
) -> torch.Tensor:
    """Multi-head self-attention ``(B, T, d) -> (B, T, d)``; ``allowed``: ``(B, 1, T, T)``."""
    bsz, seq, d = h.shape
    dh = d // n_heads

    def heads(x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, H, T, dh)
        return x.reshape(bsz, seq, n_heads, dh).transpose(1, 2)

    q = heads(h @ params[prefix + "wq"])
    k = heads(h @ params[prefix + "wk"])
    v = heads(h @ params[prefix + "wv"])
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(dh))
    probs = torch.softmax(torch.where(allowed, scores, MASK_VALUE), dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(bsz, seq, d)
    return out @ params[prefix + "wo"]


def _mlp(params: Params, prefix: str, h: torch.Tensor) -> torch.Tensor:
    """``gelu(h @ w1 + b1) @ w2 + b2``."""
    u = gelu(h @ params[prefix + "w1"] + params[prefix + "b1"])
    return u @ params[prefix + "w2"] + params[prefix + "b2"]


def _allowed_mask(
    seq: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """``(B|1, 1, T, T)`` bool: query ``i`` sees key ``j`` iff ``j <= i`` and ``j`` not padded."""
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask is not None:
        allowed = allowed & (attention_mask != 0)[:, None, None, :]
    return allowed


def transformer_logits(
    params: Params,
    tokens: torch.Tensor,
    cfg: TransformerConfig,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``(B, T, V)`` of the pre-LN causal transformer for int ``tokens`` ``(B, T)``.

    ``x = tok_emb[tokens] + pos_emb[:T]``; per layer ``x += attn(LN1(x))``, ``x += mlp(LN2(x))``;
    ``logits = LN_f(x) @ tok_emb.T``. ``attention_mask`` ``(B, T)`` of 0/1 hides padded keys.
    """
    seq = check_tokens_shape(
        tuple(tokens.shape), cfg, None if attention_mask is None else tuple(attention_mask.shape)
    )
    emb = params["tok_emb"]
    x = F.embedding(tokens, emb) + params["pos_emb"][:seq]
    allowed = _allowed_mask(seq, attention_mask, x.device)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = layer_norm(x, params[p + "ln1.g"], params[p + "ln1.b"])
        x = x + _attention(params, p + "attn.", h, allowed, cfg.n_heads)
        h = layer_norm(x, params[p + "ln2.g"], params[p + "ln2.b"])
        x = x + _mlp(params, p + "mlp.", h)
    x = layer_norm(x, params["ln_f.g"], params["ln_f.b"])
    return x @ emb.T
