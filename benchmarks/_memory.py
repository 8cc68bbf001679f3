"""Peak memory: each framework's own counter (its backend's ``peak_memory``), and the RSS of a
subprocess per measurement.

- torch on CPU: ``torch.profiler``'s memory events (the peak of the live bytes allocated during
  one call); on CUDA: ``torch.cuda.max_memory_allocated``;
- JAX: XLA's ``memory_analysis()`` of the compiled function (its temporary buffers);
- MLX: ``mx.get_peak_memory()``;
- a child process (``overhead.py --_child SPEC``) reports ``getrusage`` maximum RSS over the
  whole child and the Linux high-water mark over the measured calls alone (reset after warm-up
  through ``/proc/self/clear_refs``).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gategrad import Backend

#: The line prefix of a child's result.
RESULT_TAG = "@@GATEGRAD-BENCH-RESULT@@"
#: The script a child runs (with ``--_child``).
SCRIPT = Path(__file__).resolve().with_name("overhead.py")

# ---------------------------------------------------------------------------------------------
# framework counters


def framework_peak(
    backend: Backend,
    run: Callable[[], None],
    compiled: Any = None,
    device: str = "cpu",
    tries: int = 1,
) -> dict[str, Any]:
    """The framework's own peak-memory counter over ``run()`` (one synchronised call; see
    :meth:`gategrad.Backend.peak_memory`) as the report's entry: ``counter``,
    ``increment_mib`` and, where the device reports it, ``device_peak_mib``; ``{}`` where the
    framework has no counter."""
    peak = backend.peak_memory(run, compiled=compiled, device=device, tries=tries)
    if peak is None:
        return {}
    out: dict[str, Any] = {"counter": peak.counter, "increment_mib": peak.increment_bytes / 2**20}
    if peak.device_peak_bytes is not None:
        out["device_peak_mib"] = peak.device_peak_bytes / 2**20
    return out


def mem_ratio(a: float | None, b: float | None) -> dict[str, float | None] | None:
    if a is None or b is None:
        return None
    # A ratio of two amounts below 1 MiB (XLA's temporaries of a fused kernel, say) says
    # nothing: it is None then, and the difference in MiB is what counts.
    ratio = a / b if b >= 1.0 else (1.0 if a == b else None)
    return {"ratio": ratio, "delta_mib": a - b}


def memory_ratios(
    row: dict[str, Any], base: dict[str, Any], keys: tuple[tuple[str, str], ...]
) -> dict[str, Any]:
    """``{'src.key': mem_ratio(row[src][key], base[src][key])}`` where both were measured."""
    out = {}
    for src, key in keys:
        r = mem_ratio((row.get(src) or {}).get(key), (base.get(src) or {}).get(key))
        if r is not None:
            out[f"{src}.{key}"] = r
    return out


# ---------------------------------------------------------------------------------------------
# RSS in a child process


def read_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process in KiB (Linux), else ``{}``."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def reset_hwm() -> bool:
    """Reset the Linux peak-RSS high-water mark to the current RSS (``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0


def memory_phase(run: Callable[[], None], steps: int) -> dict[str, Any]:
    """Peak RSS: over the whole process (``ru_maxrss``) and over ``steps`` calls of ``run``
    (the high-water mark reset just before them; Linux only)."""
    gc.collect()
    before = read_status().get("VmRSS")
    reset = reset_hwm()
    for _ in range(steps):
        run()
    status = read_status()
    out: dict[str, Any] = {"maxrss_mib": maxrss_mib()}
    if reset and before is not None and "VmHWM" in status:
        out["steady_hwm_mib"] = status["VmHWM"] / 1024.0
        out["steady_increment_mib"] = (status["VmHWM"] - before) / 1024.0
    return out


def start_children(
    specs: dict[str, dict[str, Any]], timeout_s: float
) -> Callable[[], dict[str, Any]]:
    """Start the children, two at a time (RSS is per process: they do not disturb each other's
    measurement); the returned function waits for their results. The full run waits at once,
    so that nothing is timed meanwhile; the smoke run lets them overlap its (meaningless)
    timings."""
    if not specs:
        return dict
    workers = max(1, min(2, os.cpu_count() or 1, len(specs)))
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {k: pool.submit(run_child, spec, timeout_s) for k, spec in specs.items()}

    def results() -> dict[str, Any]:
        try:
            return {k: f.result() for k, f in futures.items()}
        finally:
            pool.shutdown()

    return results


def run_children(specs: dict[str, dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    return start_children(specs, timeout_s)()


def run_child(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run ``overhead.py --_child spec`` and return its result (``error`` on failure)."""
    cmd = [sys.executable, str(SCRIPT), "--_child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"child timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return dict(json.loads(line[len(RESULT_TAG) :]))
    tail = (proc.stderr or "").strip().splitlines()[-5:]
    return {"error": f"child exited with {proc.returncode}: " + " | ".join(tail)}


def report_child_result(result: dict[str, Any]) -> None:
    """The child's side of :func:`run_child`: print the one tagged JSON line."""
    print(RESULT_TAG + json.dumps(result), flush=True)
