"""Which backends the tests run on, and dtype tables. Shared by the test modules."""

from __future__ import annotations

import numpy as np
import pytest

import gategrad

ALL = ("numpy", "torch", "jax", "mlx")
AUTOGRAD = ("torch", "jax", "mlx")

#: dtypes each framework supports (MLX float64 is CPU-only: see :func:`dtypes`).
DTYPES = {
    "numpy": ("float16", "float32", "float64"),
    "torch": ("float16", "bfloat16", "float32", "float64"),
    "jax": ("float16", "bfloat16", "float32", "float64"),
    "mlx": ("float16", "bfloat16", "float32", "float64"),
}

#: absolute tolerance for gate values computed by different frameworks, per dtype of the input
#: (the gate is computed in promote_types(dtype, float32), so float16/bfloat16 inputs match float32)
GATE_ATOL = {"float16": 2e-6, "bfloat16": 2e-6, "float32": 2e-6, "float64": 1e-12}


def dtypes(backend: str, candidates: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The float dtypes to test on ``backend`` here: MLX float64 only when MLX runs on the CPU
    (on Metal it raises), so the macOS job tests float16/bfloat16/float32 there."""
    names = DTYPES[backend] if candidates is None else candidates
    if backend == "mlx" and "float64" in names:
        import mlx.core as mx

        if mx.default_device() != mx.cpu:
            names = tuple(n for n in names if n != "float64")
    return names


def float64_name(backend: str) -> str:
    """``'float64'``, or ``'float32'`` for MLX on Metal (which has no float64)."""
    return "float64" if "float64" in dtypes(backend, ("float64",)) else "float32"


def skip_unless(name: str) -> None:
    """Skip (with the pip extra in the reason) when backend ``name`` is not installed."""
    if not gategrad.is_available(name):
        pytest.skip(f"{name} is not installed: pip install 'gategrad[{name}]'")


def np_dtype(dtype: str) -> type:
    """The NumPy dtype used to build reference inputs (bfloat16 inputs start as float32)."""
    return np.float32 if dtype == "bfloat16" else getattr(np, dtype)
