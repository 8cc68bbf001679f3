"""The spec where mutation testing found gaps (CONTRIBUTING.md, "Mutation testing").

Every comparison here is against an independent reference written in this file in NumPy and
float64 (never against ``gate_rejected_vjp``, which shares the core's code), on every backend:

- the ``seq``, ``mean``, ``min`` and ``qNN`` estimators (``q0`` and ``q100`` included, which are
  accepted: the row's minimum and maximum probability, as ``numpy.quantile``) on random,
  non-right-padded masks, and the gate shapes applied to them;
- the hard gate at ``p == tau`` (open: ``g = 1[p >= tau]``);
- ``scale_grad``'s argument checks;
- masks holding values other than 0 and 1: every mask is ``mask != 0`` (2, 0.5 and -1 count as
  1), as documented ("nonzero = counts"), in the gate, the losses and ``token_logps``;
- metrics and gate statistics carry no gradient (torch autograd, ``jax.grad``, ``mx.grad``);
- double backward through ``token_logps`` against float64 finite differences.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _backends import ALL, AUTOGRAD, float64_name, skip_unless
from hypothesis import given
from hypothesis import strategies as st

import gategrad
from gategrad import Gate
from gategrad.testing import from_numpy, to_numpy

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
ESTIMATORS = ("seq", "mean", "min", "q0", "q10", "q50", "q97.5", "q100")
SHAPED_GATES = (
    Gate(shape="sigmoid", alpha=20.0, tau=0.3, floor=0.1),
    Gate(shape="log_sigmoid", tau=0.05, temperature=0.7),
    Gate(shape="hard", tau=0.2),
    Gate(shape="power", tau=0.4, exponent=1.5, floor=0.05),
)


# --- the independent reference --------------------------------------------------------------


def ref_estimate(logps: np.ndarray, mask: np.ndarray, estimator: str) -> np.ndarray:
    """Per-row ``p`` (float64) from the documented formulas, row by row with NumPy."""
    out = []
    for row, keep in zip(logps.astype(np.float64), mask, strict=True):
        vals = row[keep]
        with np.errstate(divide="ignore"):
            if estimator == "seq":
                out.append(np.exp(vals.mean()))
            elif estimator == "mean":
                out.append(np.exp(vals).mean())
            elif estimator == "min":
                out.append(np.exp(vals.min()))
            else:
                out.append(np.quantile(np.exp(vals), float(estimator[1:]) / 100))
    return np.array(out)


def ref_gate(gate: Gate, p: np.ndarray) -> np.ndarray:
    """``g(p)`` of the Gate docstring, in float64."""
    with np.errstate(divide="ignore", over="ignore"):
        if gate.shape == "sigmoid":
            g = 1 / (1 + np.exp(-gate.alpha * (p - gate.tau)))
        elif gate.shape == "log_sigmoid":
            g = 1 / (1 + np.exp(-(np.log(p) - np.log(gate.tau)) / gate.temperature))
        elif gate.shape == "hard":
            g = (p >= gate.tau).astype(np.float64)
        else:
            g = np.minimum(1.0, (p / gate.tau) ** gate.exponent)
    return gate.floor + (1 - gate.floor) * g


def p_tolerance(
    estimator: str, logps: np.ndarray, mask: np.ndarray, ref: np.ndarray, eps: float
) -> np.ndarray:
    """Bound on ``|p - ref|`` per row when the backend computes in a precision of unit roundoff
    ``eps``, from the operations each estimator does (each rounds by at most ``eps``, ``exp`` and
    ``log`` by at most 2 ulp), with a factor 2 of margin:

    - ``seq``: a sum of ``n`` log-probs errs by ``n * eps * max|l|``; ``exp`` turns that
      absolute error into a relative one;
    - ``mean``: ``n`` ``exp``s, a positive sum (``n * eps``), a division, ``log`` and ``exp``
      back (``2 |log p| eps``);
    - ``min``: exact, then one ``exp``;
    - ``qNN``: ``exp`` of each value, the lerp ``a + (b - a) t`` (three roundings of values up
      to the row's largest ``p``), then ``log`` and ``exp`` back.
    """
    n = mask.sum(-1)
    finite = np.where(mask & np.isfinite(logps), np.abs(logps), 0.0)
    big = finite.max(-1)
    with np.errstate(divide="ignore"):
        logp = np.where(ref > 0, np.abs(np.log(np.where(ref > 0, ref, 1.0))), 0.0)
    if estimator == "seq":
        rel, atol = (n + 2) * (1 + big) * eps, 0.0
    elif estimator == "mean":
        rel, atol = (n + 6 + 2 * logp) * eps, 0.0
    elif estimator == "min":
        rel, atol = 4 * eps, 0.0
    else:
        pmax = np.where(mask, np.exp(np.where(mask, logps, 0.0)), 0.0).max(-1)
        rel, atol = (6 + 2 * logp) * eps, 6 * eps * pmax
    return 2 * (rel * ref + atol)


@st.composite
def masked_logps(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """``(B, T)`` log-probs in ``[-60, 0]`` (``-inf`` sometimes) with a random mask, not
    right-padded, holding at least one entry per row. Few fixed sizes (JAX and MLX compile per
    shape)."""
    b = draw(st.sampled_from([1, 3]))
    t = draw(st.sampled_from([1, 4, 7]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logps = np.maximum(-rng.exponential(draw(st.sampled_from([0.05, 1.0, 8.0])), (b, t)), -60)
    if draw(st.booleans()):
        logps[rng.uniform(size=(b, t)) < 0.15] = -np.inf
    mask = rng.uniform(size=(b, t)) < draw(st.sampled_from([0.3, 0.7, 1.0]))
    mask[np.arange(b), rng.integers(0, t, size=b)] = True
    return logps, mask


def _eps(backend: str, dtype: str) -> float:
    if dtype == "float32" or backend == "mlx":  # MLX float64 exp/log are float32-accurate
        return EPS32
    return EPS64


# --- estimators and gate values ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
@given(batch=masked_logps(), estimator=st.sampled_from(ESTIMATORS))
def test_estimators_match_the_numpy_reference(backend, batch, estimator) -> None:
    """``gate_weights(...).p`` equals the estimator's formula on the masked tokens, in float32
    and float64; in float64 the weight equals ``g(p)`` of the Gate docstring."""
    skip_unless(backend)
    logps, mask = batch
    for dtype in ("float32", float64_name(backend)):
        x = logps.astype(dtype)
        ref = ref_estimate(x, mask, estimator)
        tol = p_tolerance(estimator, x, mask, ref, _eps(backend, dtype))
        for gate in SHAPED_GATES:
            gate = gate.replace(estimator=estimator)
            stats = gategrad.gate_weights(
                from_numpy(backend, x, dtype), gate, from_numpy(backend, mask)
            )
            p = to_numpy(stats.p).astype(np.float64)
            assert np.all(np.abs(p - ref) <= tol), (dtype, gate, p, ref)
            if dtype != "float64" or backend == "mlx":
                continue
            # g is non-decreasing in p: it lies between g at the ends of p's error interval
            w = to_numpy(stats.weight)
            lo = ref_gate(gate, np.maximum(ref - tol, 0)) - 1e-12
            hi = ref_gate(gate, np.minimum(ref + tol, 1)) + 1e-12
            assert np.all((lo <= w) & (w <= hi)), (gate, w, lo, hi)


@pytest.mark.parametrize("backend", ALL)
def test_token_granularity_gates_each_token_by_its_own_p(backend) -> None:
    skip_unless(backend)
    rng = np.random.default_rng(7)
    logps = -rng.exponential(2.0, size=(3, 5))
    mask = rng.uniform(size=(3, 5)) < 0.6
    mask[:, 2] = True
    f64 = float64_name(backend)
    for gate in SHAPED_GATES:
        gate = gate.replace(granularity="token")
        stats = gategrad.gate_weights(
            from_numpy(backend, logps, f64), gate, from_numpy(backend, mask)
        )
        np.testing.assert_array_equal(to_numpy(stats.mask), mask)
        tol = 1e-5 if backend == "mlx" else 1e-12
        np.testing.assert_allclose(to_numpy(stats.p), np.exp(logps), rtol=tol)
        np.testing.assert_allclose(to_numpy(stats.weight), ref_gate(gate, np.exp(logps)), atol=tol)


@pytest.mark.parametrize("estimator", ["q0", "q100", "q0.0", "q100.0", "q50"])
def test_q0_and_q100_are_accepted(estimator: str) -> None:
    """``q0`` and ``q100`` are the ends of ``[0, 1]`` that ``numpy.quantile`` accepts: the
    row's smallest and largest probability."""
    assert Gate(estimator=estimator).quantile == float(estimator[1:]) / 100
    logps = np.log(np.array([[0.5, 0.1, 0.9, 0.3]]))
    p = gategrad.gate_weights(logps, Gate(estimator=estimator)).p
    np.testing.assert_allclose(p, np.quantile(np.exp(logps), float(estimator[1:]) / 100, axis=-1))


@pytest.mark.parametrize("estimator", ["q100.5", "q101", "q-1", "q", "Q10", "q10%", "max"])
def test_quantiles_outside_0_100_are_refused(estimator: str) -> None:
    with pytest.raises(ValueError, match="estimator"):
        Gate(estimator=estimator)


@pytest.mark.parametrize("backend", ALL)
def test_masked_quantile_matches_numpy_at_the_ends(backend) -> None:
    skip_unless(backend)
    rng = np.random.default_rng(3)
    values = rng.uniform(size=(4, 6))
    mask = rng.uniform(size=(4, 6)) < 0.5
    mask[:, 0] = True
    f64 = float64_name(backend)
    for q in (0, 0.0, 0.25, 1, 1.0):
        got = gategrad.masked_quantile(
            from_numpy(backend, values, f64), from_numpy(backend, mask), q
        )
        ref = [np.quantile(v[m], q) for v, m in zip(values, mask, strict=True)]
        np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-6 if backend == "mlx" else 0)
    for bad in (-0.01, 1.01, True, "0.5", None):
        with pytest.raises(ValueError, match="quantile q must be a number in"):
            gategrad.masked_quantile(
                from_numpy(backend, values, f64), from_numpy(backend, mask), bad
            )


