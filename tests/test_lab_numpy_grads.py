"""The test kit's closed-form NumPy gradients (the NumPy lab's too): against float64 finite
differences of ``gategrad.losses.preference_loss`` (NumPy forward), and the gate on the rejected
branch only."""

from __future__ import annotations

import numpy as np
import pytest

from gategrad import Gate, gate_weights
from gategrad.losses import preference_loss
from gategrad.testing import _closed_form as ng

CASES = [
    ("sigmoid", {}),
    ("sigmoid", {"label_smoothing": 0.2}),
    ("robust", {"label_smoothing": 0.1}),
    ("hinge", {}),
    ("ipo", {}),
    ("ipo", {"length_normalize": False}),
    ("cal_dpo", {}),
    ("dpo_shift", {"lam": 0.7}),
    ("simpo", {"gamma": 0.3}),
    ("dpop", {"dpop_lambda": 5.0}),
]


def _inputs(seed: int, batch: int = 6):
    rng = np.random.default_rng(seed)
    len_w = rng.integers(1, 6, size=batch).astype(np.float64)
    len_l = rng.integers(1, 6, size=batch).astype(np.float64)
    pi_w = -rng.uniform(0.5, 3.0, size=batch) * len_w
    pi_l = -rng.uniform(0.5, 3.0, size=batch) * len_l
    ref_w = pi_w + rng.normal(0.0, 1.0, size=batch)
    ref_l = pi_l + rng.normal(0.0, 1.0, size=batch)
    return pi_w, pi_l, ref_w, ref_l, len_w, len_l


def _value(loss_type, pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, sft, params):
    refs = (None, None) if loss_type == "simpo" else (ref_w, ref_l)
    loss, _ = preference_loss(
        loss_type,
        pi_w,
        pi_l,
        *refs,
        beta=beta,
        chosen_lengths=len_w,
        rejected_lengths=len_l,
        sft_weight=sft,
        **params,
    )
    return float(loss)


@pytest.mark.parametrize("sft", [0.0, 0.5])
@pytest.mark.parametrize(("loss_type", "params"), CASES)
def test_loss_grads_match_losses_module_and_finite_differences(loss_type, params, sft):
    beta = 0.3
    for seed in range(2):
        pi_w, pi_l, ref_w, ref_l, len_w, len_l = _inputs(seed)
        if loss_type == "hinge":  # keep away from the kink at beta (h_w - h_l) = 1
            z = beta * ((pi_w - ref_w) - (pi_l - ref_l))
            pi_w = pi_w + np.where(np.abs(1.0 - z) < 0.05, 0.5, 0.0)
        if loss_type == "dpop":  # and from the kink at ref_w = pi_w
            ref_w = np.where(np.abs(ref_w - pi_w) < 0.05, ref_w + 0.3, ref_w)
        args = (pi_w, pi_l, ref_w, ref_l, len_w, len_l, beta, sft, params)
        lg = ng.loss_grads(
            loss_type,
            pi_w,
            pi_l,
            None if loss_type == "simpo" else ref_w,
            None if loss_type == "simpo" else ref_l,
            beta=beta,
            chosen_lengths=len_w,
            rejected_lengths=len_l,
            sft_weight=sft,
            **params,
        )
        assert lg.loss == pytest.approx(_value(loss_type, *args), rel=1e-12, abs=1e-12)
        h = 1e-6
        for i in range(len(pi_w)):
            for which, d in ((0, lg.d_chosen), (1, lg.d_rejected)):
                plus, minus = [list(args) for _ in range(2)]
                plus[which] = args[which].copy()
                minus[which] = args[which].copy()
                plus[which][i] += h
                minus[which][i] -= h
                fd = (_value(loss_type, *plus) - _value(loss_type, *minus)) / (2 * h)
                assert d[i] == pytest.approx(fd, rel=1e-6, abs=1e-9), (loss_type, which, i)


def test_loss_grads_rejects_bad_arguments():
    x = np.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        ng.loss_grads("nope", x, x, x, x)
    with pytest.raises(ValueError, match="unexpected"):
        ng.loss_grads("sigmoid", x, x, x, x, lam=0.5)
    with pytest.raises(ValueError, match="reference"):
        ng.loss_grads("sigmoid", x, x)
    with pytest.raises(ValueError, match="lengths"):
        ng.loss_grads("ipo", x, x, x, x)


