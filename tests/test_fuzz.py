"""A red team, as tests: Hypothesis fuzzing of the public API on every backend.

Every test draws inputs a hostile or careless user could pass: shapes with 0 and 1, every float
dtype of the backend, masks with 0, 1, 2 and 0.5 and empty rows, labels inside and outside
``[0, V)``, NaN, infinities, positive "log-probs" (logits passed by mistake), subnormals,
booleans and 0-d arrays as hyper-parameters, and gate parameters from 1e-50 to 1e39. The
property is the same everywhere:

- the call raises ``ValueError`` or ``TypeError`` *from gategrad's own code* (the innermost
  frame of the traceback lies in ``gategrad/`` or ``gategrad.backends``; a framework's error, an
  ``IndexError`` or numpy's ``UFuncTypeError`` is a failure), and the NumPy float64 reference
  refuses the same input (the spec and the backends agree on what is valid); or
- it returns a finite result which, in float64, equals an independent NumPy float64 reference
  (closed-form loss gradients, ``log_softmax`` by hand), and, in lower precision, is finite and
  brackets the reference as stated per test.

Under tracing (``jax.jit``, ``mx.compile``), where values cannot be checked, the result must
still be finite for every input without NaN.

Examples per test: the ``ci`` profile's ``max_examples`` (60) per backend; ``dev`` draws 12.
"""

from __future__ import annotations

import argparse
import linecache
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gategrad.backends
import numpy as np
import pytest
from _backends import ALL, dtypes, skip_unless
from hypothesis import assume, given, note
from hypothesis import strategies as st

import gategrad
from gategrad import Gate
from gategrad.losses import LOSS_PARAMS, LOSS_TYPES
from gategrad.testing._closed_form import gate_grad, loss_grads

_OWN_CODE = (
    str(Path(gategrad.__file__).resolve().parent),
    str(Path(gategrad.backends.__file__).resolve().parent),
)
CHECKED = (ValueError, TypeError)

#: machine epsilon of the compute dtype: promote_types(dtype, float32)
EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "bfloat16": 2.0**-23, "float16": 2.0**-23}

NAN, INF = float("nan"), float("inf")
#: values a log-prob array can hold by accident: NaN, infinities, logits (> 0), subnormals,
#: the float32 exp underflow edge, 0
SPECIAL = [NAN, INF, -INF, 100.0, 1e-8, 0.0, -0.0, -1e-45, -88.0, -745.0, -1e30]


class Refused(Exception):
    """The call raised a checked gategrad error (``err``)."""

    def __init__(self, err: BaseException) -> None:
        super().__init__(str(err))
        self.err = err


def _raise_site(err: BaseException) -> tuple[str, str]:
    """The file and source line of the innermost frame of ``err``'s traceback."""
    tb = err.__traceback__
    last = tb
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None:
        return "", ""
    path = last.tb_frame.f_code.co_filename
    return str(Path(path).resolve()), linecache.getline(path, last.tb_lineno).strip()


def run(fn: Callable[[], Any]) -> Any:
    """``fn()``, or a :class:`Refused` holding a checked error; any other exception fails.

    Checked means: a ``ValueError``/``TypeError`` with a message, raised by a ``raise``
    statement in gategrad's own code (an operator's ``TypeError`` or a framework's
    ``ValueError`` that merely passes through gategrad's frames is not checked).
    """
    try:
        return fn()
    except CHECKED as err:
        where, line = _raise_site(err)
        if not where.startswith(_OWN_CODE) or not line.startswith("raise") or not str(err):
            raise AssertionError(
                f"unchecked {type(err).__name__} at {where}: {line!r}: {err}"
            ) from err
        return Refused(err)


def same_verdict(got: Any, ref: Any) -> bool:
    """Record both outcomes; ``True`` when both returned a result (compare them then)."""
    note(f"backend: {got!r:.300}")
    note(f"reference: {ref!r:.300}")
    if isinstance(ref, Refused):
        assert isinstance(got, Refused), f"the reference refuses ({ref}) but the backend did not"
        return False
    assert not isinstance(got, Refused), f"the backend refused ({got}); the reference did not"
    return True


def eps_of(backend: str, dtype: str) -> float:
    """The compute precision: MLX's CPU float64 stores float64 but evaluates exp/log at float32
    precision (see tests/test_gate.py), so its float64 results are float32-accurate."""
    return EPS["float32"] if backend == "mlx" else EPS[dtype]


def to_np(x: Any) -> np.ndarray:
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x, dtype=np.float64)
    return np.asarray(gategrad.testing.to_numpy(x), dtype=np.float64)


