"""The machine description and the Markdown report of the overhead benchmark."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import numpy as np

import gategrad

from ._config import LOGPS_MODES, StepSize

_LSCPU_KEYS = (
    "Model name",
    "CPU(s)",
    "Thread(s) per core",
    "Core(s) per socket",
    "L2 cache",
    "L3 cache",
    "Hypervisor vendor",
)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info["lscpu"] = {
            k.strip(): v.strip()
            for k, v in (line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
            if k.strip() in _LSCPU_KEYS
        }
    with contextlib.suppress(OSError):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    for mod in ("gategrad", "torch", "jax", "jaxlib", "trl"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[mod] = metadata.version(mod)
    for name in gategrad.BACKENDS:
        if gategrad.is_available(name):
            info.update(gategrad.get_backend(name).describe())
    return info


def fmt_ratio(stats: dict[str, Any] | None) -> str:
    if not stats or not stats.get("n"):
        return "n/a"
    out = (
        f"**{stats['median']:.3f}** [{stats['p25']:.3f}, {stats['p75']:.3f}] "
        f"({stats['min']:.3f}-{stats['max']:.3f})"
    )
    if "min_over_min" in stats:
        out += f" {stats['min_over_min']:.3f}"
    return out


def fmt_mem(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "n/a"
    ratio = "-" if entry["ratio"] is None else f"{entry['ratio']:.3f}"
    return f"{ratio} ({entry['delta_mib']:+.1f} MiB)"


def _table(
    title: str, text: str, columns: tuple[str, ...], numeric: tuple[str, ...] = ()
) -> list[str]:
    """A section's heading, its explanation and its table's header (``numeric`` columns
    right-aligned)."""
    align = "".join("---:|" if c in numeric else "---|" for c in columns)
    return [f"## {title}", "", text, "", "| " + " | ".join(columns) + " |", "|" + align]


def _ran(
    results: dict[str, Any], key: str, columns: int, lines: list[str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The groups of ``results`` that have ``key``; for each other one, a row of ``columns``
    cells appended to ``lines`` that says why it did not run (skipped or failed)."""
    for name, res in results.items():
        if key in res:
            yield name, res
        else:
            why = res.get("skipped") or res.get("error")
            lines.append(f"| {name} | {why} |" + " |" * (columns - 2))


def _header(meta: dict[str, Any]) -> list[str]:
    m = meta["machine"]
    cpu = m.get("lscpu", {}).get("Model name") or platform.processor() or "?"
    return [
        "# gategrad overhead benchmark",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {cpu}, {m.get('cpu_count')} CPUs, {m.get('platform')}",
        f"- versions: python {m.get('python')}, gategrad {m.get('gategrad', '-')}, "
        f"torch {m.get('torch', '-')} ({m.get('torch_threads', '-')} threads), "
        f"jax {m.get('jax', '-')} ({m.get('jax_backend', '-')}), "
        f"mlx {m.get('mlx', '-')} ({m.get('mlx_device', '-')}), trl {m.get('trl', '-')}",
        f"- torch device: `{meta['device']}`"
        + (f" ({m['cuda_device']})" if m.get("cuda_device") else ""),
        f"- load average (1, 5, 15 min) at start: {m.get('loadavg_start')}, at end: "
        f"{meta.get('loadavg_end')}; total time {meta['total_s']:.0f} s"
        + (
            " (**smoke mode**: tiny sizes, one repetition, timings meaningless)"
            if meta["smoke"]
            else ""
        ),
        f"- subnormals: {_subnormals(meta.get('subnormals', {}))}",
        f"- state: {meta.get('state', '-')}",
        "",
        "Time ratios: **median** [interquartile range] (min-max) of the per-repetition ratio "
        "(variants interleaved), then the ratio of the fastest calls. Memory ratios: gated / "
        "ungated peak (difference in MiB; '-' where both are below 1 MiB).",
        "",
    ]


def _subnormals(policies: dict[str, Any]) -> str:
    parts = []
    for fw, p in policies.items():
        if "error" in p:
            parts.append(f"{fw}: check failed ({p['error']})")
        else:
            state = "flushed" if p.get("flushed") else "NOT flushed"
            parts.append(f"{fw}: {p['policy']}, {state} (checked)")
    return "; ".join(parts) or "-"


def _drift(check: dict[str, Any] | None) -> list[str]:
    if not check:
        return []
    if "failed" in check:
        return ["## Drift self-check: **FAILED**", "", check["failed"], ""]
    worst = max(check["drift"].items(), key=lambda kv: abs(kv[1]), default=None)
    text = (
        f"Ran on {len(check['drift'])} baseline series (limit ±{check['limit']:.0%}: median "
        "of the last third of a baseline's step times over that of the first third); passed"
    )
    if worst is not None:
        text += f", largest drift {worst[1]:+.1%} ({worst[0]})"
    return ["## Drift self-check", "", text + ".", ""]


