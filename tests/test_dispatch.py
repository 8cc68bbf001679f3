"""Lazy, per-call dispatch: no framework imported by ``import gategrad``, clear errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from _backends import skip_unless

import gategrad
from gategrad import Gate, gate_rejected
from gategrad.testing import from_numpy


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    # cwd outside the repository: the installed package is what is imported
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )


def test_import_gategrad_imports_no_framework(tmp_path) -> None:
    code = (
        "import sys, gategrad, gategrad.testing, gategrad.testing.models\n"
        "import numpy as np\n"
        "gategrad.gate_rejected(np.zeros((2, 3)), gategrad.Gate())\n"
        "bad = [m for m in ('torch', 'jax', 'mlx', 'jaxlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("framework", "extra"), [("torch", "torch"), ("jax", "jax"), ("mlx", "mlx")]
)
def test_uninstalled_framework_names_the_pip_extra(tmp_path, framework: str, extra: str) -> None:
    blocked = "mlx" if framework == "mlx" else framework
    code = (
        "import sys\n"
        f"sys.modules[{blocked!r}] = None  # simulate a missing install\n"
        "import gategrad\n"
        "try:\n"
        f"    gategrad.get_backend({framework!r})\n"
        "except ImportError as e:\n"
        "    print(e)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
        f"assert not gategrad.is_available({framework!r})\n"
    )
    out = _run(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"pip install 'gategrad[{extra}]'" in out.stdout


def test_unknown_backend_and_type() -> None:
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        gategrad.get_backend("tensorflow")
    with pytest.raises(TypeError, match="cannot handle builtins.list"):
        gate_rejected([[-1.0, -2.0]], Gate())
    with pytest.raises(TypeError, match="gate must be a gategrad.Gate"):
        gate_rejected(np.zeros((2, 3)), {"tau": 0.1})


@pytest.mark.parametrize(
    ("a", "b"), [("torch", "numpy"), ("jax", "torch"), ("mlx", "jax"), ("numpy", "mlx")]
)
def test_mixed_frameworks_raise_type_error_naming_both(a: str, b: str) -> None:
    skip_unless(a)
    skip_unless(b)
    x = from_numpy(a, np.full((2, 3), -1.0), "float32")
    mask = from_numpy(b, np.ones((2, 3), bool))
    with pytest.raises(TypeError, match=rf"{a} array but mask is a {b} array"):
        gate_rejected(x, Gate(), mask)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax", "mlx"])
def test_dispatch_finds_framework_and_caches_per_type(backend: str) -> None:
    skip_unless(backend)
    from gategrad import _dispatch

    x = from_numpy(backend, np.zeros(3), "float32")
    assert gategrad.framework_of(x) == backend
    assert _dispatch._type_cache[type(x)] == backend
    assert gategrad.framework_of(1.5) is None


def test_torch_parameter_and_subclass_dispatch_to_torch() -> None:
    skip_unless("torch")
    import torch

    p = torch.nn.Parameter(torch.full((2, 3), -0.5))
    assert gategrad.framework_of(p) == "torch"
    y = gate_rejected(p, Gate())
    y.sum().backward()
    assert p.grad is not None and torch.isfinite(p.grad).all()


def test_first_calls_inside_torch_compile_fullgraph_in_a_fresh_process(tmp_path) -> None:
    """The backend is loaded, and the token-log-prob kernel used, for the first time inside a
    ``torch.compile(fullgraph=True)`` region: no graph break (plain import statements, autograd
    Functions defined at import)."""
    pytest.importorskip("torch")
    code = (
        "import torch, gategrad\n"
        "@torch.compile(fullgraph=True)\n"
        "def f(logits, labels):\n"
        "    lp, mask = gategrad.token_logps(logits, labels)\n"
        "    return gategrad.gate_rejected(lp, gategrad.Gate(), mask).sum()\n"
        "x = torch.randn(2, 5, 7, requires_grad=True)\n"
        "f(x, torch.randint(0, 7, (2, 5))).backward()\n"
        "print(bool(torch.isfinite(x.grad).all()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


def test_get_ops_is_a_deprecated_alias_of_get_backend() -> None:
    with pytest.warns(DeprecationWarning, match="gategrad.get_backend"):
        get_ops = gategrad.get_ops
    assert get_ops("numpy") is gategrad.get_backend("numpy")


def test_every_backend_is_a_backend_instance() -> None:
    for name in gategrad.BACKENDS:
        if gategrad.is_available(name):
            backend = gategrad.get_backend(name)
            assert isinstance(backend, gategrad.Backend) and backend.name == name


def test_value_checks_context_manager_restores_the_setting() -> None:
    x = np.log(np.array([[0.5, np.nan]]))
    assert bool(gategrad.value_checks()) is True
    with gategrad.value_checks(False):
        assert bool(gategrad.value_checks()) is False
        gate_rejected(x, Gate())  # not checked: no error
    assert bool(gategrad.value_checks()) is True
    with pytest.raises(ValueError, match="NaN"):
        gate_rejected(x, Gate())
    with pytest.raises(TypeError, match="a bool"):
        gategrad.value_checks("no")  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax", "mlx"])
def test_from_numpy_keeps_shapes_and_dtypes(backend: str) -> None:
    """0-d, transposed (non-contiguous) and integer arrays keep their shape, values and kind."""
    skip_unless(backend)
    b = gategrad.get_backend(backend)
    for a in (np.float32(1.5) * np.ones(()), np.arange(6.0).reshape(2, 3).T, np.arange(4)):
        x = b.from_numpy(a)
        assert tuple(x.shape) == a.shape
        np.testing.assert_array_equal(b.to_numpy(x), a.astype(b.to_numpy(x).dtype))
        assert b.is_floating(x) == np.issubdtype(a.dtype, np.floating)
    assert b.to_numpy(b.from_numpy(np.ones(2), dtype="float32")).dtype == np.float32
