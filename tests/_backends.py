"""Which backends the tests run on, and dtype tables. Shared by the test modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def fw(name: str) -> object:
    """The array namespace of backend ``name`` (``numpy``, ``torch``, ``jax.numpy``,
    ``mlx.core``); skips when the framework is not installed."""
    skip_unless(name)
    return gategrad.get_backend(name).xp


def run_outside_repo(
    args: list[str], cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``python *args`` from ``cwd`` (outside the repository, so the installed gategrad is the
    one imported), headless and offline, without the caller's ``PYTHONPATH``."""
    env = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "HF_HUB_OFFLINE": "1",
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONWARNINGS": "ignore",  # the output is parsed; warnings go to stderr anyway
    }
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def tiny_llama(vocab_size: int, hidden: int, layers: int, heads: int, **extra: Any) -> Any:
    """A tiny ``transformers.LlamaForCausalLM`` (seeded), MLP width ``2 * hidden``."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        **extra,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def stacked_pair_loss(lp: Any, ref_lp: Any, mask: Any, **kwargs: Any) -> Any:
    """DPO on per-token log-probs of a stacked ``[chosen; rejected]`` batch."""
    return gategrad.stacked_preference_loss("sigmoid", lp, ref_lp, mask=mask, **kwargs)
