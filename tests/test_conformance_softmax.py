"""Conformance on the toy softmax: the gated DPO-family loss and every parameter's gradient agree
between the closed-form NumPy reference, PyTorch, JAX and MLX; the gate only rescales the
rejected path; compiled and vmapped variants agree with eager mode."""

from __future__ import annotations

import numpy as np
import pytest
from _backends import AUTOGRAD, skip_unless
from hypothesis import given, settings
from hypothesis import strategies as st

import gategrad
from gategrad.testing import (
    FLOAT32_TOL,
    assert_backends_agree,
    compare_results,
    gate_gradient_parts,
    gates,
    preference_loss_fn,
    preference_specs,
    run_backend,
    run_backend_vmapped,
    softmax_batches,
    softmax_configs,
    softmax_logps,
    softmax_reference,
)

pytestmark = pytest.mark.conformance


def _cap(n: int) -> int:
    """``n`` examples, or fewer when the Hypothesis profile asks for fewer (``dev``)."""
    return min(n, settings.default.max_examples)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The models are tiny: torch's intra-op threads cost more than they gain (a transformer
    step ran 4x slower with 2 threads than with 1 on a busy 2-core machine). Restored after.
    Shared with tests/test_conformance_transformer.py."""
    if not gategrad.is_available("torch"):
        yield
        return
    ops = gategrad.get_backend("torch")
    before = ops.set_threads(1)
    yield
    ops.set_threads(before)


DTYPES = ("float32", "float64")
#: examples per compiled property: each example compiles afresh (torch.compile: tens of seconds
#: on a CPU; mx.compile builds CPU kernels; jax.jit is quicker)
COMPILED_EXAMPLES = {"torch": 2, "jax": 5, "mlx": 2}


def _fns(backends, spec):
    return {b: preference_loss_fn(softmax_logps(b), spec) for b in backends}


@pytest.mark.parametrize("backend", AUTOGRAD)
@settings(max_examples=_cap(30))
@given(case=softmax_batches(), spec=preference_specs())
def test_softmax_matches_numpy_closed_form(backend, case, spec) -> None:
    """Loss and dL/dW, dL/db of `backend` equal the NumPy closed form (gate included):
    float32 within 1e-4, float64 within 1e-12 (MLX float64 within 1e-4)."""
    skip_unless(backend)
    _, inputs = case
    fns = {"numpy": softmax_reference(spec), **_fns([backend], spec)}
    for dtype in DTYPES:
        assert_backends_agree(fns, inputs, dtype=dtype, wrt=["params"])


@pytest.mark.parametrize("backend", AUTOGRAD)
@settings(max_examples=_cap(20))
@given(case=softmax_batches(), spec=preference_specs(gate=gates()))
def test_softmax_gate_scales_only_the_rejected_path(backend, case, spec) -> None:
    """Within one framework (float64, eager): the loss value and the reference log-probs'
    gradients are bitwise those of the ungated loss; the parameter gradient is the chosen path
    plus the rejected path with its cotangent multiplied by g."""
    skip_unless(backend)
    _, inputs = case
    parts = gate_gradient_parts(
        backend,
        softmax_logps(backend),
        spec,
        inputs,
        wrt=["params", "ref_chosen_logps", "ref_rejected_logps"],
    )
    parts.check(reference=["ref_chosen_logps", "ref_rejected_logps"])
    assert np.all((parts.weights >= 0) & (parts.weights <= 1))


def _compiled(backend, case, spec, dtype) -> None:
    skip_unless(backend)
    _, inputs = case
    assert_backends_agree(
        _fns([backend], spec), inputs, dtype=dtype, wrt=["params"], modes=("eager", "compiled")
    )


compiled_cases = {
    "case": softmax_batches(),
    "spec": preference_specs(),
    "dtype": st.sampled_from(DTYPES),
}


@settings(max_examples=_cap(COMPILED_EXAMPLES["torch"]))
@given(**compiled_cases)
def test_softmax_torch_compile_matches_eager(case, spec, dtype) -> None:
    _compiled("torch", case, spec, dtype)


@settings(max_examples=_cap(COMPILED_EXAMPLES["jax"]))
@given(**compiled_cases)
def test_softmax_jax_jit_matches_eager(case, spec, dtype) -> None:
    _compiled("jax", case, spec, dtype)


@settings(max_examples=_cap(COMPILED_EXAMPLES["mlx"]))
@given(**compiled_cases)
def test_softmax_mx_compile_matches_eager(case, spec, dtype) -> None:
    _compiled("mlx", case, spec, dtype)


@pytest.mark.parametrize("backend", AUTOGRAD)
@settings(max_examples=_cap(4))
@given(
    cases=softmax_configs().flatmap(
        lambda cfg: st.lists(
            softmax_batches(st.just(cfg), shapes=((3, 11),)), min_size=2, max_size=2
        )
    ),
    spec=preference_specs(),
    dtype=st.sampled_from(DTYPES),
)
def test_softmax_vmap_matches_eager(backend, cases, spec, dtype) -> None:
    """Per-batch gradients under vmap (over a stack of batches, shared weights) equal eager
    runs batch by batch. JAX runs ``jax.jit(jax.vmap(...))``: eager JAX vmap compiles every
    batched operation separately, which is slow on a CPU."""
    skip_unless(backend)
    batches = [inputs for _, inputs in cases]
    params = batches[0]["params"]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0] if k != "params"}
    fn = preference_loss_fn(softmax_logps(backend), spec)
    mode = "compiled" if backend == "jax" else "eager"
    mapped = run_backend_vmapped(
        backend,
        fn,
        {"params": params, **stacked},
        list(stacked),
        wrt=["params"],
        dtype=dtype,
        mode=mode,
    )
    tol = FLOAT32_TOL if dtype == "float32" or backend == "mlx" else 1e-12
    for k, batch in enumerate(batches):
        eager = run_backend(backend, fn, {**batch, "params": params}, wrt=["params"], dtype=dtype)
        report = compare_results({"vmap": mapped[k], "eager": eager}, dtype=dtype, tol=tol)
        assert report.ok, "\n".join(d.describe() for d in report.failures)
