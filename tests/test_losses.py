"""The DPO loss family (gategrad.losses): values and gradients against a NumPy float64 reference,
in every backend, ungated and gated; metrics; edge cases; tracing behaviour."""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from _backends import fw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gategrad
from gategrad import Gate, gate_weights
from gategrad.losses import GATE_METRIC_KEYS, LOSS_PARAMS, LOSS_TYPES, METRIC_KEYS

try:  # float64 in JAX for the reference comparisons (a global flag: set, never unset)
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover - jax is optional
    pass

BACKENDS = ("numpy", "torch", "jax", "mlx")
GRAD_BACKENDS = ("torch", "jax", "mlx")
NAMED = {
    "sigmoid": gategrad.dpo_loss,
    "ipo": gategrad.ipo_loss,
    "cal_dpo": gategrad.cal_dpo_loss,
    "dpo_shift": gategrad.dpo_shift_loss,
    "simpo": gategrad.simpo_loss,
    "dpop": gategrad.dpop_loss,
    "hinge": gategrad.hinge_loss,
    "robust": gategrad.robust_dpo_loss,
}
# non-default parameters, so every parameter reaches the formula
PARAMS = {
    "sigmoid": {"label_smoothing": 0.1},
    "ipo": {},
    "cal_dpo": {"calibration_weight": 0.7},
    "dpo_shift": {"lam": 0.8},
    "simpo": {"gamma": 0.3},
    "dpop": {"dpop_lambda": 5.0},
    "hinge": {},
    "robust": {"label_smoothing": 0.2},
}
GATES = {
    "seq_sigmoid": Gate(shape="sigmoid", alpha=50.0, tau=0.2),
    "seq_log": Gate(shape="log_sigmoid", tau=1e-2, floor=0.05),
    "q10_power": Gate(shape="power", tau=0.05, estimator="q10"),
    "token_log": Gate(shape="log_sigmoid", tau=0.1, granularity="token"),
}
INPUT_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
               "ref_rejected_logps")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the NumPy float64 reference, written independently of gategrad


def _ls(z):
    return -np.logaddexp(0.0, -z)


def ref_per_example(lt, pw, pl, rw, rl, nw, nl, beta, p):
    if lt == "simpo":
        return -_ls(beta * pw / nw - beta * pl / nl - p.get("gamma", 0.5))
    hw, hl = pw - rw, pl - rl
    if lt == "sigmoid":
        e = p.get("label_smoothing", 0.0)
        z = beta * (hw - hl)
        return -(1 - e) * _ls(z) - e * _ls(-z)
    if lt == "robust":
        e = p.get("label_smoothing", 0.0)
        z = beta * (hw - hl)
        return (-(1 - e) * _ls(z) + e * _ls(-z)) / (1 - 2 * e)
    if lt == "hinge":
        return np.maximum(0.0, 1 - beta * (hw - hl))
    if lt == "ipo":
        if p.get("length_normalize", True):
            hw, hl = hw / nw, hl / nl
        return (hw - hl - 1 / (2 * beta)) ** 2
    if lt == "cal_dpo":
        w = p.get("calibration_weight", 0.5)  # 0.5: the official code (tests/test_loss_sources.py)
        return -_ls(hw - hl) + w * ((hw - 1 / (2 * beta)) ** 2 + (hl + 1 / (2 * beta)) ** 2)
    if lt == "dpo_shift":
        return -_ls(beta * hw - p.get("lam", 0.95) * beta * hl)
    if lt == "dpop":
        return -_ls(beta * (hw - hl - p.get("dpop_lambda", 50.0) * np.maximum(0.0, rw - pw)))
    raise AssertionError(lt)


def ref_loss(lt, x, beta, p, sft_weight=0.0):
    """Mean loss from per-sequence sums ``x`` (dict: pw, pl, rw, rl, nw, nl)."""
    losses = ref_per_example(lt, x["pw"], x["pl"], x["rw"], x["rl"], x["nw"], x["nl"], beta, p)
    loss = np.mean(losses)
    if sft_weight:
        loss = loss + sft_weight * np.mean(-x["pw"] / x["nw"])
    return loss


def ref_metrics(lt, x, beta):
    if lt == "simpo":
        cw, cl = beta * x["pw"] / x["nw"], beta * x["pl"] / x["nl"]
    else:
        cw, cl = beta * (x["pw"] - x["rw"]), beta * (x["pl"] - x["rl"])
    return {
        "rewards/chosen": cw.mean(),
        "rewards/rejected": cl.mean(),
        "rewards/accuracies": (cw > cl).mean(),
        "rewards/margins": (cw - cl).mean(),
        "logps/chosen": x["pw"].mean(),
        "logps/rejected": x["pl"].mean(),
    }


