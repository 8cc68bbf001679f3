"""gate_rejected and scale_grad: bitwise-identity forward, VJP = g * v, in every backend."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from _backends import (
    ALL,
    AUTOGRAD,
    dtypes,
    float64_name,
    np_dtype,
    run_outside_repo,
    skip_unless,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gate import gates

import gategrad
from gategrad import Gate, gate_rejected
from gategrad.testing import from_numpy, to_numpy, vjp

ESTIMATORS = ("seq", "mean", "min", "q10", "q50", "q97.5")


@st.composite
def token_batches(draw: st.DrawFn, max_b: int = 5, max_t: int = 9) -> dict:
    """Per-token rejected log-probs (B, T) in [-40, 0] with -inf allowed, a right-padded mask
    with at least one token per row, and a cotangent."""
    # a few fixed sizes: JAX and MLX compile each primitive per shape, so free sizes are slow
    b = draw(st.sampled_from([1, 2, max_b]))
    t = draw(st.sampled_from([1, 3, max_t]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    logps = -rng.exponential(draw(st.sampled_from([0.1, 2.0, 10.0])), size=(b, t))
    if draw(st.booleans()):
        logps[rng.uniform(size=(b, t)) < 0.1] = -np.inf
    lengths = rng.integers(1, t + 1, size=b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    cot = rng.normal(size=(b, t))
    return {"logps": logps, "mask": mask, "cot": cot}


def _gate_for(gate: Gate, estimator: str, granularity: str) -> Gate:
    return gate.replace(estimator=estimator, granularity=granularity)


@pytest.mark.parametrize("backend", ALL)
@given(
    batch=token_batches(),
    gate=gates,
    estimator=st.sampled_from(ESTIMATORS),
    granularity=st.sampled_from(["example", "token"]),
)
def test_forward_is_bitwise_identity(backend, batch, gate, estimator, granularity) -> None:
    skip_unless(backend)
    gate = _gate_for(gate, estimator, granularity)
    for dtype in dtypes(backend):
        x = from_numpy(backend, batch["logps"].astype(np_dtype(dtype)), dtype)
        y = gate_rejected(x, gate, from_numpy(backend, batch["mask"]))
        assert type(y) is type(x) and y.dtype == x.dtype and tuple(y.shape) == tuple(x.shape)
        xs, ys = to_numpy(x), to_numpy(y)
        assert xs.tobytes() == ys.tobytes(), dtype


vjp_cases = {
    "batch": token_batches(),
    "gate": gates,
    "estimator": st.sampled_from(ESTIMATORS),
    "granularity": st.sampled_from(["example", "token"]),
}


@pytest.mark.parametrize("backend", AUTOGRAD)
@given(**vjp_cases)
def test_vjp_is_gate_times_cotangent(backend, batch, gate, estimator, granularity) -> None:
    """Eager: grad = g * v exactly (with the backend's own g); g matches the NumPy oracle."""
    _check_vjp(backend, "eager", batch, gate, estimator, granularity)


@given(**vjp_cases)
def test_vjp_under_jax_jit(batch, gate, estimator, granularity) -> None:
    """``jax.jit``: grad = g * v within 1e-6 relative."""
    _check_vjp("jax", "compiled", batch, gate, estimator, granularity)


@settings(max_examples=5)  # each example is a fresh mx.compile, which builds CPU kernels
@given(**vjp_cases)
def test_vjp_under_mx_compile(batch, gate, estimator, granularity) -> None:
    """``mx.compile``: grad = g * v within 1e-6 relative."""
    _check_vjp("mlx", "compiled", batch, gate, estimator, granularity)


@settings(max_examples=4)  # each example is a fresh torch.compile (seconds on a CPU)
@given(**vjp_cases)
def test_vjp_under_torch_compile(batch, gate, estimator, granularity) -> None:
    """``torch.compile(fullgraph=True)``: grad = g * v within 1e-6 relative."""
    _check_vjp("torch", "compiled", batch, gate, estimator, granularity)


def _check_vjp(backend, mode, batch, gate, estimator, granularity) -> None:
    skip_unless(backend)
    gate = _gate_for(gate, estimator, granularity)
    for dtype in dtypes(backend, ("float32", "float64")):
        x = from_numpy(backend, batch["logps"], dtype)
        mask = from_numpy(backend, batch["mask"])
        v = from_numpy(backend, batch["cot"], dtype)
        _, grad = vjp(backend, lambda z, m=mask: gate_rejected(z, gate, m), x, v, mode=mode)
        grad = to_numpy(grad)
        own = to_numpy(_expected(backend, x, v, gate, mask))
        assert np.isfinite(grad).all()
        if mode == "eager":
            np.testing.assert_array_equal(grad, own)
        else:  # compiled: the same float32 ops fused and reordered (the estimator's mean or
            # quantile over T <= 8 tokens feeds g): 8 ulps of each entry (1e-6 relative) and
            # 8 ulps of the largest, for entries whose g sits on a steep part of the gate
            np.testing.assert_allclose(grad, own, rtol=1e-6, atol=1e-6 * np.abs(own).max())
        ref = gategrad.gate_rejected_vjp(
            batch["logps"].astype(dtype), batch["cot"].astype(dtype), gate, batch["mask"]
        )
        exact64 = dtype == "float64" and backend != "mlx"  # MLX float64 is float32-accurate
        slack = _gate_slack(gate, batch, 1e-13 if exact64 else 2e-6) * np.abs(batch["cot"])
        tol = (1e-12 if exact64 else 2e-6) * max(1.0, np.abs(ref).max())
        assert np.all(np.abs(grad - ref) <= tol + slack), np.abs(grad - ref).max()


def _gate_slack(gate: Gate, batch: dict, rel: float) -> np.ndarray:
    """How far g may move when the log-prob statistic moves by its rounding error ``rel``:
    ``|g(l + d) - g(l - d)|`` with ``d = rel * max(1, |l|)``, per element of the batch. A steep
    gate amplifies rounding (and a hard gate may flip at its threshold) between frameworks."""
    stats = gategrad.gate_weights(batch["logps"], gate, batch["mask"])
    with np.errstate(divide="ignore"):
        logp = np.log(stats.p)
    d = rel * np.maximum(1.0, np.abs(np.where(np.isfinite(logp), logp, 0.0)))
    hi = gategrad.gate_value(gate, logp + d, log=True)
    lo = gategrad.gate_value(gate, logp - d, log=True)
    slack = np.abs(hi - lo)
    return (
        slack if stats.mask is not None else np.broadcast_to(slack[:, None], batch["logps"].shape)
    )


def _expected(backend, x, v, gate, mask):
    """v * g with the backend's own gate weights (the oracle for exactness)."""
    ops = gategrad.get_backend(backend)
    from gategrad._core import broadcast_weight

    stats = gategrad.gate_weights(x, gate, mask)
    w = broadcast_weight(ops, x, stats)
    return ops.astype(ops.astype(v, w.dtype) * w, v.dtype)


@pytest.mark.parametrize("backend", AUTOGRAD)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_scales_once_in_float32(backend: str, dtype: str) -> None:
    skip_unless(backend)
    rng = np.random.default_rng(0)
    logps = -rng.exponential(3.0, size=(4, 7)).astype(np.float32)
    cot = rng.normal(size=(4, 7)).astype(np.float32)
    gate = Gate(shape="log_sigmoid", tau=0.05)
    x = from_numpy(backend, logps, dtype)
    v = from_numpy(backend, cot, dtype)
    _, grad = vjp(backend, lambda z: gate_rejected(z, gate), x, v)
    w = gategrad.gate_weights(x, gate).weight  # float32
    assert to_numpy(w).dtype == np.float32
    expected = to_numpy(from_numpy(backend, (to_numpy(v) * to_numpy(w)[:, None]), dtype))
    np.testing.assert_array_equal(to_numpy(grad), expected)


@pytest.mark.parametrize("backend", ALL)
def test_per_sequence_input_uses_seq_estimator(backend: str) -> None:
    skip_unless(backend)
    rng = np.random.default_rng(1)
    tok = -rng.exponential(1.0, size=(3, 6))
    mask = np.ones((3, 6), bool)
    mask[1, 4:] = False
    seq = np.where(mask, tok, 0).sum(-1)
    gate = Gate(shape="log_sigmoid", tau=0.2)
    f64 = float64_name(backend)
    by_tokens = gategrad.gate_weights(
        from_numpy(backend, tok, f64), gate, from_numpy(backend, mask)
    )
    by_seq = gategrad.gate_weights(
        from_numpy(backend, seq, f64), gate, lengths=from_numpy(backend, mask.sum(-1), f64)
    )
    # float64 everywhere but MLX, whose CPU float64 exp/log run at float32 precision (see
    # test_gate.py): the two routes differ only in the order of T <= 6 additions, far below
    # 1e-12 in float64; on MLX 1e-6 is 8 float32 ulps of p and g in (0, 1]
    tol = 1e-6 if backend == "mlx" else 1e-12
    np.testing.assert_allclose(to_numpy(by_seq.weight), to_numpy(by_tokens.weight), atol=tol)
    np.testing.assert_allclose(to_numpy(by_seq.p), np.exp(seq / mask.sum(-1)), rtol=tol)


def test_token_granularity_leaves_masked_positions_unscaled() -> None:
    logps = np.log(np.array([[0.5, 1e-9, 0.3], [1e-12, 0.9, 0.2]]))
    mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    gate = Gate(shape="hard", tau=1e-6, granularity="token")
    grad = gategrad.gate_rejected_vjp(logps, np.ones_like(logps), gate, mask)
    np.testing.assert_array_equal(grad, [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])


def test_old_numpy_oracle_names_warn_and_still_work() -> None:
    from gategrad.backends import numpy as npref

    logps = np.log(np.array([[0.5, 1e-9, 0.3], [1e-12, 0.9, 0.2]]))
    mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    gate = Gate(shape="hard", tau=1e-6, granularity="token")
    with pytest.warns(DeprecationWarning, match="gate_rejected_vjp"):
        old_vjp = npref.vjp
    np.testing.assert_array_equal(
        old_vjp(logps, np.ones_like(logps), gate, mask),
        gategrad.gate_rejected_vjp(logps, np.ones_like(logps), gate, mask),
    )
    v = np.array([[2.0, 2.0], [4.0, 1.0]], np.float32)
    w = np.array([[0.5], [0.0]])
    with pytest.warns(DeprecationWarning, match="deprecated"):
        old_scale = npref.scale_grad_vjp
    out = old_scale(v, w)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, v * w.astype(np.float32))


