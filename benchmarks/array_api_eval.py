"""Evaluate the Array API standard (``array-api-compat``) as gategrad's operations namespace.

Compares, on the gate's own math (``gategrad._math``: estimator + gate value), the einops-style
:class:`gategrad._backend.Backend` (NumPy-like defaults, overrides where a framework differs)
with the same backend whose array namespace is ``array_api_compat.array_namespace(x)``:

1. coverage: which of the operations the core needs the standard namespace lacks;
2. ``torch.compile(fullgraph=True)``: graph breaks (``torch._dynamo.explain``);
3. eager torch and ``jax.jit`` time per call, median of interleaved repeats, ratio compat/ours.

Run: ``python benchmarks/array_api_eval.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gategrad import Gate, get_backend
from gategrad._math import estimate_logp, gate_value

#: Operations the core calls on a backend that are array-namespace functions.
NEEDED = (
    "exp",
    "log",
    "sqrt",
    "tanh",
    "sum",
    "mean",
    "min",
    "max",
    "any",
    "where",
    "minimum",
    "maximum",
    "sort",
    "take",
    "take_along_axis",
    "concat",
    "reshape",
    "permute_dims",
    "full_like",
    "isnan",
    "isfinite",
    "astype",
    "logsumexp",
    "sigmoid",
    "log_sigmoid",
    "softmax",
    "logaddexp",
)


def compat_backend(name: str) -> Any:
    """The gategrad backend of ``name`` with its ``xp`` swapped for the array-api-compat one."""
    import array_api_compat

    base = get_backend(name)
    probe = base.from_numpy(np.zeros(2, dtype=np.float32))
    xp = array_api_compat.array_namespace(probe)

    class Compat(type(base)):  # type: ignore[misc]
        # standard names where they differ from NumPy's; everything else from the defaults
        def concatenate(self, xs: Any, axis: int = 0) -> Any:
            return xp.concat(list(xs), axis=axis)

        def sort(self, x: Any, axis: int = -1) -> Any:
            return xp.sort(x, axis=axis)

        def min(self, x: Any, axis: int = -1) -> Any:
            return xp.min(x, axis=axis)

        def max(self, x: Any, axis: int = -1) -> Any:
            return xp.max(x, axis=axis)

        def take_along_axis(self, x: Any, idx: Any, axis: int = -1) -> Any:
            return xp.take_along_axis(x, idx, axis=axis)

    compat = Compat()
    compat.xp = xp
    return compat


def _median_time(fn: Callable[[], Any], sync: Callable[[Any], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gate_math(b: Any, gate: Gate, x: Any, m: Any) -> Any:
    return gate_value(gate, estimate_logp(gate, x, b.bool_mask(m), b), b)


def _timed_call(b: Any, mode: str, x: Any, m: Any, gate: Gate) -> Callable[[], Any]:
    if mode == "eager":
        return lambda: _gate_math(b, gate, x, m)
    compiled = b.compile(lambda x, m: _gate_math(b, gate, x, m))
    return lambda: compiled(x, m)


def torch_graph_breaks(logps: np.ndarray, mask: np.ndarray, gate: Gate) -> None:
    """``torch._dynamo.explain`` of the gate math with both namespaces."""
    import torch

    ours = get_backend("torch")
    x, m = ours.from_numpy(logps), ours.from_numpy(mask)
    for label, b in (("ours", ours), ("compat", compat_backend("torch"))):
        torch._dynamo.reset()
        report = torch._dynamo.explain(lambda x, m, b=b: _gate_math(b, gate, x, m))(x, m)
        print(f"torch.compile(fullgraph) {label}: {report.graph_break_count} graph breaks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    import array_api_compat

    print(f"array-api-compat {array_api_compat.__version__}")
    rng = np.random.default_rng(0)
    logps = np.log(rng.uniform(1e-4, 1.0, (args.batch, args.length))).astype(np.float32)
    mask = rng.uniform(size=logps.shape) < 0.8
    gate = Gate(estimator="q10")

    for name in ("numpy", "torch", "jax"):
        ours, compat = get_backend(name), compat_backend(name)
        missing = [op for op in NEEDED if not hasattr(compat.xp, op)]
        print(f"\n## {name}: the standard namespace lacks {missing}")
        x, m = ours.from_numpy(logps), ours.from_numpy(mask)

        sync = ours.to_numpy
        pair = {"ours": ours, "compat": compat}
        for mode in ("eager", "compiled"):
            fns = {k: _timed_call(b, mode, x, m, gate) for k, b in pair.items()}
            for fn in fns.values():
                sync(fn())  # warm up / compile
            t: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(5):  # interleaved rounds
                for k, fn in fns.items():
                    t[k].append(_median_time(fn, sync, args.repeats // 5))
            ours_t, compat_t = statistics.median(t["ours"]), statistics.median(t["compat"])
            print(
                f"{name} {mode}: ours {ours_t * 1e6:.1f} us, compat {compat_t * 1e6:.1f} us "
                f"per call, compat/ours {compat_t / ours_t:.3f}"
            )
    torch_graph_breaks(logps, mask, gate)
    try:
        import mlx.core as mx

        array_api_compat.array_namespace(mx.zeros(2))
        print("\nmlx: supported by array-api-compat")
    except (ImportError, TypeError) as err:
        print(f"\nmlx: not supported by array-api-compat ({type(err).__name__}: {err})")


if __name__ == "__main__":
    main()