def fd_grad(f, arrays, i, h=1e-6):
    """Central finite differences of the float64 scalar ``f(*arrays)`` w.r.t. ``arrays[i]``."""
    a = [np.array(v, dtype=np.float64) for v in arrays]
    g = np.zeros_like(a[i])
    for idx in np.ndindex(a[i].shape):
        step = h * max(1.0, abs(a[i][idx]))
        old = a[i][idx]
        a[i][idx] = old + step
        up = f(*a)
        a[i][idx] = old - step
        down = f(*a)
        a[i][idx] = old
        g[idx] = (up - down) / (2 * step)
    return g


# ---------------------------------------------------------------------------------------------
# inputs


def make_case(seed, batch, layout, loss_type):
    """Per-sequence (``seq``) or per-token (``token``) inputs, with their per-sequence sums."""
    rng = np.random.default_rng(seed)
    if layout == "seq":
        nw = rng.integers(1, 12, batch).astype(np.float64)
        nl = rng.integers(1, 12, batch).astype(np.float64)
        pw = -rng.uniform(0.2, 2.0, batch) * nw
        pl = -rng.uniform(0.2, 2.0, batch) * nl
        rw = pw + rng.normal(0, 1.0, batch)
        rl = pl + rng.normal(0, 1.0, batch)
        arrays = [pw, pl, rw, rl]
        extra = {"chosen_lengths": nw, "rejected_lengths": nl}
        sums = dict(pw=pw, pl=pl, rw=rw, rl=rl, nw=nw, nl=nl)
    else:
        tw, tl = int(rng.integers(2, 7)), int(rng.integers(2, 7))
        mw = rng.random((batch, tw)) < 0.7
        ml = rng.random((batch, tl)) < 0.7
        mw[:, 0] = True
        ml[:, 0] = True
        pw = -rng.exponential(1.5, (batch, tw))
        pl = -rng.exponential(1.5, (batch, tl))
        rw = pw + rng.normal(0, 0.3, (batch, tw))
        rl = pl + rng.normal(0, 0.3, (batch, tl))
        arrays = [pw, pl, rw, rl]
        extra = {"chosen_mask": mw, "rejected_mask": ml}
        sums = dict(
            pw=(pw * mw).sum(-1), pl=(pl * ml).sum(-1), rw=(rw * mw).sum(-1),
            rl=(rl * ml).sum(-1), nw=mw.sum(-1).astype(float), nl=ml.sum(-1).astype(float),
        )  # fmt: skip
    if loss_type == "simpo":
        arrays = arrays[:2]
    return arrays, extra, sums


def ref_from_arrays(lt, layout, extra, beta, p, sft_weight=0.0):
    """The reference loss as a function of the raw input arrays (for finite differences)."""

    def f(*arrays):
        pw, pl = arrays[0], arrays[1]
        rw, rl = (arrays[2], arrays[3]) if len(arrays) > 2 else (None, None)
        if layout == "seq":
            x = dict(pw=pw, pl=pl, rw=rw, rl=rl, nw=extra["chosen_lengths"],
                     nl=extra["rejected_lengths"])  # fmt: skip
        else:
            mw, ml = extra["chosen_mask"], extra["rejected_mask"]
            x = dict(
                pw=(pw * mw).sum(-1), pl=(pl * ml).sum(-1),
                rw=None if rw is None else (rw * mw).sum(-1),
                rl=None if rl is None else (rl * ml).sum(-1),
                nw=mw.sum(-1).astype(float), nl=ml.sum(-1).astype(float),
            )  # fmt: skip
        return ref_loss(lt, x, beta, p, sft_weight)

    return f


# ---------------------------------------------------------------------------------------------
# framework adapters


def conv(name, a):
    """NumPy -> framework (float64; MLX float32, whose float64 is CPU-only and ~1e-7 accurate)."""
    if a is None or isinstance(a, (int, float)):
        return a
    a = np.asarray(a)
    mod = fw(name)
    if name == "numpy":
        return a
    if name == "torch":
        return mod.tensor(a)
    if name == "jax":
        return mod.asarray(a)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    return mod.array(a)


def to_np(x):
    if hasattr(x, "detach"):
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
    return np.asarray(x, dtype=np.float64)


