"""``gategrad lab scale``: the paper's scale claim in miniature.

The paper reports that "smaller gated models can exhibit stronger chosen-response improvements
than larger ungated models" (Δ Chosen of DPO against Gate-DPO across Pythia-410M to 7B models).
This trains the lab's transformer (:mod:`gategrad.lab.transformer`, the same language, SFT,
pairs and checkpoints) at several sizes, ``LAYERS x WIDTH`` with ``d_ff = 2 * WIDTH`` and two
heads, with every method of the config (by default DPO ungated, with the paper's ``seq`` gate
and with ``g = 0``) and reports, per size and method, Δ Chosen (and Δ Rejected, Margin,
Δ Others) as mean ± std over seeds, against the parameter count.

Outputs in ``out_dir``: ``scale.txt`` (the table, Markdown), ``scale.json`` (every row and the
per-seed values) and ``scale.png`` (Δ Chosen against the parameter count, log axis, error bars
± std) when matplotlib is installed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .config import LabConfig
from .report import summarize

__all__ = [
    "DEFAULT_GATES",
    "DEFAULT_SIZES",
    "format_scale",
    "param_count",
    "plot_scale",
    "run_scale",
]

#: ``(layers, width)`` of the default sizes.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((1, 16), (2, 32), (4, 64), (4, 128))
#: The default methods' gate kinds (on DPO): ungated, the paper's gate and the g=0 baseline.
DEFAULT_GATES: tuple[str, ...] = ("none", "seq", "zero")


def sized(cfg: LabConfig, layers: int, width: int) -> LabConfig:
    """A copy of ``cfg`` whose transformer has ``layers`` blocks of width ``width``."""
    tr = dataclasses.replace(cfg.transformer, n_layers=layers, d_model=width, d_ff=2 * width)
    return dataclasses.replace(cfg, transformer=tr)


def param_count(cfg: LabConfig) -> int:
    """Number of parameters of the config's transformer."""
    from gategrad.testing.models import transformer_param_shapes

    from .transformer import model_config

    return int(sum(math.prod(s) for s in transformer_param_shapes(model_config(cfg)).values()))


def format_scale(rows: list[dict[str, Any]]) -> str:
    """The scale table as Markdown: one row per (size, method)."""
    lines = [
        "| Size | Parameters | Method | Δ Chosen | Δ Rejected | Margin | Δ Others |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        m, s = r["mean"], r["std"]
        cells = [f"{m[k]:+.2f} ± {s[k]:.2f}" for k in ("d_chosen", "d_rejected", "margin")]
        cells.append(f"{m['d_others']:+.2f} ± {s['d_others']:.2f}")
        lines.append(f"| {r['size']} | {r['params']:,} | {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_scale(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Δ Chosen against the parameter count, one line per method, error bars ± std."""
    from .report import _GATE_COLORS, _gate_kind, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names: list[str] = []
    for r in rows:
        if r["name"] not in names:
            names.append(r["name"])
    for i, name in enumerate(names):
        mine = [r for r in rows if r["name"] == name]
        x = np.array([r["params"] for r in mine], dtype=np.float64)
        y = np.array([r["mean"]["d_chosen"] for r in mine])
        e = np.array([r["std"]["d_chosen"] for r in mine])
        color = _GATE_COLORS.get(_gate_kind(mine[0]["method"]), f"C{i}")
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, lw=1.6, color=color, label=name)
        for r, xi, yi in zip(mine, x, y, strict=True):
            ax.annotate(r["size"], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("Δ Chosen (nats, held-out pairs)")
    ax.set_title(title or "Δ Chosen against model size (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_scale(
    cfg: LabConfig,
    sizes: list[tuple[int, int]] | tuple[tuple[int, int], ...] = DEFAULT_SIZES,
    *,
    write: bool = True,
    plots: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run every method of ``cfg`` (a transformer config) at every size; returns
    ``{"rows", "text", "seconds", ...}`` and writes ``scale.*`` into ``cfg.out_dir``."""
    from .runner import timed_records, write_json

    cfg = cfg.resolved()
    if cfg.model != "transformer":
        raise ValueError("run_scale needs a transformer config (model='transformer')")
    if not sizes:
        raise ValueError("sizes must name at least one (layers, width)")
    out = Path(cfg.settled().out_dir) if write else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    seconds = 0.0
    for layers, width in sizes:
        c = sized(cfg, layers, width).resolved()
        methods = c.methods()
        records, took = timed_records(c, methods, progress, f"scale {layers}x{width}/{c.backend}")
        seconds += took
        n = param_count(c)
        for row in summarize(records, methods):
            rows.append({**row, "size": f"{layers}x{width}", "params": n, "seconds": took})
        runs.extend({**r, "size": f"{layers}x{width}"} for r in records)
    table = format_scale(rows)
    text = "\n".join(
        [
            table,
            "",
            f"Δ Chosen / Δ Rejected: held-out pairs; mean ± std over seeds {cfg.seeds}; "
            f"{cfg.settled().steps} preference steps per run; {seconds:.1f} s on {cfg.backend}.",
        ]
    )
    result: dict[str, Any] = {
        "config": cfg.to_dict(),
        "sizes": [list(s) for s in sizes],
        "rows": [
            {
                k: r[k]
                for k in (
                    "size",
                    "params",
                    "method",
                    "name",
                    "seeds",
                    "values",
                    "mean",
                    "std",
                    "seconds",
                )
            }
            for r in rows
        ],  # fmt: skip
        "seconds": seconds,
    }
    if out is not None:
        write_json(out / "scale.json", {**result, "runs": runs}, compact=True)
        (out / "scale.txt").write_text(
            f"# gategrad lab scale: transformer on {cfg.backend}\n\n{text}\n", encoding="utf-8"
        )
        if plots:
            try:
                plot_scale(rows, out / "scale.png", f"Δ Chosen vs size: {cfg.backend}, "
                           f"seeds {cfg.seeds}")  # fmt: skip
            except ImportError:
                text += "\nPlot skipped: matplotlib is not installed (pip install 'gategrad[lab]')."
    if echo is not None:
        echo(text)
        if out is not None:
            echo(f"Wrote scale.txt, scale.json{', scale.png' if plots else ''} to {out}/")
    result["text"] = text
    return result