def quantize(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` rounded to ``dtype`` (bfloat16 via a torch-free bit trick), back in float64."""
    if dtype == "bfloat16":
        with np.errstate(over="ignore", invalid="ignore"):
            f = np.asarray(a, dtype=np.float32)
            bits = f.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            out = rounded.astype(np.uint32).view(np.float32).astype(np.float64)
        return np.where(np.isnan(a), np.nan, out)
    with np.errstate(over="ignore"):
        return np.asarray(a, dtype=getattr(np, dtype)).astype(np.float64)


def to_backend(backend: str, a: np.ndarray, dtype: str | None) -> Any:
    return gategrad.testing.from_numpy(backend, a, dtype)


def bad_number(v: Any) -> bool:
    """``True`` for what no hyper-parameter may be: a bool, a non-number, NaN or infinity."""
    if isinstance(v, (bool, np.bool_)) or (isinstance(v, np.ndarray) and v.dtype == bool):
        return True
    try:
        return not math.isfinite(float(v))
    except (TypeError, ValueError):
        return True


# --- strategies --------------------------------------------------------------------------------

SIZES = st.sampled_from([0, 1, 2, 3])


def values(shape: tuple[int, ...], special: bool) -> st.SearchStrategy[np.ndarray]:
    """Log-probs of ``shape``: finite in [-20, 0], with some special values when ``special``."""
    elem = st.floats(-20.0, 0.0, allow_nan=False)
    if special:
        elem = st.one_of(elem, elem, elem, st.sampled_from(SPECIAL))
    n = int(np.prod(shape)) if shape else 1
    return st.lists(elem, min_size=n, max_size=n).map(lambda v: np.array(v).reshape(shape))


def masks(shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray | None]:
    """``None``, or a mask of 0/1 (often), with 2 and 0.5 (nonzero counts) and empty rows."""
    n = int(np.prod(shape)) if shape else 1
    entry = st.sampled_from([0.0, 1.0, 1.0, 1.0, 2.0, 0.5])
    arrays = st.lists(entry, min_size=n, max_size=n).map(lambda v: np.array(v).reshape(shape))
    return st.one_of(st.none(), arrays)


BAD_NUMBERS: list[Any] = [NAN, INF, -INF, 0.0, -1.0, True, False, "3", None, [1.0]]


def hyper(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A hyper-parameter: good values as floats, numpy scalars and 0-d arrays, or bad ones."""
    as_types = good.flatmap(
        lambda v: st.sampled_from([v, np.float32(v), np.float64(v), np.array(v)])
    )
    return st.one_of(as_types, as_types, st.sampled_from(BAD_NUMBERS))


GATE_PARAM = st.one_of(
    st.none(),
    st.sampled_from([1e-50, 1e-8, 1e-3, 0.02, 0.5, 1.0, 3.0, 200.0, 1e39]),
    st.floats(1e-4, 50.0),
    st.sampled_from(BAD_NUMBERS + [np.float32(3.0), np.float64(0.5), np.array(0.25)]),
)
ESTIMATORS = ["seq", "q10", "q0", "q50", "q100", "min", "mean", "p10", "q101", "", 3]


@st.composite
def gate_kwargs(draw: st.DrawFn) -> dict[str, Any]:
    shape = draw(st.sampled_from([*gategrad.SHAPE_DEFAULTS, "tanh"]))
    own = list(gategrad.SHAPE_DEFAULTS.get(shape, {}))
    names = own if draw(st.booleans()) else ["alpha", "tau", "temperature", "exponent"]
    kw: dict[str, Any] = {"shape": shape}
    for name in names:
        value = draw(GATE_PARAM)
        if value is not None:
            kw[name] = value
    if draw(st.booleans()):
        kw["floor"] = draw(st.sampled_from([0.0, 0.1, 0.99, 1.0, -0.1, NAN, True]))
    kw["estimator"] = draw(st.sampled_from(ESTIMATORS))
    kw["granularity"] = draw(st.sampled_from(["example", "example", "token", "sequence"]))
    return kw


#: gates of ordinary magnitude (for the loss tests: the gate test covers the extremes)
MODERATE_GATES = st.builds(
    Gate,
    shape=st.sampled_from(list(gategrad.SHAPE_DEFAULTS)),
    estimator=st.sampled_from(["seq", "q10", "q0", "q100", "min", "mean"]),
    granularity=st.sampled_from(["example", "token"]),
)


# --- gate ----------------------------------------------------------------------------------


def _gate_bracket(x: np.ndarray, gate: Gate, mask: Any, eps: float) -> tuple[Any, Any]:
    """The NumPy float64 gate at ``x - d`` and ``x + d`` (clipped at 0), ``d = 64 eps (1 + |x|)``.

    Every named gate shape and every estimator is non-decreasing in each token's log-prob, so
    a backend computing in a dtype of machine epsilon ``eps`` must land between the two: its
    rounding of ``exp``, ``p - tau``, ``log p - log tau``, the quantile's interpolation and the
    parameters themselves moves ``log p`` by at most a few ``eps (1 + |log p|)``; 64 covers
    the handful of operations in the chain with room for library differences.
    """
    d = 64 * eps * (1.0 + np.abs(np.nan_to_num(x, posinf=0.0, neginf=0.0)))
    with np.errstate(invalid="ignore"):
        lo, hi = np.minimum(x - d, 0.0), np.minimum(x + d, 0.0)
    lo = np.where(x > 0, x, lo)  # positive input: the reference decides what happens
    hi = np.where(x > 0, x, hi)
    w_lo = gategrad.gate_weights(lo, gate, mask).weight
    w_hi = gategrad.gate_weights(hi, gate, mask).weight
    return np.minimum(w_lo, w_hi), np.maximum(w_lo, w_hi)


@pytest.mark.parametrize("backend", ALL)
@given(data=st.data())
def test_fuzz_gate_weights(backend: str, data: st.DataObject) -> None:
    """``Gate(...)`` then ``gate_weights``: a checked error, or weights in [0, 1] that bracket
    the NumPy float64 reference (see :func:`_gate_bracket`), also for 1e-50 and 1e39."""
    skip_unless(backend)
    kw = data.draw(gate_kwargs(), label="gate")
    gate = run(lambda: Gate(**kw))
    params = ("alpha", "tau", "temperature", "exponent", "floor")
    if any(bad_number(v) for k, v in kw.items() if k in params and v is not None):
        assert isinstance(gate, Refused), f"Gate({kw}) accepted a bool, non-number or non-finite"
    if isinstance(gate, Refused):
        return
    b, t = data.draw(SIZES, label="B"), data.draw(SIZES, label="T")
    dtype = data.draw(st.sampled_from(dtypes(backend)), label="dtype")
    x = quantize(data.draw(values((b, t), special=True), label="logps"), dtype)
    mask = data.draw(masks((b, t)), label="mask")

    ref = run(lambda: gategrad.gate_weights(x, gate, mask))
    xb = to_backend(backend, x, dtype)
    mb = None if mask is None else to_backend(backend, mask, dtype)
    got = run(lambda: gategrad.gate_weights(xb, gate, mb))
    if not same_verdict(got, ref):
        return
    w = to_np(got.weight)
    assert np.all(np.isfinite(w)) and np.all((w >= 0) & (w <= 1)), w
    lo, hi = _gate_bracket(x, gate, mask, eps_of(backend, dtype))
    atol = 4 * eps_of(backend, dtype)  # the weight's own rounding in [0, 1]
    counted = np.ones(w.shape, bool) if got.mask is None else to_np(got.mask).astype(bool)
    ok = (w >= lo - atol) & (w <= hi + atol)
    assert np.all(ok | ~counted), (w, lo, hi)


# --- preference losses ---------------------------------------------------------------------


def _loss_param_values(loss_type: str) -> dict[str, st.SearchStrategy[Any]]:
    good = {
        "label_smoothing": st.sampled_from([0.0, 0.1, 0.3]),
        "length_normalize": st.booleans(),
        "calibration_weight": st.sampled_from([0.0, 0.5, 1.0]),
        "lam": st.sampled_from([0.5, 0.95, 1.0]),
        "gamma": st.sampled_from([0.0, 0.5, 2.0]),
        "dpop_lambda": st.sampled_from([0.0, 5.0, 50.0]),
    }
    return {
        name: (good[name] if name == "length_normalize" else hyper(good[name]))
        for name in LOSS_PARAMS.get(loss_type, {})
    }


@st.composite
def loss_case(draw: st.DrawFn) -> dict[str, Any]:
    loss_type = draw(st.sampled_from([*LOSS_TYPES, "dpo"]))
    params = {
        name: draw(strat, label=name)
        for name, strat in _loss_param_values(loss_type).items()
        if draw(st.booleans())
    }
    if draw(st.integers(0, 9)) == 0:
        params["bogus"] = 1.0
    per_token = draw(st.booleans(), label="per_token")
    b, t = draw(SIZES, label="B"), draw(SIZES, label="T")
    shape = (b, t) if per_token else (b,)
    special = draw(st.integers(0, 3)) == 0
    arrays = {k: draw(values(shape, special), label=k) for k in ("pc", "pr", "rc", "rr")}
    case: dict[str, Any] = {
        "loss_type": loss_type,
        "params": params,
        "beta": draw(hyper(st.sampled_from([0.01, 0.1, 1.0, 10.0])), label="beta"),
        "gate": draw(st.one_of(st.none(), MODERATE_GATES), label="gate"),
        "per_token": per_token,
        "arrays": arrays,
    }
    if per_token:
        case["masks"] = (draw(masks(shape), label="cmask"), draw(masks(shape), label="rmask"))
    else:
        lengths = st.one_of(
            st.none(),
            st.sampled_from([1, 3, 0, -1, 2.5]),
            st.lists(st.sampled_from([1, 2, 3, 0]), min_size=b, max_size=b).map(np.array),
        )
        case["lengths"] = (draw(lengths, label="clen"), draw(lengths, label="rlen"))
    return case


def _loss_call(case: dict[str, Any], arrays: dict[str, Any], extra: dict[str, Any]) -> Any:
    uses_ref = case["loss_type"] != "simpo"
    kwargs = dict(beta=case["beta"], gate=case["gate"], **case["params"], **extra)

    def loss(pc: Any, pr: Any) -> Any:
        refs = (arrays["rc"], arrays["rr"]) if uses_ref else ()
        return gategrad.preference_loss(case["loss_type"], pc, pr, *refs, **kwargs)[0]

    return loss


def _reference(case: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    """Closed-form float64 loss and gradients w.r.t. the policy's log-probs, or ``Refused``
    where gategrad's NumPy backend refuses the same input (the spec of what is valid)."""
    extra = _extra(case, lambda a: a)
    spec = run(lambda: _loss_call(case, arrays, extra)(arrays["pc"], arrays["pr"]))
    if isinstance(spec, Refused):
        return spec
    hypers = {"beta": case["beta"], **case["params"]}
    hypers.pop("length_normalize", None)
    if any(bad_number(v) for v in hypers.values()):
        return Refused(ValueError(f"a bad hyper-parameter in {hypers}"))
    pc, pr, rc, rr = (arrays[k] for k in ("pc", "pr", "rc", "rr"))
    params = {k: float(v) if k != "length_normalize" else v for k, v in case["params"].items()}
    beta = float(case["beta"])
    if case["per_token"]:
        cm, rm = ((np.ones_like(pc) if m is None else (m != 0)) for m in case["masks"])
        sums = [np.sum(a * m, axis=1) for a, m in ((pc, cm), (pr, rm), (rc, cm), (rr, rm))]
        lengths = (np.sum(cm, axis=1), np.sum(rm, axis=1))
    else:
        sums = [pc, pr, rc, rr]
        lengths = tuple(
            None if n is None else np.broadcast_to(np.asarray(n, float), pc.shape)
            for n in case["lengths"]
        )
    refs = sums[2:] if case["loss_type"] != "simpo" else (None, None)
    lt = "sigmoid" if case["loss_type"] == "dpo" else case["loss_type"]
    out = loss_grads(lt, sums[0], sums[1], *refs, beta=beta, chosen_lengths=lengths[0],
                     rejected_lengths=lengths[1], **params)  # fmt: skip
    if case["per_token"]:
        d_c = out.d_chosen[:, None] * cm
        d_r, _ = gate_grad(out.d_rejected[:, None] * rm, pr, case["gate"], mask=case["masks"][1])
    else:
        d_c = out.d_chosen
        d_r, _ = gate_grad(out.d_rejected, pr, case["gate"], lengths=case["lengths"][1])
    return out.loss, d_c, d_r


def _extra(case: dict[str, Any], conv: Callable[[Any], Any]) -> dict[str, Any]:
    if case["per_token"]:
        cm, rm = case["masks"]
        return {
            "chosen_mask": None if cm is None else conv(cm),
            "rejected_mask": None if rm is None else conv(rm),
        }
    cl, rl = case["lengths"]
    return {
        "chosen_lengths": conv(cl) if isinstance(cl, np.ndarray) else cl,
        "rejected_lengths": conv(rl) if isinstance(rl, np.ndarray) else rl,
    }


@pytest.mark.parametrize("backend", ALL)
@given(case=loss_case(), data=st.data())
def test_fuzz_preference_loss(backend: str, case: dict[str, Any], data: st.DataObject) -> None:
    """``preference_loss`` on drawn shapes, values, masks, lengths, parameters and gates: a
    checked error exactly where the NumPy spec refuses, else a finite loss and gradient; in
    float64 they equal the closed form (rtol 1e-9: inputs are at most 20 in size and 3 tokens
    long, so float64 rounding through the few dozen operations of a loss and its gradient stays
    below 1e-13 relative; the margin covers libraries' exp/log1p ulps amplified by beta <= 10
    and the gate's alpha = 200)."""
    skip_unless(backend)
    dtype = data.draw(st.sampled_from(dtypes(backend)), label="dtype")
    arrays = {k: quantize(v, dtype) for k, v in case["arrays"].items()}
    ref = _reference(case, arrays)
    xs = {k: to_backend(backend, v, dtype) for k, v in arrays.items()}
    loss = _loss_call(case, xs, _extra(case, lambda a: to_backend(backend, a, None)))
    if backend == "numpy":
        got = run(lambda: (loss(xs["pc"], xs["pr"]), None))
    else:
        got = run(lambda: gategrad.testing.value_and_grad(backend, loss, (xs["pc"], xs["pr"]),
                                                          argnums=(0, 1)))  # fmt: skip
    if not same_verdict(got, ref):
        return
    value, grads = got
    value = float(to_np(value))
    assert math.isfinite(value), value
    if grads is not None:
        for g in grads:
            assert np.all(np.isfinite(to_np(g)))
    if dtype != "float64":
        return
    ref_loss, d_c, d_r = ref
    # MLX's float64 is float32-accurate (eps_of): test_losses.tol's MLX bound, 1e-4
    rtol, atol = (1e-9, 1e-12) if eps_of(backend, dtype) == EPS["float64"] else (1e-4, 1e-7)
    np.testing.assert_allclose(value, ref_loss, rtol=rtol, atol=atol)
    if grads is not None:
        np.testing.assert_allclose(to_np(grads[0]), d_c, rtol=rtol, atol=atol)
        np.testing.assert_allclose(to_np(grads[1]), d_r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", ["jax", "mlx"])
@given(case=loss_case())
def test_fuzz_traced_loss_is_finite(backend: str, case: dict[str, Any]) -> None:
    """Under ``jax.jit`` / ``mx.compile`` nothing can be checked; for every input without NaN
    or +inf that the static checks accept, the loss and its gradient are finite."""
    skip_unless(backend)
    arrays = case["arrays"]
    assume(all(not np.any(np.isnan(a) | (a == INF)) for a in arrays.values()))
    xs = {k: to_backend(backend, v, "float32") for k, v in arrays.items()}
    loss = _loss_call(case, xs, _extra(case, lambda a: to_backend(backend, a, None)))
    with gategrad.value_checks(False):  # as under tracing: the same code path, eagerly refused
        eager = run(lambda: loss(xs["pc"], xs["pr"]))
    if isinstance(eager, Refused):
        return  # a static error (shape, parameter), raised under tracing too
    got = run(lambda: gategrad.testing.value_and_grad(backend, loss, (xs["pc"], xs["pr"]),
                                                      argnums=(0, 1), mode="compiled"))  # fmt: skip
    if isinstance(got, Refused):
        return
    value, grads = got
    assert math.isfinite(float(to_np(value)))
    for g in grads:
        assert np.all(np.isfinite(to_np(g))), to_np(g)


# --- token log-probs and metrics -----------------------------------------------------------


@st.composite
def logits_case(draw: st.DrawFn) -> dict[str, Any]:
    b, t, v = draw(SIZES, label="B"), draw(st.sampled_from([0, 1, 2, 4])), draw(SIZES, label="V")
    logits = draw(
        st.lists(st.floats(-30, 30), min_size=b * t * v, max_size=b * t * v).map(
            lambda a: np.array(a, dtype=np.float64).reshape(b, t, v)
        ),
        label="logits",
    )
    ignore = draw(st.sampled_from([-100, -1, 0]), label="ignore_index")
    label = st.one_of(st.integers(0, max(v - 1, 0)), st.sampled_from([-100, -1, v, v + 3]))
    labels = draw(
        st.lists(label, min_size=b * t, max_size=b * t).map(
            lambda a: np.array(a, dtype=np.int64).reshape(b, t)
        ),
        label="labels",
    )
    return {
        "logits": logits,
        "labels": labels,
        "mask": draw(masks((b, t)), label="mask"),
        "ignore_index": ignore,
        "shift": draw(st.booleans(), label="shift"),
        "chunk_size": draw(st.sampled_from([None, None, 1, 2, 0, -1]), label="chunk_size"),
    }


def _np_token_logps(case: dict[str, Any], logits: np.ndarray) -> Any:
    """``log_softmax(logits)[label]`` by hand, with the validity rules of ``token_logps``:
    labels outside ``[0, V)`` at a counted position other than ``ignore_index`` are an error."""
    labels, mask = case["labels"], case["mask"]
    b, t, v = logits.shape
    if case["shift"]:
        if t < 2:
            return Refused(ValueError("T < 2"))
        logits, labels = logits[:, :-1], labels[:, 1:]
        mask = None if mask is None else mask[:, 1:]
    if v == 0:
        return Refused(ValueError("V = 0"))
    valid = labels != case["ignore_index"]
    if mask is not None:
        valid &= mask != 0
    if np.any(valid & ((labels < 0) | (labels >= v))):
        return Refused(ValueError("label out of range"))
    m = logits.max(axis=-1, keepdims=True) if v else logits
    lse = (m + np.log(np.sum(np.exp(logits - m), axis=-1, keepdims=True)))[..., 0]
    picked = np.take_along_axis(logits, np.where(valid, labels, 0)[..., None], -1)[..., 0]
    return np.where(valid, picked - lse, 0.0), valid


@pytest.mark.parametrize("backend", ALL)
@given(case=logits_case(), data=st.data())
def test_fuzz_token_logps(backend: str, case: dict[str, Any], data: st.DataObject) -> None:
    """``token_logps``: a checked error where labels, masks, shapes or ``chunk_size`` are
    invalid (the NumPy rules above), else the masked log-probs of ``log_softmax`` by hand.
    Tolerance: |logits| <= 30 and V <= 3, so the log-sum-exp is exact to a few ulps of 30 in
    the compute dtype (float32 for 16-bit inputs): 16 eps * 30."""
    skip_unless(backend)
    dtype = data.draw(st.sampled_from(dtypes(backend)), label="dtype")
    logits = quantize(case["logits"], dtype)
    ref = _np_token_logps(case, logits)
    if case["chunk_size"] is not None and case["chunk_size"] < 1:
        ref = Refused(ValueError("chunk_size"))
    if not isinstance(ref, Refused) and ref[0].size == 0:  # empty: NumPy's spec decides
        spec = run(lambda: gategrad.token_logps(logits, case["labels"], case["mask"],
                                                shift=case["shift"],
                                                ignore_index=case["ignore_index"]))  # fmt: skip
        ref = spec if isinstance(spec, Refused) else ref
    lb = to_backend(backend, logits, dtype)
    yb = to_backend(backend, case["labels"], None)
    mb = None if case["mask"] is None else to_backend(backend, case["mask"], None)
    got = run(lambda: gategrad.token_logps(lb, yb, mb, shift=case["shift"],
                                           ignore_index=case["ignore_index"],
                                           chunk_size=case["chunk_size"]))  # fmt: skip
    if not same_verdict(got, ref):
        return
    logps, valid = got
    want, want_valid = ref
    np.testing.assert_array_equal(to_np(valid).astype(bool), want_valid)
    np.testing.assert_allclose(to_np(logps), want, rtol=0, atol=16 * eps_of(backend, dtype) * 30)


@pytest.mark.parametrize("backend", ["jax", "mlx"])
@given(case=logits_case())
def test_fuzz_traced_token_logps_masks_bad_labels(backend: str, case: dict[str, Any]) -> None:
    """Under tracing, labels outside ``[0, V)`` cannot be refused: they are masked (not
    counted, log-prob 0) and the rest equals the reference, never NaN or a wrong entry."""
    skip_unless(backend)
    _, _, v = case["logits"].shape
    kw = dict(shift=case["shift"], ignore_index=case["ignore_index"])
    ops = gategrad.get_backend(backend)
    lb = to_backend(backend, case["logits"], "float32")
    yb = to_backend(backend, case["labels"], None)
    mb = None if case["mask"] is None else to_backend(backend, case["mask"], None)
    fn = ops.compile(
        lambda a, y: gategrad.token_logps(a, y, mb, chunk_size=case["chunk_size"], **kw)
    )
    got = run(lambda: fn(lb, yb))
    if isinstance(got, Refused):  # static (shapes, chunk_size): refused eagerly as well
        eager = run(lambda: gategrad.token_logps(lb, yb, mb, chunk_size=case["chunk_size"], **kw))
        assert isinstance(eager, Refused), f"refused only under tracing: {got}"
        return
    logps, valid = got
    full = case["labels"].copy()
    full[(full < 0) | (full >= v)] = case["ignore_index"]
    fixed = dict(case, labels=full)
    want, want_valid = _np_token_logps(fixed, case["logits"])
    np.testing.assert_array_equal(to_np(valid).astype(bool), want_valid)
    np.testing.assert_allclose(to_np(logps), want, rtol=0, atol=16 * EPS["float32"] * 30)


@pytest.mark.parametrize("backend", ALL)
@given(case=logits_case(), data=st.data())
def test_fuzz_sequence_metrics(backend: str, case: dict[str, Any], data: st.DataObject) -> None:
    """``metrics.sequence_metrics``: the same validity rules as ``token_logps``; its ``logp``
    is the row sum of the reference log-probs, and ``top1`` lies in [0, 1] where a row counts."""
    skip_unless(backend)
    case = dict(case, chunk_size=None)
    dtype = data.draw(st.sampled_from(dtypes(backend)), label="dtype")
    logits = quantize(case["logits"], dtype)
    ref = _np_token_logps(case, logits)
    kw = dict(shift=case["shift"], ignore_index=case["ignore_index"])
    lb = to_backend(backend, logits, dtype)
    yb = to_backend(backend, case["labels"], None)
    mb = None if case["mask"] is None else to_backend(backend, case["mask"], None)
    got = run(lambda: gategrad.metrics.sequence_metrics(lb, yb, mb, **kw))
    if not isinstance(ref, Refused) and ref[0].size == 0:  # empty: NumPy's spec decides
        spec = run(lambda: gategrad.metrics.sequence_metrics(logits, case["labels"],
                                                             case["mask"], **kw))  # fmt: skip
        ref = spec if isinstance(spec, Refused) else ref
    if not same_verdict(got, ref):
        return
    want, valid = ref
    counts = valid.sum(axis=-1)
    np.testing.assert_allclose(
        to_np(got["logp"]), want.sum(axis=-1), rtol=0, atol=16 * eps_of(backend, dtype) * 30 * 4
    )
    top1 = to_np(got["top1"])[counts > 0]
    assert np.all((top1 >= 0) & (top1 <= 1)), top1


# --- torch module hook, attach -------------------------------------------------------------

ROW_SPECS: list[Any] = [
    "second_half", "first_half", "middle", slice(10, 20), slice(0, 1), slice(-1, None),
    [0], [0, 3], [5], [-1], (1,), 2.5, None, "bool-ok", "bool-bad", "callable",
]  # fmt: skip


def _second_half(rows: int) -> slice:
    return slice(rows // 2, rows)


@given(data=st.data())
def test_fuzz_torch_hook_rows(data: st.DataObject) -> None:
    """``gategrad.torch.hook``: a checked error (at creation or at the forward), or exactly
    the named rows are gated: with a hard gate at tau = 1 every gated row with a counted
    token loses its gradient and every other row keeps it."""
    skip_unless("torch")
    import torch

    import gategrad.torch as gt

    n = data.draw(st.sampled_from([1, 2, 4]), label="rows")
    t, v = 3, 4
    spec = data.draw(st.sampled_from(ROW_SPECS), label="rejected_rows")
    if spec == "bool-ok":
        spec = torch.tensor([i % 2 == 1 for i in range(n)])
    elif spec == "bool-bad":
        spec = torch.tensor([True, False, True])
    elif spec == "callable":
        spec = _second_half
    width = data.draw(st.sampled_from([t - 1, t - 1, t, 1]), label="mask width")

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(n, t, v, dtype=torch.float64))

        def forward(self, labels: torch.Tensor) -> torch.Tensor:
            return self.w * 1.0

    torch.manual_seed(0)
    model = Logits()
    labels = torch.randint(0, v, (n, t))

    def mask_fn(args: Any, kwargs: Any, out: Any) -> torch.Tensor:
        return torch.ones(n, width, dtype=torch.bool)

    def grads(hooked: bool) -> Any:
        model.zero_grad()
        if hooked:
            h = run(lambda: gt.hook(model, Gate("hard", tau=1.0), rejected_rows=spec,
                                    mask=mask_fn))  # fmt: skip
            if isinstance(h, Refused):
                return h
        try:
            out = run(lambda: model(labels=labels))
            if isinstance(out, Refused):
                return out
            lp, _ = gategrad.token_logps(out, labels)
            lp.sum().backward()
        finally:
            if hooked:
                h.remove()
        return model.w.grad.clone()

    plain = grads(False)
    got = grads(True)
    if isinstance(got, Refused):
        return
    assert width == t - 1, f"a mask of width {width} for T-1 = {t - 1} was accepted"
    rows = np.arange(n)
    if isinstance(spec, str):
        want = rows[n // 2 :] if spec == "second_half" else rows[: n // 2]
    elif callable(spec):
        want = rows[spec(n)]
    elif isinstance(spec, torch.Tensor):
        want = rows[spec.numpy()]
    else:
        want = rows[spec] if isinstance(spec, slice) else rows[list(spec)]
    assert len(want) > 0, f"rejected_rows={spec!r} selects no row of {n} and was accepted"
    zeroed = [i for i in range(n) if torch.all(got[i] == 0)]
    kept = [i for i in range(n) if torch.equal(got[i], plain[i])]
    assert sorted(zeroed) == sorted(set(want.tolist())), (zeroed, want)
    assert sorted(kept) == sorted(set(range(n)) - set(want.tolist())), (kept, want)


ATTACH_GATES: list[Any] = [Gate(), Gate("hard", tau=1.0), None, "seq", {"alpha": 3.0}, Gate]


@given(data=st.data())
def test_fuzz_attach(data: st.DataObject) -> None:
    """``gategrad.attach``: a checked error at attach or call time, or the same loss value as
    the plain loss and a rejected gradient equal to the plain one times the gate's weight."""
    skip_unless("torch")
    import torch

    def loss_fn(chosen: Any, rejected: Any, rmask: Any = None) -> Any:
        return -(chosen.sum() - rejected.sum()) * 0.1

    target = data.draw(st.sampled_from([loss_fn, "not callable", loss_fn]), label="loss_fn")
    gate = data.draw(st.sampled_from(ATTACH_GATES), label="gate")
    rejected = data.draw(st.sampled_from(["rejected", "rejected", "chosen_logps", 3]))
    mask = data.draw(st.sampled_from([None, "rmask", "nope"]), label="mask")
    wrapped = run(lambda: gategrad.attach(target, gate, rejected=rejected, mask=mask))
    if isinstance(wrapped, Refused):
        return
    assert callable(target) and isinstance(gate, Gate), "an invalid attach was accepted"
    c = torch.full((2, 3), -1.0, dtype=torch.float64)
    r = torch.full((2, 3), -5.0, dtype=torch.float64, requires_grad=True)
    out = run(lambda: wrapped(c, r, torch.ones(2, 3, dtype=torch.bool)))
    if isinstance(out, Refused):
        return
    out.backward()
    assert float(out) == float(loss_fn(c, r))
    g = gategrad.gate_weights(r.detach(), gate, torch.ones(2, 3, dtype=torch.bool)).weight
    g = g[:, None] if g.ndim == 1 else g
    torch.testing.assert_close(r.grad, (0.1 * g).expand_as(r), rtol=0, atol=1e-15)


# --- the lab's command line ----------------------------------------------------------------

CLI_FLAGS = {
    "--lr": ["inf", "nan", "-1", "0", "1e-3", "abc"],
    "--beta": ["inf", "-0.1", "0", "0.1", "1e309"],
    "--steps": ["0", "-5", "10", "3.5", "x"],
    "--seeds": ["-1", "0", "1 2", "a"],
    "--batch-size": ["0", "-1", "8"],
    "--pairs": ["0", "16"],
    "--d-model": ["0", "7", "16"],
    "--sft-steps": ["-5", "0", "3"],
    "--dpo-shift-lam": ["-3", "0.5", "nan"],
    "--alpha": ["inf", "3", "-1"],
    "--tau": ["0", "1.5", "0.02"],
    "--config": ["/nonexistent/cfg.json", "BAD_FILE"],
    "--out": ["/proc/forbidden/out", "OUT_DIR"],
}


@given(data=st.data())
def test_fuzz_lab_cli_arguments(data: st.DataObject, tmp_path_factory: Any) -> None:
    """``gategrad lab`` flags: argparse's usage error (exit code 2), a ``ValueError`` or
    ``OSError`` that the CLI prints as ``gategrad lab: error:``, or a resolved configuration
    whose numbers are finite and in range. Never a traceback of another kind."""
    from gategrad.cli import build_parser
    from gategrad.lab.cli import config_from_args

    tmp = tmp_path_factory.mktemp("cli")
    bad = tmp / "bad.json"
    bad.write_text("{not json")
    flags = data.draw(st.lists(st.sampled_from(sorted(CLI_FLAGS)), max_size=3, unique=True))
    argv = ["lab"]
    for flag in flags:
        value = data.draw(st.sampled_from(CLI_FLAGS[flag]), label=flag)
        value = value.replace("BAD_FILE", str(bad)).replace("OUT_DIR", str(tmp / "o"))
        argv += [flag, *value.split()]
    note(repr(argv))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        assert exit_.code == 2
        return
    try:
        cfg = config_from_args(args).resolved()
    except (ValueError, OSError) as err:
        assert str(err)
        return
    for name in ("lr", "beta"):
        value = getattr(cfg, name)
        assert value is None or (math.isfinite(value) and value > 0), (name, value)
    assert all(int(s) >= 0 for s in cfg.seeds)
    assert isinstance(args, argparse.Namespace)