# --- the hard gate at its threshold -----------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("tau", [0.25, 0.1, 1.0])
def test_hard_gate_is_open_at_p_equal_tau(backend, tau) -> None:
    """``g = 1[p >= tau]``: 1 at ``log p == log tau`` exactly, 0 one ulp below (below 0: the
    smallest normal number, as XLA flushes subnormals to zero)."""
    skip_unless(backend)
    f64 = float64_name(backend)
    at = math.log(tau)
    below = np.nextafter(at, -np.inf) if at != 0 else -np.finfo(np.float64).tiny
    logps = np.array([[at], [below]])
    for granularity in ("example", "token"):
        gate = Gate(shape="hard", tau=tau, estimator="min", granularity=granularity)
        w = to_numpy(gategrad.gate_weights(from_numpy(backend, logps, f64), gate).weight)
        np.testing.assert_array_equal(w.reshape(-1), [1.0, 0.0])
    w = to_numpy(gategrad.gate_value(Gate(shape="hard", tau=tau), np.array([at, below]), log=True))
    np.testing.assert_array_equal(w, [1.0, 0.0])


# --- scale_grad's arguments -------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL)
def test_scale_grad_checks_its_arguments(backend) -> None:
    skip_unless(backend)
    x = from_numpy(backend, np.zeros((2, 3)), "float32")
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        gategrad.scale_grad(from_numpy(backend, np.zeros((2, 3), np.int32)), 0.5)
    with pytest.raises(ValueError, match="more dimensions than x"):
        gategrad.scale_grad(x, from_numpy(backend, np.ones((1, 2, 3)), "float32"))
    with pytest.raises(ValueError, match=r"does not broadcast against x of shape \(2, 3\)"):
        gategrad.scale_grad(x, from_numpy(backend, np.ones(2), "float32"))
    with pytest.raises(ValueError, match="does not broadcast"):
        gategrad.scale_grad(x, from_numpy(backend, np.ones((3, 3)), "float32"))


