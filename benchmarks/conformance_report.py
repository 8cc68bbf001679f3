"""Measure how closely the backends agree on the kit's models; print markdown tables.

Runs the toy softmax (against its closed-form NumPy gradients) and the tiny transformer on a
fixed set of seeds, loss types and gates, in float32 and float64, and reports per backend pair
the worst scale-relative difference ``max|a-b| / max(|a|, |b|)`` over the loss and every
parameter's gradient. Also: compiled versus eager (``jax.jit``, ``mx.compile``, and with
``--torch-compile`` ``torch.compile``, which takes minutes on a CPU), the float64 finite-difference
check, and the gate's within-framework decomposition.

    python benchmarks/conformance_report.py [--cases 16] [--torch-compile]

The output of one run is recorded in docs/verification.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict

import numpy as np

from gategrad import LOSS_TYPES, Gate, get_backend, is_available
from gategrad.testing import (
    FLOAT64_TOL,
    FRAMEWORKS,
    PreferenceSpec,
    compare_results,
    gate_gradient_parts,
    make_softmax_batch,
    make_transformer_batch,
    preference_loss_fn,
    run_backend,
    softmax_logps,
    softmax_reference,
    tolerance,
    transformer_logps,
)
from gategrad.testing.strategies import SOFTMAX_CONFIGS, TRANSFORMER_CONFIGS

GATES = (
    None,
    Gate(shape="log_sigmoid", tau=0.02, temperature=0.5, estimator="seq"),
    Gate(shape="sigmoid", alpha=50.0, tau=0.05, estimator="q10"),
    Gate(shape="power", tau=0.05, exponent=2.0, floor=0.1, granularity="token"),
    Gate(shape="hard", tau=0.01, estimator="min"),
)
SOFTMAX_SHAPES = ((3, 11), (2, 15))
TRANSFORMER_SHAPES = ((3, 12), (2, 16))
SMOOTH = ("sigmoid", "ipo", "cal_dpo", "dpo_shift", "simpo", "robust")
#: Frameworks whose compiler takes minutes per case on a CPU: compared only when asked
#: (``--torch-compile``).
SLOW_COMPILE = ("torch",)


def _cases(n: int) -> list[tuple[int, PreferenceSpec]]:
    out = []
    for i in range(n):
        out.append(
            (
                i,
                PreferenceSpec(
                    LOSS_TYPES[i % len(LOSS_TYPES)],
                    beta=(0.1, 0.5, 2.0)[i % 3],
                    gate=GATES[i % len(GATES)],
                    sft_weight=0.5 * (i % 2),
                ),
            )
        )
    return out


class Worst:
    """Worst relative difference per (model, dtype, pair)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str, str], tuple[float, str, float]] = {}

    def add(self, model: str, dtype: str, report) -> None:  # type: ignore[no-untyped-def]
        for (a, b), d in report.worst_by_pair().items():
            key = (model, dtype, a, b)
            if key not in self.rows or d.rel > self.rows[key][0]:
                self.rows[key] = (d.rel, d.tensor, d.tol)

    def table(self) -> str:
        lines = [
            "| model | dtype | pair | worst rel. diff | where | tolerance |",
            "|---|---|---|---|---|---|",
        ]
        for (model, dtype, a, b), (rel, tensor, tol) in sorted(self.rows.items()):
            lines.append(f"| {model} | {dtype} | {a} vs {b} | {rel:.1e} | {tensor} | {tol:.0e} |")
        return "\n".join(lines)


