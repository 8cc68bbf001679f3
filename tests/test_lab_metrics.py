"""gategrad.metrics: mass-dynamics metrics against a direct NumPy computation, per framework."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from gategrad.metrics import METRIC_NAMES, sequence_metrics, to_numpy


def _reference(logits, labels, mask):
    x = logits[:, :-1].astype(np.float64)
    y = labels[:, 1:]
    m = mask[:, 1:].astype(bool)
    logp = (
        x
        - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - x.max(-1, keepdims=True)
    )
    p = np.exp(logp)
    top = p.max(-1)
    out = {k: [] for k in METRIC_NAMES}
    for b in range(x.shape[0]):
        idx = np.flatnonzero(m[b])
        out["logp"].append(logp[b, idx, y[b, idx]].sum())
        out["argmax_logp"].append(np.log(top[b, idx]).sum())
        out["except_argmax"].append(np.log1p(-top[b, idx]).sum())
        out["top1"].append(top[b, idx].mean())
        out["entropy"].append((-(p[b, idx] * logp[b, idx]).sum(-1)).mean())
    return {k: np.array(v) for k, v in out.items()}


def _case():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, size=(3, 6, 7))
    labels = rng.integers(0, 7, size=(3, 6))
    mask = np.ones((3, 6), dtype=np.int64)
    mask[:, :2] = 0
    mask[2, 4:] = 0
    return logits, labels, mask


def test_numpy_matches_reference():
    logits, labels, mask = _case()
    got = sequence_metrics(logits, labels, mask)
    ref = _reference(logits, labels, mask)
    for k in METRIC_NAMES:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12, atol=1e-12)


def test_ignore_index_and_unshifted():
    logits, labels, mask = _case()
    masked_labels = np.where(mask == 1, labels, -100)
    a = sequence_metrics(logits, masked_labels)
    b = sequence_metrics(logits, labels, mask)
    for k in METRIC_NAMES:
        np.testing.assert_allclose(a[k], b[k])
    c = sequence_metrics(logits[:, :-1], labels[:, 1:], mask[:, 1:], shift=False)
    for k in METRIC_NAMES:
        np.testing.assert_allclose(c[k], b[k])


def test_except_argmax_stays_finite_near_one():
    logits = np.zeros((1, 2, 4))
    logits[0, 0, 1] = 40.0  # top-1 mass 1 - 3e-17: log(1 - p) would be -inf in float64
    got = sequence_metrics(logits, np.array([[0, 1]]))
    assert np.isfinite(got["except_argmax"][0])
    np.testing.assert_allclose(got["except_argmax"][0], np.log(3.0) - 40.0, rtol=1e-9)


def test_shape_errors():
    logits, labels, mask = _case()
    with pytest.raises(ValueError, match="logits"):
        sequence_metrics(logits[0], labels)
    with pytest.raises(ValueError, match="labels"):
        sequence_metrics(logits, labels[:, :3])
    with pytest.raises(ValueError, match="mask"):
        sequence_metrics(logits, labels, mask[:, :3])


def _frameworks():
    out = []
    for name in ("torch", "jax", "mlx"):
        mod = "mlx.core" if name == "mlx" else name
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        out.append(
            pytest.param(name, marks=pytest.mark.skipif(not found, reason=f"{name} not installed"))
        )
    return out


@pytest.mark.parametrize("framework", _frameworks())
def test_frameworks_agree_with_numpy(framework):
    logits, labels, mask = _case()
    ref = sequence_metrics(logits.astype(np.float32), labels, mask)
    if framework == "torch":
        import torch

        args = (torch.tensor(logits, dtype=torch.float32), torch.tensor(labels), torch.tensor(mask))
    elif framework == "jax":
        import jax.numpy as jnp

        args = (jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(mask))
    else:
        import mlx.core as mx

        args = (
            mx.array(logits.astype(np.float32)),
            mx.array(labels.astype(np.int32)),
            mx.array(mask.astype(np.int32)),
        )
    got = to_numpy(sequence_metrics(*args))
    # float32 both sides, different formulations (log-sum-exp vs log-softmax, log1p(-p) vs a
    # log of the mass outside the argmax, reduction order): each per-token value of size <= ~15
    # is within a few ulps (~1e-6 each) and a row sums <= 4 of them; except_argmax subtracts
    # two close numbers when the top-1 mass is near 1, which costs up to ~2 orders more: 1e-4
    for k in METRIC_NAMES:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-4)
