"""gategrad.fused_token_logps: values and gradients equal token_logps(hidden @ weight.T + bias)
in every backend (float64 references), with chunk sizes that do not divide the positions,
masks and ignored labels; input validation."""

from __future__ import annotations

import numpy as np
import pytest
from _backends import skip_unless
from hypothesis import given
from hypothesis import strategies as st

import gategrad
import gategrad._fused as fused_mod


def reference(h, w, b, y, m, g):
    """float64 NumPy: log-probs (shift=True) and the closed-form gradients of sum(g * logps)."""
    z = h @ w.T + b
    z, yy, mm = z[:, :-1], y[:, 1:], m[:, 1:]
    valid = (yy != -100) & mm
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    safe = np.where(valid, yy, 0)
    lp = np.where(valid, np.take_along_axis(z, safe[..., None], -1)[..., 0] - lse, 0.0)
    p = np.exp(z - lse[..., None])
    onehot = np.eye(z.shape[-1])[safe]
    gv = np.where(valid, g, 0.0)[..., None]
    d = np.concatenate([gv * (onehot - p), np.zeros_like(z[:, :1])], axis=1)
    return lp, valid, d @ w, np.einsum("btv,btd->vd", d, h), d.sum((0, 1))


def _case(seed, b, t, d, v):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(b, t, d))
    w = rng.normal(size=(v, d))
    bias = rng.normal(size=v)
    y = rng.integers(0, v, (b, t))
    y[rng.random((b, t)) < 0.25] = -100
    m = rng.random((b, t)) < 0.8
    g = rng.normal(size=(b, t - 1))
    return h, w, bias, y, m, g


def _grads(name, h, w, bias, y, m, g, chunk):
    """(logps, valid, dh, dw, db) from backend ``name`` in float64."""
    skip_unless(name)
    ops = gategrad.get_backend(name)
    with ops.device_scope("float64"):
        arr = [ops.from_numpy(x, dtype="float64") for x in (h, w, bias, g)]
        yy, mm = ops.from_numpy(y), ops.from_numpy(m)

        def loss(h_, w_, b_):
            lp, _ = gategrad.fused_token_logps(h_, w_, yy, mm, bias=b_, chunk_size=chunk)
            return ops.sum(lp * arr[3], axis=None)

        lp, valid = gategrad.fused_token_logps(*arr[:2], yy, mm, bias=arr[2], chunk_size=chunk)
        if name == "numpy":
            return ops.to_numpy(lp), ops.to_numpy(valid), None
        _, grads = ops.value_and_grad(loss, arr[:3], argnums=(0, 1, 2))
        return ops.to_numpy(lp), ops.to_numpy(valid), [ops.to_numpy(x) for x in grads]


@pytest.mark.conformance
@pytest.mark.parametrize("name", ["numpy", "torch", "jax", "mlx"])
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, 3),
    t=st.integers(2, 7),
    v=st.integers(2, 300),
    chunk=st.sampled_from([None, 1, 3, 5]),
)
def test_matches_float64_reference(name, seed, b, t, v, chunk) -> None:
    # small tiles so that several vocabulary tiles and row chunks (not dividing) occur
    old, fused_mod.TILE_ELEMENTS = fused_mod.TILE_ELEMENTS, 128 * 3
    try:
        h, w, bias, y, m, g = _case(seed, b, t, 4, v)
        lp, valid, grads = _grads(name, h, w, bias, y, m, g, chunk)
    finally:
        fused_mod.TILE_ELEMENTS = old
    ref = reference(h, w, bias, y, m, g)
    # float64 throughout: rounding of O(10) logits; MLX's float64 exp/log are ~1e-7 accurate
    tol = gategrad.get_backend(name).float64_tol * 100
    np.testing.assert_array_equal(valid, ref[1])
    np.testing.assert_allclose(lp, ref[0], atol=tol, rtol=tol)
    if grads is not None:
        for got, want in zip(grads, ref[2:], strict=True):
            np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


def test_validation() -> None:
    h, w = np.zeros((2, 3, 4)), np.zeros((5, 4))
    y = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="weight must have shape"):
        gategrad.fused_token_logps(h, np.zeros((5, 3)), y)
    with pytest.raises(TypeError, match="weight has dtype"):
        gategrad.fused_token_logps(h, w.astype(np.float32), y)
    with pytest.raises(ValueError, match="labels must have shape"):
        gategrad.fused_token_logps(h, w, y[:, :2])
    with pytest.raises(TypeError, match="labels must be integer"):
        gategrad.fused_token_logps(h, w, y.astype(float))
    with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
        gategrad.fused_token_logps(h, w, y + 7)