@pytest.mark.parametrize("backend", AUTOGRAD)
def test_minus_inf_gives_zero_gate_and_finite_gradient(backend: str) -> None:
    skip_unless(backend)
    logps = np.array([[-np.inf, -1.0, -2.0], [-0.1, -0.2, -0.3]])
    for gate in (
        Gate(shape="log_sigmoid", estimator="seq"),
        Gate(shape="power", floor=0.2, estimator="min"),
    ):
        x = from_numpy(backend, logps, "float32")
        _, grad = vjp(
            backend,
            lambda z, g=gate: gate_rejected(z, g),
            x,
            from_numpy(backend, np.ones_like(logps), "float32"),
        )
        grad = to_numpy(grad)
        assert np.isfinite(grad).all()
        np.testing.assert_allclose(grad[0], gate.floor, atol=0)


@pytest.mark.parametrize("backend", ALL)
def test_scale_grad_is_the_generic_hook(backend: str) -> None:
    skip_unless(backend)
    x = np.array([[1.0, -2.0], [3.0, 0.5]])
    w = np.array([[0.5], [0.0]])
    v = np.array([[2.0, 2.0], [4.0, 1.0]])
    if backend == "numpy":
        # the NumPy statement of the backward: v * w in promote_types(dtype, float32), cast back
        scaled = (v.astype(np.promote_types(v.dtype, np.float32)) * w).astype(v.dtype)
        np.testing.assert_array_equal(scaled, v * w)
        assert gategrad.scale_grad(x, w) is x
        return
    xb = from_numpy(backend, x, "float32")
    out, grad = vjp(
        backend,
        lambda z: gategrad.scale_grad(z, from_numpy(backend, w, "float32")),
        xb,
        from_numpy(backend, v, "float32"),
    )
    np.testing.assert_array_equal(to_numpy(out), x.astype(np.float32))
    np.testing.assert_array_equal(to_numpy(grad), (v * w).astype(np.float32))
    _, grad = vjp(
        backend, lambda z: gategrad.scale_grad(z, 0.25), xb, from_numpy(backend, v, "float32")
    )
    np.testing.assert_array_equal(to_numpy(grad), (v * 0.25).astype(np.float32))