def value_and_grads(name, f, arrays):
    """``f(*framework_arrays)`` and its gradient w.r.t. every array (NumPy: no gradients)."""
    xs = [conv(name, a) for a in arrays]
    if name == "numpy":
        return to_np(f(*xs)), None
    if name == "torch":
        xs = [x.requires_grad_(True) for x in xs]
        out = f(*xs)
        grads = fw("torch").autograd.grad(out, xs, allow_unused=True)
        return to_np(out), [None if g is None else to_np(g) for g in grads]
    if name == "jax":
        import jax

        v, grads = jax.value_and_grad(f, argnums=tuple(range(len(xs))))(*xs)
        return to_np(v), [to_np(g) for g in grads]
    mx = fw("mlx")
    v, grads = mx.value_and_grad(f, argnums=list(range(len(xs))))(*xs)
    return to_np(v), [to_np(g) for g in grads]


def tol(name):
    """(value rtol, gradient scale-rtol) against the float64 closed form.

    float64 backends: a loss is a few dozen roundings of O(10) values, so 1e-12 relative holds
    with a wide margin; gradients are compared relative to the largest entry (1e-6 covers the
    1/(2 beta) and length divisions that amplify by <= ~100). MLX computes in float32 here
    (its float64 transcendentals have float32 precision): 2e-5 is ~160 ulps for the value, a
    sum over B <= 8 examples of log_sigmoid terms; 1e-4 for gradients amplified as above.
    """
    return (2e-5, 1e-4) if name == "mlx" else (1e-12, 1e-6)


def close_scaled(a, b, rtol):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
    return float(np.max(np.abs(a - b))) <= rtol * scale if a.size else True


def loss_fn(lt, extra, beta, p, gate=None, sft_weight=0.0, name="numpy"):
    kw = {k: conv(name, v) for k, v in extra.items()}

    def f(*xs):
        loss, _ = gategrad.preference_loss(
            lt, *xs, beta=beta, gate=gate, sft_weight=sft_weight, **kw, **p
        )
        return loss

    return f


# ---------------------------------------------------------------------------------------------
# value and gradient against the NumPy reference, every loss x backend x layout


