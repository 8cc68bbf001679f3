"""Issue 14, classes 1-10: no silent wrong answer and no NaN from any input.

One section per class. Each test is parametrized over the backends it applies to and failed on
main before the fix (the comment at each section says how). Numeric results are compared with
float64 NumPy references (gategrad's NumPy backend or closed forms). "Traced" means the
framework's tracer: ``jax.jit``, ``torch.func`` (``torch.compile`` in one test: it compiles for
seconds), ``mx.compile``; NumPy has no tracer, and its traced contract is the same code with the
value checks off (``gategrad.value_checks(False)``), which is what a tracer sees.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from _backends import ALL, AUTOGRAD, skip_unless

import gategrad
from gategrad import Gate, gate_rejected, gate_value, gate_weights, token_logps
from gategrad.testing import from_numpy, to_numpy

#: float32 gate vs its float64 reference: p = exp(a mean or quantile of float32 log-probs),
#: then a sigmoid; each step is a few ulp (6e-8) of a value <= 1 and the sigmoid's slope
#: alpha * g * (1 - g) * p <= 0.25 * 10 * 0.1 keeps it there: 1e-6 is > 10 ulp of 1.
ATOL32 = 1e-6


def _a(backend: str, a, dtype: str | None = "float32"):
    a = np.asarray(a)
    if a.dtype.kind in "iub":
        dtype = None
    return from_numpy(backend, a, dtype)


def _n(x) -> np.ndarray:
    """Any framework's array (or a NumPy scalar result) as NumPy."""
    return np.asarray(x) if isinstance(x, (np.ndarray, np.generic)) else to_numpy(x)


def _traced_grad(backend: str, f, *args):
    """d f / d args[0] under the backend's tracer (see the module docstring)."""
    if backend == "jax":
        import jax

        return np.asarray(jax.jit(jax.grad(f))(*args))
    if backend == "torch":
        import torch.func

        return to_numpy(torch.func.grad(f)(*args))
    import mlx.core as mx

    return to_numpy(mx.compile(mx.grad(f))(*args))


def _traced(backend: str, f, *args):
    """``f(*args)`` under ``jax.jit`` / ``mx.compile`` (values, not gradients)."""
    if backend == "jax":
        import jax

        return jax.jit(f)(*args)
    import mlx.core as mx

    return mx.compile(f)(*args)


def _ref_weight(x: np.ndarray, gate: Gate, mask: np.ndarray | None = None) -> np.ndarray:
    """The float64 NumPy gate weights (gategrad's NumPy backend, the reference spec)."""
    return np.asarray(gate_weights(np.asarray(x, np.float64), gate, mask).weight)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(np.asarray(z, np.float64) / 2.0))  # exact at +-inf, no overflow


# --------------------------------------------------------------------------------------------
# Class 1: traced empty rows. On main the seq estimator divided 0 by 0 under every tracer: a
# NaN gradient (mean/min/q10 too); now an empty row gets p = 1 and gate weight exactly 1
# (documented in gate_weights, preference_loss and docs/errors.md), and eager still raises.

EMPTY_X = np.array([[-1.0, -2.5, -4.0], [-0.5, -1.5, -3.0]])
EMPTY_M = np.array([[True, True, False], [False, False, False]])


# seq, mean and q10 gave NaN on main; min gave 1 there by accident (min over nothing = +inf,
# p = inf, sigmoid = 1) and is kept as a guard of the stated constant
@pytest.mark.parametrize("estimator", ["seq", "mean", "min", "q10"])
@pytest.mark.parametrize("backend", AUTOGRAD)
def test_class1_traced_empty_row_gradient_is_finite_weight_one(backend, estimator) -> None:
    skip_unless(backend)
    gate = Gate(estimator=estimator)

    def f(x, m):
        return gate_rejected(x, gate, m).sum()

    grad = _traced_grad(backend, f, _a(backend, EMPTY_X), _a(backend, EMPTY_M))
    assert np.isfinite(grad).all()
    w0 = _ref_weight(EMPTY_X[:1], gate, EMPTY_M[:1])[0]
    np.testing.assert_allclose(grad[0], np.full(3, w0), atol=ATOL32)
    np.testing.assert_array_equal(grad[1], np.ones(3))  # the stated constant: weight 1
    with pytest.raises(ValueError, match="all zero in row 1"):  # eager: raises, as before
        gate_rejected(_a(backend, EMPTY_X), gate, _a(backend, EMPTY_M))


