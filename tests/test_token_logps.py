"""gategrad.token_logps: agreement with log_softmax + gather in every backend, low precision,
chunking, the per-token gate, and peak memory (no second (B, T, V) buffer)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from _backends import fw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gategrad
import gategrad._logps as logps_mod
from gategrad import Gate, gate_weights, token_logps

try:  # float64 in JAX (a global flag: set, never unset)
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover - jax is optional
    pass

BACKENDS = ("numpy", "torch", "jax", "mlx")
TOKEN_GATE = Gate(shape="log_sigmoid", tau=0.05, granularity="token")


def conv(name, a, dtype=None):
    a = np.asarray(a)
    mod = fw(name)
    if name == "numpy":
        return a if dtype is None else a.astype(dtype)
    if name == "torch":
        t = mod.tensor(a)
        return t if dtype is None else t.to(getattr(mod, dtype))
    if name == "jax":
        return mod.asarray(a) if dtype is None else mod.asarray(a).astype(dtype)
    if a.dtype == np.float64:
        a = a.astype(np.float32)  # MLX: float32 (its float64 is CPU-only)
    x = mod.array(a)
    return x if dtype is None else x.astype(getattr(mod, dtype))


def to_np(x):
    if hasattr(x, "detach"):
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
    elif type(x).__module__.startswith("mlx") and "bfloat16" in str(x.dtype):
        x = x.astype(fw("mlx").float32)
    return np.asarray(x)


def reference(logits, labels, mask=None, shift=True, ignore_index=-100):
    """float64 log_softmax + gather, 0 where masked, and the mask used."""
    logits = np.asarray(logits, dtype=np.float64)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
        mask = None if mask is None else mask[:, 1:]
    m = logits.max(-1, keepdims=True)
    logsm = logits - (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))
    valid = labels != ignore_index
    if mask is not None:
        valid &= mask.astype(bool)
    picked = np.take_along_axis(logsm, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return np.where(valid, picked, 0.0), valid


def make(seed, b=3, t=7, v=13, ignore_frac=0.3, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, (b, t, v))
    labels = rng.integers(0, v, (b, t))
    labels[rng.random((b, t)) < ignore_frac] = -100
    mask = rng.random((b, t)) < 0.8
    return logits, labels, mask


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_log_softmax_gather(backend, shift):
    fw(backend)
    logits, labels, mask = make(0)
    for m in (None, mask):
        for chunk in (None, 2):
            out, used = token_logps(
                conv(backend, logits), conv(backend, labels),
                None if m is None else conv(backend, m), shift=shift, chunk_size=chunk,
            )  # fmt: skip
            want, want_mask = reference(logits, labels, m, shift=shift)
            assert tuple(out.shape) == want.shape == tuple(used.shape)
            np.testing.assert_array_equal(to_np(used), want_mask)
            atol = 2e-5 if backend == "mlx" else 1e-12
            np.testing.assert_allclose(to_np(out), want, atol=atol, rtol=0)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    backend=st.sampled_from(BACKENDS),
    b=st.integers(1, 4),
    t=st.integers(2, 9),
    v=st.integers(1, 17),
    chunk=st.one_of(st.none(), st.integers(1, 5)),
    budget=st.sampled_from([None, 1, 7, 40]),
    shift=st.booleans(),
    ignore_index=st.sampled_from([-100, -1, 0]),
    seed=st.integers(0, 2**16),
)
def test_property_agrees_with_reference(backend, b, t, v, chunk, budget, shift, ignore_index, seed):
    """Any shape, chunking (explicit rows, or the automatic row/time plan under a tiny element
    budget) and ignore index: equal to log_softmax + gather to float tolerance."""
    try:
        fw(backend)
    except pytest.skip.Exception:
        return
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, (b, t, v))
    labels = rng.integers(0, v, (b, t))
    labels[rng.random((b, t)) < 0.3] = ignore_index
    old = logps_mod.CHUNK_ELEMENTS
    try:
        if budget is not None:
            logps_mod.CHUNK_ELEMENTS = budget
        fn = functools.partial(
            token_logps, shift=shift, ignore_index=ignore_index, chunk_size=chunk
        )
        if backend == "jax":  # one compilation per shape instead of one per op and shape
            fn = jax.jit(fn)
        out, used = fn(conv(backend, logits), conv(backend, labels))
    finally:
        logps_mod.CHUNK_ELEMENTS = old
    want, want_mask = reference(logits, labels, shift=shift, ignore_index=ignore_index)
    np.testing.assert_array_equal(to_np(used), want_mask)
    np.testing.assert_allclose(to_np(out), want, atol=5e-5 if backend == "mlx" else 1e-11, rtol=0)


def test_chunk_plan():
    plan = logps_mod._plan
    n = logps_mod.CHUNK_ELEMENTS
    assert plan(4, 8, 16, None) == (4, 8)  # small: one chunk
    assert plan(64, 256, 1024, None) == (n // (256 * 1024), 256)  # rows
    assert plan(2, 4096, 2 * n // 4096, None) == (1, 2048)  # one row too big: time chunks
    assert plan(4, 8, 16, 3) == (3, 8)  # explicit rows


# ---------------------------------------------------------------------------------------------
# low precision: bf16/fp16 logits are accumulated in float32


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("backend", ["torch", "jax", "mlx"])
def test_low_precision_accumulates_in_float32(backend, dtype):
    fw(backend)
    logits, labels, mask = make(1, b=2, t=9, v=2000, scale=2.0)
    low = conv(backend, logits.astype(np.float32), dtype)
    out, _ = token_logps(low, conv(backend, labels), conv(backend, mask), chunk_size=1)
    assert "float32" in str(out.dtype)
    # the reference: float64 log_softmax of the same rounded logits
    if backend == "torch":
        rounded = low.float().numpy()
    elif backend == "jax":
        rounded = np.asarray(low.astype("float32"))
    else:
        rounded = np.array(low.astype(fw("mlx").float32))
    want, _ = reference(rounded.astype(np.float64), labels, mask)
    np.testing.assert_allclose(to_np(out), want, atol=2e-5, rtol=1e-5)


def test_float64_stays_float64_and_float32_stays_float32():
    torch = fw("torch")
    logits, labels, _ = make(2)
    out, _ = token_logps(torch.tensor(logits), torch.tensor(labels))
    assert out.dtype == torch.float64
    out, _ = token_logps(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels))
    assert out.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# gradients


def test_torch_gradient_matches_log_softmax_gather():
    torch = fw("torch")
    logits, labels, mask = make(3, b=3, t=6, v=9)
    x = torch.tensor(logits, requires_grad=True)
    y = torch.tensor(logits, requires_grad=True)
    lab = torch.tensor(labels)
    out, used = token_logps(x, lab, torch.tensor(mask), chunk_size=2)
    weights = torch.randn(out.shape, dtype=out.dtype)
    (out * weights).sum().backward()
    ref = torch.log_softmax(y[:, :-1], -1).gather(2, lab[:, 1:].clamp(min=0)[..., None])[..., 0]
    ((ref * used) * weights).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("backend", ["jax", "mlx"])
def test_jax_mlx_gradient_matches_log_softmax_gather(backend):
    mod = fw(backend)
    logits, labels, mask = make(4, b=2, t=5, v=7, ignore_frac=0.0)
    w = np.random.default_rng(0).normal(size=(2, 4))

    def ours(x):
        out, _ = token_logps(x, conv(backend, labels), chunk_size=1)
        return (out * conv(backend, w)).sum()

    def ref(x):
        if backend == "jax":
            import jax

            ls = jax.nn.log_softmax(x[:, :-1], axis=-1)
        else:
            ls = x[:, :-1] - mod.logsumexp(x[:, :-1], axis=-1, keepdims=True)
        picked = mod.take_along_axis(ls, conv(backend, labels)[:, 1:, None], axis=-1)[..., 0]
        return (picked * conv(backend, w)).sum()

    if backend == "jax":
        import jax

        g1, g2 = jax.grad(ours)(conv(backend, logits)), jax.grad(ref)(conv(backend, logits))
        # and under jit, with the chunk loop unrolled
        g3 = jax.jit(jax.grad(ours))(conv(backend, logits))
        np.testing.assert_allclose(np.asarray(g3), np.asarray(g2), atol=1e-12)
    else:
        g1, g2 = mod.grad(ours)(conv(backend, logits)), mod.grad(ref)(conv(backend, logits))
    np.testing.assert_allclose(to_np(g1), to_np(g2), atol=1e-5 if backend == "mlx" else 1e-12)


# ---------------------------------------------------------------------------------------------
# the per-token gate


@pytest.mark.parametrize("backend", ["torch", "jax", "mlx"])
def test_token_gate_scales_each_token_gradient(backend):
    mod = fw(backend)
    logits, labels, mask = make(5, b=3, t=6, v=5, scale=4.0)
    w = np.random.default_rng(1).normal(size=(3, 5))

    def run(gate):
        def f(x):
            out, _ = token_logps(x, conv(backend, labels), conv(backend, mask), gate=gate)
            return (out * conv(backend, w)).sum()

        x = conv(backend, logits)
        if backend == "torch":
            x.requires_grad_(True)
            value = f(x)
            value.backward()
            return to_np(value), to_np(x.grad)
        if backend == "jax":
            import jax

            v, g = jax.value_and_grad(f)(x)
        else:
            v, g = mod.value_and_grad(f)(x)
        return to_np(v), to_np(g)

    v0, g0 = run(None)
    v1, g1 = run(TOKEN_GATE)
    assert v0.tobytes() == v1.tobytes()
    # d/dlogits of sum_t w_t g_t logp_t: each token's row of the logits gradient scaled by g_t
    out, used = token_logps(conv(backend, logits), conv(backend, labels), conv(backend, mask))
    g = to_np(gate_weights(out, TOKEN_GATE, used).weight)
    g = np.where(to_np(used), g, 1.0)
    expect = g0.copy()
    expect[:, :-1] *= g[..., None]
    np.testing.assert_allclose(g1, expect, rtol=1e-5 if backend == "mlx" else 1e-12, atol=1e-7)
    assert (g < 0.99).any() and (g > 0.01).any()  # the gate really acts on this input


def test_example_gate_refused():
    logits, labels, _ = make(0)
    with pytest.raises(ValueError, match="belongs to the loss"):
        token_logps(logits, labels, gate=Gate())
    with pytest.raises(TypeError, match="gategrad.Gate"):
        token_logps(logits, labels, gate="token")


def test_outputs_feed_the_loss():
    """token_logps -> preference_loss with per-token inputs and masks."""
    torch = fw("torch")
    logits, labels, mask = make(6, b=4, t=8, v=11, ignore_frac=0.1)
    lg = torch.tensor(logits, requires_grad=True)
    lp, used = token_logps(lg, torch.tensor(labels), torch.tensor(mask))
    with torch.no_grad():
        ref_lp, _ = token_logps(lg * 0.9, torch.tensor(labels), torch.tensor(mask))
    c, r = lp[:2], lp[2:]
    loss, m = gategrad.dpo_loss(c, r, ref_lp[:2], ref_lp[2:], chosen_mask=used[:2],
                                rejected_mask=used[2:], gate=Gate(estimator="q10"))  # fmt: skip
    loss.backward()
    assert torch.isfinite(lg.grad).all() and "gate/mean" in m
    want = float(lp[:2].detach().sum(-1).mean())
    assert float(m["logps/chosen"]) == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# errors


def test_argument_errors():
    logits, labels, mask = make(0)
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        token_logps(logits[0], labels)
    with pytest.raises(ValueError, match="labels must have shape"):
        token_logps(logits, labels[:, :-1])
    with pytest.raises(TypeError, match="integer token ids"):
        token_logps(logits, labels.astype(float))
    with pytest.raises(TypeError, match="floating-point"):
        token_logps(labels[..., None], labels)
    with pytest.raises(ValueError, match="mask has shape"):
        token_logps(logits, labels, mask[:, :-1])
    with pytest.raises(ValueError, match="chunk_size"):
        token_logps(logits, labels, chunk_size=0)
    with pytest.raises(ValueError, match="T >= 2"):
        token_logps(logits[:, :1], labels[:, :1])


# ---------------------------------------------------------------------------------------------
# peak memory (torch, CPU), from the allocator events that torch.profiler records


def _torch_peak_mib(fn):
    """(peak, still held) MiB allocated by torch while ``fn()`` runs."""
    torch = fw("torch")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:  # pragma: no cover - private API moved
        pytest.skip("torch.profiler does not expose its memory events here")
    events = sorted(
        (e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    del torch
    return peak / 2**20, current / 2**20


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_memory_has_no_second_full_buffer(dtype, grad, monkeypatch):
    torch = fw("torch")
    monkeypatch.setattr(logps_mod, "CHUNK_ELEMENTS", 1 << 18)  # 1 MiB of float32 per chunk
    B, T, V = 4, 129, 8192
    full = B * (T - 1) * V * 4 / 2**20  # one float32 (B, T - 1, V) buffer: 16 MiB
    logits = torch.randn(B, T, V).to(getattr(torch, dtype)).requires_grad_(grad)
    labels = torch.randint(0, V, (B, T))
    kept = {}

    def ours():
        kept["out"] = token_logps(logits, labels)[0]

    def log_softmax_gather():
        ls = torch.log_softmax(logits.float(), -1)[:, :-1]
        kept["ref"] = torch.gather(ls, 2, labels[:, 1:, None])[..., 0]

    peak, held = _torch_peak_mib(ours)
    ref_peak, _ = _torch_peak_mib(log_softmax_gather)
    assert ref_peak >= 0.99 * full  # the measurement sees a second full buffer when there is one
    assert peak < 0.15 * full, (peak, full)  # here only one chunk's temporaries
    # what stays allocated for the backward: the (B, T - 1) outputs and small per-row values;
    # no float32 copy of the logits (low precision: each chunk's cast is recomputed)
    assert held < 0.05 * full, (held, full)
    if grad:
        kept["out"].sum().backward()
        ref = torch.log_softmax(logits.detach().double(), -1)[:, :-1]
        expect = -ref.exp()
        expect.scatter_add_(2, labels[:, 1:, None], torch.ones_like(expect[..., :1]))
        torch.testing.assert_close(logits.grad[:, :-1].double(), expect, atol=1e-2, rtol=0)