@pytest.mark.parametrize("backend", AUTOGRAD)
@pytest.mark.parametrize(
    "weight", [np.array([0.5, 0.0, 2.0]), np.array([[0.5], [3.0]]), np.array(0.25), 3, 0.75]
)
def test_scale_grad_broadcasts_a_weight_as_numpy_does(backend, weight) -> None:
    """A ``(T,)`` weight scales every row of ``(B, T)``, a ``(B, 1)`` one every column; numbers
    (int or float) scale everything. Exact: one float32 product per element."""
    skip_unless(backend)
    from gategrad.testing import vjp

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3)).astype(np.float32)
    v = rng.normal(size=(2, 3)).astype(np.float32)
    w = weight if isinstance(weight, (int, float)) else from_numpy(backend, weight, "float32")
    out, grad = vjp(
        backend,
        lambda z: gategrad.scale_grad(z, w),
        from_numpy(backend, x, "float32"),
        from_numpy(backend, v, "float32"),
    )
    np.testing.assert_array_equal(to_numpy(out), x)
    np.testing.assert_array_equal(to_numpy(grad), v * np.asarray(weight, np.float32))


# --- masks holding other values than 0 and 1 --------------------------------------------------


def _odd_masks(mask: np.ndarray) -> list[np.ndarray]:
    """The same positions as ``mask`` written with 2, 0.5 and -1 (float and int)."""
    return [
        np.where(mask, 2.0, 0.0),
        np.where(mask, 0.5, 0.0),
        np.where(mask, -1, 0).astype(np.int32),
        np.where(mask, 2, 0).astype(np.int64),
    ]


