"""The Gate value object: validation, documented properties, agreement across backends."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _backends import ALL, GATE_ATOL, dtypes, skip_unless
from hypothesis import given
from hypothesis import strategies as st

import gategrad
from gategrad import Gate
from gategrad.testing import from_numpy, to_numpy

NAMED_GATES = [
    Gate(),
    Gate(shape="sigmoid", alpha=50.0, tau=0.3, floor=0.1),
    Gate(shape="log_sigmoid", tau=1e-3, temperature=0.5),
    Gate(shape="hard", tau=0.05),
    Gate(shape="power", tau=0.2, exponent=2.0),
    Gate(shape="log_sigmoid", floor=0.25, granularity="token"),
]

gates = st.one_of(
    st.builds(
        Gate,
        shape=st.just("sigmoid"),
        alpha=st.floats(0.1, 1e3),
        tau=st.floats(1e-6, 1.0),
        floor=st.floats(0.0, 0.99),
    ),
    st.builds(
        Gate,
        shape=st.just("log_sigmoid"),
        tau=st.floats(1e-12, 1.0),
        temperature=st.floats(0.01, 10.0),
        floor=st.floats(0.0, 0.99),
    ),
    st.builds(Gate, shape=st.just("hard"), tau=st.floats(1e-12, 1.0)),
    st.builds(
        Gate, shape=st.just("power"), tau=st.floats(1e-12, 1.0), exponent=st.floats(0.1, 5.0)
    ),
)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": 0.0}, r"tau must lie in \(0, 1\]"),
        ({"tau": 1.5}, r"tau must lie in \(0, 1\]"),
        ({"shape": "log_sigmoid", "tau": -1e-3}, r"tau must lie in \(0, 1\]"),
        ({"shape": "log_sigmoid", "temperature": 0.0}, "temperature must be > 0"),
        ({"shape": "log_sigmoid", "temperature": -2.0}, "temperature must be > 0"),
        ({"alpha": 0.0}, "alpha must be > 0"),
        ({"shape": "power", "exponent": 0.0}, "exponent must be > 0"),
        ({"floor": 1.0}, r"floor must lie in \[0, 1\)"),
        ({"floor": -0.1}, r"floor must lie in \[0, 1\)"),
        ({"estimator": "q150"}, r"quantile must lie in \[0, 1\]"),
        ({"estimator": "median"}, "estimator must be"),
        ({"granularity": "batch"}, "granularity must be one of"),
        ({"shape": "cosine"}, "shape must be one of"),
        ({"tau": float("nan")}, "tau must be finite"),
        ({"alpha": "10"}, "alpha must be a real number"),
        ({"shape": "sigmoid", "temperature": 1.0}, "temperature is not used by shape='sigmoid'"),
        ({"shape": lambda p: p, "tau": 0.1}, "not used by a callable shape"),
    ],
)
def test_invalid_parameters_raise_value_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Gate(**kwargs)


def test_gate_is_frozen_and_hashable() -> None:
    g = Gate(estimator="q10")
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.tau = 0.5  # type: ignore[misc]
    assert hash(g) == hash(Gate(estimator="q10"))
    assert g.quantile == pytest.approx(0.10)
    assert g.params == {"alpha": g.alpha, "tau": g.tau, "floor": 0.0}
    with pytest.raises(ValueError, match="tau"):
        g.replace(tau=2.0)


@given(gates, st.lists(st.floats(-800.0, 0.0), min_size=2, max_size=40))
def test_gate_in_unit_interval_and_monotone(gate: Gate, logps: list[float]) -> None:
    logp = np.sort(np.asarray(logps, dtype=np.float64))
    g = gategrad.gate_value(gate, logp, log=True)
    assert np.all((g >= gate.floor - 1e-15) & (g <= 1.0))
    assert np.all(np.diff(g) >= -1e-15), "gate must be non-decreasing in p"


@given(gates)
def test_zero_probability_is_defined(gate: Gate) -> None:
    g_log = gategrad.gate_value(gate, np.array([-np.inf]), log=True)
    g_p = gategrad.gate_value(gate, np.array([0.0]))
    assert np.isfinite(g_log).all() and np.isfinite(g_p).all()
    if gate.shape != "sigmoid":  # sigmoid(alpha*(0 - tau)) > 0: the paper's gate never closes
        assert g_log[0] == pytest.approx(gate.floor, abs=1e-15)


def test_default_gate_tends_to_one() -> None:
    for shape in ("sigmoid", "log_sigmoid", "hard", "power"):
        g = gategrad.gate_value(Gate(shape=shape), np.array([0.9, 0.99, 1.0]))
        assert g[-1] > 0.98, shape
        assert np.all(np.diff(g) >= 0)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("gate", NAMED_GATES, ids=lambda g: f"{g.shape}-{g.floor}")
def test_gate_values_agree_across_backends(backend: str, gate: Gate) -> None:
    skip_unless(backend)
    logp = np.concatenate([[-np.inf, -1e4], np.linspace(-30.0, 0.0, 61)])
    for dtype in dtypes(backend):
        x = logp.astype(np.float32 if dtype == "bfloat16" else dtype)
        got = to_numpy(gategrad.gate_value(gate, from_numpy(backend, x, dtype), log=True))
        cast = to_numpy(from_numpy(backend, x, dtype)).astype(np.float64)
        ref = gategrad.gate_value(gate, cast, log=True)  # same rounded inputs
        assert got.dtype == (np.float64 if dtype == "float64" else np.float32), dtype
        atol = GATE_ATOL["float32" if backend == "mlx" else dtype]  # MLX float64 ~ float32
        np.testing.assert_allclose(got, ref, rtol=0, atol=atol, err_msg=dtype)
