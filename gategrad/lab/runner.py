"""Run a lab configuration end to end and write its outputs.

Output directory contents:

- ``config.json``: the resolved :class:`~gategrad.lab.config.LabConfig` (re-run it with
  ``gategrad lab --config config.json``);
- ``results.json``: every checkpoint of every (method, seed), the per-method summary, timings
  and versions;
- ``table.txt``: the table in the paper's format, as Markdown (also printed; not named ``.md``
  so that an output directory under ``docs/`` does not become a MkDocs page);
- ``delta_chosen.png`` and ``mass_dynamics.png`` when matplotlib is installed.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import LabConfig
from .report import (
    format_start,
    format_table,
    plot_delta_chosen,
    plot_mass_dynamics,
    start_summary,
    summarize,
)

__all__ = ["LabResult", "Progress", "run_lab", "run_records"]


class Progress:
    """A progress bar over steps: tqdm when installed, else a plain one-line counter on stderr
    (or nothing with ``enabled=False``)."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "lab") -> None:
        self.total, self.enabled, self.n = total, enabled, 0
        self._bar = None
        self._last = -1
        if enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="step", leave=False, smoothing=0.1)
            except ImportError:
                self._bar = None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled:
            pct = int(100 * self.n / max(self.total, 1))
            if pct != self._last and pct % 5 == 0:
                self._last = pct
                print(f"\r[{pct:3d}%] {self.n}/{self.total} steps", end="", file=sys.stderr)

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


@dataclass
class LabResult:
    """What :func:`run_lab` produced."""

    config: LabConfig
    records: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    table: str
    out_dir: Path | None
    seconds: float
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, name_or_key: str) -> dict[str, Any]:
        """The summary row of a method, by display name or key (``'sigmoid+seq'``)."""
        for r in self.rows:
            if name_or_key in (r["name"], r["method"]):
                return r
        raise KeyError(name_or_key)


def total_steps(cfg: LabConfig, methods: list[Any] | None = None) -> int:
    """Optimisation steps of a resolved config (for progress bars)."""
    n_methods = len(cfg.methods() if methods is None else methods)
    per_seed = n_methods * cfg.settled().steps
    if cfg.model == "transformer":
        per_seed += cfg.transformer.sft_steps
    return per_seed * len(cfg.seeds)


def timed_records(
    cfg: LabConfig, methods: list[Any], progress: bool, desc: str
) -> tuple[list[Any], float]:
    """:func:`run_records` under a progress bar; returns the records and the seconds taken."""
    bar = Progress(total_steps(cfg, methods), enabled=progress, desc=desc)
    t0 = time.perf_counter()
    try:
        records = run_records(cfg, methods, on_step=bar.update, on_phase=bar.describe)
    finally:
        bar.close()
    return records, time.perf_counter() - t0


def run_records(
    cfg: LabConfig,
    methods: list[Any] | None = None,
    on_step: Callable[[int], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run the experiment of ``cfg`` (toy or transformer) and return the raw records."""
    cfg = cfg.resolved()
    if cfg.model == "toy":
        from .toy import run_toy

        return run_toy(cfg, methods, on_step=on_step)
    from .transformer import run_transformer

    return run_transformer(cfg, methods, on_step=on_step, on_phase=on_phase)


def _versions(backend: str) -> dict[str, str]:
    from gategrad import __version__

    out = {
        "gategrad": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
    mod = {"torch": "torch", "jax": "jax", "mlx": "mlx.core"}.get(backend)
    if mod is not None:
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[backend] = str(getattr(m, "__version__", "?"))
        except ImportError:
            pass
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _round(obj: Any, digits: int) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: _round(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, digits) for v in obj]
    return obj


def write_json(path: Path, data: Any, *, compact: bool = False) -> None:
    """JSON with NaN allowed. ``compact`` (the large results files): one line, floats rounded
    to 7 significant digits."""
    with open(path, "w", encoding="utf-8") as fh:
        if compact:
            json.dump(
                _round(data, 7),
                fh,
                separators=(",", ":"),
                default=_json_default,
                allow_nan=True,
            )
        else:
            json.dump(data, fh, indent=1, default=_json_default, allow_nan=True)
        fh.write("\n")


def run_lab(
    cfg: LabConfig,
    *,
    write: bool = True,
    plots: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> LabResult:
    """Run ``cfg``, write the outputs into ``cfg.out_dir`` (``write=False``: nothing is
    written) and print the table through ``echo`` (``None``: silent)."""
    cfg = cfg.resolved()
    methods = cfg.methods()
    settled = cfg.settled()
    out = Path(settled.out_dir) if write else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg.to_dict())
    records, seconds = timed_records(cfg, methods, progress, f"{cfg.model}/{cfg.backend}")
    rows = summarize(records, methods)
    start = start_summary(records)
    table = format_table(rows)
    what = "training pairs" if cfg.model == "toy" else "held-out pairs"
    notes = [
        format_start(start),
        f"Δ Chosen / Δ Rejected: {what}; Δ Others: mean over the five probe sets; Top-1 and "
        "Entropy: final values on held-out contexts. Mean ± std over seeds "
        f"{cfg.seeds}; {seconds:.1f} s on {cfg.backend}.",
    ]
    result = LabResult(cfg, records, rows, table, out, seconds, notes=notes)
    if out is not None:
        results = {
            "config": cfg.to_dict(),
            "methods": [m.to_dict() for m in methods],
            "table": [{k: r[k] for k in ("method", "name", "seeds", "mean", "std")} for r in rows],
            "summary": rows,
            "start": {k: {"mean": v[0], "std": v[1]} for k, v in start.items()},
            "runs": records,
            "seconds": seconds,
            "versions": _versions(settled.backend),
        }
        write_json(out / "results.json", results, compact=True)
        md = [
            f"# gategrad lab: {cfg.model} on {cfg.backend}",
            "",
            table,
            "",
            *notes,
            "",
        ]
        (out / "table.txt").write_text("\n".join(md), encoding="utf-8")
        result.files += [out / "config.json", out / "results.json", out / "table.txt"]
        if plots:
            try:
                title = f"{cfg.model} / {cfg.backend}, seeds {cfg.seeds}"
                result.files.append(
                    plot_delta_chosen(rows, out / "delta_chosen.png", f"Δ Chosen: {title}")
                )
                result.files.append(
                    plot_mass_dynamics(
                        records, methods, out / "mass_dynamics.png", f"Mass dynamics: {title}"
                    )
                )
            except ImportError:
                notes.append(
                    "Plots skipped: matplotlib is not installed (pip install 'gategrad[lab]')."
                )
    if echo is not None:
        echo(table)
        echo("")
        for note in notes:
            echo(note)
        if out is not None:
            echo(f"Wrote {', '.join(p.name for p in result.files)} to {out}/")
    return result
