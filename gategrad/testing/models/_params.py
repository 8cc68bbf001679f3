"""Configs and NumPy (float64) parameter initialisation for the reference models.

Nothing here imports a deep-learning framework: parameters are plain ``np.ndarray`` dicts that
[`gategrad.testing.models.params_from_numpy`][] converts to any framework.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "LN_EPS",
    "MASK_VALUE",
    "GELU_C",
    "DTypeName",
    "SoftmaxConfig",
    "TransformerConfig",
    "check_dtype",
    "check_tokens_shape",
    "init_softmax_params",
    "init_transformer_params",
    "make_shared_contexts",
    "transformer_param_shapes",
]

DTypeName = Literal["float32", "float64"]

LN_EPS: float = 1e-5
"""LayerNorm epsilon used by every framework implementation."""

MASK_VALUE: float = -1e9
"""Finite score given to masked attention logits (finite, so fully masked rows stay finite)."""

GELU_C: float = math.sqrt(2.0 / math.pi)
"""Constant of the tanh GELU approximation, shared so that all frameworks agree bit for bit."""


def _require_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class SoftmaxConfig:
    """Toy softmax regression: ``logits = contexts @ W + b``.

    Attributes:
        vocab: number of classes ``V``.
        dim: context dimension ``D``.
    """

    vocab: int
    dim: int

    def __post_init__(self) -> None:
        _require_positive("vocab", self.vocab)
        _require_positive("dim", self.dim)


@dataclass(frozen=True)
class TransformerConfig:
    """Tiny pre-LayerNorm decoder-only transformer with a tied output head.

    Attributes:
        vocab: vocabulary size ``V``.
        d_model: residual width ``d``; must be divisible by ``n_heads``.
        n_heads: attention heads ``H`` (head size ``d // H``).
        n_layers: number of blocks, 1..8.
        d_ff: MLP hidden width.
        max_len: longest sequence ``T`` (rows of ``pos_emb``).
    """

    vocab: int = 32
    d_model: int = 16
    n_heads: int = 2
    n_layers: int = 2
    d_ff: int = 32
    max_len: int = 16

    def __post_init__(self) -> None:
        for name in ("vocab", "d_model", "n_heads", "n_layers", "d_ff", "max_len"):
            _require_positive(name, getattr(self, name))
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if not 1 <= self.n_layers <= 8:
            raise ValueError(f"n_layers must be in 1..8, got {self.n_layers}")

    @property
    def head_dim(self) -> int:
        """Per-head width ``d_model // n_heads``."""
        return self.d_model // self.n_heads


def check_dtype(dtype: str) -> DTypeName:
    """Validate a dtype name; only ``'float32'`` and ``'float64'`` are accepted."""
    if dtype == "float32":
        return "float32"
    if dtype == "float64":
        return "float64"
    raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")


def check_tokens_shape(
    shape: Sequence[int], cfg: TransformerConfig, mask_shape: Sequence[int] | None = None
) -> int:
    """Check ``tokens`` is ``(B, T)`` with ``T <= cfg.max_len`` (and the mask matches); return T."""
    if len(shape) != 2:
        raise ValueError(f"tokens must have shape (B, T), got {tuple(shape)}")
    seq_len = shape[1]
    if seq_len > cfg.max_len:
        raise ValueError(f"sequence length {seq_len} exceeds cfg.max_len={cfg.max_len}")
    if mask_shape is not None and tuple(mask_shape) != tuple(shape):
        raise ValueError(
            f"attention_mask shape {tuple(mask_shape)} must equal tokens shape {tuple(shape)}"
        )
    return seq_len


def _normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    return rng.normal(0.0, std, size=shape).astype(np.float64)


def init_softmax_params(cfg: SoftmaxConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Float64 parameters of the softmax model.

    Returns ``{"W": (dim, vocab), "b": (vocab,)}`` with ``W ~ N(0, 0.5^2)`` and ``b ~ N(0, 0.1^2)``,
    so unit-norm contexts give logits of order 1.
    """
    rng = np.random.default_rng(seed)
    return {
        "W": _normal(rng, (cfg.dim, cfg.vocab), 0.5),
        "b": _normal(rng, (cfg.vocab,), 0.1),
    }


def make_shared_contexts(n: int, dim: int, shared: float = 0.8, seed: int = 0) -> np.ndarray:
    """Float64 ``(n, dim)`` unit-norm context vectors that share one common direction.

    ``c_i = normalise(shared * u + sqrt(1 - shared^2) * e_i)`` with ``u`` a random unit vector and
    ``e_i`` independent random unit vectors, so ``c_i . c_j ~= shared^2`` for ``i != j``.
    ``shared=0`` gives independent contexts, ``shared=1`` identical ones.
    """
    _require_positive("n", n)
    _require_positive("dim", dim)
    if not 0.0 <= shared <= 1.0:
        raise ValueError(f"shared must be in [0, 1], got {shared!r}")
    rng = np.random.default_rng(seed)
    common = rng.normal(size=dim)
    common /= np.linalg.norm(common)
    noise = rng.normal(size=(n, dim))
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    ctx = shared * common[None, :] + math.sqrt(1.0 - shared * shared) * noise
    norms = np.linalg.norm(ctx, axis=1, keepdims=True)
    return np.asarray(ctx / np.maximum(norms, 1e-12), dtype=np.float64)


def transformer_param_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Ordered map from parameter name to shape (the keys of ``init_transformer_params``)."""
    d, f = cfg.d_model, cfg.d_ff
    shapes: dict[str, tuple[int, ...]] = {
        "tok_emb": (cfg.vocab, d),
        "pos_emb": (cfg.max_len, d),
    }
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes.update(
            {
                p + "ln1.g": (d,),
                p + "ln1.b": (d,),
                p + "attn.wq": (d, d),
                p + "attn.wk": (d, d),
                p + "attn.wv": (d, d),
                p + "attn.wo": (d, d),
                p + "ln2.g": (d,),
                p + "ln2.b": (d,),
                p + "mlp.w1": (d, f),
                p + "mlp.b1": (f,),
                p + "mlp.w2": (f, d),
                p + "mlp.b2": (d,),
            }
        )
    shapes["ln_f.g"] = (d,)
    shapes["ln_f.b"] = (d,)
    return shapes


def _init_std(name: str, shape: tuple[int, ...], cfg: TransformerConfig) -> tuple[float, float]:
    """(mean, std) of the normal init for one parameter."""
    leaf = name.rsplit(".", 1)[-1]
    if name == "tok_emb":
        return 0.0, 0.2
    if name == "pos_emb":
        return 0.0, 0.1
    if leaf == "g":  # LayerNorm gain: around 1, perturbed so its gradient is not trivial
        return 1.0, 0.1
    if leaf in ("b", "b1", "b2"):  # biases: small but nonzero
        return 0.0, 0.05
    std = 0.5 / math.sqrt(shape[0])  # fan-in scaling
    if leaf in ("wo", "w2"):  # residual-branch outputs, GPT-2 style depth scaling
        std /= math.sqrt(2.0 * cfg.n_layers)
    return 0.0, std


def init_transformer_params(cfg: TransformerConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Float64 tiny-transformer parameters: a flat dict keyed as ``transformer_param_shapes``.

    Embeddings ``N(0, 0.2^2)`` / ``N(0, 0.1^2)``; projections ``N(0, (0.5/sqrt(fan_in))^2)``, output
    projections (``wo``, ``w2``) further divided by ``sqrt(2 n_layers)``; LayerNorm gains
    ``N(1, 0.1^2)``; all biases ``N(0, 0.05^2)``. Logits ``h @ tok_emb.T`` are then of order 1.
    """
    rng = np.random.default_rng(seed)
    params: dict[str, np.ndarray] = {}
    for name, shape in transformer_param_shapes(cfg).items():
        mean, std = _init_std(name, shape, cfg)
        params[name] = mean + _normal(rng, shape, std)
    return params
