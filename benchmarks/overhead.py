"""Measure what the gate costs: a DPO training step, per-token log-probs, gate mechanisms.

    python benchmarks/overhead.py                 # full run (about 8 minutes on 2 CPU cores)
    python benchmarks/overhead.py --smoke         # tiny sizes, one repetition (what CI runs)
    python benchmarks/overhead.py --device cuda   # torch on CUDA; JAX and MLX use their default

Sections (docs/benchmarks.md explains how to read the tables):

1. ``step``: one DPO training step (forward, backward, AdamW update) of a small decoder-only
   transformer, ungated versus gated (``example/seq``, ``example/q10``, ``token/log_sigmoid``),
   in torch eager (value checks on and off), ``torch.compile``, ``jax.jit`` and ``mx.compile``.
1b. ``gate_cost``: the loss alone (forward and backward from per-token log-probs), gated minus
   ungated, in microseconds, and the step ratio that implies.
2. ``logps``: :func:`gategrad.token_logps` against ``log_softmax`` + ``gather`` and against
   TRL's ``selective_log_softmax`` (when TRL is installed); forward only, and forward + backward.
3. ``mechanism``: the custom-gradient primitive (``gate_weights`` + :func:`gategrad.scale_grad`)
   against the naive detach mix ``g * x + stop_gradient((1 - g) * x)``, on the same step.

State and subnormals (``benchmarks/_state.py``): every timed step of every variant starts from
the same model and optimizer state, restored outside the timed region; torch flushes
subnormals (set before its thread pool starts, checked in every thread), XLA flushes them by
default, MLX cannot (the restore keeps them away). A self-check fails the run (exit status 3,
after the report is written) when a baseline's step time drifts by more than
``--drift-limit`` between the first and the last third of its repetitions.

Timing: the variants of one group run interleaved (A B C A B C ..., the order rotating every
repetition) in one process, after warm-up (compilation) steps, so that machine drift cancels in
the per-repetition ratio ``t(variant) / t(baseline)``. Reported: the median ratio, its
interquartile range and its min-max. Each group gets a time budget (and 5 to 40 repetitions);
a global deadline (``--deadline``) shrinks the budgets of late groups.

Peak memory, gated versus ungated: each framework's own counter (``torch.profiler`` on a CPU,
``torch.cuda.max_memory_allocated``, XLA's ``memory_analysis()``, ``mx.get_peak_memory()``)
and, for torch on a CPU, the RSS of a subprocess per variant (``--_child``); see
``benchmarks/_memory.py``.

Output: a Markdown report (printed, and written to ``<out>/overhead.md``) and the raw numbers
as JSON (``<out>/overhead.json``); ``--out`` defaults to ``benchmarks/results``.

This file is the command line; the benchmark is the package next to it: ``_config`` (sizes,
variants, modes), ``_runners`` (what is timed, for every framework), ``_timing``, ``_memory``,
``_sections`` and ``_report``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the package ``benchmarks`` importable (last, so
    # that an installed gategrad is not shadowed by the checkout's)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import gategrad
from benchmarks._config import (
    LOGPS_FULL,
    LOGPS_MODES,
    LOGPS_SMOKE,
    PASSES,
    STEP_FULL,
    STEP_MODES,
    STEP_SMOKE,
    Clock,
    Config,
    log,
)
from benchmarks._report import machine, render
from benchmarks._sections import (
    child_main,
    mechanism_section,
    section_gate_cost,
    section_logps,
    section_step,
)
from benchmarks._state import DRIFT_LIMIT, DriftError, check_drift, subnormal_policy

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, one repetition, few compilations (what CI runs)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device (cpu or cuda); JAX and MLX use their default device",
    )
    p.add_argument(
        "--out", default=str(HERE / "results"), help="folder for overhead.json and overhead.md"
    )
    p.add_argument(
        "--sections",
        default="step,logps",
        help="comma-separated: step (sections 1, 1b and 3), logps (section 2)",
    )
    p.add_argument("--modes", default=",".join(STEP_MODES), help="comma-separated step modes")
    p.add_argument("--layers", type=int, default=None, help="transformer layers (torch, JAX)")
    p.add_argument("--seq", type=int, default=None, help="sequence length T (torch, JAX)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary V (torch, JAX)")
    p.add_argument(
        "--deadline",
        type=float,
        default=420.0,
        help="seconds the whole run should take: the timing budgets of later groups shrink "
        "when set-up and compilation ran long (5 repetitions at least)",
    )
    p.add_argument(
        "--step-budget",
        type=float,
        default=40.0,
        help="seconds of interleaved timing per step mode, at most",
    )
    p.add_argument(
        "--logps-budget",
        type=float,
        default=4.0,
        help="seconds of interleaved timing per log-prob group, at most",
    )
    p.add_argument(
        "--drift-limit",
        type=float,
        default=DRIFT_LIMIT,
        help="fail (exit status 3) when a baseline's step time changes by more than this "
        "fraction between the first and the last third of its interleaved repetitions",
    )
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=40)
    p.add_argument(
        "--rss",
        default=None,
        help="where to run RSS subprocesses (torch on CPU): comma-separated step modes "
        "and/or 'logps', or 'none' (default: torch-eager,logps; torch-eager with --smoke)",
    )
    p.add_argument(
        "--torch-backend",
        default=None,
        help="torch.compile backend (default: inductor; aot_eager with --smoke)",
    )
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> Config:
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = sorted(set(modes) - set(STEP_MODES))
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}; choose from {list(STEP_MODES)}")
    sections = tuple(s for s in args.sections.split(",") if s)
    if not sections or set(sections) - {"step", "logps"}:
        raise SystemExit(f"--sections {args.sections!r}: choose from step, logps")
    if args.device != "cpu":
        try:
            gategrad.get_backend("torch").device_like(args.device)
        except RuntimeError as err:
            raise SystemExit(f"--device {args.device}: {err}") from err
    smoke = args.smoke
    step = STEP_SMOKE if smoke else STEP_FULL
    overrides = {
        k: v
        for k, v in (("n_layers", args.layers), ("seq", args.seq), ("vocab", args.vocab))
        if v is not None
    }
    step = dataclasses.replace(step, **overrides)
    mlx = STEP_MODES["mlx-compile"]
    mlx_size = STEP_SMOKE if smoke else (mlx.cpu_size or step)
    if not smoke and gategrad.is_available(mlx.framework):
        if gategrad.get_backend(mlx.framework).default_device_is_gpu():  # the common size
            mlx_size = step
    logps = LOGPS_SMOKE if smoke else LOGPS_FULL
    n_logps = len(LOGPS_MODES) * len(PASSES) * len(logps.vocabs)
    planned = len(modes) * args.step_budget * ("step" in sections) + n_logps * args.logps_budget * (
        "logps" in sections
    )
    rss_arg = args.rss or ("torch-eager" if smoke else "torch-eager,logps")
    rss = () if rss_arg == "none" else tuple(x for x in rss_arg.split(",") if x)
    return Config(
        smoke=smoke,
        device=args.device,
        out=args.out,
        step_size=step,
        mlx_size=mlx_size,
        logps_size=logps,
        warmup=1 if smoke else 2,
        min_reps=1 if smoke else args.min_reps,
        max_reps=1 if smoke else args.max_reps,
        step_budget_s=0.0 if smoke else args.step_budget,
        logps_budget_s=0.0 if smoke else args.logps_budget,
        gate_cost_budget_s=0.0 if smoke else 3.0,
        rss_modes=rss,
        torch_backend=args.torch_backend or ("aot_eager" if smoke else "inductor"),
        child_timeout_s=120.0 if smoke else 300.0,
        modes=modes,
        sections=sections,
        clock=Clock(args.deadline, planned),
    )


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Dd]onat.*")
        yield


def smoke_environment() -> None:
    """Fast, unoptimised XLA compilation for the smoke run (set before JAX is imported)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (
            flags + " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
        ).strip()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # first thing, before any framework computes: torch's thread pool must not have started
    subnormals = subnormal_policy()
    if args._child is not None:
        with quiet_warnings():
            child_main(json.loads(args._child))
        return {}
    if args.smoke:
        smoke_environment()
    # on a GPU, JAX would otherwise take 75% of its memory at start-up, leaving torch none
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cfg = make_config(args)
    shown = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = {
        "meta": {
            "command": " ".join(["python benchmarks/overhead.py", *shown]),
            "smoke": cfg.smoke,
            "device": cfg.device,
            "torch_compile_backend": cfg.torch_backend,
            "step_size": dataclasses.asdict(cfg.step_size),
            "mlx_step_size": dataclasses.asdict(cfg.mlx_size),
            "logps_size": dataclasses.asdict(cfg.logps_size),
            "machine": machine(),
            "subnormals": subnormals,
            "state": "every timed step of every variant starts from the initial parameters "
            "and a fresh optimizer (restored outside the timed region)",
        }
    }
    with quiet_warnings():
        if "step" in cfg.sections:
            report["step"] = section_step(cfg)
            report["mechanism"] = mechanism_section(report["step"])
            report["gate_cost"] = section_gate_cost(cfg, report["step"])
        if "logps" in cfg.sections:
            report["logps"] = section_logps(cfg)
    failure = None
    if "step" in cfg.sections:
        series = {
            f"{mode}/{name}": ts
            for mode, res in report["step"].items()
            for name, ts in res.get("baseline_times_s", {}).items()
        }
        try:
            report["drift_check"] = check_drift(series, args.drift_limit)
        except DriftError as err:
            failure = err
            report["drift_check"] = {"limit": args.drift_limit, "failed": str(err)}
    report["meta"]["total_s"] = cfg.clock.elapsed()
    with contextlib.suppress(OSError):
        report["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    md = render(report)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "overhead.md").write_text(md + "\n")
    print(md)
    log(f"wrote {out}/overhead.json and overhead.md; total {report['meta']['total_s']:.0f} s")
    if failure is not None:
        print(f"overhead.py: DRIFT CHECK FAILED: {failure}", file=sys.stderr, flush=True)
        raise SystemExit(3)
    return report


if __name__ == "__main__":
    main()
