"""What keeps the timings honest: subnormal floats handled the same way in every variant, and a
self-check that fails the run when a baseline's step time drifts.

Subnormals. A training step whose activations or gradients drift into subnormal floats runs
tens of times slower on a CPU (measured here: a torch step went from 0.4 s to 21 s in 12 steps).
Policy, per framework:

- torch: ``torch.set_flush_denormal(True)`` (flush-to-zero and denormals-are-zero), set *before*
  torch's thread pool starts (worker threads inherit the main thread's floating-point mode
  when they are created; set later, it reaches the main thread only), then checked in every
  thread by a parallel multiplication whose products are subnormal;
- JAX/XLA on a CPU flushes subnormals by default (checked the same way under ``jit``);
- MLX has no switch: its subnormals are not flushed (the check records it). Restoring the
  state before every timed step (below) keeps them from appearing.

State. Every timed step of every variant starts from the same model and optimizer state: the
runner restores it (fresh copies of the initial parameters, a fresh optimizer) outside the
timed region, so no variant trains its own drifting copy.

Drift. :func:`check_drift` compares the median of the last third of a baseline's interleaved
step times with that of the first third; beyond ``limit`` (a fraction) the run fails with
:class:`DriftError` (``overhead.py`` exits with status 3 after writing its report).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

import numpy as np

#: The default ``--drift-limit``: the subnormal drift this guards against was 10-50x; the load
#: of a shared machine moves a step time by well under 50% over a run.
DRIFT_LIMIT = 0.5
#: Elements of the subnormal probe: enough that torch splits it over every thread.
_PROBE = 1 << 20
_TINY = 1e-38  # a normal float32; half of it is subnormal


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _torch_policy() -> dict[str, Any]:
    import torch

    requested = bool(torch.set_flush_denormal(True))
    x = torch.full((_PROBE,), _TINY, dtype=torch.float32)
    nonzero = int(torch.count_nonzero(x * 0.5))  # parallel: every thread computes a part
    return {
        "policy": "torch.set_flush_denormal(True) before the thread pool starts",
        "supported": requested,
        "threads": torch.get_num_threads(),
        "subnormal_products_left": nonzero,
        "flushed": requested and nonzero == 0,
    }


def _jax_policy() -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    x = jnp.full((_PROBE,), _TINY, dtype=jnp.float32)
    nonzero = int(jnp.count_nonzero(jax.jit(lambda a: a * 0.5)(x)))
    return {
        "policy": "XLA's default (flush to zero on the CPU)",
        "subnormal_products_left": nonzero,
        "flushed": nonzero == 0,
    }


def _mlx_policy() -> dict[str, Any]:
    import mlx.core as mx

    y = mx.full((_PROBE,), _TINY, dtype=mx.float32) * 0.5
    nonzero = int(mx.sum(y != 0).item())
    return {
        "policy": "none available (MLX has no switch); the state restore keeps them away",
        "subnormal_products_left": nonzero,
        "flushed": nonzero == 0,
    }


_POLICIES: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "torch": ("torch", _torch_policy),
    "jax": ("jax", _jax_policy),
    "mlx": ("mlx.core", _mlx_policy),
}


def subnormal_policy(frameworks: tuple[str, ...] = tuple(_POLICIES)) -> dict[str, Any]:
    """Apply each installed framework's subnormal policy and check it; call it first thing,
    before any framework computes (torch's thread pool must not have started)."""
    out: dict[str, Any] = {}
    for name in frameworks:
        module, apply = _POLICIES[name]
        if not _found(module):
            continue
        try:
            out[name] = apply()
        except Exception as err:  # recorded, never fatal: the drift check still guards
            out[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
    return out


# ---------------------------------------------------------------------------------------------
# the drift self-check


class DriftError(RuntimeError):
    """A baseline's step time drifted over the run by more than the limit."""


def drift(series: list[float]) -> float:
    """``median(last third) / median(first third) - 1`` of a time series (``0.0`` for fewer
    than two points; the thirds overlap for fewer than three)."""
    a = np.asarray([t for t in series if math.isfinite(t)], dtype=np.float64)
    if a.size < 2:
        return 0.0
    k = max(1, a.size // 3)
    return float(np.median(a[-k:]) / np.median(a[:k]) - 1.0)


def check_drift(series: dict[str, list[float]], limit: float) -> dict[str, Any]:
    """The drift of each named baseline series; raises :class:`DriftError` naming every series
    whose drift exceeds ``limit`` in either direction. Returns what was checked."""
    drifts = {name: drift(ts) for name, ts in series.items()}
    bad = {n: d for n, d in drifts.items() if abs(d) > limit}
    result = {"limit": limit, "drift": drifts, "points": {n: len(t) for n, t in series.items()}}
    if bad:
        listed = ", ".join(f"{n}: {d:+.0%}" for n, d in sorted(bad.items()))
        raise DriftError(
            f"baseline step time drifted by more than {limit:.0%} over the run ({listed}); the "
            "ratios of this run are not trustworthy: check the subnormal policy and the state "
            "restore, or a change of load on the machine, and run again"
        )
    return result
