"""Issue 14, classes 1-10: each bad or extreme input gives a checked error or a finite result."""

from __future__ import annotations

import numpy as np
import pytest
from _backends import ALL, skip_unless

import gategrad
from gategrad import Gate, gate_rejected, gate_weights, token_logps
from gategrad.testing import from_numpy, to_numpy


def _x(backend, a, dtype="float32"):
    return from_numpy(backend, np.asarray(a, dtype=np.float64), dtype)


def test_class1_traced_empty_row_weight_is_one_jax() -> None:
    skip_unless("jax")
    import jax
    import jax.numpy as jnp

    x = jnp.array([[-1.0, -2.0], [-1.0, -3.0]], jnp.float32)
    m = jnp.array([[True, True], [False, False]])
    for est in ("seq", "mean", "min", "q10"):
        g = jax.jit(jax.grad(lambda a, mm, e=est: gate_rejected(a, Gate(estimator=e), mm).sum()))
        grad = np.asarray(g(x, m))
        assert np.isfinite(grad).all()
        np.testing.assert_array_equal(grad[1], [1.0, 1.0])  # the stated constant: weight 1


@pytest.mark.parametrize("backend", ALL)
def test_class2_labels_out_of_range_raise(backend: str) -> None:
    skip_unless(backend)
    logits = _x(backend, np.zeros((1, 3, 4)))
    for bad in (-1, 4):
        labels = from_numpy(backend, np.array([[0, bad, 1]], np.int64))
        with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
            token_logps(logits, labels, shift=False)
        with pytest.raises(ValueError, match="outside \\[0, 4\\)"):
            gategrad.metrics.sequence_metrics(logits, labels, shift=False)


@pytest.mark.parametrize("backend", ALL)
def test_class3_callable_gate_checked(backend: str) -> None:
    skip_unless(backend)
    x = _x(backend, [[-1.0, -2.0]])
    for shape in (lambda p: p * 0 + 2.0, lambda p: -p):
        with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
            gate_weights(x, Gate(shape=shape))
    with pytest.raises(ValueError, match="returned shape"):
        gate_weights(x, Gate(shape=lambda p: p[:, None], granularity="token"))
    w = to_numpy(gate_weights(x, Gate(shape=lambda p: 0.5)).weight)
    np.testing.assert_array_equal(w, [0.5])


def test_class4_scalars_validated() -> None:
    x = np.full(2, -1.0)
    with pytest.raises(ValueError, match="beta"):
        gategrad.dpo_loss(x, x, x, x, beta=np.float32(-0.1))
    for name in ("label_smoothing",):
        with pytest.raises(ValueError, match=name):
            gategrad.dpo_loss(x, x, x, x, **{name: np.bool_(True)})
    with pytest.raises(ValueError, match="lam"):
        gategrad.dpo_shift_loss(x, x, x, x, lam=np.array(-3.0))
    assert Gate(alpha=np.float32(3.0)) == Gate(alpha=3.0)
    with pytest.raises(ValueError, match="alpha"):
        Gate(alpha=np.bool_(True))


@pytest.mark.parametrize("backend", ALL)
def test_class5_logits_refused(backend: str) -> None:
    skip_unless(backend)
    with pytest.raises(ValueError, match="values > 0"):
        gate_rejected(_x(backend, [[100.0, -1.0]]), Gate(estimator="q10"))
    gate_weights(_x(backend, [[0.005, -1.0]]), Gate())  # within the rounding slack


@pytest.mark.parametrize("backend", ALL)
def test_class6_extreme_parameters_finite(backend: str) -> None:
    skip_unless(backend)
    for gate in (
        Gate(alpha=1e39),
        Gate(shape="log_sigmoid", temperature=1e-50),
        Gate(shape="power", exponent=1e39),
    ):
        x = _x(backend, [[np.log(np.float32(gate.tau)), -np.inf], [-1.0, -2.0]])
        w = to_numpy(gate_weights(x, gate.replace(granularity="token")).weight)
        assert np.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()


@pytest.mark.parametrize("backend", ALL)
def test_class7_empty_batches(backend: str) -> None:
    skip_unless(backend)
    e = _x(backend, np.zeros((0,)))
    with pytest.raises(ValueError, match="B = 0"):
        gategrad.dpo_loss(e, e, e, e)
    with pytest.raises(ValueError, match="T = 0"):
        gate_rejected(_x(backend, np.zeros((2, 0))), Gate(estimator="q10"))


def test_class8_hook_rows_and_mask() -> None:
    skip_unless("torch")
    import torch

    import gategrad.torch as gtorch

    model = torch.nn.Linear(3, 5)
    with gtorch.hook(model, Gate(), rejected_rows=slice(10, 20), mask=lambda a, k, o: None):
        with pytest.raises(ValueError, match="selects no row"):
            model(torch.zeros(4, 3))
    with gtorch.hook(model, Gate(), rejected_rows=[7]):
        with pytest.raises(ValueError, match="outside"):
            model(torch.zeros(4, 3))


def test_class9_replace_drops_filled_defaults() -> None:
    assert Gate().replace(shape="log_sigmoid") == Gate(shape="log_sigmoid")
    assert Gate().replace(shape="power", alpha=None) == Gate(shape="power")
    assert Gate(tau=0.05).replace(shape="power").tau == 0.05


def test_class10_internal_errors_become_checked() -> None:
    with pytest.raises(ValueError, match=r"shape \(B,\) or \(B, T\)"):
        gate_rejected(np.full((2, 3, 4), np.nan), Gate())
    with pytest.raises(TypeError, match="mask must hold bools or numbers"):
        gate_rejected(np.full((1, 2), -1.0), Gate(), np.array([["a", "b"]]))
    assert "metrics" in dir(gategrad)


def test_class10_gatestats_under_jit() -> None:
    skip_unless("jax")
    import jax
    import jax.numpy as jnp

    _, st = jax.jit(lambda a: gate_rejected(a, Gate(), return_stats=True))(jnp.array([[-1.0]]))
    np.testing.assert_allclose(np.asarray(st.p), [np.exp(-1.0)], rtol=1e-6)  # one f32 exp
