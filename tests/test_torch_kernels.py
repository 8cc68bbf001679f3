"""The torch backend's kernels called directly: the fused head (``fused_linear_logps``) for every
subset of hidden/weight/bias needing a gradient, with and without a bias, in place (eager) and
out of place (``create_graph``, ``vmap``), float32 and bfloat16, tiles that do not divide the rows
or the vocabulary; ``token_logps`` chunking of non-contiguous logits; ``checkpoint``; the
default axes of the array ops. References: float64 autograd on the plain expressions, NumPy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from _backends import skip_unless

skip_unless("torch")

import torch  # noqa: E402

import gategrad  # noqa: E402

ops = gategrad.get_backend("torch")

N, D, V = 7, 4, 12
#: (rows, cols): 3 row chunks (3, 3, 1) and 2 vocabulary tiles (7, 5); one tile and one chunk
TILES = [(3, 7), (64, 64)]
#: (hidden, weight, bias) needing a gradient: every non-empty subset, with and without a bias
NEEDS = [
    (nh, nw, nb, has_b)
    for nh, nw, nb in itertools.product((False, True), repeat=3)
    for has_b in (False, True)
    if (nh or nw or nb) and (has_b or not nb)
]


def _inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    h = torch.tensor(rng.normal(size=(N, D))).to(dtype)
    w = torch.tensor(rng.normal(size=(V, D))).to(dtype)
    b = torch.tensor(rng.normal(size=V)).to(dtype)
    y = torch.tensor(rng.integers(0, V, N))
    g = torch.tensor(rng.normal(size=N))
    return h, w, b, y, g


def _reference(h, w, b, y, g):
    """float64 autograd on ``log_softmax(h @ w.T + b)[y]``: (logps, dh, dw, db)."""
    h64, w64 = (t.double().requires_grad_(True) for t in (h, w))
    b64 = None if b is None else b.double().requires_grad_(True)
    z = h64 @ w64.T + (0.0 if b64 is None else b64)
    lp = torch.log_softmax(z, -1).gather(1, y[:, None])[:, 0]
    wrt = [h64, w64] + ([] if b64 is None else [b64])
    grads = torch.autograd.grad(lp, wrt, g.double())
    return lp.detach(), *grads, *([None] if b is None else [])


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("mode", ["eager", "create_graph"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", NEEDS)
def test_fused_gradients_match_float64(needs, dtype, mode, tile) -> None:
    nh, nw, nb, has_b = needs
    h, w, b, y, g = _inputs(dtype)
    b = b if has_b else None
    h.requires_grad_(nh)
    w.requires_grad_(nw)
    if b is not None:
        b.requires_grad_(nb)
    cd = torch.promote_types(dtype, torch.float32)
    lp = ops.fused_linear_logps(h, w, b, y, cd, tile)
    wrt = [t for t, need in ((h, nh), (w, nw), (b, nb)) if need]
    grads = torch.autograd.grad(lp, wrt, g.to(cd), create_graph=mode == "create_graph")
    ref = _reference(h.detach(), w.detach(), None if b is None else b.detach(), y, g)
    refs = [r for r, need in zip(ref[1:], (nh, nw, nb), strict=True) if need]
    # float32: a few roundings of O(1) sums of 7 rows and 12 columns, far below 1e-4.
    # bfloat16: the logits and the matmuls round to 8 significant bits (2**-8 relative per
    # rounding, on O(1) values summed over 7 rows): 0.05 absolute leaves a wide margin while a
    # lost or zeroed contribution (O(1)) still fails
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    np.testing.assert_allclose(lp.detach().double(), ref[0], atol=tol, rtol=0)
    for got, want in zip(grads, refs, strict=True):
        assert got.shape == want.shape and got.dtype == dtype
        np.testing.assert_allclose(got.detach().double(), want, atol=tol, rtol=0)


@pytest.mark.parametrize("mode", ["eager", "create_graph"])
def test_fused_bfloat16_weight_gradient_accumulates_in_float32(mode) -> None:
    # rows=1: the weight gradient is a sum of 33 row contributions. Closed form with h = 1,
    # w = 0 (every logit 0, softmax 1/4), label 0 and cotangent g: dw[0] = 0.75 * sum(g),
    # dw[j > 0] = -0.25 * sum(g). The first row's g = 512 makes the running sum 384 and -128,
    # where a bfloat16 accumulator (ulp 2 and 1) drops every later 0.75 and -0.25; the exact
    # sums 408 and -136 are bfloat16 numbers, so float32 accumulation gives them exactly
    n, vocab = 33, 4
    h = torch.ones(n, 2, dtype=torch.bfloat16)
    w = torch.zeros(vocab, 2, dtype=torch.bfloat16, requires_grad=True)
    y = torch.zeros(n, dtype=torch.int64)
    g = torch.ones(n)
    g[0] = 512.0
    lp = ops.fused_linear_logps(h, w, None, y, torch.float32, (1, 64))
    (gw,) = torch.autograd.grad(lp, [w], g, create_graph=mode == "create_graph")
    want = np.zeros((vocab, 2))
    want[0] = 0.75 * g.sum().item()
    want[1:] = -0.25 * g.sum().item()
    np.testing.assert_array_equal(gw.detach().double(), want)


def test_fused_vmap_matches_a_loop() -> None:
    h, w, b, y, _ = _inputs(torch.float32)
    hs = torch.stack([h, 2 * h, -h])

    def f(hh):
        return ops.fused_linear_logps(hh, w, b, y, torch.float32, (3, 7))

    got = torch.func.vmap(f)(hs)
    for i in range(3):
        want = _reference(hs[i], w, b, y, torch.zeros(N))[0]
        # float32 logits of O(1) values and a 12-term log-sum-exp: errors ~1e-6
        np.testing.assert_allclose(got[i].double(), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [(4, 2), (1, 3), (64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [True, False])
def test_token_logps_chunks(contiguous, dtype, chunk) -> None:
    # (2, 5, 6) logits; non-contiguous: logits[:, :-1] of (2, 6, 6), which no flat view covers,
    # and chunks of 2 or 3 positions do not divide the 5 positions of a batch row
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(size=(2, 5 if contiguous else 6, 6))).to(dtype)
    x.requires_grad_(True)
    xin = x if contiguous else x[:, :-1]
    assert xin.is_contiguous() == contiguous
    labels = torch.tensor(rng.integers(0, 6, (2, 5)))
    g = torch.tensor(rng.normal(size=(2, 5)))
    lp = ops.token_logps(xin, labels, torch.float32, chunk, True)
    (gx,) = torch.autograd.grad(lp, [x], g.float())
    x64 = x.detach().double().requires_grad_(True)
    z = x64 if contiguous else x64[:, :-1]
    want = torch.log_softmax(z, -1).gather(-1, labels[..., None])[..., 0]
    (gwant,) = torch.autograd.grad(want, [x64], g)
    # float32: a 6-term log-softmax of O(1) values, ~1e-7; bfloat16 inputs are exact in float64
    # and the values are computed in float32, but the gradient is rounded to bfloat16 (2**-8)
    np.testing.assert_allclose(lp.detach().double(), want.detach(), atol=1e-5, rtol=0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    np.testing.assert_allclose(gx.double(), gwant, atol=tol, rtol=0)


def test_checkpoint_recomputes_in_the_backward() -> None:
    calls = []

    def fn(a):
        calls.append(1)
        return torch.exp(a).sum()

    x = torch.linspace(-1, 1, 5, dtype=torch.float64, requires_grad=True)
    out = ops.checkpoint(fn, x)
    (gx,) = torch.autograd.grad(out, [x])
    assert len(calls) == 2  # the forward, and once more in the backward (nothing kept)
    np.testing.assert_allclose(gx, np.exp(np.linspace(-1, 1, 5)), rtol=1e-12)
    calls.clear()
    with torch.no_grad():
        out = ops.checkpoint(fn, x)
    assert len(calls) == 1 and out.grad_fn is None


def test_array_op_default_axes() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(3, 4))
    x = torch.tensor(a)
    z = a - a.max(-1, keepdims=True)
    np.testing.assert_allclose(
        ops.log_softmax(x), z - np.log(np.exp(z).sum(-1, keepdims=True)), rtol=1e-12
    )
    idx = np.array([2, 0])
    np.testing.assert_array_equal(ops.take(x, torch.tensor(idx)), np.take(a, idx, axis=0))
    along = rng.integers(0, 3, (3, 2))
    np.testing.assert_array_equal(
        ops.take_along_axis(x, torch.tensor(along)), np.take_along_axis(a, along, -1)
    )