@pytest.mark.parametrize("layout", ["seq", "token"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_value_and_grad_match_numpy_reference(backend, loss_type, layout):
    fw(backend)
    arrays, extra, sums = make_case(7, 5, layout, loss_type)
    beta, p = 0.3, PARAMS[loss_type]
    value, grads = value_and_grads(
        backend, loss_fn(loss_type, extra, beta, p, name=backend), arrays
    )
    expected = ref_loss(loss_type, sums, beta, p)
    vtol, gtol = tol(backend)
    assert value == pytest.approx(expected, rel=vtol, abs=vtol)
    if grads is None:
        return
    f = ref_from_arrays(loss_type, layout, extra, beta, p)
    for i, g in enumerate(grads):
        assert close_scaled(g, fd_grad(f, arrays, i), gtol), (INPUT_NAMES[i], g)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_named_wrappers_equal_preference_loss(loss_type):
    arrays, extra, _ = make_case(3, 4, "seq", loss_type)
    a, ma = gategrad.preference_loss(loss_type, *arrays, beta=0.2, **extra, **PARAMS[loss_type])
    b, mb = NAMED[loss_type](*arrays, beta=0.2, **extra, **PARAMS[loss_type])
    assert a == b and ma.keys() == mb.keys()
    assert NAMED[loss_type].__name__.endswith("_loss") and NAMED[loss_type].__doc__


def test_defaults_match_reference():
    """Default loss parameters are the documented ones (LOSS_PARAMS)."""
    for lt in LOSS_TYPES:
        arrays, extra, sums = make_case(11, 3, "seq", lt)
        loss, _ = gategrad.preference_loss(lt, *arrays, **extra)
        assert float(loss) == pytest.approx(ref_loss(lt, sums, 0.1, LOSS_PARAMS[lt]), rel=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sft_term(backend):
    fw(backend)
    arrays, extra, sums = make_case(5, 4, "token", "sigmoid")
    value, grads = value_and_grads(
        backend, loss_fn("sigmoid", extra, 0.1, {}, sft_weight=0.7, name=backend), arrays
    )
    expected = ref_loss("sigmoid", sums, 0.1, {}, sft_weight=0.7)
    vtol, gtol = tol(backend)
    assert value == pytest.approx(expected, rel=vtol)
    assert expected != pytest.approx(ref_loss("sigmoid", sums, 0.1, {}), rel=1e-3)
    if grads is not None:
        f = ref_from_arrays("sigmoid", "token", extra, 0.1, {}, sft_weight=0.7)
        assert close_scaled(grads[0], fd_grad(f, arrays, 0), gtol)


# ---------------------------------------------------------------------------------------------
# the gate: value bitwise unchanged, chosen and reference gradients bitwise unchanged,
# rejected gradient = ungated gradient * g


def _expected_weight(name, arrays, extra, gate, layout):
    """The gate weight broadcast like the rejected input, computed by the same backend."""
    rej = conv(name, arrays[1])
    if layout == "seq":
        stats = gate_weights(rej, gate, lengths=conv(name, extra["rejected_lengths"]))
        return to_np(stats.weight)
    mask = conv(name, extra["rejected_mask"])
    stats = gate_weights(rej, gate, mask)
    w = to_np(stats.weight)
    if gate.granularity == "token":
        return np.where(extra["rejected_mask"], w, 1.0)
    return w[:, None]


def check_gated(backend, loss_type, layout, gate_name, seed=0, batch=4, beta=0.3):
    gate = GATES[gate_name]
    arrays, extra, _ = make_case(seed, batch, layout, loss_type)
    p = PARAMS[loss_type]
    v0, g0 = value_and_grads(backend, loss_fn(loss_type, extra, beta, p, name=backend), arrays)
    v1, g1 = value_and_grads(
        backend, loss_fn(loss_type, extra, beta, p, gate=gate, name=backend), arrays
    )
    assert v1.tobytes() == v0.tobytes()  # the loss value is bitwise unchanged
    if g0 is None:
        return
    for i in (0, 2, 3):  # chosen and reference gradients: bitwise unchanged
        if i < len(g0):
            assert g1[i].tobytes() == g0[i].tobytes(), INPUT_NAMES[i]
    weight = _expected_weight(backend, arrays, extra, gate, layout)
    dt = np.float32 if backend == "mlx" else np.float64  # the backend's gradient dtype
    np.testing.assert_array_equal(g1[1].astype(dt), g0[1].astype(dt) * weight.astype(dt))
    assert np.all((weight >= 0) & (weight <= 1))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_gate_scales_only_rejected_gradient(backend, loss_type):
    fw(backend)
    check_gated(backend, loss_type, "seq", "seq_sigmoid")
    check_gated(backend, loss_type, "token", "q10_power")
    check_gated(backend, loss_type, "token", "token_log")


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # JAX is covered by the parametrized test above: in eager mode it compiles every op anew
    # for each new shape, which random shapes make slow.
    backend=st.sampled_from(["torch", "mlx"]),
    loss_type=st.sampled_from(LOSS_TYPES),
    layout=st.sampled_from(["seq", "token"]),
    gate_name=st.sampled_from(sorted(GATES)),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 6),
    beta=st.floats(0.05, 2.0),
)
def test_gate_property(backend, loss_type, layout, gate_name, seed, batch, beta):
    """For any loss, layout and gate: gated value == ungated value; only the rejected
    gradient changes, by exactly the factor g (per example or per token)."""
    try:
        fw(backend)
    except pytest.skip.Exception:
        return
    if layout == "seq" and GATES[gate_name].granularity == "token":
        gate_name = "seq_log"
    if layout == "seq" and GATES[gate_name].estimator != "seq":
        gate_name = "seq_sigmoid"
    check_gated(backend, loss_type, layout, gate_name, seed=seed, batch=batch, beta=beta)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    loss_type=st.sampled_from(LOSS_TYPES),
    layout=st.sampled_from(["seq", "token"]),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 6),
    beta=st.floats(0.05, 2.0),
)
def test_torch_matches_reference_property(loss_type, layout, seed, batch, beta):
    """Random inputs: torch float64 value and gradients equal the NumPy reference."""
    fw("torch")
    arrays, extra, sums = make_case(seed, batch, layout, loss_type)
    p = PARAMS[loss_type]
    value, grads = value_and_grads(
        "torch", loss_fn(loss_type, extra, beta, p, name="torch"), arrays
    )
    assert value == pytest.approx(ref_loss(loss_type, sums, beta, p), rel=1e-10, abs=1e-12)
    f = ref_from_arrays(loss_type, layout, extra, beta, p)
    for i, g in enumerate(grads):
        assert close_scaled(g, fd_grad(f, arrays, i), 1e-5), INPUT_NAMES[i]


# ---------------------------------------------------------------------------------------------
# metrics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "ipo"])
def test_metrics_match_trl_definitions(backend, loss_type):
    fw(backend)
    arrays, extra, sums = make_case(2, 6, "token", loss_type)
    xs = [conv(backend, a) for a in arrays]
    kw = {k: conv(backend, v) for k, v in extra.items()}
    _, m = gategrad.preference_loss(loss_type, *xs, beta=0.4, **kw)
    assert tuple(m) == METRIC_KEYS  # no gate/* keys without a gate
    rtol = tol(backend)[0] * 10
    for key, want in ref_metrics(loss_type, sums, 0.4).items():
        assert to_np(m[key]) == pytest.approx(want, rel=rtol, abs=rtol), key
        assert to_np(m[key]).shape == ()