@pytest.mark.parametrize("backend", ALL)
def test_nonzero_mask_values_count_as_one(backend) -> None:
    """``mask != 0`` everywhere: a mask of 2 or 0.5 never weights tokens."""
    skip_unless(backend)
    rng = np.random.default_rng(11)
    b, t, v = 3, 5, 4
    f64 = float64_name(backend)
    mask = rng.uniform(size=(b, t)) < 0.6
    mask[:, 1] = True
    lw, ll = -rng.exponential(1.0, size=(2, b, t))
    rw, rl = -rng.exponential(1.0, size=(2, b, t))
    logits = rng.normal(size=(b, t, v))
    labels = rng.integers(0, v, size=(b, t))
    a = lambda z: from_numpy(backend, z, f64)  # noqa: E731

    def everything(m: np.ndarray) -> list[np.ndarray]:
        mb = from_numpy(backend, m) if m.dtype != np.float64 else a(m)
        stats = gategrad.gate_weights(a(ll), Gate(estimator="q50"), mb)
        loss, metrics = gategrad.preference_loss(
            "sigmoid", a(lw), a(ll), a(rw), a(rl), chosen_mask=mb, rejected_mask=mb, gate=Gate()
        )
        lp, valid = gategrad.token_logps(a(logits), from_numpy(backend, labels), mb, shift=False)
        seqm = gategrad.metrics.sequence_metrics(
            a(logits), from_numpy(backend, labels), mb, shift=False
        )
        return (
            [to_numpy(stats.p), to_numpy(loss), to_numpy(lp), to_numpy(valid)]
            + [to_numpy(metrics[k]) for k in sorted(metrics)]
            + [to_numpy(seqm[k]) for k in sorted(seqm)]
        )

    expected = everything(mask)
    for odd in _odd_masks(mask):
        for got, want in zip(everything(odd), expected, strict=True):
            np.testing.assert_array_equal(got, want)


# --- no gradient through metrics and gate statistics ------------------------------------------


def _grads(backend: str, fn, *args):
    """Gradients of the scalar ``fn(*args)`` with respect to every argument (framework arrays);
    torch: a result that does not require grad has zero gradient."""
    if backend == "jax":
        import jax

        return [np.asarray(g) for g in jax.grad(fn, argnums=tuple(range(len(args))))(*args)]
    if backend == "mlx":
        import mlx.core as mx

        grads = mx.grad(fn, argnums=list(range(len(args))))(*args)
        grads = grads if isinstance(grads, (list, tuple)) else [grads]
        return [np.array(g) for g in grads]
    import torch

    leaves = [x.detach().clone().requires_grad_(True) for x in args]
    out = fn(*leaves)
    if not out.requires_grad:
        return [np.zeros(tuple(x.shape)) for x in leaves]
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return [
        np.zeros(tuple(x.shape)) if g is None else g.numpy()
        for x, g in zip(leaves, grads, strict=False)
    ]


