"""Interleaved timing: every repetition calls each variant once, in rotated order, so that
machine drift cancels in the per-repetition ratio; statistics are median [IQR] (min-max)."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ._config import log

Times = dict[str, list[float]]


def ratio_stats(ratios: list[float]) -> dict[str, Any]:
    """Median, interquartile range and min-max of per-repetition ratios."""
    a = np.asarray([r for r in ratios if math.isfinite(r)], dtype=np.float64)
    if a.size == 0:
        nan = float("nan")
        return {"median": nan, "p25": nan, "p75": nan, "min": nan, "max": nan, "n": 0}
    p25, med, p75 = np.percentile(a, [25, 50, 75])
    return {
        "median": float(med),
        "p25": float(p25),
        "p75": float(p75),
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
    }


Prepare = dict[str, Callable[[], Any]]


def interleave(
    fns: dict[str, Callable[[], Any]], reps: int, prepare: Prepare | None = None
) -> Times:
    """Seconds per call of each function; every repetition calls each once, in rotated order.

    ``prepare[name]()``, where given, runs before each call of ``fns[name]``, outside the timed
    region (the state restore of a training step). The garbage collector is paused while timing
    (collected before), as in ``timeit``.
    """
    names = list(fns)
    times: Times = {n: [] for n in names}
    prepare = prepare or {}
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                if name in prepare:
                    prepare[name]()
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def plan_reps(seconds_per_rep: float, budget_s: float, min_reps: int, max_reps: int) -> int:
    if seconds_per_rep <= 0:
        return max_reps
    return int(max(min_reps, min(max_reps, budget_s // seconds_per_rep)))


def timed_group(
    label: str,
    fns: dict[str, Callable[[], Any]],
    budget_s: Callable[[], float],
    min_reps: int,
    max_reps: int,
    prepare: Prepare | None = None,
) -> tuple[Times, int]:
    """Time the (warmed-up) ``fns`` interleaved: one more call each plans the repetitions that
    fit ``budget_s()`` (asked after that call); returns the times and the repetitions."""
    per_rep = 0.0
    for name, fn in fns.items():
        if prepare and name in prepare:
            prepare[name]()
        t0 = time.perf_counter()
        fn()
        per_rep += time.perf_counter() - t0
    reps = plan_reps(per_rep, budget_s(), min_reps, max_reps)
    log(f"{label}: {reps} interleaved repetitions of {len(fns)} (~{per_rep:.2f} s each)")
    return interleave(fns, reps, prepare), reps


def median_ms(seconds: list[float]) -> float:
    return 1e3 * float(np.median(seconds))


def time_ratios(times: Times, name: str, base: str) -> dict[str, Any]:
    """Statistics of the per-repetition ratio, plus the ratio of the fastest calls
    (``min_over_min``: on a busy machine the fastest call is the least disturbed one)."""
    out = ratio_stats([a / b for a, b in zip(times[name], times[base], strict=True)])
    out["min_over_min"] = min(times[name]) / min(times[base])
    return out


def added_us(times: Times, name: str, base: str) -> dict[str, Any]:
    """Microseconds ``name`` adds to ``base``: the median and the IQR of the per-repetition
    differences, and ``name``'s own median."""
    deltas = [1e6 * (a - b) for a, b in zip(times[name], times[base], strict=True)]
    return {
        "median_us": 1e3 * median_ms(times[name]),
        "added_us": float(np.median(deltas)),
        "added_us_iqr": [float(x) for x in np.percentile(deltas, [25, 75])],
    }