def test_torch_func_vmap_checkpoint_and_compile_graph() -> None:
    skip_unless("torch")
    import torch
    from torch.utils.checkpoint import checkpoint

    rng = np.random.default_rng(3)
    logps = torch.tensor(-rng.exponential(2.0, size=(4, 6)))
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2, 3:] = False
    v = torch.tensor(rng.normal(size=(4, 6)))
    gate = Gate(estimator="q10")
    ref = gategrad.gate_rejected_vjp(logps.numpy(), v.numpy(), gate, mask.numpy())

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (gate_rejected(x, gate, mask) * v).sum()

    np.testing.assert_array_equal(torch.func.grad(loss)(logps).numpy(), ref)

    def row_grad(x, m, vv):  # per-example gradients under vmap
        return torch.func.grad(lambda z: (gate_rejected(z[None], gate, m[None]) * vv).sum())(x)

    np.testing.assert_array_equal(torch.func.vmap(row_grad)(logps, mask, v).numpy(), ref)

    x = logps.clone().requires_grad_()
    checkpoint(lambda z: loss(z * 1.0), x, use_reentrant=False).backward()
    np.testing.assert_array_equal(x.grad.numpy(), ref)

    # one graph, no breaks, under fullgraph compile
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss)(logps.clone().requires_grad_())
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_jax_vmap_and_traced_gate_parameters() -> None:
    skip_unless("jax")
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(4)
    logps = -rng.exponential(2.0, size=(3, 5))
    v = rng.normal(size=(3, 5))
    gate = Gate(shape="log_sigmoid", tau=0.05, estimator="q50")
    ref = gategrad.gate_rejected_vjp(logps, v, gate)

    traces = []  # runs in Python only while jax.jit traces

    def loss(x, g):
        traces.append(1)
        return (gate_rejected(x, g) * v).sum()

    grad_fn = jax.jit(jax.grad(loss))
    np.testing.assert_allclose(grad_fn(jnp.asarray(logps), gate), ref, rtol=1e-12)
    other = gate.replace(tau=0.5)
    np.testing.assert_allclose(
        grad_fn(jnp.asarray(logps), other), gategrad.gate_rejected_vjp(logps, v, other), rtol=1e-12
    )
    assert len(traces) == 1, "a new tau must not retrace: gate params are traced"
    rows = jax.vmap(jax.grad(lambda x, vv: (gate_rejected(x[None], gate) * vv).sum()))
    np.testing.assert_allclose(rows(jnp.asarray(logps), jnp.asarray(v)), ref, rtol=1e-12)


