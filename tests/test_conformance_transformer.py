"""Conformance on the tiny transformer (right-padded prompt + response batches, policy and
reference models): loss and every parameter's gradient agree between PyTorch, JAX and MLX; the
gate only rescales the rejected path; a float64 finite-difference check pins the ungated
gradient; compiled and vmapped variants agree with eager mode.

``torch.compile`` of the whole transformer step takes minutes on a CPU; it is checked on the
toy softmax here (tests/test_conformance_softmax.py) and on the transformer by
``benchmarks/conformance_report.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
from _backends import AUTOGRAD, skip_unless
from hypothesis import given, settings
from hypothesis import strategies as st
from test_conformance_softmax import _cap, _one_torch_thread  # noqa: F401 (an autouse fixture)

from gategrad.testing import (
    FLOAT32_TOL,
    PreferenceSpec,
    assert_backends_agree,
    compare_results,
    gate_gradient_parts,
    gates,
    preference_loss_fn,
    preference_specs,
    run_backend,
    run_backend_vmapped,
    transformer_batches,
    transformer_configs,
    transformer_logps,
)
from gategrad.testing.models import transformer_logits

pytestmark = pytest.mark.conformance


DTYPES = ("float32", "float64")
#: loss types without kinks, for finite differences (hinge and dpop have a max(0, .))
SMOOTH = ("sigmoid", "ipo", "cal_dpo", "dpo_shift", "simpo", "robust")
#: |central difference - <grad, v>| <= FD_TOL * |grad| + FD_ATOL (4-point stencil, float64):
#: truncation ~h^4 (below 1e-9 relative here), rounding ~1e-14 / h
FD_TOL = 1e-7
FD_ATOL = 1e-9
FD_STEP = 2.5e-4
#: (B, T) per dtype: one shape each, as JAX in eager mode compiles every operation per shape
#: (about 15 CPU seconds for the transformer's forward and backward). float32 per-tensor
#: differences grow with the sequence length: at T = 16 one example in a few hundred exceeded
#: 1e-4 (every float32 backend equally far from the float64 result: conditioning, not a
#: backend bug), so float32 runs T = 12 and float64 covers the full length, T = 16.
SHAPES = {"float32": ((3, 12),), "float64": ((2, 16),)}


def _skip_unless_all() -> None:
    for name in AUTOGRAD:
        skip_unless(name)


def _batches_and_dtype():
    """(dtype, (cfg, inputs)); float32 batches are at most 12 tokens long (see SHAPES)."""
    return st.sampled_from(DTYPES).flatmap(
        lambda dtype: st.tuples(st.just(dtype), transformer_batches(shapes=SHAPES[dtype]))
    )


@settings(max_examples=_cap(16))
@given(drawn=_batches_and_dtype(), spec=preference_specs())
def test_transformer_backends_agree(drawn, spec) -> None:
    """Loss and every policy parameter's gradient: torch, jax and mlx pairwise, float32 within
    1e-4, float64 torch vs jax within 1e-12 (MLX float64 within 1e-4)."""
    _skip_unless_all()
    dtype, (cfg, inputs) = drawn
    fns = {b: preference_loss_fn(transformer_logps(b, cfg), spec) for b in AUTOGRAD}
    assert_backends_agree(fns, inputs, dtype=dtype, wrt=["params"])


@pytest.mark.parametrize("backend", AUTOGRAD)
@settings(max_examples=_cap(6))
@given(case=transformer_batches(shapes=SHAPES["float64"]), spec=preference_specs(gate=gates()))
def test_transformer_gate_scales_only_the_rejected_path(backend, case, spec) -> None:
    """Within one framework (float64, eager): loss value and the reference model's gradients
    bitwise unchanged by the gate; policy gradient = chosen path + g * rejected path."""
    skip_unless(backend)
    cfg, inputs = case
    parts = gate_gradient_parts(
        backend, transformer_logps(backend, cfg), spec, inputs, wrt=["params", "ref_params"]
    )
    parts.check(reference=["ref_params"])


def _numpy_loss(cfg, spec, inputs, params) -> float:
    fn = preference_loss_fn(transformer_logps("numpy", cfg), spec)
    return float(fn(**{**inputs, "params": params}))


@pytest.mark.parametrize("backend", ["torch", "jax"])
@settings(max_examples=_cap(8))
@given(
    case=transformer_batches(shapes=SHAPES["float64"]),
    spec=preference_specs(loss_types=SMOOTH, gate=st.none()),
    seed=st.integers(0, 2**31 - 1),
)
def test_transformer_gradient_matches_finite_differences(backend, case, spec, seed) -> None:
    """float64: the ungated loss' directional derivative along the gradient and along a random
    direction, by a 4-point central difference of the NumPy forward pass (an independent
    implementation), equals <grad, v> from the framework."""
    skip_unless(backend)
    cfg, inputs = case
    fn = preference_loss_fn(transformer_logps(backend, cfg), spec)
    value, grads = run_backend(backend, fn, inputs, wrt=["params"], dtype="float64")
    params = inputs["params"]
    base = _numpy_loss(cfg, spec, inputs, params)
    assert abs(value - base) <= 1e-12 * max(1.0, abs(base))
    grad = {k: grads[f"params/{k}"] for k in params}
    norm = float(np.sqrt(sum((g * g).sum() for g in grad.values())))
    rng = np.random.default_rng(seed)
    rand = {k: rng.normal(size=v.shape) for k, v in params.items()}
    rnorm = float(np.sqrt(sum((r * r).sum() for r in rand.values())))
    directions = {"random": {k: r / rnorm for k, r in rand.items()}}
    if norm > 0:
        directions["gradient"] = {k: g / norm for k, g in grad.items()}

    def loss_at(v, t):
        return _numpy_loss(cfg, spec, inputs, {k: params[k] + t * v[k] for k in params})

    h = FD_STEP
    for name, v in directions.items():
        fd = (8 * (loss_at(v, h) - loss_at(v, -h)) - (loss_at(v, 2 * h) - loss_at(v, -2 * h))) / (
            12 * h
        )
        analytic = float(sum((grad[k] * v[k]).sum() for k in params))
        assert abs(fd - analytic) <= FD_TOL * norm + FD_ATOL, (
            f"{backend} gradient along the {name} direction: <grad, v> = {analytic!r}, "
            f"finite difference {fd!r}, |grad| = {norm:.3g}"
        )


def _compiled(backend, case, spec, dtype) -> None:
    skip_unless(backend)
    cfg, inputs = case
    fn = preference_loss_fn(transformer_logps(backend, cfg), spec)
    assert_backends_agree(
        {backend: fn}, inputs, dtype=dtype, wrt=["params"], modes=("eager", "compiled")
    )


@settings(max_examples=_cap(2))
@given(drawn=_batches_and_dtype(), spec=preference_specs())
def test_transformer_jax_jit_matches_eager(drawn, spec) -> None:
    dtype, case = drawn
    _compiled("jax", case, spec, dtype)


@settings(max_examples=_cap(1))  # a cold mx.compile builds its CPU kernels: ~30 s each
@given(drawn=_batches_and_dtype(), spec=preference_specs())
def test_transformer_mx_compile_matches_eager(drawn, spec) -> None:
    dtype, case = drawn
    _compiled("mlx", case, spec, dtype)


def _stacked_batches():
    """(dtype, [(cfg, inputs), (cfg, inputs)]): two batches of one config and shape."""
    return st.sampled_from(DTYPES).flatmap(
        lambda dtype: st.tuples(
            st.just(dtype),
            transformer_configs().flatmap(
                lambda cfg: st.lists(
                    transformer_batches(st.just(cfg), shapes=SHAPES[dtype]), min_size=2, max_size=2
                )
            ),
        )
    )


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@settings(max_examples=_cap(2))
@given(drawn=_stacked_batches(), spec=preference_specs(gate=gates()))
def test_transformer_vmap_matches_eager(backend, drawn, spec) -> None:
    """Per-batch gradients under vmap over a stack of two batches (shared weights) equal eager
    runs batch by batch."""
    _check_vmap(backend, drawn, spec)


@settings(max_examples=_cap(1))  # each example compiles jax.jit(jax.vmap(...)) afresh
@given(drawn=_stacked_batches(), spec=preference_specs(gate=gates()))
def test_transformer_jax_vmap_matches_eager(drawn, spec) -> None:
    """As above, with ``jax.jit(jax.vmap(...))``: eager JAX vmap compiles every batched
    operation separately, which is slow on a CPU."""
    _check_vmap("jax", drawn, spec)


def _check_vmap(backend, drawn, spec) -> None:
    dtype, cases = drawn
    skip_unless(backend)
    cfg = cases[0][0]
    batches = [inputs for _, inputs in cases]
    shared = {"params": batches[0]["params"], "ref_params": batches[0]["ref_params"]}
    keys = [k for k in batches[0] if k not in shared]
    stacked = {k: np.stack([b[k] for b in batches]) for k in keys}
    fn = preference_loss_fn(transformer_logps(backend, cfg), spec)
    mode = "compiled" if backend == "jax" else "eager"
    mapped = run_backend_vmapped(
        backend, fn, {**shared, **stacked}, keys, wrt=["params"], dtype=dtype, mode=mode
    )
    tol = FLOAT32_TOL if dtype == "float32" or backend == "mlx" else 1e-12
    for k, batch in enumerate(batches):
        eager = run_backend(backend, fn, {**batch, **shared}, wrt=["params"], dtype=dtype)
        report = compare_results({"vmap": mapped[k], "eager": eager}, dtype=dtype, tol=tol)
        assert report.ok, "\n".join(d.describe() for d in report.failures)


def test_numpy_forward_matches_frameworks_float64() -> None:
    """The NumPy forward used by the finite differences is the same model as the frameworks'."""
    _skip_unless_all()
    from gategrad.testing import make_transformer_batch
    from gategrad.testing.strategies import TRANSFORMER_CONFIGS

    cfg = TRANSFORMER_CONFIGS[1]
    inputs = make_transformer_batch(cfg, *SHAPES["float64"][0], seed=7)
    spec = PreferenceSpec("sigmoid", beta=0.3)
    ref = _numpy_loss(cfg, spec, inputs, inputs["params"])
    for backend in ("torch", "jax"):
        fn = preference_loss_fn(transformer_logps(backend, cfg), spec)
        value, _ = run_backend(backend, fn, inputs, wrt=["params"], dtype="float64")
        assert abs(value - ref) <= 1e-12 * abs(ref)
    logits = transformer_logits(
        inputs["params"], inputs["chosen_tokens"], cfg, inputs["chosen_attention_mask"]
    )
    assert np.isfinite(logits).all() and logits.shape == (*SHAPES["float64"][0], cfg.vocab)
