"""Per-token log-probs: gategrad.token_logps against log_softmax + gather and TRL.

    python benchmarks/token_logps.py            # full run (about 10 minutes on 2 CPU cores)
    python benchmarks/token_logps.py --smoke    # tiny sizes, one repetition (what CI runs)

Cells: V = 8192, 32768, 131072; ``fwd`` (no gradient: the reference model's case) and
``fwd+bwd`` (the gradient of a weighted sum of the log-probs); float32 and bfloat16 logits;
torch eager, ``torch.compile`` (inductor), ``jax.jit`` and ``mx.compile``. In each cell
:func:`gategrad.token_logps` runs against ``log_softmax(-1)`` + gather ("plain") and, in torch,
TRL's ``selective_log_softmax`` (``trl.trainer.utils``), on the same inputs: logits
``(B, T, V)`` with ``B * T = --positions`` (default 512: B=4, T=128), aligned labels, a mask.

Timing: the implementations of a cell run interleaved (rotated order) after warm-up, and the
report gives the median [IQR] of the per-repetition ratio ``t(token_logps) / t(other)``.
Memory: each framework's own counter (``torch.profiler``'s peak of live bytes on the CPU,
XLA's ``memory_analysis()`` temporaries, ``mx.get_peak_memory()``), as the ratio to the other
implementation's and, for ``fwd+bwd``, to the returned gradient's size (the floor). The load
average (``/proc/loadavg``) is recorded at the start and the end: the machine may be shared,
which is why only interleaved ratios are reported.

Subnormals and state: as ``overhead.py`` (``benchmarks/_state.py``); the calls here are
functions of fixed inputs, so no state can drift.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the package ``benchmarks`` importable
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import numpy as np

import gategrad
from benchmarks import _memory
from benchmarks._config import log
from benchmarks._report import fmt_ratio, machine
from benchmarks._runners import LOGPS_IMPLS, LOGPS_NEEDS
from benchmarks._sections import have
from benchmarks._state import subnormal_policy
from benchmarks._timing import interleave, median_ms, plan_reps, time_ratios

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Mode:
    """One way of running the cells: the framework, whether compiled, the implementations."""

    name: str
    framework: str
    compiled: bool
    impls: tuple[str, ...]


PLAIN = "log_softmax+gather"
TRL = "trl.selective_log_softmax"
MODES = {
    m.name: m
    for m in (
        Mode("torch-eager", "torch", False, ("token_logps", PLAIN, TRL)),
        Mode("torch-compile", "torch", True, ("token_logps", PLAIN, TRL)),
        Mode("jax-jit", "jax", True, ("token_logps", PLAIN)),
        Mode("mlx-compile", "mlx", True, ("token_logps", PLAIN)),
    )
}
PASSES = ("fwd", "fwd+bwd")
DTYPES = ("float32", "bfloat16")
FULL_VOCABS = (8192, 32768, 131072)


def inputs(positions: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 logits ``(B, T, V)`` (``T = min(128, positions)``), labels, mask, cotangent."""
    seq = min(128, positions)
    rows = max(1, positions // seq)
    rng = np.random.default_rng(seed)
    return {
        "logits": rng.standard_normal((rows, seq, vocab), dtype=np.float32) * 2.0,
        "labels": rng.integers(0, vocab, size=(rows, seq)).astype(np.int32),
        "mask": rng.random((rows, seq)) < 0.9,
        "cot": rng.standard_normal((rows, seq), dtype=np.float32),
    }


class Case:
    """One (mode, implementation, dtype, pass) callable, synchronised, with its memory."""

    def __init__(self, mode: Mode, impl: str, data: dict[str, np.ndarray], dtype: str, pas: str):
        b = self.backend = gategrad.get_backend(mode.framework)
        like = b.device_like("cpu")
        x = b.astype(b.from_numpy(data["logits"], like=like), b.dtype(dtype))  # type: ignore[arg-type]
        y = b.as_index(b.from_numpy(data["labels"], like=like))
        m = b.from_numpy(data["mask"], like=like)
        cot = b.from_numpy(data["cot"], like=like)
        b.evaluate(x, y, m, cot)
        logps = LOGPS_IMPLS[impl]
        f32 = b.dtype("float32")

        def fwd(x: Any) -> Any:
            return b.astype(logps(b, x, y, m), f32)

        def fwd_bwd(x: Any) -> Any:
            def weighted(p: dict[str, Any]) -> Any:
                return b.sum(fwd(p["x"]) * cot, axis=None)

            return b.value_and_grad_fn(weighted)({"x": x})[1]

        fn = fwd if pas == "fwd" else fwd_bwd
        self.note = ""
        if mode.compiled:
            eager = fn
            fn = b.compile(eager, reset=False, example_args=(x,))
            try:
                b.evaluate(fn(x))
            except Exception as err:  # a graph break under fullgraph=True: say so, go on
                self.note = f"fullgraph=False ({type(err).__name__})"
                log(f"{mode.name}/{impl}: fullgraph=True failed: {str(err)[:200]}")
                fn = b.compile(eager, reset=False, fullgraph=False, example_args=(x,))
        self.compiled, self.last = fn, None
        self.grad_bytes = int(np.prod(data["logits"].shape)) * (2 if dtype == "bfloat16" else 4)

        def run() -> None:
            self.last = None
            out = fn(x)
            b.evaluate(out)
            if b.keeps_grads:  # as ``.grad``: held until the next call releases it
                self.last = out

        self.run = run

    def peak(self) -> dict[str, Any]:
        return _memory.framework_peak(self.backend, self.run, self.compiled, "cpu", tries=2)


def cell(
    mode: Mode, impls: tuple[str, ...], data: dict[str, np.ndarray], dtype: str, pas: str,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    t0 = time.perf_counter()
    cases = {impl: Case(mode, impl, data, dtype, pas) for impl in impls}
    for case in cases.values():
        for _ in range(args.warmup):
            case.run()
    setup_s = time.perf_counter() - t0
    per_rep = 0.0
    for case in cases.values():
        s0 = time.perf_counter()
        case.run()
        per_rep += time.perf_counter() - s0
    reps = plan_reps(per_rep, args.budget, args.min_reps, args.max_reps)
    times = interleave({n: c.run for n, c in cases.items()}, reps)
    rows: dict[str, Any] = {}
    for impl, case in cases.items():
        rows[impl] = {"median_ms": median_ms(times[impl]), "memory": case.peak()}
        if case.note:
            rows[impl]["note"] = case.note
    ours = rows["token_logps"]
    inc = (ours["memory"] or {}).get("increment_mib")
    if pas == "fwd+bwd" and inc is not None:
        ours["memory_over_gradient"] = inc / (cases["token_logps"].grad_bytes / 2**20)
    for impl in impls[1:]:
        rows[impl]["time_ratio"] = time_ratios(times, "token_logps", impl)
        rows[impl]["memory_ratio"] = _memory.mem_ratio(
            inc, (rows[impl]["memory"] or {}).get("increment_mib")
        )
    return {"reps": reps, "setup_s": setup_s, "shape": list(data["logits"].shape), "impls": rows}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name in args.modes.split(","):
        mode = MODES[name]
        if not gategrad.is_available(mode.framework):
            results[name] = {"skipped": f"{mode.framework} is not installed"}
            continue
        impls = tuple(i for i in mode.impls if have(LOGPS_NEEDS.get(i, "numpy")))
        for vocab in args.vocab_list:
            data = inputs(args.positions, vocab)
            for dtype in args.dtype_list:
                for pas in PASSES:
                    key = f"{name}/V={vocab}/{dtype}/{pas}"
                    log(f"token_logps {key}")
                    try:
                        results[key] = cell(mode, impls, data, dtype, pas, args)
                    except Exception as err:
                        traceback.print_exc()
                        results[key] = {"error": f"{type(err).__name__}: {err}"[:500]}
                    gc.collect()
            del data
    return results


def _mem(entry: dict[str, Any] | None) -> str:
    if not entry or entry.get("ratio") is None:
        return "n/a"
    return f"{entry['ratio']:.2f}"


def render(report: dict[str, Any]) -> str:
    meta, m = report["meta"], report["meta"]["machine"]
    cpu = m.get("lscpu", {}).get("Model name", "?")
    lines = [
        "# gategrad token_logps benchmark",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {cpu}, {m.get('cpu_count')} CPUs; torch {m.get('torch', '-')} "
        f"({m.get('torch_threads', '-')} threads), jax {m.get('jax', '-')}, "
        f"mlx {m.get('mlx', '-')}, trl {m.get('trl', '-')}",
        f"- positions B*T = {meta['positions']}; `/proc/loadavg` at start "
        f"`{meta['loadavg_start']}`, at end `{meta['loadavg_end']}`; total "
        f"{meta['total_s']:.0f} s" + (" (**smoke**: timings meaningless)" if meta["smoke"] else ""),
        "",
        "Time ratio: token_logps / other, **median** [IQR] (min-max) of the interleaved "
        "per-repetition ratios, then fastest / fastest. Memory: token_logps' peak over the "
        "other's (framework counter); `/grad`: token_logps' peak over its returned gradient.",
        "",
        "| mode | V | dtype | pass | other | token_logps ms | other ms | time ratio | "
        "memory ratio | /grad |",
        "|---|---:|---|---|---|---:|---:|---|---:|---:|",
    ]
    for key, res in report["results"].items():
        if "impls" not in res:
            why = res.get("skipped") or res.get("error")
            lines.append(f"| {key} | {why} |" + " |" * 8)
            continue
        mode, v, dtype, pas = key.split("/")
        ours = res["impls"]["token_logps"]
        over = ours.get("memory_over_gradient")
        for impl, row in res["impls"].items():
            if impl == "token_logps":
                continue
            note = f" ({row['note']})" if row.get("note") else ""
            lines.append(
                f"| {mode} | {v[2:]} | {dtype} | {pas} | {impl}{note} | {ours['median_ms']:.1f} | "
                f"{row['median_ms']:.1f} | {fmt_ratio(row['time_ratio'])} | "
                f"{_mem(row.get('memory_ratio'))} | "
                + ("-" if over is None else f"{over:.2f}")
                + " |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for token_logps.json/md")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes")
    p.add_argument("--vocabs", default=",".join(map(str, FULL_VOCABS)))
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--positions", type=int, default=512, help="B * T positions per call")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per cell")
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.smoke:
        args.vocabs, args.positions, args.budget = "64", 16, 0.0
        args.min_reps = args.max_reps = args.warmup = 1
    args.vocab_list = tuple(int(v) for v in args.vocabs.split(",") if v)
    args.dtype_list = tuple(d for d in args.dtypes.split(",") if d)
    unknown = sorted(set(args.modes.split(",")) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown --modes {unknown}; choose from {list(MODES)}")
    return args


def _loadavg() -> str | None:
    """``cat /proc/loadavg`` (Linux), else ``None``."""
    with contextlib.suppress(OSError):
        return Path("/proc/loadavg").read_text().strip()
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    subnormals = subnormal_policy()  # first: before torch's thread pool starts
    t0 = time.perf_counter()
    load_start = _loadavg()
    shown = sys.argv[1:] if argv is None else argv
    meta: dict[str, Any] = {
        "command": " ".join(["python benchmarks/token_logps.py", *shown]),
        "smoke": args.smoke,
        "positions": args.positions,
        "machine": machine(),
        "subnormals": subnormals,
    }
    meta["loadavg_start"] = load_start
    results = run(args)
    meta["total_s"] = time.perf_counter() - t0
    meta["loadavg_end"] = _loadavg()
    report = {"meta": meta, "results": results}
    md = render(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_logps.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "token_logps.md").write_text(md + "\n")
    print(md)
    return report


if __name__ == "__main__":
    main()