def run(n_cases: int, torch_compile: bool) -> str:
    backends = [b for b in FRAMEWORKS if is_available(b)]
    worst = Worst()
    timings: dict[str, float] = defaultdict(float)
    for i, spec in _cases(n_cases):
        cfg = SOFTMAX_CONFIGS[i % len(SOFTMAX_CONFIGS)]
        inputs = make_softmax_batch(
            cfg, *SOFTMAX_SHAPES[i % 2], seed=i, weight_scale=(0.5, 2.0, 6.0)[i % 3]
        )
        for dtype in ("float32", "float64"):
            t0 = time.perf_counter()
            res = {
                "numpy": run_backend(
                    "numpy", softmax_reference(spec), inputs, wrt=["params"], dtype=dtype
                )
            }
            for b in backends:
                fn = preference_loss_fn(softmax_logps(b), spec)
                res[b] = run_backend(b, fn, inputs, wrt=["params"], dtype=dtype)
            worst.add("softmax", dtype, compare_results(res, dtype=dtype))
            timings["softmax"] += time.perf_counter() - t0
    for i, spec in _cases(n_cases):
        cfg = TRANSFORMER_CONFIGS[i % len(TRANSFORMER_CONFIGS)]
        inputs = make_transformer_batch(cfg, *TRANSFORMER_SHAPES[i % 2], seed=i)
        for dtype in ("float32", "float64"):
            t0 = time.perf_counter()
            res = {
                b: run_backend(
                    b,
                    preference_loss_fn(transformer_logps(b, cfg), spec),
                    inputs,
                    wrt=["params"],
                    dtype=dtype,
                )
                for b in backends
            }
            worst.add("transformer", dtype, compare_results(res, dtype=dtype))
            timings["transformer"] += time.perf_counter() - t0

    # compiled versus eager, one softmax and one transformer case per backend and dtype
    compiled = [b for b in backends if torch_compile or b not in SLOW_COMPILE]
    spec = PreferenceSpec("sigmoid", beta=0.5, gate=GATES[2], sft_weight=0.5)
    cfg = TRANSFORMER_CONFIGS[1]
    for model, logps_fn, inputs in (
        ("softmax", softmax_logps, make_softmax_batch(SOFTMAX_CONFIGS[1], 3, 11, seed=1)),
        (
            "transformer",
            lambda b: transformer_logps(b, cfg),
            make_transformer_batch(cfg, 3, 12, seed=1),
        ),
    ):
        for b in compiled:
            for dtype in ("float32", "float64"):
                t0 = time.perf_counter()
                fn = preference_loss_fn(logps_fn(b), spec)
                res = {
                    m: run_backend(b, fn, inputs, wrt=["params"], dtype=dtype, mode=m)
                    for m in ("eager", "compiled")
                }
                rep = compare_results(
                    {b: res["eager"], f"{b}[compiled]": res["compiled"]}, dtype=dtype
                )
                worst.add(f"{model} (compiled)", dtype, rep)
                timings[f"compile {b}"] += time.perf_counter() - t0

    # the gate within one framework (float64): gated = chosen + g * rejected
    gate_rows = []
    for b in backends:
        err = 0.0
        for i, spec in _cases(n_cases):
            if spec.gate is None:
                continue
            cfg = TRANSFORMER_CONFIGS[i % len(TRANSFORMER_CONFIGS)]
            inputs = make_transformer_batch(cfg, *TRANSFORMER_SHAPES[i % 2], seed=i)
            parts = gate_gradient_parts(b, transformer_logps(b, cfg), spec, inputs, wrt=["params"])
            parts.check()
            for k, g in parts.gated[1].items():
                want = parts.chosen[k] + parts.rejected_gated[k]
                scale = max(np.abs(parts.chosen[k]).max(), np.abs(parts.rejected[k]).max())
                err = max(err, float(np.abs(g - want).max() / scale))
        gate_rows.append(f"| {b} | {err:.1e} |")

    # float64 finite differences of the ungated transformer loss (NumPy forward), for the
    # backends whose float64 is accurate to FLOAT64_TOL (not MLX's, ~1e-7)
    fd_rows = []
    for b in [x for x in backends if tolerance("float64", x, x) <= FLOAT64_TOL]:
        err = 0.0
        for i, spec in _cases(n_cases):
            if spec.loss_type not in SMOOTH:
                continue
            spec = spec.ungated()
            cfg = TRANSFORMER_CONFIGS[i % len(TRANSFORMER_CONFIGS)]
            inputs = make_transformer_batch(cfg, *TRANSFORMER_SHAPES[i % 2], seed=i)
            _, grads = run_backend(
                b,
                preference_loss_fn(transformer_logps(b, cfg), spec),
                inputs,
                wrt=["params"],
                dtype="float64",
            )
            params = inputs["params"]
            g = {k: grads[f"params/{k}"] for k in params}
            norm = float(np.sqrt(sum((x * x).sum() for x in g.values())))
            v = {k: x / norm for k, x in g.items()}
            np_fn = preference_loss_fn(transformer_logps("numpy", cfg), spec)

            def at(t, v=v, params=params, inputs=inputs, np_fn=np_fn):  # type: ignore[no-untyped-def]
                return float(
                    np_fn(**{**inputs, "params": {k: params[k] + t * v[k] for k in params}})
                )

            h = 2.5e-4
            fd = (8 * (at(h) - at(-h)) - (at(2 * h) - at(-2 * h))) / (12 * h)
            err = max(err, abs(fd - norm) / norm)
        fd_rows.append(f"| {b} | {err:.1e} |")

    head = (
        f"cases: {n_cases} per model; machine: {platform.machine()}, "
        f"{platform.python_version()}; backends: {', '.join(backends)}; "
        f"torch.compile: {'yes' if torch_compile else 'no'}"
    )
    out = [
        head,
        "",
        worst.table(),
        "",
        "Gate decomposition within one framework (float64, transformer): max |gated - "
        "(chosen + g * rejected)| / max(|chosen|, |rejected|)",
        "",
        "| backend | worst |",
        "|---|---|",
        *gate_rows,
        "",
        "Finite differences (float64, transformer, 4-point stencil h = 2.5e-4, along the "
        "gradient): |FD - |grad|| / |grad|",
        "",
        "| backend | worst |",
        "|---|---|",
        *fd_rows,
        "",
        "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
        f"Default tolerances: float32 {tolerance('float32', 'torch', 'jax'):.0e}, "
        f"float64 {tolerance('float64', 'torch', 'jax'):.0e} "
        f"(MLX float64 {tolerance('float64', 'torch', 'mlx'):.0e}).",
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=16, help="cases per model (default 16)")
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="also compare torch.compile with eager (minutes on a CPU)",
    )
    args = parser.parse_args()
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
    except ImportError:
        pass
    for b in FRAMEWORKS:  # tiny models: one intra-op thread is faster than several
        if is_available(b):
            get_backend(b).set_threads(1)
    print(run(args.cases, args.torch_compile))


if __name__ == "__main__":
    main()