def test_class1_numpy_unchecked_empty_row_weight_one() -> None:
    with gategrad.value_checks(False):
        for estimator in ("seq", "mean", "min", "q10"):
            w = np.asarray(gate_weights(EMPTY_X, Gate(estimator=estimator), EMPTY_M).weight)
            ref0 = _ref_weight(EMPTY_X[:1], Gate(estimator=estimator), EMPTY_M[:1])[0]
            np.testing.assert_allclose(w, [ref0, 1.0], rtol=1e-12)  # float64, the same ops
        w = gate_weights(np.array([-3.0, -2.0]), Gate(), lengths=np.array([3.0, 0.0])).weight
        assert np.asarray(w)[1] == 1.0


def test_class1_torch_compile_empty_row() -> None:
    skip_unless("torch")
    import torch

    gate = Gate()

    @torch.compile(fullgraph=True)
    def f(x, m):
        return gate_rejected(x, gate, m).sum()

    x = torch.tensor(EMPTY_X, dtype=torch.float32, requires_grad=True)
    f(x, torch.tensor(EMPTY_M)).backward()
    w0 = _ref_weight(EMPTY_X[:1], gate, EMPTY_M[:1])[0]
    np.testing.assert_allclose(x.grad.numpy(), [[w0] * 3, [1.0] * 3], atol=ATOL32)


@pytest.mark.parametrize("backend", AUTOGRAD)
def test_class1_traced_dpo_loss_zero_rejected_length(backend) -> None:
    skip_unless(backend)
    pc, pl = np.array([-3.0, -4.0]), np.array([-6.0, -5.0])
    rc, rl = np.array([-3.5, -4.2]), np.array([-5.5, -5.1])
    lengths = np.array([3.0, 0.0])
    beta, gate = 0.1, Gate()

    def f(pl_, pc_, rc_, rl_, n):
        return gategrad.dpo_loss(pc_, pl_, rc_, rl_, beta=beta, gate=gate, rejected_lengths=n)[0]

    args = [_a(backend, a) for a in (pl, pc, rc, rl, lengths)]
    grad = _traced_grad(backend, f, *args)
    # closed form: d/d pl of mean(-log sigmoid(z)) = beta (1 - sigmoid(z)) / B, times the gate
    z = beta * ((pc - rc) - (pl - rl))
    w0 = np.asarray(gate_weights(pl[:1], gate, lengths=lengths[:1]).weight)[0]
    w = np.array([w0, 1.0])  # the empty row: weight 1, its ungated gradient
    np.testing.assert_allclose(grad, w * beta * (1 - _sigmoid(z)) / 2, atol=ATOL32)
    with pytest.raises(ValueError, match="no tokens"):
        gategrad.dpo_loss(*[_a(backend, a) for a in (pc, pl, rc, rl)], gate=gate,
                          rejected_lengths=_a(backend, lengths))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Class 2: labels. On main -1 read the last vocabulary entry on NumPy/JAX/MLX, V gave a wrong
# value (MLX) or NaN (JAX), NumPy/torch raised raw IndexError/RuntimeError, V = 0 and T = 0
# crashed in the framework.

LOGITS = np.random.default_rng(0).normal(0.0, 2.0, (2, 4, 5))


