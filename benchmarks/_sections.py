"""The report's sections: each builds its runners, times them interleaved, adds memory.

1. ``step``: one DPO training step, ungated versus gated, per step mode;
1b. ``gate_cost``: the loss alone, gated minus ungated (microseconds), and the step ratio that
   implies;
2. ``logps``: :func:`gategrad.token_logps` against other implementations;
3. ``mechanism``: the custom-gradient primitive against the detach mix (from the step runs).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

import gategrad

from . import _memory
from ._config import (
    ALL_VARIANTS,
    GATE_COST_MODES,
    GATED,
    LOGPS_MODES,
    PASSES,
    SMOKE_COMPILED,
    SMOKE_MEMORY,
    STEP_MODES,
    UNGATED,
    Config,
    StepMode,
    StepSize,
    Variant,
    log,
)
from ._runners import LOGPS_NEEDS, LogpsCase, StepRunner, loss_only_fn, measures_rss
from ._state import drift
from ._timing import Times, added_us, median_ms, time_ratios, timed_group


def guarded(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``, or ``{'error': ...}`` (logged, with the traceback) when it raises."""
    try:
        return fn()
    except Exception as err:
        traceback.print_exc()
        log(f"{label}: failed: {err!r}")
        return {"error": f"{type(err).__name__}: {err}"[:500]}


def clocked_group(
    cfg: Config,
    label: str,
    fns: dict[str, Callable[[], Any]],
    budget_s: float,
    prepare: dict[str, Callable[[], Any]] | None = None,
) -> tuple[Times, int]:
    """:func:`timed_group` with the budget the run's clock allows of ``budget_s``."""
    return timed_group(
        label, fns, lambda: cfg.clock.budget(budget_s), cfg.min_reps, cfg.max_reps, prepare
    )


def skipped(framework: str) -> dict[str, Any] | None:
    """``{'skipped': ...}`` when ``framework`` is not installed, else ``None``."""
    if gategrad.is_available(framework):
        return None
    return {"skipped": f"{framework} is not installed"}


# ---------------------------------------------------------------------------------------------
# sections 1 and 3: the training step


def section_step(cfg: Config) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in cfg.modes:
        mode = STEP_MODES[name]
        absent = skipped(mode.framework)
        if absent is not None:
            results[name] = absent
            log(f"step/{name}: skipped ({mode.framework} is not installed)")
            continue
        variants = cfg.step_variants(mode)
        results[name] = guarded(f"step/{name}", functools.partial(step_mode, cfg, mode, variants))
        gc.collect()
    return results


def step_mode(cfg: Config, mode: StepMode, variants: tuple[Variant, ...]) -> dict[str, Any]:
    size = cfg.size(mode)
    t0 = time.perf_counter()
    specs = {}
    if mode.name in cfg.rss_modes and measures_rss(mode.framework, cfg.device):
        specs = {
            v.name: {
                "section": "step",
                "mode": mode.name,
                "variant": v.name,
                "device": cfg.device,
                "size": dataclasses.asdict(size),
                "torch_backend": cfg.torch_backend,
                "warmup": 2,
                "steps": 2,
            }
            for v in variants
            # (the mechanisms' memory comes from the framework counter)
            if v.checks and v.mechanism == "api" and (not cfg.smoke or v.name in SMOKE_MEMORY[:2])
        }
    early = _memory.start_children(specs, cfg.child_timeout_s) if cfg.smoke else None
    runners: dict[str, StepRunner] = {}
    setup: dict[str, float] = {}
    for v in variants:
        log(f"step/{mode.name}: building and warming up {v.name}")
        s0 = time.perf_counter()
        runner = StepRunner(mode, v, size, cfg.device, cfg.torch_backend)
        runner.warmup(cfg.warmup)
        setup[v.name] = time.perf_counter() - s0
        runners[v.name] = runner
    log(f"step/{mode.name}: set-up took {time.perf_counter() - t0:.0f} s")
    times, reps = clocked_group(
        cfg,
        f"step/{mode.name}",
        {n: r.step for n, r in runners.items()},
        cfg.step_budget_s,
        prepare={n: r.reset for n, r in runners.items()},
    )
    # the drift self-check's input: each baseline's step times in run order
    baseline_times = {v.name: times[v.name] for v in variants if v.baseline is None}
    rows: dict[str, Any] = {}
    for v in variants:
        row: dict[str, Any] = {"median_ms": median_ms(times[v.name]), "setup_s": setup[v.name]}
        if v.baseline is not None:
            row["baseline"] = v.baseline
            row["time_ratio"] = time_ratios(times, v.name, v.baseline)
        if runners[v.name].note:
            row["note"] = runners[v.name].note
        # The value checks allocate (B, T) booleans at most: not measured apart. The smoke run
        # measures two variants (the profiler's start-up costs seconds).
        if v.checks and (not cfg.smoke or v.name in SMOKE_MEMORY):
            row["framework_memory"] = runners[v.name].framework_peak()
        rows[v.name] = row
    mech = {}
    if "primitive" in times and "detach-mix" in times:
        mech["detach_over_primitive"] = time_ratios(times, "detach-mix", "primitive")
    del runners
    gc.collect()
    if specs:
        log(f"step/{mode.name}: {len(specs)} RSS subprocesses")
        done = early() if early is not None else _memory.run_children(specs, cfg.child_timeout_s)
        for name, result in done.items():
            rows[name]["rss"] = result
    for v in variants:
        if v.baseline is None or not v.checks:
            continue
        rows[v.name]["memory_ratio"] = _memory.memory_ratios(
            rows[v.name],
            rows[v.baseline],
            (
                ("framework_memory", "increment_mib"),
                ("rss", "maxrss_mib"),
                ("rss", "steady_hwm_mib"),
            ),
        )
    return {
        "framework": mode.framework,
        "size": dataclasses.asdict(size),
        "reps": reps,
        "variants": rows,
        "mechanism": mech,
        "baseline_times_s": baseline_times,
        "baseline_drift": {n: drift(t) for n, t in baseline_times.items()},
    }


