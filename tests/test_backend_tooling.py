"""The backends' training and machine tooling (what the benchmarks, the lab and the tests use):
``log_softmax``, ``adamw``, ``value_and_grad_fn``, the ``compile`` options, ``evaluate`` on
trees, ``peak_memory``, ``device_like``, ``describe``. Written once for every backend: nothing
here branches on a framework's name."""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import pytest
from _backends import ALL, AUTOGRAD, skip_unless

import gategrad
from gategrad import Backend

LR, WEIGHT_DECAY, BETAS, EPS = 0.1, 0.1, (0.9, 0.999), 1e-8


def _backend(name: str) -> Backend:
    skip_unless(name)
    return gategrad.get_backend(name)


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.uniform(-1.0, 1.0, (3, 4)).astype(np.float32),
        "b": rng.uniform(-1.0, 1.0, (5,)).astype(np.float32),
    }


def _grads(params: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Gradients whose magnitudes span 1e-9 to 10, so that ``eps`` matters for some entries."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, p in params.items():
        scale = 10.0 ** rng.uniform(-9.0, 1.0, p.shape)
        out[k] = (rng.choice([-1.0, 1.0], p.shape) * scale).astype(np.float32)
    return out


def _adamw_reference(
    params: dict[str, np.ndarray], grads: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """AdamW written out in float64: bias-corrected moments, decoupled weight decay."""
    (b1, b2), out = BETAS, {}
    for k, p0 in params.items():
        p = p0.astype(np.float64)
        m, v = np.zeros_like(p), np.zeros_like(p)
        for t, step in enumerate(grads, start=1):
            g = step[k].astype(np.float64)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g**2
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
            p = p - LR * WEIGHT_DECAY * p - LR * m_hat / (np.sqrt(v_hat) + EPS)
        out[k] = p
    return out


@pytest.mark.parametrize("name", AUTOGRAD)
def test_adamw_matches_the_formula(name: str) -> None:
    """Two steps of the framework's own AdamW equal the float64 formula.

    Tolerance: the parameters are float32 of magnitude <= 1.2 after the steps; each step is a
    dozen float32 roundings of values of that size (half an ulp each, about 7e-8), so the
    error stays below ~2e-6. ``1e-5`` leaves room for fused kernels and is far below what a
    different algorithm changes: a step is ``lr = 0.1`` per element, weight decay
    ``lr * wd * |p|`` up to 1e-2, and skipping the bias correction scales the first step by
    about 3.
    """
    b = _backend(name)
    np_params = _params()
    steps = [_grads(np_params, seed) for seed in (1, 2)]
    params = {k: b.from_numpy(v.copy()) for k, v in np_params.items()}
    opt = b.adamw(params, LR, WEIGHT_DECAY)
    state = opt.init(params)
    for step in steps:
        opt.zero_grad()
        grads = {k: b.from_numpy(v) for k, v in step.items()}
        params, state = opt.update(params, grads, state)
        b.evaluate(params, state)
    expected = _adamw_reference(np_params, steps)
    for k, want in expected.items():
        got = b.to_numpy(params[k])
        assert got.dtype == np.float32, k
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=k)


def test_adamw_needs_autograd() -> None:
    b = gategrad.get_backend("numpy")
    with pytest.raises(NotImplementedError, match="no autograd"):
        b.adamw(_params(), LR)


def test_jax_adamw_names_the_optax_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    b = _backend("jax")
    monkeypatch.setitem(sys.modules, "optax", None)  # `import optax` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'gategrad\[optax\]'"):
        b.adamw({"w": b.from_numpy(np.ones(2, np.float32))}, LR)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("axis", [-1, 0])
def test_log_softmax_matches_numpy(name: str, axis: int) -> None:
    """float32 log-softmax of values up to ~30 in magnitude: a few float32 ulps (~2e-6 each at
    that size) from the float64 result."""
    b = _backend(name)
    x = (3.0 * np.random.default_rng(0).standard_normal((4, 7))).astype(np.float32)
    x64 = x.astype(np.float64)
    m = x64.max(axis=axis, keepdims=True)
    want = x64 - m - np.log(np.exp(x64 - m).sum(axis=axis, keepdims=True))
    got = b.to_numpy(b.log_softmax(b.from_numpy(x), axis=axis))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def _objective(b: Backend) -> Any:
    def fn(p: dict[str, Any]) -> Any:
        return b.sum(b.tanh(p["a"]) * p["c"], axis=None) + b.sum(b.log_softmax(p["a"]), axis=None)

    return fn


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", AUTOGRAD)
def test_value_and_grad_fn_equals_value_and_grad(name: str, compiled: bool) -> None:
    """The traceable ``value_and_grad_fn`` (eager and inside ``compile``) gives what
    ``value_and_grad`` does; both are float32 with the same operations, so to a few ulps."""
    b = _backend(name)
    rng = np.random.default_rng(3)
    a_np, c_np = (rng.standard_normal((3, 5)).astype(np.float32) for _ in range(2))
    fn = _objective(b)
    want_value, (want_a, want_c) = b.value_and_grad(
        lambda a, c: fn({"a": a, "c": c}), [b.from_numpy(a_np), b.from_numpy(c_np)], (0, 1)
    )
    run = b.value_and_grad_fn(fn)
    if compiled:  # fullgraph=False: dynamo does not trace torch.autograd.grad
        run = b.compile(run, reset=False, fullgraph=False)
    value, grads = run({"a": b.from_numpy(a_np), "c": b.from_numpy(c_np)})
    b.evaluate(value, grads)
    assert sorted(grads) == ["a", "c"]
    np.testing.assert_allclose(b.to_numpy(value), b.to_numpy(want_value), rtol=1e-6)
    for got, want in ((grads["a"], want_a), (grads["c"], want_c)):
        np.testing.assert_allclose(b.to_numpy(got), b.to_numpy(want), rtol=1e-5, atol=1e-6)


def test_value_and_grad_fn_needs_autograd() -> None:
    b = gategrad.get_backend("numpy")
    run = b.value_and_grad_fn(_objective(b))
    with pytest.raises(NotImplementedError, match="no autograd"):
        run({"a": np.ones(2), "c": np.ones(2)})


def _double_sum(x: Any) -> Any:
    return 2.0 * x + 1.0


@pytest.mark.parametrize("name", ALL)
def test_compile_options_run(name: str) -> None:
    """Every option combination compiles and computes the function (options a framework lacks
    are ignored); ahead-of-time compilation with donation takes fresh buffers per call."""
    b = _backend(name)
    x_np = np.arange(6, dtype=np.float32).reshape(2, 3)
    want = 2.0 * x_np + 1.0
    variants = [
        b.compile(_double_sum),
        b.compile(_double_sum, reset=False, fullgraph=False, compiler="eager"),
        b.compile(_double_sum, reset=False, donate=(0,), example_args=(b.from_numpy(x_np),)),
    ]
    for fn in variants:
        for _ in range(2):  # a donated buffer is consumed: a new one each call
            out = fn(b.from_numpy(x_np.copy()))
            b.evaluate(out)
            np.testing.assert_allclose(b.to_numpy(out), want)


@pytest.mark.parametrize("name", ALL)
def test_peak_memory_and_machine(name: str) -> None:
    """``peak_memory`` reports a non-negative increment (or ``None``: no counter);
    ``describe`` is JSON for the report; ``device_like('cpu')`` places ``from_numpy``."""
    b = _backend(name)
    x = b.from_numpy(np.ones((64, 64), np.float32))
    compiled = b.compile(_double_sum, reset=False, example_args=(x,))

    def run() -> None:
        b.evaluate(compiled(x))

    run()
    peak = b.peak_memory(run, compiled=compiled, device="cpu")
    if peak is not None:
        assert peak.counter and peak.increment_bytes >= 0
        assert peak.device_peak_bytes is None or peak.device_peak_bytes >= 0
    info = b.describe()
    assert json.loads(json.dumps(info)) == info
    assert isinstance(b.default_device_is_gpu(), bool)
    like = b.device_like("cpu")
    y = b.from_numpy(np.ones(3, np.float32), like=like)
    np.testing.assert_array_equal(b.to_numpy(y), np.ones(3))


@pytest.mark.parametrize("name", ALL)
def test_evaluate_takes_trees(name: str) -> None:
    b = _backend(name)
    x = b.from_numpy(np.ones(3, np.float32))
    b.evaluate({"a": x, "b": [x, (x, {"c": x})]}, x)
