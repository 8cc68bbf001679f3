"""Edges of the JAX/MLX backends and of the core entry points that the other suites leave open:
the JAX import error, ``GateStats`` as a pytree, JAX's 64-bit switch, the explicit
``chunk_size`` path, ``lengths`` dtype checks, ``T = 0`` shapes and ``gate_value``'s default."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
from _backends import ALL, skip_unless

import gategrad
from gategrad import Gate, GateStats, gate_value, gate_weights, masked_quantile, token_logps
from gategrad.testing import from_numpy


def _sigmoid_gate(gate: Gate, p: np.ndarray) -> np.ndarray:
    """The closed form of the sigmoid gate, float64: ``1 / (1 + exp(-alpha (p - tau)))``."""
    return 1.0 / (1.0 + np.exp(-gate.alpha * (p - gate.tau)))


def _np_token_logps(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``log_softmax(logits)[label]`` in float64."""
    z = logits.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[..., 0]
    return np.take_along_axis(z, labels[..., None], axis=-1)[..., 0] - lse


# --- backends/jax.py -------------------------------------------------------------------------


def test_jax_backend_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    skip_unless("jax")
    gategrad.get_backend("jax")  # loaded once, so the entries below exist to be restored
    monkeypatch.setitem(sys.modules, "jax", None)  # `import jax` now raises ImportError
    monkeypatch.setitem(sys.modules, "jax.numpy", None)
    monkeypatch.delitem(sys.modules, "gategrad.backends.jax")
    with pytest.raises(ImportError, match=r"needs JAX: pip install 'gategrad\[jax\]'"):
        importlib.import_module("gategrad.backends.jax")


def test_jax_gate_stats_is_a_pytree_under_jit() -> None:
    skip_unless("jax")
    import jax

    gate = Gate()
    p = np.array([0.001, 0.02, 0.05, 0.5])
    x = from_numpy("jax", np.log(p), "float64")
    stats = jax.jit(lambda a: gate_weights(a, gate, lengths=1))(x)
    assert isinstance(stats, GateStats) and stats.mask is None
    np.testing.assert_allclose(np.asarray(stats.weight), _sigmoid_gate(gate, p), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(stats.p), p, rtol=1e-12)
    leaves, tree = jax.tree_util.tree_flatten(stats)
    assert len(leaves) == 2  # weight and p; mask None is an empty subtree
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert isinstance(back, GateStats) and back.weight is leaves[0] and back.p is leaves[1]


def test_jax_log_softmax_default_axis_is_last() -> None:
    skip_unless("jax")
    ops = gategrad.get_backend("jax")
    a = np.random.default_rng(0).normal(size=(2, 5))
    m = a.max(axis=-1, keepdims=True)
    ref = a - (m + np.log(np.exp(a - m).sum(axis=-1, keepdims=True)))
    out = ops.log_softmax(from_numpy("jax", a, "float64"))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12, atol=1e-14)


def test_jax_device_scope_float64_switches_on_x64() -> None:
    skip_unless("jax")
    import jax

    ops = gategrad.get_backend("jax")
    a = np.array([1.0 + 2.0**-40, -3.0])  # not representable in float32
    before = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", False)
    try:
        with ops.device_scope("float64"):
            x = ops.from_numpy(a, dtype="float64")
        assert jax.config.read("jax_enable_x64")
        assert x.dtype == np.float64
        np.testing.assert_array_equal(np.asarray(x), a)
    finally:
        jax.config.update("jax_enable_x64", before)


# --- explicit chunk_size: backends/mlx.py token_logps, gategrad/_logps.py ---------------------


def _jit(backend: str, f):  # type: ignore[no-untyped-def]
    if backend == "jax":
        import jax

        return jax.jit(f)
    return f  # MLX: eager arrays already take the fused path


@pytest.mark.parametrize("backend", ["jax", "mlx"])
@pytest.mark.parametrize("chunk_size", [None, 1])
def test_explicit_chunk_size_takes_the_chunked_slices(
    backend: str, chunk_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Traced JAX and MLX take one fused ``logsumexp`` unless ``chunk_size`` is given; then the
    chunked slices of ``chunk_size`` rows (docs of ``token_logps``)."""
    skip_unless(backend)
    ops = gategrad.get_backend(backend)
    calls: list[tuple[int, int]] = []
    real = ops.chunked_logps

    def spy(logits, labels, cdtype, rows, cols):  # type: ignore[no-untyped-def]
        calls.append((rows, cols))
        return real(logits, labels, cdtype, rows, cols)

    monkeypatch.setattr(ops, "chunked_logps", spy)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 4, 6)).astype(np.float32)
    labels = rng.integers(0, 6, size=(3, 4))
    x = from_numpy(backend, logits, "float32")
    y = from_numpy(backend, labels)
    out, valid = _jit(backend, lambda a, b: token_logps(a, b, shift=False, chunk_size=chunk_size))(
        x, y
    )
    assert calls == ([] if chunk_size is None else [(1, 4)])
    # float32 log-softmax of 6 logits of size ~1: rounding below 1e-6 relative
    np.testing.assert_allclose(
        np.asarray(out), _np_token_logps(logits, labels), rtol=1e-5, atol=1e-6
    )
    assert np.asarray(valid).all()


# --- gategrad/_core.py ---------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "dtype"), [(b, bool) for b in ALL] + [("numpy", np.complex64)])
def test_lengths_must_be_real_counts(backend: str, dtype: type) -> None:
    skip_unless(backend)
    x = from_numpy(backend, np.full((2,), -3.0, np.float32), "float32")
    lengths = from_numpy(backend, np.array([1, 2]).astype(dtype))
    with pytest.raises(TypeError, match="lengths must be real token counts, got dtype"):
        gate_weights(x, Gate(), lengths=lengths)


@pytest.mark.parametrize("backend", ALL)
def test_zero_positions(backend: str) -> None:
    """``T = 0``: refused for ``B >= 1`` (no token to estimate ``p`` from, nothing to rank);
    ``B = 0`` gives empty results."""
    skip_unless(backend)
    for batch in (1, 2):
        x = from_numpy(backend, np.zeros((batch, 0), np.float32), "float32")
        with pytest.raises(ValueError, match=rf"\({batch}, 0\): T = 0 positions"):
            gate_weights(x, Gate())
        m = from_numpy(backend, np.zeros((batch, 0), bool))
        with pytest.raises(ValueError, match=rf"\({batch}, 0\): T = 0, no value to rank"):
            masked_quantile(x, m, 0.5)
    empty = from_numpy(backend, np.zeros((0, 0), np.float32), "float32")
    stats = gate_weights(empty, Gate())
    assert tuple(stats.weight.shape) == (0,) and tuple(stats.p.shape) == (0,)
    q = masked_quantile(empty, from_numpy(backend, np.zeros((0, 0), bool)), 0.5)
    assert tuple(q.shape) == (0,)


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_gate_value_reads_probabilities_by_default(backend: str) -> None:
    skip_unless(backend)
    gate = Gate()
    p = np.array([1e-3, 0.01, 0.02, 0.03, 0.1])
    out = gate_value(gate, from_numpy(backend, p, "float64"))
    np.testing.assert_allclose(np.asarray(out), _sigmoid_gate(gate, p), rtol=1e-12)
    assert float(gate_value(gate, 0.02)) == pytest.approx(0.5, abs=1e-15)  # p = tau