def test_gate_metrics_example_and_token():
    torch = fw("torch")
    arrays, extra, _ = make_case(4, 5, "token", "sigmoid")
    xs = [torch.tensor(a, requires_grad=True) for a in arrays]
    kw = {k: torch.tensor(v) for k, v in extra.items()}
    for gate in (GATES["seq_sigmoid"], GATES["token_log"]):
        loss, m = gategrad.dpo_loss(*xs, gate=gate, **kw)
        assert tuple(m) == METRIC_KEYS + GATE_METRIC_KEYS
        assert not any(v.requires_grad for v in m.values())
        stats = gate_weights(arrays[1], gate, extra["rejected_mask"])
        w, p = stats.weight, stats.p
        if gate.granularity == "token":
            sel = extra["rejected_mask"]
            w, p = w[sel], p[sel]
        assert float(m["gate/mean"]) == pytest.approx(w.mean(), rel=1e-12)
        assert float(m["gate/frac_below_half"]) == pytest.approx((w < 0.5).mean(), rel=1e-12)
        assert float(m["gate/p_mean"]) == pytest.approx(p.mean(), rel=1e-12)


def test_metrics_without_gradient_jax_and_mlx():
    arrays, extra, _ = make_case(4, 3, "seq", "sigmoid")
    for name in ("jax", "mlx"):
        try:
            fw(name)
        except pytest.skip.Exception:
            continue
        xs = [conv(name, a) for a in arrays]
        kw = {k: conv(name, v) for k, v in extra.items()}
        _, m = gategrad.dpo_loss(*xs, gate=GATES["seq_log"], **kw)
        assert all(to_np(v).shape == () for v in m.values())
        assert type(m["gate/mean"]).__module__.split(".")[0] in ("jax", "jaxlib", "mlx")


# ---------------------------------------------------------------------------------------------
# dtypes


