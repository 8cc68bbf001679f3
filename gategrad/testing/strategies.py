"""Hypothesis strategies for preference batches, gates, losses and the kit's tiny models.

Needs Hypothesis (``pip install 'gategrad[test]'``). Sizes are drawn from small fixed sets by
default: JAX and MLX compile every operation per shape, so free sizes make a suite slow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st

from gategrad._gate import Gate

from . import _STRATEGIES as STRATEGIES
from .models import SoftmaxConfig, TransformerConfig
from .preference import PreferenceSpec, make_softmax_batch, make_transformer_batch

__all__ = list(STRATEGIES)  # the names gategrad.testing serves lazily from this module

#: Estimators drawn by :func:`gates` by default.
ESTIMATORS: tuple[str, ...] = ("seq", "mean", "min", "q10", "q50")

#: The softmax sizes drawn by :func:`softmax_configs` (classes x context dimension).
SOFTMAX_CONFIGS: tuple[SoftmaxConfig, ...] = (
    SoftmaxConfig(vocab=8, dim=4),
    SoftmaxConfig(vocab=24, dim=6),
)

#: The transformer sizes drawn by :func:`transformer_configs`: 1 to 3 layers, 2 or 4 heads,
#: vocab 32 or 97. They share d_model and d_ff, so most operations have the same shapes in
#: every config and JAX (eager) compiles them once.
TRANSFORMER_CONFIGS: tuple[TransformerConfig, ...] = (
    TransformerConfig(vocab=32, d_model=16, n_heads=2, n_layers=1, d_ff=32, max_len=16),
    TransformerConfig(vocab=97, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=16),
    TransformerConfig(vocab=32, d_model=16, n_heads=4, n_layers=3, d_ff=32, max_len=16),
)


def gates(
    shapes: Sequence[str] = ("sigmoid", "log_sigmoid", "hard", "power"),
    estimators: Sequence[str] = ESTIMATORS,
    granularities: Sequence[str] = ("example", "token"),
    *,
    floors: bool = True,
) -> st.SearchStrategy[Gate]:
    """[`gategrad.Gate`][] objects whose thresholds sit where token probabilities of small
    vocabularies live (``1e-4`` to ``0.5``), so weights spread over ``[0, 1]``."""
    by_shape: dict[str, st.SearchStrategy[dict[str, Any]]] = {
        "sigmoid": st.builds(dict, alpha=st.floats(1.0, 200.0), tau=st.floats(1e-3, 0.5)),
        "log_sigmoid": st.builds(dict, tau=st.floats(1e-4, 0.5), temperature=st.floats(0.05, 5.0)),
        "hard": st.builds(dict, tau=st.floats(1e-4, 0.5)),
        "power": st.builds(dict, tau=st.floats(1e-4, 0.5), exponent=st.floats(0.2, 4.0)),
    }

    @st.composite
    def draw_gate(draw: st.DrawFn) -> Gate:
        shape = draw(st.sampled_from(list(shapes)))
        params = draw(by_shape[shape])
        floor = draw(st.sampled_from([0.0, 0.0, 0.25])) if floors else 0.0
        return Gate(
            shape=shape,  # type: ignore[arg-type]
            floor=floor,
            estimator=draw(st.sampled_from(list(estimators))),
            granularity=draw(st.sampled_from(list(granularities))),
            **params,
        )

    return draw_gate()


def loss_params(loss_type: str) -> st.SearchStrategy[dict[str, Any]]:
    """Non-default parameters of one loss type (``label_smoothing``, ``lam``, ...)."""
    table: dict[str, st.SearchStrategy[dict[str, Any]]] = {
        "sigmoid": st.builds(dict, label_smoothing=st.sampled_from([0.0, 0.1, 0.3])),
        "robust": st.builds(dict, label_smoothing=st.sampled_from([0.0, 0.1, 0.3])),
        "ipo": st.builds(dict, length_normalize=st.booleans()),
        "dpo_shift": st.builds(dict, lam=st.floats(0.1, 1.0)),
        "simpo": st.builds(dict, gamma=st.floats(0.0, 2.0)),
        "dpop": st.builds(dict, dpop_lambda=st.floats(0.0, 50.0)),
    }
    return table.get(loss_type, st.just({}))


def preference_specs(
    loss_types: Sequence[str] | None = None,
    gate: st.SearchStrategy[Gate | None] | None = None,
    *,
    betas: st.SearchStrategy[float] | None = None,
    sft_weights: Sequence[float] = (0.0, 0.5),
) -> st.SearchStrategy[PreferenceSpec]:
    """[`PreferenceSpec`][]: loss type, beta, gate, SFT weight and the loss type's parameters.
    ``gate`` defaults to ``None`` or any of [`gates`][]."""
    from gategrad.losses import LOSS_TYPES

    types = list(loss_types or LOSS_TYPES)
    gate = gate if gate is not None else st.one_of(st.none(), gates())
    betas = betas if betas is not None else st.floats(0.05, 2.5)

    @st.composite
    def draw_spec(draw: st.DrawFn) -> PreferenceSpec:
        loss_type = draw(st.sampled_from(types))
        params = draw(loss_params(loss_type))
        return PreferenceSpec(
            loss_type=loss_type,
            beta=draw(betas),
            gate=draw(gate),
            sft_weight=draw(st.sampled_from(list(sft_weights))),
            params=tuple(sorted(params.items())),
        )

    return draw_spec()


@st.composite
def preference_batches(
    draw: st.DrawFn,
    batch_sizes: Sequence[int] = (1, 2, 4),
    lengths: Sequence[int] = (1, 3, 8),
    *,
    per_token: bool = True,
    dtype: str = "float64",
) -> dict[str, np.ndarray]:
    """Log-probs of a preference batch, as [`gategrad.preference_loss`][] takes them.

    ``per_token=True``: ``policy_/ref_{chosen,rejected}_logps`` of shape ``(B, T)`` with
    right-padded boolean ``chosen_mask`` / ``rejected_mask`` (at least one token per row; padding
    holds junk). ``False``: summed ``(B,)`` log-probs with ``chosen_lengths`` /
    ``rejected_lengths`` token counts. Token log-probs lie in ``[-12, 0)``; the reference is the
    policy plus noise.
    """
    b = draw(st.sampled_from(list(batch_sizes)))
    t = draw(st.sampled_from(list(lengths)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from([0.1, 1.0, 3.0]))
    out: dict[str, np.ndarray] = {}
    for side in ("chosen", "rejected"):
        policy = -np.minimum(rng.exponential(spread, size=(b, t)), 12.0) - 1e-6
        ref = np.minimum(policy + 0.3 * rng.normal(size=(b, t)), -1e-6)
        n = rng.integers(1, t + 1, size=b)
        mask = np.arange(t)[None, :] < n[:, None]
        if per_token:
            junk = rng.normal(size=(b, t))
            out[f"policy_{side}_logps"] = np.where(mask, policy, junk).astype(dtype)
            out[f"ref_{side}_logps"] = np.where(mask, ref, junk).astype(dtype)
            out[f"{side}_mask"] = mask
        else:
            out[f"policy_{side}_logps"] = np.where(mask, policy, 0.0).sum(-1).astype(dtype)
            out[f"ref_{side}_logps"] = np.where(mask, ref, 0.0).sum(-1).astype(dtype)
            out[f"{side}_lengths"] = n.astype(dtype)
    return out


def softmax_configs() -> st.SearchStrategy[SoftmaxConfig]:
    """One of ``SOFTMAX_CONFIGS``."""
    return st.sampled_from(SOFTMAX_CONFIGS)


def transformer_configs(free: bool = False) -> st.SearchStrategy[TransformerConfig]:
    """One of ``TRANSFORMER_CONFIGS``, or with ``free=True`` any 1-3 layer model with
    vocab up to 100 (slow in JAX and MLX eager mode: each size compiles anew)."""
    if not free:
        return st.sampled_from(TRANSFORMER_CONFIGS)

    @st.composite
    def draw_cfg(draw: st.DrawFn) -> TransformerConfig:
        heads = draw(st.sampled_from([1, 2, 4]))
        return TransformerConfig(
            vocab=draw(st.integers(4, 100)),
            d_model=heads * draw(st.sampled_from([2, 4, 8])),
            n_heads=heads,
            n_layers=draw(st.integers(1, 3)),
            d_ff=draw(st.sampled_from([8, 16, 32])),
            max_len=16,
        )

    return draw_cfg()


@st.composite
def softmax_batches(
    draw: st.DrawFn,
    configs: st.SearchStrategy[SoftmaxConfig] | None = None,
    shapes: Sequence[tuple[int, int]] = ((3, 11), (2, 15)),
) -> tuple[SoftmaxConfig, dict[str, Any]]:
    """``(cfg, inputs)`` for [`softmax_logps`][gategrad.testing.softmax_logps]: weights (with a
    drawn scale, so probabilities range from flat to extreme), contexts, targets and masks.

    ``shapes``: the ``(B, T)`` drawn from. The defaults give the same ``(B, T)`` log-prob
    shapes as [`transformer_batches`][] (which shifts by one), so JAX and MLX compile the
    loss' operations once for both models."""
    cfg = draw(configs if configs is not None else softmax_configs())
    b, t = draw(st.sampled_from(list(shapes)))
    return cfg, make_softmax_batch(
        cfg,
        b,
        t,
        seed=draw(st.integers(0, 2**31 - 1)),
        shared=draw(st.sampled_from([0.0, 0.5, 0.9])),
        weight_scale=draw(st.sampled_from([0.5, 2.0, 6.0])),
    )


@st.composite
def transformer_batches(
    draw: st.DrawFn,
    configs: st.SearchStrategy[TransformerConfig] | None = None,
    shapes: Sequence[tuple[int, int]] = ((3, 12), (2, 16)),
) -> tuple[TransformerConfig, dict[str, Any]]:
    """``(cfg, inputs)`` for [`transformer_logps`][gategrad.testing.transformer_logps]: policy and
    reference weights, right-padded prompt + response sequences and their masks."""
    cfg = draw(configs if configs is not None else transformer_configs())
    b, t = draw(st.sampled_from(list(shapes)))
    t = min(t, cfg.max_len)
    return cfg, make_transformer_batch(cfg, b, t, seed=draw(st.integers(0, 2**31 - 1)))
