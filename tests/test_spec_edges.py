"""Edges of the gate and loss spec that a mutation-testing sample found untested.

Every expected value comes from the documented formulas (docs/concepts.md, docs/losses.md, the
``Gate`` and loss docstrings) evaluated here in float64 NumPy, or is an exact error class with a
message naming the argument:

- the documented default ``tau=1e-4`` of the ``hard`` gate, and ``Gate.replace(shape=)`` taking
  the new shape's defaults;
- gate parameters: traced arrays refused, 0-d arrays (``floor`` too) read as Python floats;
- callable gate shapes returning a number (broadcast to ``p``'s shape) or a non-array;
- rows with no token in the mask (value checks off): ``p = 1`` and weight 1;
- the loss-parameter intervals at their bounds, open or closed as documented;
- DPO with ``label_smoothing=0`` where ``beta (h_w - h_l)`` is ``+inf``: loss 0, not NaN;
- ``max(0, x)`` with derivative 0 at ``x = 0`` (DPOP's penalty, the hinge's kink);
- token counts of per-token inputs without a mask; ``gate/frac_below_half`` at ``g = 0.5``;
- ``simpo`` refusing a single reference input; the typed stubs' defaults checked at import.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from _backends import skip_unless

import gategrad
from gategrad import Gate
from gategrad.losses import _named

TORCH_OR_NUMPY = ("numpy", "torch")


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -np.asarray(z, dtype=np.float64))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(_log_sigmoid(z))


def _arr(backend: str, x: np.ndarray, *, grad: bool = False):  # noqa: ANN202
    """``x`` as an array of ``backend`` (a leaf requiring grad for torch when ``grad``)."""
    if backend == "numpy":
        return x
    skip_unless(backend)
    import torch

    return torch.tensor(x, requires_grad=grad)


def _np(x) -> np.ndarray:  # noqa: ANN001
    return np.asarray(x.detach().numpy() if hasattr(x, "detach") else x, dtype=np.float64)


# --- Gate construction ----------------------------------------------------------------------


def test_hard_gate_default_tau_is_the_documented_1e_4() -> None:
    # docs/concepts.md, "Gate shapes": hard and power default to tau=1e-4
    tau = 1e-4
    assert Gate(shape="hard").tau == tau
    assert Gate(shape="power").tau == tau
    p = np.array([0.5 * tau, 0.99 * tau, tau, 1.5 * tau, 0.5], dtype=np.float64)
    got = np.asarray(gategrad.gate_value(Gate(shape="hard"), p), dtype=np.float64)
    np.testing.assert_array_equal(got, (p >= tau).astype(np.float64))


def test_traced_gate_parameter_is_refused_by_name() -> None:
    skip_unless("jax")
    import jax

    def build(t):  # noqa: ANN001, ANN202
        return Gate(tau=t).tau

    with pytest.raises(ValueError, match="Gate parameter tau must be a concrete number"):
        jax.jit(build)(0.3)
    with pytest.raises(ValueError, match="Gate parameter floor must be a concrete number"):
        jax.jit(lambda f: Gate(floor=f).floor)(0.1)


@pytest.mark.parametrize("backend", TORCH_OR_NUMPY)
def test_zero_d_array_floor_is_read_as_a_float(backend: str) -> None:
    floor = _arr(backend, np.array(0.25, dtype=np.float32 if backend == "torch" else np.float64))
    gate = Gate(shape="sigmoid", alpha=10.0, tau=0.3, floor=floor)
    assert type(gate.floor) is float and gate.floor == 0.25
    assert type(gate.params["floor"]) is float
    assert hash(gate) == hash(Gate(shape="sigmoid", alpha=10.0, tau=0.3, floor=0.25))
    # applied to NumPy float32 input it gives a NumPy float32 result: floor + (1 - floor) g
    p = np.array([0.0, 0.1, 0.3, 0.8, 1.0], dtype=np.float32)
    got = gategrad.gate_value(gate, p)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    ref = 0.25 + 0.75 * _sigmoid(10.0 * (p.astype(np.float64) - 0.3))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)  # float32 rounding of ~1 values


@pytest.mark.parametrize(
    ("start", "shape", "expected"),
    [
        (Gate(), "hard", Gate(shape="hard")),
        (Gate(shape="log_sigmoid"), "power", Gate(shape="power")),
        (Gate(shape="power"), "sigmoid", Gate()),
        # explicitly set parameters are kept; the filled-in ones are dropped
        (Gate(tau=0.3), "hard", Gate(shape="hard", tau=0.3)),
        (Gate(shape="power", exponent=2.0), "log_sigmoid", None),
    ],
)
def test_replace_shape_takes_the_new_shapes_defaults(
    start: Gate, shape: str, expected: Gate | None
) -> None:
    if expected is None:  # exponent was set explicitly: log_sigmoid does not take it
        with pytest.raises(ValueError, match="exponent is not used by shape='log_sigmoid'"):
            start.replace(shape=shape)
        return
    got = start.replace(shape=shape)
    assert got == expected
    assert got.params == expected.params


# --- callable gate shapes -------------------------------------------------------------------


@pytest.mark.parametrize("backend", TORCH_OR_NUMPY)
@pytest.mark.parametrize("granularity", ["example", "token"])
def test_callable_gate_returning_a_number_is_broadcast(backend: str, granularity: str) -> None:
    logps = np.log(np.array([[0.2, 0.5, 0.9], [0.01, 0.3, 0.6]], dtype=np.float32))
    x = _arr(backend, logps, grad=True)
    gate = Gate(shape=lambda p: 0.375, granularity=granularity)
    gated, stats = gategrad.gate_rejected(x, gate, return_stats=True)
    want_shape = (2,) if granularity == "example" else (2, 3)
    weight = _np(stats.weight)
    assert weight.shape == want_shape
    np.testing.assert_array_equal(weight, np.full(want_shape, 0.375))
    if backend == "torch":
        cot = np.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]], dtype=np.float32)
        gated.backward(_arr("torch", cot))
        np.testing.assert_array_equal(_np(x.grad), 0.375 * cot.astype(np.float64))


@pytest.mark.parametrize("backend", TORCH_OR_NUMPY)
@pytest.mark.parametrize(("fn", "kind"), [(lambda p: [0.5], "list"), (lambda p: None, "NoneType")])
def test_callable_gate_returning_a_non_array_is_a_type_error(backend: str, fn, kind: str) -> None:  # noqa: ANN001
    x = _arr(backend, np.log(np.array([[0.2, 0.5], [0.3, 0.6]], dtype=np.float32)))
    msg = rf"must return an array like p \(or a number\), got {kind}"
    with pytest.raises(TypeError, match=msg):
        gategrad.gate_weights(x, Gate(shape=fn))


# --- rows with no token (value checks off) --------------------------------------------------


@pytest.mark.parametrize("backend", TORCH_OR_NUMPY)
@pytest.mark.parametrize("estimator", ["seq", "mean", "min", "q10"])
def test_empty_row_reads_p_one_and_weight_one(backend: str, estimator: str) -> None:
    logps = np.array([[-1.0, -2.0, -3.0], [-3.0, -4.0, -5.0]], dtype=np.float64)
    mask = np.array([[True, True, False], [False, False, False]])
    gate = Gate(shape="sigmoid", alpha=5.0, tau=0.4, estimator=estimator)
    with gategrad.value_checks(False):
        stats = gategrad.gate_weights(_arr(backend, logps), gate, _arr(backend, mask))
    probs = np.exp(logps[0, :2])
    p0 = {
        "seq": math.exp(logps[0, :2].mean()),
        "mean": probs.mean(),
        "min": probs.min(),
        "q10": np.quantile(probs, 0.1),
    }[estimator]
    np.testing.assert_allclose(_np(stats.p), [p0, 1.0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        _np(stats.weight), [_sigmoid(5.0 * (p0 - 0.4)), 1.0], rtol=1e-12, atol=0
    )


# --- loss parameters at their bounds ---------------------------------------------------------


def _pair() -> tuple[np.ndarray, ...]:
    pc = np.array([-1.0, -2.5], dtype=np.float64)
    pr = np.array([-3.0, -1.5], dtype=np.float64)
    rc = np.array([-1.2, -2.0], dtype=np.float64)
    rr = np.array([-2.0, -2.5], dtype=np.float64)
    return pc, pr, rc, rr


@pytest.mark.parametrize(
    ("loss_type", "name", "value", "interval"),
    [
        ("dpo_shift", "lam", 0.0, "(0, 1]"),
        ("dpo_shift", "lam", 1.0000001, "(0, 1]"),
        ("sigmoid", "label_smoothing", 1.0, "[0, 1)"),
        ("sigmoid", "label_smoothing", -1e-9, "[0, 1)"),
        ("robust", "label_smoothing", 0.5, "[0, 0.5)"),
        ("simpo", "gamma", -0.1, "[0, inf)"),
    ],
)
def test_loss_parameter_outside_its_interval(
    loss_type: str, name: str, value: float, interval: str
) -> None:
    pc, pr, rc, rr = _pair()
    refs = (None, None) if loss_type == "simpo" else (rc, rr)
    msg = re.escape(f"{name} must lie in {interval} for loss_type={loss_type!r}")
    with pytest.raises(ValueError, match=msg):
        gategrad.preference_loss(
            loss_type, pc, pr, *refs, chosen_lengths=2, rejected_lengths=3, **{name: value}
        )


def test_loss_parameters_at_their_closed_bounds_are_accepted() -> None:
    pc, pr, rc, rr = _pair()
    hw, hl = pc - rc, pr - rr
    beta = 0.3
    loss, _ = gategrad.dpo_shift_loss(pc, pr, rc, rr, beta=beta, lam=1.0)
    np.testing.assert_allclose(loss, np.mean(-_log_sigmoid(beta * hw - beta * hl)), rtol=1e-12)
    loss, _ = gategrad.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.0)
    np.testing.assert_allclose(loss, np.mean(-_log_sigmoid(beta * (hw - hl))), rtol=1e-12)
    loss, _ = gategrad.simpo_loss(
        pc, pr, beta=beta, gamma=0.0, chosen_lengths=2, rejected_lengths=3
    )
    ref = np.mean(-_log_sigmoid(beta * pc / 2 - beta * pr / 3))
    np.testing.assert_allclose(loss, ref, rtol=1e-12)


@pytest.mark.parametrize("backend", TORCH_OR_NUMPY)
def test_dpo_saturated_margin_gives_zero_loss_not_nan(backend: str) -> None:
    # beta (h_w - h_l) overflows float32 to +inf: -ls(+inf) = 0 exactly (float64 reference:
    # -ls(1e39) = 0); cDPO's eps * ls(-z) must not be formed at eps = 0 (0 * -inf = NaN)
    pc = np.array([-1.0, -2.0], dtype=np.float32)
    pr = np.array([-11.0, -12.0], dtype=np.float32)
    zero = np.zeros(2, dtype=np.float32)
    beta = 1e38
    ref = np.mean(-_log_sigmoid(beta * (pc.astype(np.float64) - pr)))
    assert ref == 0.0
    args = [_arr(backend, a) for a in (pc, pr, zero, zero)]
    with np.errstate(over="ignore"):
        loss, _ = gategrad.dpo_loss(*args, beta=beta)
    assert _np(loss) == ref


# --- max(0, x) has derivative 0 at 0 ---------------------------------------------------------


def test_dpop_penalty_and_hinge_kink_have_zero_derivative_at_zero() -> None:
    skip_unless("torch")
    import torch

    beta, lam = 0.5, 50.0
    pc = np.array([-2.0, -3.0], dtype=np.float64)
    pr = np.array([-4.0, -1.0], dtype=np.float64)
    rr = np.array([-3.0, -3.5], dtype=np.float64)
    # DPOP at the first step: policy == reference on the chosen side, penalty max(0, 0)
    x = torch.tensor(pc, requires_grad=True)
    loss, _ = gategrad.dpop_loss(
        x, torch.tensor(pr), torch.tensor(pc), torch.tensor(rr), beta=beta, dpop_lambda=lam
    )
    loss.backward()
    z = beta * (0.0 - (pr - rr))
    # d/dpi_w of mean(-ls(z)) with the penalty's derivative 0 at 0: -beta sigmoid(-z) / B
    np.testing.assert_allclose(_np(x.grad), -beta * _sigmoid(-z) / 2, rtol=1e-12, atol=0)
    # hinge exactly at its kink 1 - beta (h_w - h_l) = 0 in the first example
    rc = np.array([-2.0, -3.0], dtype=np.float64)
    pr_h = np.array([-4.0, -1.0], dtype=np.float64)
    rr_h = pr_h + 2.0  # h_l = -2, h_w = 0: beta (h_w - h_l) = 1
    rr_h[1] = pr_h[1] - 1.0  # second example: 1 - beta * (0 - 1) = 1.5 > 0, slope -beta
    x = torch.tensor(pc, requires_grad=True)
    loss, _ = gategrad.hinge_loss(
        x, torch.tensor(pr_h), torch.tensor(rc), torch.tensor(rr_h), beta=beta
    )
    loss.backward()
    np.testing.assert_allclose(_np(x.grad), [0.0, -beta / 2], rtol=0, atol=0)


# --- token counts, gate metrics --------------------------------------------------------------


@pytest.mark.parametrize("backend", TORCH_OR_NUMPY)
def test_per_token_inputs_without_mask_count_every_position(backend: str) -> None:
    rng = np.random.default_rng(3)
    b, t = 3, 4
    pc, pr = -rng.uniform(0.1, 2.0, (b, t)), -rng.uniform(0.1, 2.0, (b, t))
    rc, rr = -rng.uniform(0.1, 2.0, (b, t)), -rng.uniform(0.1, 2.0, (b, t))
    beta = 0.2
    hw, hl = (pc - rc).sum(-1) / t, (pr - rr).sum(-1) / t
    args = [_arr(backend, a) for a in (pc, pr, rc, rr)]
    loss, _ = gategrad.ipo_loss(*args, beta=beta)
    np.testing.assert_allclose(_np(loss), np.mean((hw - hl - 1 / (2 * beta)) ** 2), rtol=1e-12)
    loss, _ = gategrad.simpo_loss(*args[:2], beta=beta, gamma=0.3)
    ref = np.mean(-_log_sigmoid(beta * pc.sum(-1) / t - beta * pr.sum(-1) / t - 0.3))
    np.testing.assert_allclose(_np(loss), ref, rtol=1e-12)


@pytest.mark.parametrize("backend", TORCH_OR_NUMPY)
def test_frac_below_half_counts_strictly_below(backend: str) -> None:
    # tau = 1 and p = 1 (log p = 0): g = sigmoid(alpha * 0) = 0.5 exactly, not below half;
    # B = 4 so that the fraction (1/4) is exact in float32
    alpha = 30.0
    pr = np.array([0.0, -0.5, 0.0, 0.0], dtype=np.float32)
    pc = np.full(4, -1.0, dtype=np.float32)
    ref_side = np.full(4, -1.5, dtype=np.float32)
    p = np.exp(pr.astype(np.float64))
    g = _sigmoid(alpha * (p - 1.0))
    assert np.count_nonzero(g == 0.5) == 3
    args = [_arr(backend, a) for a in (pc, pr, ref_side, ref_side)]
    _, metrics = gategrad.dpo_loss(*args, gate=Gate(alpha=alpha, tau=1.0), rejected_lengths=1)
    assert float(_np(metrics["gate/frac_below_half"])) == np.mean(g < 0.5)
    np.testing.assert_allclose(_np(metrics["gate/mean"]), g.mean(), rtol=1e-6)  # float32 sigmoid


# --- reference inputs and the typed stubs -----------------------------------------------------


@pytest.mark.parametrize("backend", TORCH_OR_NUMPY)
@pytest.mark.parametrize("given", ["ref_chosen_logps", "ref_rejected_logps"])
def test_simpo_refuses_a_single_reference_input(backend: str, given: str) -> None:
    pc, pr, rc, rr = (_arr(backend, a) for a in _pair())
    refs = {"ref_chosen_logps": rc if given == "ref_chosen_logps" else None}
    refs["ref_rejected_logps"] = rr if given == "ref_rejected_logps" else None
    with pytest.raises(ValueError, match="loss_type='simpo' uses no reference model"):
        gategrad.simpo_loss(pc, pr, chosen_lengths=2, rejected_lengths=3, **refs)


def test_typed_stub_defaults_must_match_the_registry() -> None:
    def bad_dpo(*, label_smoothing: float = 0.1) -> None:
        """A stub whose default disagrees with the registry's 0.0."""

    def missing_dpo() -> None:
        """A stub that does not declare label_smoothing."""

    for stub in (bad_dpo, missing_dpo):
        with pytest.raises(AssertionError, match=f"{stub.__name__}: .* != registry"):
            _named("sigmoid")(stub)

    # a stub that agrees builds the loss
    def good_dpo(*, label_smoothing: float = 0.0) -> None:
        """Agrees with the registry."""

    pc, pr, rc, rr = _pair()
    loss, _ = _named("sigmoid")(good_dpo)(pc, pr, rc, rr, beta=0.1)
    np.testing.assert_allclose(
        loss, np.mean(-_log_sigmoid(0.1 * ((pc - rc) - (pr - rr)))), rtol=1e-12
    )