@pytest.mark.parametrize("backend", AUTOGRAD)
def test_metrics_and_gate_stats_carry_no_gradient(backend) -> None:
    """Every metric of ``preference_loss``, the gate's statistics and ``sequence_metrics`` are
    constants to autograd: their gradient is exactly zero, while the loss's is not."""
    skip_unless(backend)
    rng = np.random.default_rng(5)
    b, t, v = 3, 4, 5
    f64 = float64_name(backend)
    lw, ll, rw, rl = (from_numpy(backend, a, f64) for a in -rng.exponential(1.0, size=(4, b, t)))
    mask = from_numpy(backend, np.ones((b, t), bool))
    gates = (Gate(), Gate(estimator="q10"), Gate(shape="log_sigmoid", granularity="token"))

    def loss_part(key: str, gate: Gate):
        def fn(w, lo):
            loss, metrics = gategrad.preference_loss(
                "sigmoid", w, lo, rw, rl, chosen_mask=mask, rejected_mask=mask, gate=gate
            )
            return (loss if key == "loss" else metrics[key]) * 1.0

        return fn

    for gate in gates:
        _, metrics = gategrad.preference_loss(
            "sigmoid", lw, ll, rw, rl, chosen_mask=mask, rejected_mask=mask, gate=gate
        )
        assert "gate/mean" in metrics
        for key in metrics:
            for g in _grads(backend, loss_part(key, gate), lw, ll):
                np.testing.assert_array_equal(g, 0.0, err_msg=f"{key} {gate}")
        assert all(np.abs(g).max() > 0 for g in _grads(backend, loss_part("loss", gate), lw, ll))

        for field in ("weight", "p"):

            def stat(x, gate=gate, field=field):
                _, stats = gategrad.gate_rejected(x, gate, mask, return_stats=True)
                return getattr(stats, field).sum()

            (g,) = _grads(backend, stat, ll)
            np.testing.assert_array_equal(g, 0.0, err_msg=f"{field} {gate}")

    logits = from_numpy(backend, rng.normal(size=(b, t, v)), f64)
    labels = from_numpy(backend, rng.integers(0, v, size=(b, t)))
    for key in gategrad.metrics.METRIC_NAMES:
        (g,) = _grads(
            backend,
            lambda z, key=key: gategrad.metrics.sequence_metrics(z, labels)[key].sum(),
            logits,
        )
        np.testing.assert_array_equal(g, 0.0, err_msg=key)


# --- double backward through token_logps ------------------------------------------------------


def _np_grad(logits: np.ndarray, labels: np.ndarray, valid: np.ndarray, c: np.ndarray):
    """``d/dz sum(c * log_softmax(z)[label] * valid)`` in float64: ``c (onehot - softmax)``."""
    z = logits - logits.max(-1, keepdims=True)
    soft = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    onehot = np.eye(logits.shape[-1])[labels]
    return (c * valid)[..., None] * (onehot - soft)


def _hvp(backend: str, f, z, u):
    """``d/dz <grad f(z), u>`` by the framework's double backward."""
    if backend == "torch":
        import torch

        zz = z.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(zz), zz, create_graph=True)
        (h,) = torch.autograd.grad((g * u).sum(), zz)
        return h.numpy()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda y: (jax.grad(f)(y) * u).sum())(z))
    import mlx.core as mx

    return np.array(mx.grad(lambda y: (mx.grad(f)(y) * u).sum())(z))


@pytest.mark.parametrize("backend", AUTOGRAD)
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_double_backward_through_token_logps(backend, chunk_size) -> None:
    """The Hessian-vector product of ``sum(c * token_logps(z))`` equals the float64 central
    difference of the closed-form gradient along ``u``. With ``eps = 1e-5`` the difference errs
    by ``eps^2 / 6 * |third derivative|`` (< 1e-9 here, ``|c|, |u| <= 3``) plus rounding
    ``1e-16 / eps``: 1e-8 is far above both; MLX's float64 ``exp`` is float32-accurate, so its
    bound is the backend's ``float64_tol``."""
    skip_unless(backend)
    rng = np.random.default_rng(2)
    b, t, v = 2, 4, 6
    f64 = float64_name(backend)
    logits = rng.normal(size=(b, t, v))
    labels = rng.integers(0, v, size=(b, t))
    labels[0, 1] = -100
    mask = np.ones((b, t), bool)
    mask[1, 3] = False
    valid = (labels != -100) & mask
    c = np.clip(rng.normal(size=(b, t)), -3, 3)
    u = np.clip(rng.normal(size=(b, t, v)), -3, 3)
    lab, msk = from_numpy(backend, labels), from_numpy(backend, mask)
    cc = from_numpy(backend, c, f64)

    def f(z):
        lp, _ = gategrad.token_logps(z, lab, msk, shift=False, chunk_size=chunk_size)
        return (lp * cc).sum()

    got = _hvp(backend, f, from_numpy(backend, logits, f64), from_numpy(backend, u, f64))
    eps = 1e-5
    safe = np.where(valid, labels, 0)
    ref = _np_grad(logits + eps * u, safe, valid, c) - _np_grad(logits - eps * u, safe, valid, c)
    ref = ref / (2 * eps)
    tol = max(1e-8, gategrad.get_backend(backend).float64_tol) if f64 == "float64" else 1e-4
    np.testing.assert_allclose(got, ref, atol=tol * np.abs(ref).max())
    assert np.abs(ref).max() > 0.1