def mechanism_section(step: dict[str, Any]) -> dict[str, Any]:
    """Section 3 from the step runs: primitive and detach mix against ungated and each other."""
    out: dict[str, Any] = {}
    for mode, res in step.items():
        rows = res.get("variants", {})
        if "primitive" not in rows or "detach-mix" not in rows:
            if "detach-mix" in rows:
                out[mode] = {"detach-mix": rows["detach-mix"]}
            continue
        out[mode] = {
            "primitive": rows["primitive"],
            "detach-mix": rows["detach-mix"],
            "detach_over_primitive": res["mechanism"].get("detach_over_primitive"),
        }
    return out


# ---------------------------------------------------------------------------------------------
# section 1b: the gate's own cost, the loss alone (forward and backward from per-token log-probs)


def section_gate_cost(cfg: Config, step: dict[str, Any]) -> dict[str, Any]:
    """Microseconds the gate adds to the loss, and the step ratio that implies."""
    results: dict[str, Any] = {}
    for gc_mode in GATE_COST_MODES:
        mode = STEP_MODES[gc_mode.step_mode]
        absent = skipped(mode.framework)
        if absent is not None:
            results[gc_mode.name] = absent
            continue
        base_name = "ungated" if gc_mode.checks else "ungated [checks off]"
        step_row = step.get(mode.name, {}).get("variants", {}).get(base_name) or {}
        step_ms = step_row.get("median_ms")
        results[gc_mode.name] = guarded(
            f"gate cost/{gc_mode.name}",
            functools.partial(gate_cost_mode, cfg, mode, gc_mode.name, gc_mode.checks, step_ms),
        )
    return results


def gate_cost_mode(
    cfg: Config, mode: StepMode, name: str, checks: bool, step_ms: float | None
) -> dict[str, Any]:
    size = cfg.size(mode)
    variants: tuple[Variant, ...] = (UNGATED, *GATED)
    if cfg.smoke and mode.slow_compile:  # two compilations only
        variants = tuple(v for v in variants if v.name in SMOKE_COMPILED)
    fns = {v.name: loss_only_fn(mode, size, v, checks) for v in variants}
    for fn in fns.values():
        for _ in range(3 * cfg.warmup):
            fn()
    times, reps = timed_group(
        f"gate cost/{name}", fns, lambda: cfg.gate_cost_budget_s, cfg.min_reps, 20 * cfg.max_reps
    )
    rows: dict[str, Any] = {"ungated": {"median_us": 1e3 * median_ms(times["ungated"])}}
    for v in variants[1:]:
        rows[v.name] = added_us(times, v.name, "ungated")
        if step_ms:
            rows[v.name]["implied_step_ratio"] = 1.0 + rows[v.name]["added_us"] / (1e3 * step_ms)
    return {"reps": reps, "size": dataclasses.asdict(size), "step_ms": step_ms, "variants": rows}


# ---------------------------------------------------------------------------------------------
# section 2: per-token log-probs