def test_low_precision_inputs_computed_in_float32():
    torch = fw("torch")
    arrays, extra, sums = make_case(1, 4, "token", "sigmoid")
    xs = [torch.tensor(a, dtype=torch.bfloat16, requires_grad=True) for a in arrays]
    kw = {k: torch.tensor(v) for k, v in extra.items()}
    loss, m = gategrad.dpo_loss(*xs, gate=GATES["token_log"], **kw)
    assert loss.dtype == torch.float32 and m["logps/chosen"].dtype == torch.float32
    loss.backward()
    assert xs[1].grad.dtype == torch.bfloat16
    rounded = {k: v for k, v in sums.items()}
    bf = [x.detach().double().numpy() for x in xs]
    rounded.update(
        pw=(bf[0] * extra["chosen_mask"]).sum(-1), pl=(bf[1] * extra["rejected_mask"]).sum(-1),
        rw=(bf[2] * extra["chosen_mask"]).sum(-1), rl=(bf[3] * extra["rejected_mask"]).sum(-1),
    )  # fmt: skip
    assert float(loss.detach()) == pytest.approx(ref_loss("sigmoid", rounded, 0.1, {}), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases_raise_value_error(backend):
    fw(backend)
    arrays, extra, _ = make_case(0, 3, "seq", "sigmoid")
    xs = [conv(backend, a) for a in arrays]
    kw = {k: conv(backend, v) for k, v in extra.items()}
    for beta in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            gategrad.dpo_loss(*xs, beta=beta)
    short = conv(backend, arrays[1][:2])
    with pytest.raises(ValueError, match="batch sizes differ"):
        gategrad.dpo_loss(xs[0], short, xs[2], xs[3])
    for bad in (float("nan"), float("-inf"), float("inf")):
        a = arrays[1].copy()
        a[1] = bad
        with pytest.raises(ValueError, match=r"policy_rejected_logps holds NaN or \+-inf at row 1"):
            gategrad.dpo_loss(xs[0], conv(backend, a), xs[2], xs[3])
        r = arrays[2].copy()
        r[2] = bad
        with pytest.raises(ValueError, match="ref_chosen_logps holds NaN"):
            gategrad.dpo_loss(xs[0], xs[1], conv(backend, r), xs[3])
    zero = extra["chosen_lengths"].copy()
    zero[0] = 0
    with pytest.raises(ValueError, match="no tokens at row 0"):
        gategrad.ipo_loss(*xs, chosen_lengths=conv(backend, zero),
                          rejected_lengths=kw["rejected_lengths"])  # fmt: skip
    tok, tex, _ = make_case(0, 3, "token", "sigmoid")
    mask = tex["rejected_mask"].copy()
    mask[2] = False
    with pytest.raises(ValueError, match="rejected_mask has no tokens at row 2"):
        gategrad.dpo_loss(*[conv(backend, a) for a in tok],
                          chosen_mask=conv(backend, tex["chosen_mask"]),
                          rejected_mask=conv(backend, mask))  # fmt: skip


def test_argument_errors():
    arrays, extra, _ = make_case(0, 3, "seq", "sigmoid")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        gategrad.preference_loss("kto", *arrays)
    with pytest.raises(ValueError, match="unexpected"):
        gategrad.dpo_loss(*arrays, lam=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        gategrad.robust_dpo_loss(*arrays, label_smoothing=0.5)
    with pytest.raises(ValueError, match="lam"):
        gategrad.dpo_shift_loss(*arrays, lam=1.5)
    with pytest.raises(ValueError, match="needs ref_chosen_logps"):
        gategrad.dpo_loss(arrays[0], arrays[1])
    with pytest.raises(ValueError, match="uses no reference"):
        gategrad.simpo_loss(*arrays, **extra)
    with pytest.raises(ValueError, match="normalises by length"):
        gategrad.simpo_loss(arrays[0], arrays[1])
    with pytest.raises(ValueError, match="sft_weight"):
        gategrad.dpo_loss(*arrays, sft_weight=1.0)
    with pytest.raises(ValueError, match="sft_weight"):
        gategrad.dpo_loss(*arrays, sft_weight=-1.0)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        gategrad.dpo_loss(arrays[0][:, None, None], *arrays[1:])
    with pytest.raises(ValueError, match="chosen_mask= is for per-token"):
        gategrad.dpo_loss(*arrays, chosen_mask=np.ones((3, 2), bool))
    with pytest.raises(TypeError, match="gategrad.Gate"):
        gategrad.dpo_loss(*arrays, gate="seq")
    with pytest.raises(TypeError, match="mixed frameworks"):
        torch = fw("torch")
        gategrad.dpo_loss(torch.tensor(arrays[0]), *arrays[1:])


def test_per_sequence_inputs_with_token_gate_explain():
    arrays, extra, _ = make_case(0, 3, "seq", "sigmoid")
    for gate in (GATES["token_log"], GATES["q10_power"]):
        with pytest.raises(ValueError, match=r"per-token\s+log-probs: pass policy_rejected_logps"):
            gategrad.dpo_loss(*arrays, gate=gate, **extra)
    with pytest.raises(ValueError, match="rejected_lengths="):
        gategrad.dpo_loss(*arrays, gate=GATES["seq_log"])
    # rejected_lengths alone are enough for the seq gate
    loss, m = gategrad.dpo_loss(*arrays, gate=GATES["seq_log"], rejected_lengths=4)
    assert "gate/mean" in m


def test_value_checks_can_be_switched_off():
    arrays, extra, _ = make_case(0, 3, "seq", "sigmoid")
    arrays[1][0] = np.nan
    old = gategrad.value_checks()
    try:
        gategrad.value_checks(False)
        loss, _ = gategrad.dpo_loss(*arrays)
        assert np.isnan(loss)
    finally:
        gategrad.value_checks(old)


# ---------------------------------------------------------------------------------------------
# under tracing: documented behaviour is "no value checks; bad values propagate as NaN/inf";
# static checks (beta, shapes) still raise


def _bad_inputs(kind):
    arrays, extra, _ = make_case(0, 3, "seq", "sigmoid")
    if kind == "nan":
        arrays[1][0] = np.nan
    elif kind == "-inf":
        arrays[0][0] = -np.inf  # chosen log-prob -inf: the DPO loss is +inf
    return arrays, extra


def test_jax_jit_skips_value_checks():
    fw("jax")
    import jax

    f = jax.jit(lambda *xs: gategrad.dpo_loss(*xs, gate=GATES["seq_log"], rejected_lengths=3)[0])
    arrays, _ = _bad_inputs("nan")
    assert np.isnan(float(f(*[conv("jax", a) for a in arrays])))
    arrays, _ = _bad_inputs("-inf")
    assert float(f(*[conv("jax", a) for a in arrays])) == math.inf
    arrays, _ = _bad_inputs("nan")
    with pytest.raises(ValueError, match="policy_rejected_logps holds NaN"):  # eager: raises
        gategrad.dpo_loss(*[conv("jax", a) for a in arrays])
    zero = jax.jit(lambda *xs: gategrad.ipo_loss(*xs[:4], chosen_lengths=xs[4],
                                                 rejected_lengths=xs[5])[0])  # fmt: skip
    arrays, extra = _bad_inputs(None)
    nw = extra["chosen_lengths"].copy()
    nw[0] = 0
    out = zero(*[conv("jax", a) for a in arrays], conv("jax", nw),
               conv("jax", extra["rejected_lengths"]))  # fmt: skip
    # issue 14 class 1 (intended contract change): a zero-length response under jit counts as
    # one token (docs/errors.md), so the loss is finite and equals eager with length 1 there
    one = extra["chosen_lengths"].copy()
    one[0] = 1
    ref = gategrad.ipo_loss(*arrays, chosen_lengths=one,
                            rejected_lengths=extra["rejected_lengths"])[0]  # fmt: skip
    assert float(out) == pytest.approx(float(ref), rel=1e-12)  # float64 both: same ops
    with pytest.raises(ValueError, match="beta"):  # static checks still raise under jit
        jax.jit(lambda *xs: gategrad.dpo_loss(*xs, beta=0.0)[0])(*[conv("jax", a) for a in arrays])


def test_jax_jit_grad_equals_eager():
    fw("jax")
    import jax

    arrays, extra, _ = make_case(9, 4, "token", "dpop")

    def f(pw, pl, rw, rl, mw, ml):
        return gategrad.dpop_loss(
            pw, pl, rw, rl, gate=GATES["token_log"], chosen_mask=mw, rejected_mask=ml
        )[0]

    xs = [conv("jax", a) for a in arrays] + [conv("jax", extra["chosen_mask"]),
                                             conv("jax", extra["rejected_mask"])]  # fmt: skip
    eager = jax.grad(f, argnums=(0, 1, 2, 3))(*xs)
    jitted = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(*xs)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


def test_torch_compile_skips_value_checks():
    torch = fw("torch")
    torch._dynamo.reset()

    def f(pw, pl, rw, rl):
        return gategrad.dpo_loss(pw, pl, rw, rl, gate=GATES["seq_log"], rejected_lengths=3)[0]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    arrays, _ = _bad_inputs("nan")
    xs = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = compiled(*xs)
    assert torch.isnan(out)
    with pytest.raises(ValueError, match="policy_rejected_logps holds NaN"):
        f(*xs)  # eager: raises
    good, _ = _bad_inputs(None)
    xs = [torch.tensor(a, requires_grad=True) for a in good]
    compiled(*xs).backward()
    ys = [torch.tensor(a, requires_grad=True) for a in good]
    f(*ys).backward()
    for a, b in zip(xs, ys, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)


def test_mlx_compile_skips_value_checks():
    mx = fw("mlx")
    f = mx.compile(lambda *xs: gategrad.dpo_loss(*xs, gate=GATES["seq_log"], rejected_lengths=3)[0])
    arrays, _ = _bad_inputs("nan")
    assert np.isnan(to_np(f(*[conv("mlx", a) for a in arrays])))
    with pytest.raises(ValueError, match="policy_rejected_logps holds NaN"):
        gategrad.dpo_loss(*[conv("mlx", a) for a in arrays])


# ---------------------------------------------------------------------------------------------
# DPO-Shift schedule


def test_dpo_shift_lambda_schedules():
    f = gategrad.dpo_shift_lambda
    assert f(0, 100) == 0.5 and f(100, 100) == 1.0 and f(50, 100) == 0.75
    assert f(0, 100, "linear_decrease") == 1.0 and f(100, 100, "linear_decrease") == 0.5
    assert f(25, 100, "linear_decrease", lam_min=0.75) == pytest.approx(0.9375)
    assert f(7, 10, "fixed", lam_min=0.85) == 0.85
    assert f(500, 100) == 1.0 and f(-3, 100) == 0.5  # clipped to [0, total_steps]
    for bad in ({"schedule": "cosine"}, {"lam_min": 0.0}, {"lam_max": 1.5},
                {"lam_min": 0.9, "lam_max": 0.8}):  # fmt: skip
        with pytest.raises(ValueError):
            f(1, 10, **bad)
    with pytest.raises(ValueError, match="total_steps"):
        f(1, 0)
    arrays, extra, sums = make_case(0, 3, "seq", "dpo_shift")
    lam = f(3, 10)
    loss, _ = gategrad.dpo_shift_loss(*arrays, lam=lam)
    assert float(loss) == pytest.approx(ref_loss("dpo_shift", sums, 0.1, {"lam": lam}), 1e-12)


def test_dpo_shift_with_lambda_one_is_dpo_and_cal_dpo_beta_independent_sigmoid():
    arrays, extra, _ = make_case(0, 5, "seq", "sigmoid")
    a, _ = gategrad.dpo_shift_loss(*arrays, lam=1.0, beta=0.3)
    b, _ = gategrad.dpo_loss(*arrays, beta=0.3)
    assert float(a) == pytest.approx(float(b), rel=1e-14)
    c, _ = gategrad.robust_dpo_loss(*arrays, beta=0.3)
    assert float(c) == pytest.approx(float(b), rel=1e-14)  # label_smoothing=0: plain DPO


# ---------------------------------------------------------------------------------------------
# packaging


def test_import_gategrad_imports_no_framework():
    code = (
        "import gategrad, sys; "
        "assert not any(m in sys.modules for m in ('torch', 'jax', 'mlx')), "
        "[m for m in ('torch', 'jax', 'mlx') if m in sys.modules]; "
        "gategrad.preference_loss; gategrad.token_logps; gategrad.attach"
    )
    # cwd outside the repository: its gategrad/ (no backends/) must not shadow the install
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tempfile.gettempdir())


def test_public_exports():
    for name in ("token_logps", "attach", "preference_loss", "dpo_shift_lambda", "LOSS_TYPES",
                 *(f.__name__ for f in NAMED.values())):  # fmt: skip
        assert name in gategrad.__all__ and hasattr(gategrad, name)
    assert gategrad.LOSS_TYPES == (
        "sigmoid", "ipo", "cal_dpo", "dpo_shift", "simpo", "dpop", "hinge", "robust"
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_layouts(backend):
    """Per-token policy log-probs with per-sequence reference sums (and the reverse) equal the
    all-per-sequence loss; chosen and rejected may use different layouts."""
    fw(backend)
    arrays, extra, sums = make_case(8, 4, "token", "sigmoid")
    pw, pl, rw, rl = (conv(backend, a) for a in arrays)
    mw, ml = conv(backend, extra["chosen_mask"]), conv(backend, extra["rejected_mask"])
    s = {k: conv(backend, v) for k, v in sums.items()}
    want = ref_loss("sigmoid", sums, 0.2, {})
    rtol = tol(backend)[0] * 10
    for args, kw in (
        ((pw, pl, s["rw"], s["rl"]), {"chosen_mask": mw, "rejected_mask": ml}),
        ((s["pw"], s["pl"], rw, rl), {"chosen_mask": mw, "rejected_mask": ml}),
        ((pw, s["pl"], rw, s["rl"]), {"chosen_mask": mw}),
    ):
        loss, _ = gategrad.dpo_loss(*args, beta=0.2, **kw)
        assert to_np(loss) == pytest.approx(want, rel=rtol)
    loss, _ = gategrad.simpo_loss(pw, s["pl"], chosen_mask=mw, rejected_lengths=s["nl"])
    assert to_np(loss) == pytest.approx(ref_loss("simpo", sums, 0.1, {}), rel=rtol)


@pytest.mark.parametrize("per_token", [True, False])
def test_stacked_preference_loss_equals_the_split_call(per_token: bool) -> None:
    """``stacked_preference_loss`` on ``[chosen; rejected]`` rows is ``preference_loss`` on the
    two halves, bitwise (the same arithmetic on the same slices)."""
    rng = np.random.default_rng(3)
    shape = (6, 5) if per_token else (6,)
    lp, ref = (np.log(rng.uniform(0.05, 1.0, shape)) for _ in range(2))
    extra: dict = {}
    split: dict = {}
    if per_token:
        mask = rng.uniform(size=shape) < 0.8
        mask[:, 0] = True
        extra["mask"] = mask
        split = {"chosen_mask": mask[:3], "rejected_mask": mask[3:]}
    else:
        extra["lengths"] = np.array([3.0, 4, 5, 2, 6, 1])
        split = {"chosen_lengths": extra["lengths"][:3], "rejected_lengths": extra["lengths"][3:]}
    gate = Gate(estimator="seq")
    got, got_m = gategrad.stacked_preference_loss("ipo", lp, ref, beta=0.3, gate=gate, **extra)
    want, want_m = gategrad.preference_loss(
        "ipo", lp[:3], lp[3:], ref[:3], ref[3:], beta=0.3, gate=gate, **split
    )
    assert float(got) == float(want)
    assert {k: float(v) for k, v in got_m.items()} == {k: float(v) for k, v in want_m.items()}


def test_stacked_preference_loss_needs_an_even_number_of_rows() -> None:
    with pytest.raises(ValueError, match="an even number"):
        gategrad.stacked_preference_loss("sigmoid", np.zeros(3), np.zeros(3), lengths=1)