def _step(step: dict[str, Any]) -> list[str]:
    sizes = "; ".join(
        f"{mode}: {StepSize(**res['size']).describe()}"
        for mode, res in step.items()
        if "size" in res
    )
    columns = (
        "mode",
        "variant",
        "step ms",
        "time ratio",
        "framework peak ratio",
        "RSS ratio (whole child)",
        "RSS ratio (steps)",
    )
    lines = _table(
        "1. DPO training step, gated / ungated",
        "Forward, backward and AdamW update; float32; reference log-probs precomputed. Sizes: "
        f"{sizes}.",
        columns,
        numeric=("step ms",),
    )
    for mode, res in _ran(step, "variants", len(columns), lines):
        for name, row in res["variants"].items():
            if name in ("primitive", "detach-mix"):
                continue
            mr = row.get("memory_ratio", {})
            counter = (row.get("framework_memory") or {}).get("counter")
            fwm = mr.get("framework_memory.increment_mib")
            ratio = fmt_ratio(row.get("time_ratio")) if row.get("baseline") else "baseline"
            note = f" ({row['note']})" if row.get("note") else ""
            peak = f"{fmt_mem(fwm)} {counter}" if fwm else ("n/a" if row.get("baseline") else "-")
            lines.append(
                f"| {mode} | {name}{note} | {row['median_ms']:.1f} | {ratio} | {peak} | "
                f"{fmt_mem(mr.get('rss.maxrss_mib'))} | {fmt_mem(mr.get('rss.steady_hwm_mib'))} |"
            )
    return [*lines, ""]


def _gate_cost(gate_cost: dict[str, Any]) -> list[str]:
    columns = ("mode", "ungated loss µs", "variant", "added µs [IQR]", "implied step ratio")
    lines = _table(
        "1b. The gate's own cost: the loss alone, gated - ungated",
        "Forward and backward of `preference_loss` from the per-token log-probs (the step "
        "without the model), interleaved. *Implied step ratio*: 1 + (added time) / (ungated "
        "step time of section 1), what the gate costs the step without the noise of timing "
        "a whole step.",
        columns,
        numeric=("ungated loss µs",),
    )
    for mode, res in _ran(gate_cost, "variants", len(columns), lines):
        base = res["variants"]["ungated"]["median_us"]
        for name, row in res["variants"].items():
            if name == "ungated":
                continue
            iqr = row["added_us_iqr"]
            implied = row.get("implied_step_ratio")
            lines.append(
                f"| {mode} | {base:.0f} | {name} | {row['added_us']:+.0f} "
                f"[{iqr[0]:+.0f}, {iqr[1]:+.0f}] | "
                + ("n/a" if implied is None else f"{implied:.4f}")
                + " |"
            )
    return [*lines, ""]


def _mechanism(mechanism: dict[str, Any]) -> list[str]:
    lines = _table(
        "3. Gate mechanism: custom-gradient primitive vs detach mix",
        "Both compute the `example/seq` gate weights with `gate_weights`, then apply them to "
        "the rejected per-token log-probs, then call the ungated loss.",
        (
            "mode",
            "primitive / ungated",
            "detach-mix / ungated",
            "detach-mix / primitive",
            "memory: primitive",
            "memory: detach-mix",
        ),
    )

    def mem(row: dict[str, Any]) -> str:
        mr = row.get("memory_ratio", {})
        return fmt_mem(mr.get("framework_memory.increment_mib") or mr.get("rss.maxrss_mib"))

    for mode, res in mechanism.items():
        p, d = res.get("primitive", {}), res.get("detach-mix", {})
        lines.append(
            f"| {mode} | {fmt_ratio(p.get('time_ratio'))} | {fmt_ratio(d.get('time_ratio'))} "
            f"| {fmt_ratio(res.get('detach_over_primitive'))} | {mem(p)} | {mem(d)} |"
        )
    return [*lines, ""]


def _logps(logps: dict[str, Any], size: dict[str, Any]) -> list[str]:
    columns = (
        "backend",
        "V",
        "pass",
        "other",
        "token_logps ms",
        "other ms",
        "time ratio",
        "memory ratio (framework counter)",
        "memory ratio (RSS, steps)",
    )
    lines = _table(
        "2. Per-token log-probs: token_logps / other implementation",
        f"float32 logits ({size['rows']}, {size['seq']}, V), aligned labels, a mask. `fwd`: no "
        "gradient (the reference model's case); `fwd+bwd`: the gradient of a weighted sum. "
        "Memory: the peak allocated on top of the inputs (a ratio below 1: token_logps needs "
        "less).",
        columns,
        numeric=("V", "token_logps ms", "other ms"),
    )
    for key, res in _ran(logps, "impls", len(columns), lines):
        fw, v, pas = key.split("/")
        ours = res["impls"]["token_logps"]
        for impl, row in res["impls"].items():
            if impl == "token_logps":
                continue
            mr = row.get("token_logps_memory_ratio", {})
            lines.append(
                f"| {fw} ({LOGPS_MODES[fw].label}) | {v[2:]} | {pas} | {impl} | "
                f"{ours['median_ms']:.1f} | {row['median_ms']:.1f} | "
                f"{fmt_ratio(row.get('token_logps_time_ratio'))} | "
                f"{fmt_mem(mr.get('framework_memory.increment_mib'))} | "
                f"{fmt_mem(mr.get('rss.steady_increment_mib'))} |"
            )
    return [*lines, ""]


def render(report: dict[str, Any]) -> str:
    """The Markdown report: the header, then sections 1, 1b, 3 and 2 where they ran."""
    lines = _header(report["meta"])
    if "step" in report:
        lines += _step(report["step"])
        lines += _drift(report.get("drift_check"))
    if report.get("gate_cost"):
        lines += _gate_cost(report["gate_cost"])
    if report.get("mechanism"):
        lines += _mechanism(report["mechanism"])
    if "logps" in report:
        lines += _logps(report["logps"], report["meta"]["logps_size"])
    return "\n".join(lines)