def logps_inputs(rows: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "logits": rng.standard_normal((rows, seq, vocab), dtype=np.float32) * 2.0,
        "labels": rng.integers(0, vocab, size=(rows, seq)).astype(np.int64),
        "mask": rng.random((rows, seq)) < 0.9,
        "cot": rng.standard_normal((rows, seq), dtype=np.float32),
    }


def have(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def section_logps(cfg: Config) -> dict[str, Any]:
    results: dict[str, Any] = {}
    size = cfg.logps_size
    for fw, lm in LOGPS_MODES.items():
        absent = skipped(fw)
        if absent is not None:
            results[fw] = absent
            continue
        impls = tuple(i for i in lm.impls if have(LOGPS_NEEDS.get(i, "numpy")))
        for impl in sorted(set(lm.impls) - set(impls)):
            log(f"logps: {LOGPS_NEEDS[impl]} is not installed; no comparison with {impl}")
        for vocab in size.vocabs:
            data = logps_inputs(size.rows, size.seq, vocab)
            for pas in PASSES[1:] if cfg.smoke else PASSES:
                key = f"{fw}/V={vocab}/{pas}"
                results[key] = guarded(
                    f"logps/{key}", functools.partial(logps_group, cfg, fw, impls, data, pas, vocab)
                )
                gc.collect()
            del data
    return results


def logps_group(
    cfg: Config, fw: str, impls: tuple[str, ...], data: dict[str, np.ndarray], pas: str, vocab: int
) -> dict[str, Any]:
    cases = {impl: LogpsCase(fw, impl, data, pas, cfg.device, cfg.smoke) for impl in impls}
    for case in cases.values():
        for _ in range(cfg.warmup):
            case.run()
    label = f"logps/{fw}/V={vocab}/{pas}"
    times, reps = clocked_group(
        cfg, label, {n: c.run for n, c in cases.items()}, cfg.logps_budget_s
    )
    rows: dict[str, Any] = {}
    for impl in impls:
        rows[impl] = {
            "median_ms": median_ms(times[impl]),
            "framework_memory": cases[impl].framework_peak(),
        }
    del cases
    gc.collect()
    rss_v = cfg.logps_size.vocabs[-1]
    if "logps" in cfg.rss_modes and measures_rss(fw, cfg.device) and vocab == rss_v:
        specs = {
            impl: {
                "section": "logps",
                "fw": fw,
                "impl": impl,
                "pass": pas,
                "device": cfg.device,
                "rows": int(data["labels"].shape[0]),
                "seq": int(data["labels"].shape[1]),
                "vocab": vocab,
                "warmup": 1,
                "steps": 2,
            }
            for impl in impls[:2]  # TRL's memory: from the profiler (an RSS child costs ~10 s)
        }
        log(f"logps/{fw}/V={vocab}/{pas}: {len(specs)} RSS subprocesses")
        for impl, result in _memory.run_children(specs, cfg.child_timeout_s).items():
            rows[impl]["rss"] = result
    ours = rows["token_logps"]
    for impl in impls[1:]:
        row = rows[impl]
        row["token_logps_time_ratio"] = time_ratios(times, "token_logps", impl)
        row["token_logps_memory_ratio"] = _memory.memory_ratios(
            ours, row, (("framework_memory", "increment_mib"), ("rss", "steady_increment_mib"))
        )
    return {"reps": reps, "shape": list(data["logits"].shape), "impls": rows}


# ---------------------------------------------------------------------------------------------
# a memory child


def child_main(spec: dict[str, Any]) -> None:
    """Entry point of a memory child (``overhead.py --_child``): measure, print one tagged
    JSON line."""
    try:
        if spec["section"] == "step":
            size = StepSize(**spec["size"])
            variant = ALL_VARIANTS[spec["variant"]]
            compiler = spec.get("torch_backend", "inductor")
            mode = STEP_MODES[spec["mode"]]
            runner = StepRunner(mode, variant, size, spec["device"], compiler)
            runner.warmup(spec["warmup"])
            result = _memory.memory_phase(runner.fresh_step, spec["steps"])
        else:
            data = logps_inputs(spec["rows"], spec["seq"], spec["vocab"])
            case = LogpsCase(spec["fw"], spec["impl"], data, spec["pass"], spec["device"])
            del data
            for _ in range(spec["warmup"]):
                case.run()
            result = _memory.memory_phase(case.run, spec["steps"])
    except Exception as err:
        traceback.print_exc()
        result = {"error": repr(err)}
    _memory.report_child_result(result)