def _ref_logps(logits: np.ndarray, labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(lsm, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return np.where(valid, picked, 0.0)


@pytest.mark.parametrize("bad", [-1, 5, 7])
@pytest.mark.parametrize("backend", ALL)
def test_class2_eager_bad_label_names_value_position_range(backend, bad) -> None:
    skip_unless(backend)
    labels = np.array([[0, 1, 2, 3], [4, bad, -100, 1]])
    msg = rf"valid range \[0, 5\) \(other than ignore_index=-100\): labels\[1, 1\] = {bad};"
    with pytest.raises(ValueError, match=msg):
        token_logps(_a(backend, LOGITS), _a(backend, labels), shift=False)
    with pytest.raises(ValueError, match=msg):
        gategrad.metrics.sequence_metrics(_a(backend, LOGITS), _a(backend, labels), shift=False)


@pytest.mark.parametrize("backend", AUTOGRAD)
def test_class2_traced_bad_labels_are_masked(backend) -> None:
    skip_unless(backend)
    labels = np.array([[0, -1, 2, 5], [4, 3, -100, 1]])
    valid = (labels >= 0) & (labels < 5)  # -1 and 5 are masked, -100 is ignored

    def f(logits, y):
        return token_logps(logits, y, shift=False)[0].sum()

    grad = _traced_grad(backend, f, _a(backend, LOGITS), _a(backend, labels))
    # closed form: d log softmax(x)[y] / dx = onehot(y) - softmax(x) where counted, else 0
    soft = np.exp(LOGITS) / np.exp(LOGITS).sum(-1, keepdims=True)
    onehot = np.eye(5)[np.where(valid, labels, 0)]
    ref = np.where(valid[..., None], onehot - soft, 0.0)
    np.testing.assert_allclose(grad, ref, atol=1e-6)  # float32 softmax: ulps of values <= 1
    if backend != "torch":
        lp, mask = _traced(backend, lambda a, y: token_logps(a, y, shift=False),
                           _a(backend, LOGITS), _a(backend, labels))  # fmt: skip
        np.testing.assert_array_equal(to_numpy(mask), valid)
        np.testing.assert_allclose(to_numpy(lp), _ref_logps(LOGITS, labels, valid), atol=2e-6)


@pytest.mark.parametrize("backend", ["jax", "mlx"])
def test_class2_traced_metrics_mask_bad_labels(backend) -> None:
    skip_unless(backend)
    labels = np.array([[0, -1, 2, 5], [4, 3, -100, 1]])
    fixed = np.where((labels >= 0) & (labels < 5), labels, -100)
    out = _traced(backend, lambda a, y: gategrad.metrics.sequence_metrics(a, y, shift=False),
                  _a(backend, LOGITS), _a(backend, labels))  # fmt: skip
    ref = gategrad.metrics.sequence_metrics(LOGITS, fixed, shift=False)  # float64 NumPy
    for k, v in ref.items():
        np.testing.assert_allclose(to_numpy(out[k]), v, atol=1e-5, err_msg=k)  # 4 f32 sums


@pytest.mark.parametrize("backend", ALL)
def test_class2_empty_vocabulary_or_positions_raise(backend) -> None:
    skip_unless(backend)
    for logits, labels, match in (
        (np.zeros((2, 3, 0)), np.zeros((2, 3), np.int64), "V = 0"),
        (np.zeros((2, 0, 4)), np.zeros((2, 0), np.int64), "T = 0"),
    ):
        for fn in (token_logps, gategrad.metrics.sequence_metrics):
            with pytest.raises(ValueError, match=match):
                fn(_a(backend, logits), _a(backend, labels), shift=False)
    if backend == "jax":  # static: also under jit
        import jax

        for shape, match in (((2, 3, 0), "V = 0"), ((2, 0, 4), "T = 0")):
            with pytest.raises(ValueError, match=match):
                jax.jit(lambda a, y: token_logps(a, y, shift=False))(
                    _a(backend, np.zeros(shape)), _a(backend, np.zeros(shape[:2], np.int64))
                )


# --------------------------------------------------------------------------------------------
# Class 3: callable gates. On main a callable returning 2 doubled the gradient, -p flipped its
# sign, and a (B, 1) result was summed (torch) or broadcast (MLX). Now: exact shape, values in
# [0, 1] in eager mode; under tracing the result is clipped to [0, 1].

CX = np.array([[-1.0, -2.0, -0.5], [-3.0, -0.2, -1.0]])


@pytest.mark.parametrize("backend", ALL)
def test_class3_callable_values_and_shape_checked(backend) -> None:
    skip_unless(backend)
    x = _a(backend, CX)
    for shape in (lambda p: p * 0 + 2.0, lambda p: -p):
        for granularity in ("example", "token"):
            with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
                gate_weights(x, Gate(shape=shape, granularity=granularity))
    with pytest.raises(ValueError, match="returned shape"):
        gate_weights(x, Gate(shape=lambda p: p[:, None]))  # (B, 1) for (B,)
    with pytest.raises(ValueError, match="returned shape"):
        gate_weights(x, Gate(shape=lambda p: p[:, :1], granularity="token"))  # (B, 1)
    w = to_numpy(gate_weights(x, Gate(shape=lambda p: p * 0.5, granularity="token")).weight)
    np.testing.assert_allclose(w, 0.5 * np.exp(CX), atol=ATOL32)


@pytest.mark.parametrize("backend", AUTOGRAD)
def test_class3_traced_callable_is_clipped(backend) -> None:
    skip_unless(backend)
    for shape, ref in (
        (lambda p: p * 3.0, np.minimum(3.0 * np.exp(CX), 1.0)),
        (lambda p: -p, np.zeros_like(CX)),
    ):
        gate = Gate(shape=shape, granularity="token")
        grad = _traced_grad(backend, lambda x, g=gate: gate_rejected(x, g).sum(), _a(backend, CX))
        np.testing.assert_allclose(grad, ref, atol=ATOL32)


def test_class3_numpy_unchecked_callable_is_clipped() -> None:
    with gategrad.value_checks(False):
        w = gate_weights(CX, Gate(shape=lambda p: p * 3.0, granularity="token")).weight
    np.testing.assert_allclose(np.asarray(w), np.minimum(3.0 * np.exp(CX), 1.0), rtol=1e-15)


# --------------------------------------------------------------------------------------------
# Class 4: hyper-parameters as NumPy scalars, 0-d arrays, bools. On main beta=np.float32(-0.1)
# was accepted, label_smoothing=True became 1.0, and Gate(alpha=np.float32(3.0)) was refused.

SEQ = [np.array([-3.0, -4.0]), np.array([-6.0, -5.0]), np.array([-3.5, -4.2]),
       np.array([-5.5, -5.1])]  # fmt: skip


def _registered_numeric_params():
    from gategrad._loss_registry import LOSSES

    for name, spec in LOSSES.items():
        for p in spec.params:
            if not isinstance(p.default, bool):
                yield name, p.name


@pytest.mark.parametrize("backend", ALL)
def test_class4_scalars_checked_bools_refused(backend) -> None:
    skip_unless(backend)
    xs = [_a(backend, a) for a in SEQ]
    for beta in (np.float32(-0.1), np.array(-0.1), _a(backend, np.array(-0.1)), np.float64(0)):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            gategrad.dpo_loss(*xs, beta=beta)
    for bad in (True, False, np.bool_(True)):
        with pytest.raises(TypeError, match="beta must be a number, got the bool"):
            gategrad.dpo_loss(*xs, beta=bad)
        for loss_type, param in _registered_numeric_params():
            with pytest.raises(TypeError, match=f"{param} must be a number, got the bool"):
                gategrad.preference_loss(loss_type, *xs, chosen_lengths=3, rejected_lengths=3,
                                         **{param: bad})  # fmt: skip
    # NumPy scalars compute exactly as the Python float they hold
    got = _n(gategrad.dpo_loss(*xs, beta=np.float32(0.25))[0])
    ref = _n(gategrad.dpo_loss(*xs, beta=0.25)[0])
    np.testing.assert_array_equal(got, ref)  # 0.25 is exact in float32


@pytest.mark.parametrize("backend", ALL)
def test_class4_gate_accepts_numpy_and_0d_arrays(backend) -> None:
    skip_unless(backend)
    for value in (np.float32(3.0), np.int64(3), np.array(3.0), _a(backend, np.array(3.0))):
        gate = Gate(alpha=value)
        assert gate == Gate(alpha=3.0)
        assert isinstance(gate.alpha, float)
    with pytest.raises(TypeError, match="alpha must be a number, got the bool"):
        Gate(alpha=np.bool_(True))
    with pytest.raises(ValueError, match="alpha must be a real number"):
        Gate(alpha=_a(backend, np.array([3.0])))


# --------------------------------------------------------------------------------------------
# Class 5: values that cannot be log-probs (logits by mistake). On main +100 was accepted, and
# the quantile estimator in float32 gave a NaN gradient under every backend (exp(100) = inf).

POS_X = np.array([[100.0, -1.0, -2.0], [-0.5, -1.5, -3.0]])


@pytest.mark.parametrize("backend", ALL)
def test_class5_eager_refuses_positive_values(backend) -> None:
    skip_unless(backend)
    for gate in (Gate(), Gate(estimator="q10"), Gate(granularity="token")):
        with pytest.raises(ValueError, match=r"rejected_logps holds values > 0 at row 0"):
            gate_weights(_a(backend, POS_X), gate)
    pos = [a.copy() for a in SEQ]
    pos[1][1] = 40.0
    with pytest.raises(ValueError, match="policy_rejected_logps holds values > 0 at row 1"):
        gategrad.dpo_loss(*[_a(backend, a) for a in pos], chosen_lengths=3, rejected_lengths=3)
    both = POS_X.copy()
    both[1, 0] = np.nan  # NaN is reported first, with its own (pinned) message
    with pytest.raises(ValueError, match="holds NaN or"):
        gate_weights(_a(backend, both), Gate())
    # float32 log_softmax can round to a tiny positive value: accepted within the slack
    gate_weights(_a(backend, [[1e-7, -1.0]]), Gate())


@pytest.mark.parametrize("backend", AUTOGRAD)
def test_class5_traced_quantile_positive_values_finite(backend) -> None:
    skip_unless(backend)
    gate = Gate(estimator="q90")  # interpolates towards p = exp(100) = inf in float32
    mask = np.ones_like(POS_X, bool)
    grad = _traced_grad(backend, lambda x: gate_rejected(x, gate).sum(), _a(backend, POS_X))
    # documented: the gate reads min(logp, 0)
    ref = _ref_weight(np.minimum(POS_X, 0.0), gate, mask)
    np.testing.assert_allclose(grad, np.repeat(ref[:, None], 3, 1), atol=ATOL32)

    # the loss value is unchanged: it uses the raw values (closed form in float64)
    pc, rc, rl = (np.full((2, 3), -1.0), np.full((2, 3), -1.2), np.full((2, 3), -0.9))

    def loss(pl_, pc_, rc_, rl_):
        return gategrad.dpo_loss(pc_, pl_, rc_, rl_, gate=gate, chosen_mask=None,
                                 rejected_mask=None)[0]  # fmt: skip

    args = [_a(backend, a) for a in (POS_X, pc, rc, rl)]
    grad = _traced_grad(backend, loss, *args)
    assert np.isfinite(grad).all()
    if backend != "torch":
        value = float(_n(_traced(backend, loss, *args)))
        z = 0.1 * ((pc.sum(1) - rc.sum(1)) - (POS_X.sum(1) - rl.sum(1)))
        ref_loss = np.mean(np.logaddexp(0.0, -z))  # -log sigmoid(z)
        assert value == pytest.approx(ref_loss, rel=1e-5)  # float32 sums of 3, one log1p


def test_class5_numpy_unchecked_quantile() -> None:
    with gategrad.value_checks(False):
        w = np.asarray(gate_weights(POS_X.astype(np.float32), Gate(estimator="q90")).weight)
    ref = _ref_weight(np.minimum(POS_X, 0.0), Gate(estimator="q90"))
    np.testing.assert_allclose(w, ref, atol=ATOL32)


# --------------------------------------------------------------------------------------------
# Class 6: extreme but valid gate parameters. On main alpha=1e39 (inf in float32),
# temperature=1e-50 (0 in float32) and exponent=1e39 gave inf * 0 or 0 / 0: a NaN gradient.


def _f32(v) -> np.ndarray:
    """``v`` rounded to float32, as float64: what a float32 computation holds for a constant."""
    return np.asarray(v, np.float32).astype(np.float64)


#: (gate, float64 formula of the float32-rounded inputs, a log-prob at the gate's step). At the
#: step the exact gate is 0.5 (sigmoids) or 1 (power); float32 sees ``d = 0`` there exactly
#: because the input equals the float32 constant (tau or log tau) it is compared with, and the
#: reference therefore uses the float32-rounded constants too. On main ``inf * 0`` or ``0 / 0``
#: made exactly these points NaN.
EXTREME = [
    (
        Gate(alpha=1e39, tau=0.5, granularity="token"),
        # exp(float32(log 0.5)) = 0.5 - 9.5e-10: 0.5 is the float32 nearest by 30x (ulp 3e-8),
        # so every float32 exp (error < 1 ulp) returns exactly 0.5
        lambda x, g: _sigmoid(1e39 * (_f32(np.exp(x)) - _f32(g.tau))),
        math.log(0.5),
    ),
    (
        Gate(shape="log_sigmoid", temperature=1e-50, granularity="token"),
        lambda x, g: _sigmoid((x - _f32(math.log(g.tau))) / 1e-50),
        math.log(Gate(shape="log_sigmoid").tau),
    ),
    (
        Gate(shape="power", exponent=1e39, granularity="token"),
        lambda x, g: np.exp(np.minimum(1e39 * (x - _f32(math.log(g.tau))), 0.0)),
        math.log(Gate(shape="power").tau),
    ),
]


@pytest.mark.parametrize("case", range(len(EXTREME)))
@pytest.mark.parametrize("backend", ALL)
def test_class6_extreme_parameters_match_float64(backend, case) -> None:
    skip_unless(backend)
    gate, formula, at_step = EXTREME[case]
    # the step point, values far from it on both sides (in p), and -inf (p = 0)
    x = np.array([[at_step, -0.01, -0.1, -1.0], [-3.0, -12.0, -20.0, -np.inf]])
    x32 = _f32(x)  # the reference sees the same rounded inputs
    with np.errstate(over="ignore", invalid="ignore"):
        ref = formula(x32, gate)  # float64, parameters unclamped
    assert np.isfinite(ref).all() and ref[0, 0] in (0.5, 1.0)
    if backend == "numpy":
        got = np.asarray(gate_weights(x.astype(np.float32), gate).weight)
    else:
        got = _traced_grad(backend, lambda a: gate_rejected(a, gate).sum(), _a(backend, x))
        eager = to_numpy(gate_weights(_a(backend, x), gate).weight)
        np.testing.assert_array_equal(eager, ref)
    np.testing.assert_array_equal(got, ref)  # every value is exactly 0, 0.5 or 1


# --------------------------------------------------------------------------------------------
# Class 7: empty batches. On main B = 0 gave a NaN loss; T = 0 with estimator q10 crashed
# inside the framework (MLX: a segfault, hence the subprocess). Static: also under tracing.


@pytest.mark.parametrize("backend", ALL)
def test_class7_empty_batch_raises(backend) -> None:
    skip_unless(backend)
    e = _a(backend, np.zeros((0,)))
    with pytest.raises(ValueError, match=r"the batch is empty \(B = 0\)"):
        gategrad.dpo_loss(e, e, e, e, chosen_lengths=1, rejected_lengths=1)
    e2 = _a(backend, np.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"B = 0"):
        gategrad.dpo_loss(e2, e2, e2, e2, gate=Gate())
    if backend == "jax":
        import jax

        with pytest.raises(ValueError, match=r"B = 0"):
            jax.jit(lambda *xs: gategrad.dpo_loss(*xs)[0])(e2, e2, e2, e2)


_T0 = """
import numpy as np, gategrad
from gategrad import Gate, gate_rejected
from gategrad.testing import from_numpy
x = from_numpy({backend!r}, np.zeros((2, 0)), "float32")
for est in ("q10", "mean", "min", "seq"):
    try:
        gate_rejected(x, Gate(estimator=est))
    except ValueError as err:
        assert "T = 0" in str(err), err
    else:
        raise SystemExit("no ValueError for " + est)
if {backend!r} == "mlx":  # static: also under mx.compile (on main: a segfault)
    import mlx.core as mx
    try:
        mx.compile(lambda a: gate_rejected(a, Gate(estimator="q10")))(x)
    except ValueError as err:
        assert "T = 0" in str(err), err
    else:
        raise SystemExit("no ValueError under mx.compile")
print("ok")
"""


@pytest.mark.parametrize("backend", ALL)
def test_class7_zero_positions_raise(backend) -> None:
    skip_unless(backend)
    out = subprocess.run([sys.executable, "-c", _T0.format(backend=backend)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and "ok" in out.stdout, (out.returncode, out.stderr[-2000:])
    if backend == "jax":
        import jax

        with pytest.raises(ValueError, match="T = 0"):
            jax.jit(lambda x: gate_rejected(x, Gate(estimator="q10")))(
                _a(backend, np.zeros((2, 0)))
            )


# --------------------------------------------------------------------------------------------
# Class 8: the torch module hook. On main slice(10, 20) on a 4-row batch gated nothing, a mask
# of the wrong width was right-aligned, out-of-range rows or labels gave raw IndexError or
# RuntimeError.


def _tiny_lm():
    import torch

    class Out:
        def __init__(self, logits):
            self.logits = logits

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 4)

        def forward(self, input_ids, labels=None):
            return Out(self.emb(input_ids) @ self.emb.weight.T)

    return LM()


@pytest.mark.parametrize("backend", ["torch"])
def test_class8_hook_rows_mask_labels(backend) -> None:
    skip_unless(backend)
    import torch

    import gategrad.torch as gtorch

    model = _tiny_lm()
    ids = torch.tensor([[1, 2, 3, 4]] * 4)
    labels = ids.clone()
    labels[:, :2] = -100
    for rows, match in ((slice(10, 20), "selects no row"), ([7], "outside the model's 4-row"),
                        ([0, -5], "outside"), ([], "selects no row")):  # fmt: skip
        with gtorch.hook(model, Gate(), rejected_rows=rows):
            with pytest.raises(ValueError, match=match):
                model(ids, labels=labels)
    wide = lambda a, k, o: torch.ones(4, 5, dtype=torch.bool)  # noqa: E731 - T - 1 = 3
    with gtorch.hook(model, Gate(), rejected_rows="second_half", mask=wide):
        with pytest.raises(ValueError, match=r"response mask has shape \(4, 5\)"):
            model(ids, labels=labels)
    bad = labels.clone()
    bad[3, 3] = 9  # V = 5
    with gtorch.hook(model, Gate(), rejected_rows="second_half"):
        with pytest.raises(ValueError, match=r"outside \[0, 5\) in rows \[3\]"):
            model(ids, labels=bad)


@pytest.mark.parametrize("backend", ["mlx"])
def test_class8_mlx_lm_refuses_odd_rows(backend) -> None:
    # on main the halves of 5 rows (2 and 3) reached the loss: "batch sizes differ"
    skip_unless(backend)
    pytest.importorskip("mlx.nn")
    import mlx.core as mx

    from gategrad.integrations import mlx_lm

    def model(ids):
        return mx.zeros((*ids.shape, 5))

    batch = {"input_ids": mx.zeros((5, 4), mx.int32), "response_mask": mx.ones((5, 4), mx.bool_)}
    with pytest.raises(ValueError, match="the batch has 5 rows; it must hold"):
        mlx_lm.make_loss_fn(loss_type="simpo")(model, batch)
    with pytest.raises(ValueError, match="the batch has 5 rows; it must hold"):
        mlx_lm.reference_logps(model, batch)


# --------------------------------------------------------------------------------------------
# Class 9: Gate.replace(shape=...) re-derives the defaults from the user's fields. On main
# Gate().replace(shape="log_sigmoid") raised about an alpha the user never set, and
# Gate().replace(shape="power", alpha=None) kept sigmoid's tau.


@pytest.mark.parametrize("backend", ALL)
def test_class9_replace_shape_rederives_defaults(backend) -> None:
    skip_unless(backend)
    cases = [
        (Gate().replace(shape="log_sigmoid"), Gate(shape="log_sigmoid")),
        (Gate().replace(shape="power", alpha=None), Gate(shape="power")),
        (Gate(shape="power").replace(shape="hard"), Gate(shape="hard")),
        (Gate(tau=0.05).replace(shape="power"), Gate(shape="power", tau=0.05)),  # user's tau
    ]
    p = _a(backend, np.array([1e-5, 1e-3, 0.02, 0.04, 0.3, 0.9]))
    for got, want in cases:
        assert got == want
        np.testing.assert_array_equal(to_numpy(gate_value(got, p)), to_numpy(gate_value(want, p)))
    with pytest.raises(ValueError, match="alpha is not used by shape='power'"):
        Gate(alpha=5.0).replace(shape="power")  # set by the user: kept, and refused


# --------------------------------------------------------------------------------------------
# Class 10: internal errors become checked ones. On main: AttributeError ('float' has no
# attribute 'shape') for a float mask, numpy's UFuncTypeError for beta="a", a comparison
# TypeError from dpo_shift_lambda(None, ...), a NumPy promotion error for string labels, a
# flattened "row 5" for a 3-D input, GateStats not a pytree under jax.jit.


@pytest.mark.parametrize("backend", ALL)
def test_class10_checked_errors_name_the_argument(backend) -> None:
    skip_unless(backend)
    x = _a(backend, CX)
    with pytest.raises(TypeError, match="mask: gategrad cannot handle builtins.float"):
        gate_rejected(x, Gate(), mask=1.0)
    with pytest.raises(TypeError, match="chosen_mask: gategrad cannot handle builtins.float"):
        gategrad.dpo_loss(x, x, x, x, chosen_mask=1.0, rejected_mask=1.0)
    with pytest.raises(ValueError, match="beta must be a real number, got 'a'"):
        gategrad.dpo_loss(x, x, x, x, beta="a")
    with pytest.raises(TypeError, match="mask: gategrad cannot handle builtins.float"):
        gategrad.metrics.sequence_metrics(_a(backend, LOGITS), _a(backend, np.zeros((2, 4), int)),
                                          mask=1.0)  # fmt: skip
    with pytest.raises(TypeError, match="mask: gategrad cannot handle builtins.float"):
        token_logps(_a(backend, LOGITS), _a(backend, np.zeros((2, 4), int)), mask=1.0)  # shift
    three = np.full((2, 3, 4), -1.0)
    three[1, 2, 1] = np.nan
    with pytest.raises(ValueError, match=r"must have shape \(B,\) or \(B, T\), got \(2, 3, 4\)"):
        gate_rejected(_a(backend, three), Gate(granularity="token"))


def test_class10_numpy_only_inputs() -> None:
    with pytest.raises(ValueError, match="step must be a real number, got None"):
        gategrad.dpo_shift_lambda(None, 10)
    with pytest.raises(TypeError, match="labels must be integer token ids"):
        token_logps(np.zeros((1, 2, 3)), np.full((1, 2), "a"))
    with pytest.raises(TypeError, match="lengths must be real token counts"):
        gate_rejected(np.full(2, -1.0), Gate(), lengths=np.array(["a", "b"]))
    from gategrad import _validate
    from gategrad._dispatch import get_backend

    bad = np.zeros((2, 3, 4), bool)
    bad[1, 2, 1] = True  # flat index 21: reported as its multi-index
    assert _validate.rows(get_backend("numpy"), bad) == "position (1, 2, 1)"


def test_class10_gatestats_under_jit() -> None:
    skip_unless("jax")
    import jax

    gate = Gate(granularity="token")
    out, stats = jax.jit(lambda a: gate_rejected(a, gate, return_stats=True))(_a("jax", CX))
    ref = gate_weights(CX, gate)
    np.testing.assert_allclose(np.asarray(stats.weight), ref.weight, atol=ATOL32)
    np.testing.assert_allclose(np.asarray(stats.p), ref.p, rtol=1e-6)  # one f32 exp
    np.testing.assert_array_equal(np.asarray(stats.mask), np.ones_like(CX, bool))


def test_class10_gatestats_under_mx_compile() -> None:
    skip_unless("mlx")
    import mlx.core as mx

    gate = Gate()
    stats = mx.compile(lambda a: gate_rejected(a, gate, return_stats=True)[1].as_dict())(
        _a("mlx", CX)
    )
    mx.eval(stats)
    ref = gate_weights(CX, gate)
    assert set(stats) == {"weight", "p"}
    np.testing.assert_allclose(to_numpy(stats["weight"]), ref.weight, atol=ATOL32)
    np.testing.assert_allclose(to_numpy(stats["p"]), ref.p, rtol=1e-6)


def test_class10_metrics_is_an_attribute() -> None:
    code = "import gategrad; print('metrics' in dir(gategrad), gategrad.metrics.METRIC_NAMES[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "logp"], out.stderr[-2000:]


# --- eager differentiation is eager: the value checks run under it ----------------------------


@pytest.mark.parametrize("backend", AUTOGRAD)
def test_eager_differentiation_runs_the_value_checks(backend) -> None:
    """``jax.grad``/``mx.grad``/torch autograd outside ``jit``/``compile`` see concrete values
    (JAX wraps them in tracers whose primal is concrete): a NaN log-prob, a bad label and an
    empty mask are refused exactly as in a plain call, not let through as a NaN gradient."""
    skip_unless(backend)
    ok = from_numpy(backend, np.array([-1.0, -2.0], np.float32))
    nan = from_numpy(backend, np.array([-1.0, np.nan], np.float32))

    def loss(pc, pr):
        return gategrad.preference_loss("sigmoid", pc, pr, ok, ok, beta=0.1)[0]

    with pytest.raises(ValueError, match=r"policy_rejected_logps holds NaN .* row 1"):
        gategrad.testing.value_and_grad(backend, loss, (ok, nan), argnums=(0, 1))
    value, (g_c, g_r) = gategrad.testing.value_and_grad(backend, loss, (ok, ok), argnums=(0, 1))
    assert np.isfinite(to_numpy(value)) and np.all(np.isfinite(to_numpy(g_r)))

    logits = from_numpy(backend, np.zeros((1, 2, 3), np.float32))
    labels = from_numpy(backend, np.array([[0, 3]]))
    with pytest.raises(ValueError, match=r"labels"):
        gategrad.testing.value_and_grad(
            backend, lambda x: token_logps(x, labels)[0].sum(), (logits,), argnums=(0,)
        )
    mask = from_numpy(backend, np.array([[1, 1], [0, 0]], bool))
    tok = from_numpy(backend, np.full((2, 2), -1.0, np.float32))
    with pytest.raises(ValueError, match=r"mask is all zero in row 1"):
        gategrad.testing.value_and_grad(
            backend,
            lambda r: gate_rejected(r, Gate(), mask=mask).sum(),
            (tok,),
            argnums=(0,),
        )
