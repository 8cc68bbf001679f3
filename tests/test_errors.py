"""Bad inputs raise exceptions that name the problem and the fix, in every backend."""

from __future__ import annotations

import numpy as np
import pytest
from _backends import ALL, skip_unless

import gategrad
from gategrad import Gate, gate_rejected
from gategrad.testing import from_numpy


def _x(backend: str, a) -> object:
    return from_numpy(backend, np.asarray(a, dtype=np.float32), "float32")


@pytest.mark.parametrize("backend", ALL)
def test_shape_and_mask_errors(backend: str) -> None:
    skip_unless(backend)
    x = _x(backend, np.full((3, 4), -1.0))
    with pytest.raises(ValueError, match=r"mask has shape \(3, 5\).*\(3, 4\)"):
        gate_rejected(x, Gate(), from_numpy(backend, np.ones((3, 5), bool)))
    with pytest.raises(ValueError, match=r"shape \(B,\) or \(B, T\), got \(2, 3, 4\)"):
        gate_rejected(_x(backend, np.zeros((2, 3, 4))), Gate())
    mask = np.ones((3, 4), bool)
    mask[1] = False
    mask[2] = False
    with pytest.raises(ValueError, match="mask is all zero in rows 1, 2"):
        gate_rejected(x, Gate(), from_numpy(backend, mask))


@pytest.mark.parametrize("backend", ALL)
def test_value_errors_name_the_row(backend: str) -> None:
    skip_unless(backend)
    a = np.full((3, 4), -1.0)
    a[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or \\+inf at row 2"):
        gate_rejected(_x(backend, a), Gate())
    a[2, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or \\+inf at row 2"):
        gate_rejected(_x(backend, a), Gate())
    with pytest.raises(TypeError, match="floating-point"):
        gate_rejected(from_numpy(backend, np.zeros((2, 3), np.int32)), Gate())


@pytest.mark.parametrize("backend", ALL)
def test_per_sequence_errors(backend: str) -> None:
    skip_unless(backend)
    x = _x(backend, [-3.0, -4.0])
    with pytest.raises(ValueError, match="need lengths="):
        gate_rejected(x, Gate())
    with pytest.raises(ValueError, match=r"lengths has no tokens at row 1"):
        gate_rejected(x, Gate(), lengths=_x(backend, [2.0, 0.0]))
    with pytest.raises(ValueError, match=r"lengths has shape \(3,\)"):
        gate_rejected(x, Gate(), lengths=_x(backend, [2.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="estimator 'q10' needs per-token"):
        gate_rejected(x, Gate(estimator="q10"), lengths=2)
    with pytest.raises(ValueError, match="granularity='token' needs per-token"):
        gate_rejected(x, Gate(granularity="token"), lengths=2)
    with pytest.raises(ValueError, match="mask= is for per-token"):
        gate_rejected(x, Gate(), from_numpy(backend, np.ones(2, bool)))


def test_scale_grad_weight_must_broadcast() -> None:
    with pytest.raises(ValueError, match=r"weight of shape \(3,\) does not broadcast"):
        gategrad.scale_grad(np.zeros((2, 4)), np.ones(3))


def test_value_checks_can_be_switched_off() -> None:
    a = np.full((2, 2), np.nan)
    previous = gategrad.value_checks()
    try:
        gategrad.value_checks(False)
        assert gate_rejected(a, Gate()) is a  # no check, no error: documented opt-out
    finally:
        gategrad.value_checks(previous)
    with pytest.raises(ValueError):
        gate_rejected(a, Gate())


def test_traced_inputs_skip_value_checks_but_stay_finite() -> None:
    """Under jit no value can be inspected: a NaN log-prob then shows in the loss (NaN), the
    documented behaviour; -inf still gives a finite gradient."""
    skip_unless("jax")
    import jax
    import jax.numpy as jnp

    f = jax.jit(jax.grad(lambda x: gate_rejected(x, Gate()).sum()))
    assert np.isnan(
        np.asarray(jax.jit(lambda x: gate_rejected(x, Gate()).sum())(jnp.array([[np.nan, -1.0]])))
    ).all()
    assert np.isfinite(np.asarray(f(jnp.array([[-np.inf, -1.0]])))).all()
