"""Which backends the tests run on, and dtype tables. Shared by the test modules."""

from __future__ import annotations

import numpy as np
import pytest

import gategrad

ALL = ("numpy", "torch", "jax", "mlx")
AUTOGRAD = ("torch", "jax", "mlx")

#: dtypes each framework supports on every device we target (MLX float64 is CPU-only).
DTYPES = {
    "numpy": ("float16", "float32", "float64"),
    "torch": ("float16", "bfloat16", "float32", "float64"),
    "jax": ("float16", "bfloat16", "float32", "float64"),
    "mlx": ("float16", "bfloat16", "float32", "float64"),
}

#: absolute tolerance for gate values computed by different frameworks, per dtype of the input
#: (the gate is computed in promote_types(dtype, float32), so float16/bfloat16 inputs match float32)
GATE_ATOL = {"float16": 2e-6, "bfloat16": 2e-6, "float32": 2e-6, "float64": 1e-12}


def skip_unless(name: str) -> None:
    """Skip (with the pip extra in the reason) when backend ``name`` is not installed."""
    if not gategrad.is_available(name):
        pytest.skip(f"{name} is not installed: pip install 'gategrad[{name}]'")


def np_dtype(dtype: str) -> type:
    """The NumPy dtype used to build reference inputs (bfloat16 inputs start as float32)."""
    return np.float32 if dtype == "bfloat16" else getattr(np, dtype)
