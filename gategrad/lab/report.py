"""Tables, JSON and figures of a lab run.

The table follows the paper: one row per method with **Δ Chosen**, **Δ Rejected**, **Margin**
(= Δ Chosen - Δ Rejected) and **Δ Others** (the mean change over the five probe sets), each the
change from the first to the last checkpoint, plus the final **Top-1** mass and **Entropy** on
held-out contexts, as mean ± std (sample standard deviation) over seeds.

Figures need matplotlib (``pip install 'gategrad[lab]'``); without it they are skipped.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "COLUMNS",
    "replot",
    "format_table",
    "plot_delta_chosen",
    "plot_mass_dynamics",
    "run_summary",
    "start_summary",
    "summarize",
]

#: Table columns: (key, header).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("d_chosen", "Δ Chosen"),
    ("d_rejected", "Δ Rejected"),
    ("margin", "Margin"),
    ("d_others", "Δ Others"),
    ("top1", "Top-1"),
    ("entropy", "Entropy"),
)
_SIGNED = {"d_chosen", "d_rejected", "margin", "d_others"}


def run_summary(record: dict[str, Any]) -> dict[str, float]:
    """The table's numbers (and a few more) for one (method, seed) record."""
    ck = record["checkpoints"]
    c0, c1 = ck[0], ck[-1]
    d_chosen = c1["chosen"] - c0["chosen"]
    d_rejected = c1["rejected"] - c0["rejected"]
    gates = [c["gate"] for c in ck[1:] if not math.isnan(c["gate"])]
    return {
        "d_chosen": d_chosen,
        "d_rejected": d_rejected,
        "margin": d_chosen - d_rejected,
        "d_others": c1["others"] - c0["others"],
        "top1": c1["top1"],
        "entropy": c1["entropy"],
        "d_argmax": c1["argmax"] - c0["argmax"],
        "d_except_argmax": c1["except_argmax"] - c0["except_argmax"],
        "d_top1": c1["top1"] - c0["top1"],
        "d_entropy": c1["entropy"] - c0["entropy"],
        "peak_chosen": max(c["chosen"] for c in ck) - c0["chosen"],
        "gate_mean": float(np.mean(gates)) if gates else float("nan"),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarize(records: list[dict[str, Any]], methods: list[Any] | None = None) -> list[dict]:
    """One row per method (in ``methods`` order, else first appearance): per-seed values and
    mean / std of every :func:`run_summary` key."""
    order: list[str] = [m.key for m in methods] if methods else []
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(rec["method"], []).append(rec)
        if rec["method"] not in order:
            order.append(rec["method"])
    rows = []
    for key in order:
        recs = groups.get(key, [])
        if not recs:
            continue
        per = [run_summary(r) for r in recs]
        values = {k: [p[k] for p in per] for k in per[0]}
        stats = {k: _mean_std(v) for k, v in values.items()}
        rows.append(
            {
                "method": key,
                "name": recs[0]["name"],
                "seeds": [r["seed"] for r in recs],
                "values": values,
                "mean": {k: s[0] for k, s in stats.items()},
                "std": {k: s[1] for k, s in stats.items()},
            }
        )
    return rows


def start_summary(records: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Mean ± std over seeds of the step-0 checkpoint (the SFT / reference model)."""
    first: dict[int, dict[str, Any]] = {}
    for rec in records:
        first.setdefault(rec["seed"], rec["checkpoints"][0])
    keys = ("chosen", "rejected", "argmax", "top1", "entropy", "others")
    return {k: _mean_std([c[k] for c in first.values()]) for k in keys}


def _fmt(key: str, mean: float, std: float) -> str:
    if key in _SIGNED:
        return f"{mean:+.2f} ± {std:.2f}"
    return f"{mean:.3f} ± {std:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The paper's table as Markdown (also readable in a terminal)."""
    head = "| Method | " + " | ".join(h for _, h in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, sep]
    for row in rows:
        cells = [_fmt(k, row["mean"][k], row["std"][k]) for k, _ in COLUMNS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_start(start: dict[str, tuple[float, float]]) -> str:
    """One line describing the starting (reference) model."""
    m = {k: v[0] for k, v in start.items()}
    return (
        f"Start (reference model, step 0): chosen {m['chosen']:.2f}, rejected "
        f"{m['rejected']:.2f}, argmax {m['argmax']:.2f}, others {m['others']:.2f} nats; "
        f"top-1 mass {m['top1']:.3f}, entropy {m['entropy']:.3f} nats."
    )


# ------------------------------------------------------------------------------------------
# figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_GATE_COLORS = {
    "none": "#d62728",
    "seq": "#1f77b4",
    "q10": "#2ca02c",
    "token": "#9467bd",
    "zero": "#7f7f7f",
}


def _gate_kind(key: str) -> str:
    key = key.split("@", 1)[0]
    return key.split("+", 1)[1] if "+" in key else "none"


def plot_delta_chosen(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Strip chart: Δ Chosen per seed (dots) and the mean (bar) for every method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2.0), 4.2))
    rng = np.random.default_rng(0)
    for i, row in enumerate(rows):
        color = _GATE_COLORS.get(_gate_kind(row["method"]), "#333333")
        vals = np.asarray(row["values"]["d_chosen"])
        x = i + rng.uniform(-0.12, 0.12, size=len(vals))
        ax.scatter(x, vals, s=18, color=color, alpha=0.8, zorder=3)
        ax.hlines(vals.mean(), i - 0.3, i + 0.3, color=color, lw=2.2, zorder=4)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["name"] for r in rows], rotation=55, ha="right", fontsize=8)
    ax.set_ylabel("Δ Chosen (nats, last − first checkpoint)")
    ax.set_title(title or "Δ Chosen by method (dots: seeds, bars: mean)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _curves(records: list[dict[str, Any]], key: str, quantity: str) -> tuple[np.ndarray, ...]:
    runs = [r for r in records if r["method"] == key]
    steps = np.array([c["step"] for c in runs[0]["checkpoints"]])
    vals = np.array([[c[quantity] for c in r["checkpoints"]] for r in runs])
    vals = vals - vals[:, :1]  # change since step 0, per seed
    return steps, vals.mean(axis=0), vals.std(axis=0)


def plot_mass_dynamics(
    records: list[dict[str, Any]], methods: list[Any], path: str | Path, title: str = ""
) -> Path:
    """Log-prob of chosen, rejected, argmax and others against step, as the change since step 0
    of each seed: one row per base loss, one line per gate kind (mean over seeds, band ± std)."""
    plt = _pyplot()
    quantities = (
        ("chosen", "chosen"),
        ("rejected", "rejected"),
        ("argmax", "argmax response"),
        ("others", "others (probes)"),
    )
    losses: list[str] = []
    for m in methods:
        if m.loss_type not in losses:
            losses.append(m.loss_type)
    fig, axes = plt.subplots(
        len(losses), len(quantities), figsize=(12, 2.6 * len(losses) + 0.6), squeeze=False
    )
    for i, loss in enumerate(losses):
        for j, (q, label) in enumerate(quantities):
            ax = axes[i][j]
            for m in methods:
                if m.loss_type != loss:
                    continue
                steps, mean, std = _curves(records, m.key, q)
                color = _GATE_COLORS.get(m.gate_kind, "#333333")
                ax.plot(steps, mean, color=color, lw=1.6, label=m.name)
                ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.15, lw=0)
            if i == 0:
                ax.set_title(f"Δ log-prob: {label}", fontsize=10)
            if j == 0:
                ax.legend(fontsize=7, loc="lower left")
            ax.axhline(0.0, color="black", lw=0.6)
            if i == len(losses) - 1:
                ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    fig.suptitle(
        (title or "Mass dynamics")
        + " (log-prob change since step 0, nats; mean over seeds, band ± std)",
        fontsize=11,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def replot(out_dir: str | Path) -> list[Path]:
    """Redraw the figures of a finished run from its ``results.json``."""
    import json

    from .methods import Method

    out = Path(out_dir)
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    methods = [
        Method(m["loss_type"], m["gate_kind"], None, m["loss_params"], m.get("tag", ""))
        for m in data["methods"]
    ]
    cfg = data["config"]
    title = f"{cfg['model']} / {cfg['backend']}, seeds {cfg['seeds']}"
    return [
        plot_delta_chosen(data["summary"], out / "delta_chosen.png", f"Δ Chosen: {title}"),
        plot_mass_dynamics(
            data["runs"], methods, out / "mass_dynamics.png", f"Mass dynamics: {title}"
        ),
    ]
