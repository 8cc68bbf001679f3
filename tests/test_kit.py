"""The verification kit itself (gategrad.testing): it must fail, clearly, when a backend is
wrong; its strategies and batch builders produce what they promise; importing it is light."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from _backends import AUTOGRAD, run_outside_repo, skip_unless
from hypothesis import given, settings
from hypothesis import strategies as st

import gategrad
from gategrad import Gate
from gategrad.testing import (
    Agreement,
    BackendDisagreement,
    PreferenceSpec,
    SoftmaxConfig,
    TransformerConfig,
    assert_backends_agree,
    compare_results,
    gate_gradient_parts,
    make_softmax_batch,
    make_transformer_batch,
    preference_batches,
    preference_loss_fn,
    preference_specs,
    softmax_logps,
    softmax_reference,
    tolerance,
)

pytestmark = pytest.mark.conformance

GATE = Gate(shape="log_sigmoid", tau=0.2, temperature=0.5, estimator="q10")


def _square(x, w):
    return ((x * w) ** 2).sum()


def _inputs():
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(3, 4)), "w": rng.normal(size=(4,))}


# ------------------------------------------------------------------------------------------
# assert_backends_agree fails on a wrong backend, naming the tensor and the pair


@pytest.mark.parametrize("backend", ["jax", "mlx"])
def test_wrong_gradient_with_right_value_fails(backend: str) -> None:
    """A backend whose value is right but whose gradient for `w` is 1% off is caught."""
    skip_unless("torch")
    skip_unless(backend)
    stop = gategrad.get_backend(backend).stop_gradient

    def wrong(x, w):
        w = 1.01 * w - stop(0.01 * w)  # same value, gradient scaled by 1.01
        return _square(x, w)

    with pytest.raises(BackendDisagreement) as info:
        assert_backends_agree({"torch": _square, backend: wrong}, _inputs(), dtype="float64")
    err = info.value
    assert err.worst.tensor == "w"
    assert {err.worst.a, err.worst.b} == {"torch", backend}
    text = str(err)
    assert "'w'" in text and "torch" in text and backend in text and "max|a-b|" in text
    assert 0.005 < err.worst.rel < 0.03
    # the value and the other input agree: only `w` fails
    assert {d.tensor for d in err.report.failures} == {"w"}


def test_every_backend_and_pair_is_compared() -> None:
    for name in AUTOGRAD:
        skip_unless(name)
    report = assert_backends_agree(_square, _inputs(), dtype="float32")
    assert isinstance(report, Agreement)
    assert set(report.values) == set(AUTOGRAD)
    assert set(report.worst_by_pair()) == {("torch", "jax"), ("torch", "mlx"), ("jax", "mlx")}
    assert {d.tensor for d in report.diffs} == {"value", "x", "w"}
    assert "| torch vs jax | float32 |" in report.table()


def test_default_tolerances() -> None:
    assert tolerance("float32", "torch", "jax") == 1e-4
    assert tolerance("float64", "torch", "jax[compiled]") == 1e-12
    assert tolerance("float64", "numpy", "torch") == 1e-12
    assert tolerance("float64", "torch", "mlx") == 1e-4  # MLX float64 is treated as float32
    assert tolerance("float64", "mlx[compiled]", "jax") == 1e-4


def test_tolerance_is_scale_relative_per_tensor() -> None:
    x = {"v": np.array([1000.0, 1e-6])}
    near = {"v": np.array([1000.0 + 5e-3, 2e-6])}  # tiny entry off by 100%, within 1e-5 * 1000
    report = compare_results({"a": (1.0, x), "b": (1.0, near)}, dtype="float64", tol=1e-5)
    assert report.ok
    far = {"v": np.array([1000.0 + 2e-2, 1e-6])}
    report = compare_results({"a": (1.0, x), "b": (1.0, far)}, dtype="float64", tol=1e-5)
    assert not report.ok and report.failures[0].index == (0,)


def test_nan_shape_and_missing_gradients_fail() -> None:
    ok = {"g": np.ones(3)}
    nan = {"g": np.array([1.0, np.nan, 1.0])}
    report = compare_results({"a": (1.0, ok), "b": (1.0, nan)}, tol=1.0)
    assert not report.ok and "non-finite" in report.failures[0].describe()
    report = compare_results({"a": (1.0, ok), "b": (1.0, {"g": np.ones(4)})}, tol=1.0)
    assert not report.ok and "shapes differ" in report.failures[0].describe()
    report = compare_results({"a": (1.0, ok), "b": (1.0, {})}, tol=1.0)
    assert not report.ok and "missing" in report.failures[0].describe()
    report = compare_results({"a": (np.inf, ok), "b": (np.inf, ok)}, tol=0.0)
    assert report.ok  # the same infinity on both sides is agreement


def test_needs_two_variants_and_complete_numpy_gradients() -> None:
    with pytest.raises(ValueError, match="at least two"):
        assert_backends_agree({"numpy": lambda x, w: (0.0, {})}, _inputs())
    skip_unless("torch")
    with pytest.raises(ValueError, match="lack"):
        assert_backends_agree({"numpy": lambda x, w: (0.0, {"x": x}), "torch": _square}, _inputs())
    with pytest.raises(ValueError, match="not among the inputs"):
        assert_backends_agree(
            {"torch": _square, "numpy": lambda x, w: (0.0, {})}, _inputs(), wrt=["nope"]
        )


@pytest.mark.parametrize("backend", AUTOGRAD)
def test_an_ungated_backend_is_caught_on_the_softmax(backend: str) -> None:
    """A backend that forgets the gate has the right loss and the wrong parameter gradients:
    the comparison with the NumPy closed form fails on the parameters, not on the value."""
    skip_unless(backend)
    cfg = SoftmaxConfig(8, 4)
    inputs = make_softmax_batch(cfg, 3, 11, seed=2, weight_scale=3.0)
    spec = PreferenceSpec("sigmoid", beta=1.0, gate=GATE)
    forgot = preference_loss_fn(softmax_logps(backend), spec.ungated())
    with pytest.raises(BackendDisagreement) as info:
        assert_backends_agree(
            {"numpy": softmax_reference(spec), backend: forgot},
            inputs,
            dtype="float64",
            wrt=["params"],
        )
    assert {d.tensor for d in info.value.report.failures} <= {"params/W", "params/b"}
    assert info.value.worst.tensor.startswith("params/")
    # and with the gate, the same backend agrees
    right = preference_loss_fn(softmax_logps(backend), spec)
    assert_backends_agree(
        {"numpy": softmax_reference(spec), backend: right}, inputs, dtype="float64", wrt=["params"]
    )


def test_a_wrong_closed_form_is_caught() -> None:
    """The NumPy reference is checked too: dropping its gate makes the comparison fail."""
    skip_unless("torch")
    cfg = SoftmaxConfig(8, 4)
    inputs = make_softmax_batch(cfg, 3, 11, seed=3, weight_scale=3.0)
    spec = PreferenceSpec("ipo", beta=0.5, gate=GATE.replace(granularity="token"))
    fn = preference_loss_fn(softmax_logps("torch"), spec)
    with pytest.raises(BackendDisagreement, match="params/"):
        assert_backends_agree(
            {"torch": fn, "numpy": softmax_reference(spec.ungated())},
            inputs,
            dtype="float64",
            wrt=["params"],
        )


def test_gate_parts_check_detects_an_unscaled_rejected_path() -> None:
    """GateParts.check passes for the real gate; the same parts with the gated and ungated
    gradients swapped fail, so the property can fail."""
    skip_unless("torch")
    cfg = SoftmaxConfig(8, 4)
    inputs = make_softmax_batch(cfg, 3, 11, seed=4, weight_scale=3.0)
    spec = PreferenceSpec("sigmoid", beta=1.0, gate=GATE)
    parts = gate_gradient_parts("torch", softmax_logps("torch"), spec, inputs, wrt=["params"])
    parts.check()
    assert parts.weights.min() < 0.5  # the gate is active in this batch
    parts.gated, parts.ungated = parts.ungated, parts.gated
    with pytest.raises(AssertionError, match="chosen"):
        parts.check()


def test_compiled_modes_are_variants() -> None:
    skip_unless("jax")
    report = assert_backends_agree(
        {"jax": _square}, _inputs(), dtype="float64", modes=("eager", "compiled")
    )
    assert set(report.values) == {"jax", "jax[compiled]"}


def test_mlx_float64_runs_on_cpu_and_uses_float32_tolerance() -> None:
    skip_unless("mlx")
    skip_unless("torch")
    report = assert_backends_agree({"torch": _square, "mlx": _square}, _inputs(), dtype="float64")
    assert all(d.tol == 1e-4 for d in report.diffs)
    assert max(d.rel for d in report.diffs) < 1e-6


# ------------------------------------------------------------------------------------------
# strategies and builders


@settings(max_examples=20)
@given(batch=preference_batches(), spec=preference_specs())
def test_preference_batches_feed_preference_loss(batch, spec) -> None:
    for side in ("chosen", "rejected"):
        mask = batch[f"{side}_mask"]
        assert mask.any(axis=-1).all()
        assert (mask[:, :-1] >= mask[:, 1:]).all()  # right padded
        assert (batch[f"policy_{side}_logps"][mask] < 0).all()
    no_ref = spec.loss_type == "simpo"
    loss, metrics = gategrad.preference_loss(
        spec.loss_type,
        batch["policy_chosen_logps"],
        batch["policy_rejected_logps"],
        None if no_ref else batch["ref_chosen_logps"],
        None if no_ref else batch["ref_rejected_logps"],
        beta=spec.beta,
        gate=spec.gate,
        chosen_mask=batch["chosen_mask"],
        rejected_mask=batch["rejected_mask"],
        sft_weight=spec.sft_weight,
        **dict(spec.params),
    )
    assert np.isfinite(loss)
    assert ("gate/mean" in metrics) == (spec.gate is not None)


@settings(max_examples=10)
@given(batch=preference_batches(per_token=False))
def test_per_sequence_batches(batch) -> None:
    assert batch["policy_chosen_logps"].ndim == 1
    assert (batch["chosen_lengths"] >= 1).all()
    loss, _ = gategrad.preference_loss(
        "simpo",
        batch["policy_chosen_logps"],
        batch["policy_rejected_logps"],
        beta=2.0,
        chosen_lengths=batch["chosen_lengths"],
        rejected_lengths=batch["rejected_lengths"],
        gate=Gate(estimator="seq"),
    )
    assert np.isfinite(loss)


@settings(max_examples=10)
@given(st.data())
def test_transformer_batches_are_right_padded_preference_pairs(data) -> None:
    from gategrad.testing import transformer_batches

    cfg, batch = data.draw(transformer_batches())
    assert isinstance(cfg, TransformerConfig)
    for side in ("chosen", "rejected"):
        tokens = batch[f"{side}_tokens"]
        attn = batch[f"{side}_attention_mask"].astype(bool)
        resp = batch[f"{side}_response_mask"].astype(bool)
        assert tokens.shape[1] <= cfg.max_len
        assert (attn[:, :-1] >= attn[:, 1:]).all() and attn[:, 0].all()  # right padded
        assert not (resp & ~attn).any() and resp.any(axis=-1).all()
        assert not resp[:, 0].any()  # the prompt has at least one token
        assert ((tokens == 0) == ~attn).all()
    prompt_c = ~batch["chosen_response_mask"].astype(bool) & batch["chosen_attention_mask"].astype(
        bool
    )
    assert (
        np.where(prompt_c, batch["chosen_tokens"], -1)
        == np.where(prompt_c, batch["rejected_tokens"], -1)
    ).all()  # one shared prompt
    assert set(batch["params"]) == set(batch["ref_params"])


def test_builders_are_deterministic() -> None:
    cfg = TransformerConfig()
    a, b = make_transformer_batch(cfg, 2, 8, seed=5), make_transformer_batch(cfg, 2, 8, seed=5)
    assert all(np.array_equal(a[k], b[k]) for k in a if k not in ("params", "ref_params"))
    with pytest.raises(ValueError, match="length"):
        make_transformer_batch(cfg, 2, cfg.max_len + 1)


# ------------------------------------------------------------------------------------------
# the models, written once


def test_models_run_the_same_maths_in_every_framework() -> None:
    """One implementation: every framework's logits equal the NumPy float64 reference, and the
    per-framework modules are the same functions with the framework bound."""
    import importlib

    from gategrad.testing.models import (
        init_softmax_params,
        init_transformer_params,
        params_from_numpy,
        softmax_logits,
        to_numpy,
        transformer_logits,
    )

    cfg = TransformerConfig()
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, cfg.vocab, size=(2, 9))
    mask = (np.arange(9)[None, :] < np.array([[9], [5]])).astype(np.int64)
    np_params = init_transformer_params(cfg, seed=1)
    sm_params = init_softmax_params(SoftmaxConfig(vocab=7, dim=5), seed=1)
    contexts = rng.normal(size=(4, 5))
    ref = transformer_logits(params_from_numpy(np_params, "numpy"), tokens, cfg, mask)
    ref_sm = softmax_logits(params_from_numpy(sm_params, "numpy"), contexts)
    assert ref.shape == (2, 9, cfg.vocab) and ref.dtype == np.float64
    for name in ("numpy", *AUTOGRAD):
        if not gategrad.is_available(name):
            continue
        ops = gategrad.get_backend(name)
        mod = importlib.import_module(f"gategrad.testing.models.{name}_models")
        assert mod.transformer_logits is transformer_logits
        tol = tolerance("float64", "numpy", name)
        params = mod.params_from_numpy(np_params, "float64")
        got = to_numpy(
            mod.transformer_logits(params, ops.from_numpy(tokens), cfg, ops.from_numpy(mask))
        )
        assert got.dtype == np.float64
        assert np.abs(got - ref).max() <= tol * np.abs(ref).max(), name
        got = to_numpy(softmax_logits(params_from_numpy(sm_params, name), contexts))
        assert np.abs(got - ref_sm).max() <= tol * np.abs(ref_sm).max(), name
        f32 = params_from_numpy(np_params, name, "float32")
        assert to_numpy(f32["tok_emb"]).dtype == np.float32


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_params_from_numpy_copies(name: str) -> None:
    from gategrad.testing.models import params_from_numpy, to_numpy

    skip_unless(name)
    src = {"w": np.ones(3)}
    params = params_from_numpy(src, name, "float64")
    src["w"][0] = 5.0
    np.testing.assert_array_equal(to_numpy(params)["w"], np.ones(3))


def test_params_from_numpy_rejects_bad_names() -> None:
    from gategrad.testing.models import params_from_numpy

    with pytest.raises(ValueError, match="dtype"):
        params_from_numpy({"w": np.ones(2)}, "numpy", "float16")
    with pytest.raises(ValueError, match="unknown backend"):
        params_from_numpy({"w": np.ones(2)}, "paddle")


def _fresh_python(*lines: str) -> None:
    """Run ``lines`` in a fresh interpreter; cwd outside the repository, so that its gategrad/
    (no backends/) does not shadow the install."""
    out = run_outside_repo(["-c", "\n".join(lines)], Path(tempfile.gettempdir()), timeout=120)
    assert out.returncode == 0, out.stderr


def test_jax_float64_params_need_x64() -> None:
    skip_unless("jax")
    _fresh_python(
        "import numpy as np",
        "from gategrad.testing.models import params_from_numpy",
        "try:",
        "    params_from_numpy({'w': np.ones(2)}, 'jax', 'float64')",
        "except RuntimeError as err:",
        "    assert 'jax_enable_x64' in str(err), err",
        "else:",
        "    raise SystemExit('no RuntimeError')",
        "p = params_from_numpy({'w': np.ones(2)}, 'jax', 'float32')",
        "assert str(p['w'].dtype) == 'float32'",
    )


def test_import_is_light() -> None:
    """``import gategrad.testing`` (and its models) imports no framework and no Hypothesis;
    strategies do."""
    _fresh_python(
        "import sys, gategrad.testing as t, gategrad.testing.models as m",
        "m.params_from_numpy, m.transformer_logits, m.softmax_logits, m.to_numpy",
        "heavy = [m for m in ('torch', 'jax', 'mlx', 'hypothesis') if m in sys.modules]",
        "assert not heavy, heavy",
        "t.gates",
        "assert 'hypothesis' in sys.modules",
        "assert not [m for m in ('torch', 'jax', 'mlx') if m in sys.modules]",
    )


def test_public_namespace() -> None:
    import gategrad.testing as kit

    for name in kit.__all__:
        assert getattr(kit, name) is not None, name
    with pytest.raises(AttributeError):
        kit.not_a_name  # noqa: B018
