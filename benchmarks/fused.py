"""The fused LM head against the unfused path and the peers: time and peak memory.

    python benchmarks/fused.py                      # the full run (docs/fused.md)
    python benchmarks/fused.py --smoke              # tiny sizes, one repetition
    python benchmarks/fused.py --backends torch --vocabs 32768 --dtypes float32 --reps 3

Per backend (torch eager, ``jax.jit``, MLX eager), dtype and vocabulary size ``V``: the
per-token log-probs of ``hidden (1, P, D)`` under an output head ``weight (V, D)``, computed

- ``unfused``: ``logits = hidden @ weight.T``, then :func:`gategrad.token_logps`;
- ``fused``: :func:`gategrad.fused_token_logps` (no ``(P, V)`` array);
- ``trl`` (torch): TRL's ``ChunkedLogProbFunction`` (the fused head of TRL >= 1.15, its torch
  fallback on a CPU), where TRL is installed;
- ``cce`` (torch): cut-cross-entropy's ``linear_cross_entropy(..., impl='torch_compile',
  reduction='none')``, its only implementation without a GPU (the Triton kernel needs CUDA),
  where it is installed;

forward only (``fwd``) and forward + backward to ``hidden`` and ``weight`` (``fwd+bwd``).

Time: the variants of one group run interleaved (:func:`benchmarks._timing.interleave`),
``--reps`` repetitions after one warm-up call each; the ratio to ``unfused`` is the median of
the per-repetition ratios. Memory: the framework's own counter (``torch.profiler`` on a CPU,
XLA's ``memory_analysis()`` temporaries, ``mx.get_peak_memory()``) over one call, less the
gradients the call returns (both paths hold them): the memory of the log-prob computation
itself. Output: Markdown on stdout and in ``<out>/fused.md``, the numbers in
``<out>/fused.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make the package ``benchmarks`` importable
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import numpy as np

import gategrad
from benchmarks._memory import framework_peak
from benchmarks._timing import interleave, ratio_stats

Fn = Callable[[], Any]


def log(msg: str) -> None:
    print(f"[fused {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_inputs(positions: int, dim: int, vocab: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "hidden": rng.standard_normal((1, positions, dim), dtype=np.float32),
        "weight": rng.standard_normal((vocab, dim), dtype=np.float32) / np.sqrt(dim),
        "labels": rng.integers(0, vocab, (1, positions)),
    }


# ---------------------------------------------------------------------------------------------
# one callable per (variant, pass), for each framework


def torch_variants(inp: dict[str, Any], dtype: str, passes: str) -> dict[str, Fn]:
    import torch

    dt = getattr(torch, dtype)
    h = torch.from_numpy(inp["hidden"]).to(dt).requires_grad_(True)
    w = torch.from_numpy(inp["weight"]).to(dt).requires_grad_(True)
    y = torch.from_numpy(inp["labels"])
    bwd = passes == "fwd+bwd"

    def run(logps_fn: Callable[[], Any]) -> Fn:
        def call() -> Any:
            with torch.set_grad_enabled(bwd):
                lp = logps_fn()
                if bwd:
                    return torch.autograd.grad(lp.sum(), [h, w])
                return lp

        return call

    fns = {
        "unfused": run(lambda: gategrad.token_logps(h @ w.T, y, shift=False)[0]),
        "fused": run(lambda: gategrad.fused_token_logps(h, w, y, shift=False)[0]),
    }
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    except ImportError:
        ChunkedLogProbFunction = None  # noqa: N806
    if ChunkedLogProbFunction is not None:
        flat_h, flat_y = h.reshape(-1, h.shape[-1]), y.reshape(-1)
        fns["trl"] = run(
            lambda: ChunkedLogProbFunction.apply(
                flat_h, w, None, flat_y, 1.0, 32768, None, 1.0, ("log_probs",)
            )[0]
        )
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        linear_cross_entropy = None
    if linear_cross_entropy is not None:
        fns["cce"] = run(
            lambda: -linear_cross_entropy(h, w, y, impl="torch_compile", reduction="none")
        )
    return fns


def jax_variants(inp: dict[str, Any], dtype: str, passes: str) -> dict[str, Fn]:
    import jax
    import jax.numpy as jnp

    h = jnp.asarray(inp["hidden"]).astype(dtype)
    w = jnp.asarray(inp["weight"]).astype(dtype)
    y = jnp.asarray(inp["labels"])

    def unfused(h: Any, w: Any) -> Any:
        return gategrad.token_logps(h @ w.T, y, shift=False)[0]

    def fused(h: Any, w: Any) -> Any:
        return gategrad.fused_token_logps(h, w, y, shift=False)[0]

    fns = {}
    for name, f in (("unfused", unfused), ("fused", fused)):
        if passes == "fwd+bwd":
            g = jax.grad(lambda h, w, f=f: f(h, w).sum(), argnums=(0, 1))
        else:
            g = f
        compiled = jax.jit(g).lower(h, w).compile()
        fns[name] = _jax_call(compiled, h, w)
    return fns


def _jax_call(compiled: Any, h: Any, w: Any) -> Fn:
    import jax

    def call() -> Any:
        return jax.block_until_ready(compiled(h, w))

    call.compiled = compiled  # type: ignore[attr-defined]
    return call


def mlx_variants(inp: dict[str, Any], dtype: str, passes: str) -> dict[str, Fn]:
    import mlx.core as mx

    dt = getattr(mx, dtype)
    h = mx.array(inp["hidden"]).astype(dt)
    w = mx.array(inp["weight"]).astype(dt)
    y = mx.array(inp["labels"])
    mx.eval(h, w, y)

    def unfused(h: Any, w: Any) -> Any:
        return gategrad.token_logps(h @ w.T, y, shift=False)[0]

    def fused(h: Any, w: Any) -> Any:
        return gategrad.fused_token_logps(h, w, y, shift=False)[0]

    fns = {}
    for name, f in (("unfused", unfused), ("fused", fused)):
        if passes == "fwd+bwd":
            g = mx.grad(lambda h, w, f=f: f(h, w).sum(), argnums=(0, 1))
        else:
            g = f

        def call(g: Any = g) -> Any:
            out = g(h, w)
            mx.eval(out)
            return out

        fns[name] = call
    return fns


VARIANTS = {"torch": torch_variants, "jax": jax_variants, "mlx": mlx_variants}


def grad_bytes(inp: dict[str, Any], dtype: str) -> int:
    """Bytes of the gradients of ``hidden`` and ``weight`` in ``dtype``."""
    size = 2 if dtype in ("bfloat16", "float16") else np.dtype(dtype).itemsize
    return size * (inp["hidden"].size + inp["weight"].size)


# ---------------------------------------------------------------------------------------------


def measure(
    backend: str,
    inp: dict[str, Any],
    dtype: str,
    passes: str,
    reps: int,
    only: tuple[str, ...] = (),
) -> dict[str, Any]:
    fns = VARIANTS[backend](inp, dtype, passes)
    if only:
        fns = {k: f for k, f in fns.items() if k in only or k == "unfused"}
    ops = gategrad.get_backend(backend)
    for name, fn in fns.items():  # warm-up (and compilation)
        t0 = time.perf_counter()
        fn()
        log(f"  {backend} {dtype} {passes} {name}: warm-up {time.perf_counter() - t0:.2f} s")
    held = grad_bytes(inp, dtype) if passes == "fwd+bwd" else 0
    rows: dict[str, Any] = {}
    for name, fn in fns.items():
        peak = framework_peak(ops, fn, compiled=getattr(fn, "compiled", None))
        if peak:
            extra = 0 if ops.traces else held  # traced (XLA) memory stats exclude the outputs
            peak["compute_mib"] = peak["increment_mib"] - extra / 2**20
        rows[name] = {"memory": peak}
    times = interleave(fns, reps)
    for name in fns:
        rows[name]["median_ms"] = 1e3 * float(np.median(times[name]))
        rows[name]["ratio"] = ratio_stats(
            [a / b for a, b in zip(times[name], times["unfused"], strict=True)]
        )
        base = rows["unfused"]["memory"].get("compute_mib")
        own = rows[name]["memory"].get("compute_mib")
        rows[name]["memory_ratio"] = own / base if own is not None and base else None
    return rows


def render(results: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| backend | dtype | V | pass | variant | median ms | time / unfused [IQR] "
        "| compute MiB | memory / unfused |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, row in r["rows"].items():
            q = row["ratio"]
            mem = row["memory"].get("compute_mib")
            mr = row["memory_ratio"]
            lines.append(
                f"| {r['backend']} | {r['dtype']} | {r['vocab']} | {r['passes']} | {name} | "
                f"{row['median_ms']:.0f} | {q['median']:.2f} [{q['p25']:.2f}-{q['p75']:.2f}] | "
                f"{'-' if mem is None else f'{mem:.0f}'} | "
                f"{'-' if mr is None else f'{mr:.3f}'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="torch,jax,mlx")
    p.add_argument("--vocabs", default="32768,131072")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--passes", default="fwd,fwd+bwd")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--positions", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default="", help="comma-separated subset (unfused always runs)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.vocabs, args.dim, args.positions, args.reps = "300", 16, 24, 1
    backends = [b for b in args.backends.split(",") if gategrad.is_available(b)]
    results = []
    t_start = time.time()
    for backend in backends:
        for vocab in (int(v) for v in args.vocabs.split(",")):
            inp = make_inputs(args.positions, args.dim, vocab)
            for dtype in args.dtypes.split(","):
                for passes in args.passes.split(","):
                    log(f"{backend} {dtype} V={vocab} {passes}")
                    only = tuple(v for v in args.variants.split(",") if v)
                    rows = measure(backend, inp, dtype, passes, args.reps, only)
                    results.append(
                        {
                            "backend": backend,
                            "dtype": dtype,
                            "vocab": vocab,
                            "passes": passes,
                            "rows": rows,
                        }
                    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    header = (
        f"D={args.dim}, {args.positions} positions, {args.reps} interleaved repetitions; "
        f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
        f"{os.cpu_count()} CPUs, {time.time() - t_start:.0f} s in all"
    )
    md = render(results, header)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fused.md").write_text(md)
    (out / "fused.json").write_text(json.dumps({"header": header, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