def test_jax_without_x64_matches_numpy_quantile() -> None:
    """Default JAX (x64 off) has no float64 index math: the quantile tables keep eager mode
    exact. Under jit, XLA may fuse ``a + (b - a) * t`` into an FMA: within one float32 ulp."""
    skip_unless("jax")
    code = (
        "import numpy as np, jax, jax.numpy as jnp, gategrad\n"
        "rng = np.random.default_rng(0)\n"
        "v = rng.uniform(size=(64, 29)).astype(np.float32); m = rng.uniform(size=v.shape) < .6\n"
        "m[:, 0] = True\n"
        "for q in (0.1, 0.33, 0.9):\n"
        "    ref = np.array([np.quantile(r[k], q) for r, k in zip(v, m)], np.float32)\n"
        "    got = np.asarray(gategrad.masked_quantile(jnp.asarray(v), jnp.asarray(m), q))\n"
        "    assert np.array_equal(got, ref), (q, np.abs(got - ref).max())\n"
        "    jit = np.asarray(jax.jit(lambda a, b: gategrad.masked_quantile(a, b, q))(v, m))\n"
        "    assert np.all(np.abs(jit - ref) <= np.spacing(np.abs(ref))), q\n"
    )
    # cwd outside the repository: its gategrad/ (no backends/) must not shadow the install
    out = run_outside_repo(["-c", code], Path(tempfile.gettempdir()), timeout=120)
    assert out.returncode == 0, out.stderr


def test_mlx_vmap_and_compile() -> None:
    skip_unless("mlx")
    import mlx.core as mx

    rng = np.random.default_rng(5)
    logps = (-rng.exponential(2.0, size=(3, 5))).astype(np.float32)
    v = rng.normal(size=(3, 5)).astype(np.float32)
    gate = Gate(estimator="q10")
    ref = gategrad.gate_rejected_vjp(logps, v, gate)
    mv = mx.array(v)

    def loss(x):
        return (gate_rejected(x, gate) * mv).sum()

    # float32 against the float64 NumPy vjp of the same float32 inputs: g * v with |v| <= ~3
    # and g in [0, 1], where g's own float32 rounding (exp, the q10 interpolation, the
    # sigmoid: a few ulps of 1) dominates: 1e-6 absolute is ~3 ulps of the largest entry
    np.testing.assert_allclose(np.array(mx.compile(mx.grad(loss))(mx.array(logps))), ref, atol=1e-6)
    rows = mx.vmap(mx.grad(lambda x, vv: (gate_rejected(x[None], gate) * vv).sum()))
    np.testing.assert_allclose(np.array(rows(mx.array(logps), mv)), ref, atol=1e-6)


def test_gate_is_a_jax_pytree_as_soon_as_jax_is_loaded(tmp_path) -> None:
    """``jax.jit(f)(x, gate)`` works without any earlier gategrad call on a JAX array."""
    skip_unless("jax")
    code = (
        "import jax, jax.numpy as jnp, gategrad\n"
        "f = jax.jit(lambda x, g: gategrad.gate_rejected(x, g).sum())\n"
        "print(float(f(jnp.full((2, 3), -1.0), gategrad.Gate(estimator='q10'))))\n"
    )
    out = run_outside_repo(["-c", code], tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "-6.0"