@pytest.mark.parametrize(
    "gate",
    [
        Gate("sigmoid", alpha=200.0, tau=0.02),
        Gate("log_sigmoid", tau=1e-3),
        Gate("sigmoid", estimator="q10"),
        Gate("log_sigmoid", tau=1e-2, granularity="token"),
    ],
)
def test_gate_grad_scales_the_rejected_derivative_only(gate):
    rng = np.random.default_rng(0)
    logps = np.log(rng.uniform(1e-5, 0.5, size=(4, 5)))
    mask = np.ones((4, 5), dtype=bool)
    mask[1, 3:] = False
    d = rng.normal(size=(4, 5))
    gated, g = ng.gate_grad(d, logps, gate, mask=mask)
    stats = gate_weights(logps, gate, mask)
    w = np.asarray(stats.weight)
    expect = d * np.where(mask, w, 1.0) if gate.granularity == "token" else d * w[:, None]
    np.testing.assert_array_equal(gated, expect)
    assert np.all((g >= 0) & (g <= 1))
    same, ones = ng.gate_grad(d, logps, None)
    np.testing.assert_array_equal(same, d)
    assert np.all(ones == 1)


def test_gate_grad_per_sequence_with_lengths():
    logp = np.array([-1.0, -30.0, -200.0])
    d = np.array([0.3, 0.3, 0.3])
    gate = Gate("log_sigmoid", tau=1e-4, temperature=1.0)  # g = p / (p + tau)
    gated, g = ng.gate_grad(d, logp, gate, lengths=np.array([1, 3, 4]))
    p = np.exp(logp / np.array([1, 3, 4]))
    np.testing.assert_allclose(g, p / (p + 1e-4), rtol=1e-12)
    np.testing.assert_allclose(gated, d * g, rtol=1e-15)


def test_softmax_grads_match_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 4))
    w, b = rng.normal(size=(4, 6)), rng.normal(size=6)
    targets = rng.integers(0, 6, size=(7, 2))
    d = rng.normal(size=(7, 2))

    def objective(w_, b_):
        logp = ng.log_softmax(x @ w_ + b_)
        return float(sum((d[:, k] * logp[np.arange(7), targets[:, k]]).sum() for k in range(2)))

    grads = ng.softmax_grads(x, x @ w + b, targets, d)
    h = 1e-6
    for name, arr in (("W", w), ("b", b)):
        fd = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            if name == "W":
                fd[idx] = (objective(plus, b) - objective(minus, b)) / (2 * h)
            else:
                fd[idx] = (objective(w, plus) - objective(w, minus)) / (2 * h)
        np.testing.assert_allclose(grads[name], fd, rtol=1e-6, atol=1e-8)
    one = ng.softmax_grads(x, x @ w + b, targets[:, 0], d[:, 0])
    two = ng.softmax_grads(x, x @ w + b, targets[:, :1], d[:, :1])
    np.testing.assert_allclose(one["W"], two["W"])


def test_toy_step_gradient_is_the_finite_difference_of_the_loss():
    """The toy's ungated step is the exact gradient of the batch-mean loss of
    gategrad.losses; the gated step differs only in the rejected branch."""
    from gategrad.lab.config import LabConfig
    from gategrad.lab.methods import Method
    from gategrad.lab.toy import make_toy_data, toy_step

    cfg = LabConfig(seeds=[0]).resolved()
    cfg.toy.n_train = 6
    data = make_toy_data(cfg, 0)
    params = {k: v.copy() for k, v in data.params0.items()}

    def pick(logp, targets):  # (N, L, V), (N, L) -> the response log-prob (N,)
        return np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0].sum(-1)

    logp0 = ng.log_softmax(data.x_train @ params["W"] + params["b"])
    ref = (pick(logp0, data.chosen_train) + 0.3, pick(logp0, data.rejected_train) - 0.2)

    def loss_of(w):
        logp = ng.log_softmax(data.x_train @ w + params["b"])
        loss, _ = preference_loss(
            "cal_dpo",
            pick(logp, data.chosen_train),
            pick(logp, data.rejected_train),
            ref[0],
            ref[1],
            beta=0.1,
        )
        return float(loss)

    grads, info = toy_step(params, data, Method("cal_dpo"), ref, 0.1)
    assert info["loss"] == pytest.approx(loss_of(params["W"]), rel=1e-12)
    h = 1e-6
    for idx in [(0, 0), (3, 5), (7, 15)]:
        plus, minus = params["W"].copy(), params["W"].copy()
        plus[idx] += h
        minus[idx] -= h
        fd = (loss_of(plus) - loss_of(minus)) / (2 * h)
        assert grads["W"][idx] == pytest.approx(fd, rel=1e-5, abs=1e-9)
    zero, info0 = toy_step(params, data, Method("cal_dpo", "zero"), ref, 0.1)
    assert info0["loss"] == info["loss"]
    assert not np.allclose(zero["W"], grads["W"])


def test_loss_tables_come_from_the_registry_and_the_lab_reexports() -> None:
    from gategrad._loss_registry import LOSS_PARAMS, LOSS_TYPES
    from gategrad.lab import _numpy_grads

    assert ng.GRAD_LOSS_TYPES == LOSS_TYPES
    assert ng._DEFAULTS == LOSS_PARAMS
    for name in ("loss_grads", "gate_grad", "softmax_grads", "log_softmax", "pick", "LossGrads"):
        assert getattr(_numpy_grads, name) is getattr(ng, name)
