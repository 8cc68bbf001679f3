"""``assert_backends_agree``: run one scalar function in several frameworks (and modes) from
shared NumPy inputs, and compare its value and gradients tensor by tensor.

Comparison rule (per tensor, scale-relative): ``max|a - b| <= tol * max(max|a|, max|b|)``.
Elementwise ``rtol`` would fail on tiny entries; a per-tensor scale does not.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gategrad._dispatch import get_backend, is_available

from ._adapters import FRAMEWORKS, MODES, from_numpy, to_numpy, value_and_grad, vmap_value_and_grad

__all__ = [
    "FLOAT32_TOL",
    "FLOAT64_TOL",
    "Agreement",
    "BackendDisagreement",
    "TensorDiff",
    "assert_backends_agree",
    "compare_results",
    "run_backend",
    "run_backend_vmapped",
    "tolerance",
]

#: Scale-relative tolerance for float32 (and for MLX float64, whose transcendental functions
#: are only about 1e-7 accurate).
FLOAT32_TOL: float = 1e-4
#: Scale-relative tolerance for float64 in NumPy, PyTorch and JAX.
FLOAT64_TOL: float = 1e-12

#: The name of the function's value in reports.
VALUE = "value"


def tolerance(dtype: str, a: str, b: str) -> float:
    """The default tolerance between backends ``a`` and ``b`` (``'torch'``, ``'jax[compiled]'``)
    at ``dtype``: 1e-12 for float64 unless one side is MLX, else 1e-4."""
    if dtype != "float64":
        return FLOAT32_TOL
    return max(FLOAT64_TOL, *(get_backend(_framework(v)).float64_tol for v in (a, b)))


class BackendDisagreement(AssertionError):
    """Backends disagree beyond tolerance. ``report`` holds every comparison (an
    [`Agreement`][]); ``worst`` the [`TensorDiff`][] that failed by the largest factor."""

    def __init__(self, message: str, report: Agreement, worst: TensorDiff) -> None:
        super().__init__(message)
        self.report = report
        self.worst = worst


@dataclass(frozen=True)
class TensorDiff:
    """One tensor compared between two variants ``a`` and ``b``.

    ``max_abs``: ``max|a - b|``; ``scale``: ``max(max|a|, max|b|)``; ``rel``: ``max_abs / scale``
    (0 when both are exactly 0; ``inf`` for a shape mismatch or non-finite values that differ);
    ``index``: where ``|a - b|`` is largest, with ``a_at`` and ``b_at`` the two values there.
    """

    tensor: str
    a: str
    b: str
    max_abs: float
    scale: float
    rel: float
    tol: float
    atol: float = 0.0
    index: tuple[int, ...] = ()
    a_at: float = math.nan
    b_at: float = math.nan
    note: str = ""

    @property
    def ok(self) -> bool:
        """Whether ``max_abs <= tol * scale + atol`` (and the tensors are comparable)."""
        if self.note:
            return False
        return self.max_abs <= self.tol * self.scale + self.atol

    @property
    def excess(self) -> float:
        """How many times over tolerance (``< 1`` when within)."""
        if self.note:
            return math.inf
        allowed = self.tol * self.scale + self.atol
        if allowed == 0.0:
            return 0.0 if self.max_abs == 0.0 else math.inf
        return self.max_abs / allowed

    def describe(self) -> str:
        where = ""
        if self.index or not math.isnan(self.a_at):
            at = f"[{', '.join(map(str, self.index))}]" if self.index else ""
            where = f"; largest at {self.tensor}{at}: {self.a_at!r} vs {self.b_at!r}"
        if self.note:
            return f"{self.tensor!r}: {self.a} vs {self.b}: {self.note}"
        return (
            f"{self.tensor!r}: {self.a} vs {self.b}: max|a-b| = {self.max_abs:.3g}, "
            f"scale max(|a|, |b|) = {self.scale:.3g}, relative {self.rel:.3g} "
            f"{'<=' if self.ok else '>'} tol {self.tol:.3g}{where}"
        )


@dataclass
class Agreement:
    """Everything [`assert_backends_agree`][] computed.

    ``values[variant]``: the function's value (float); ``grads[variant][tensor]``: gradients as
    float64 NumPy arrays; ``diffs``: one [`TensorDiff`][] per compared tensor and pair.
    Variants are named ``'<framework>'`` in eager mode and ``'<framework>[<mode>]'`` otherwise.
    """

    dtype: str
    values: dict[str, float] = field(default_factory=dict)
    grads: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    diffs: list[TensorDiff] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.diffs)

    @property
    def failures(self) -> list[TensorDiff]:
        return sorted((d for d in self.diffs if not d.ok), key=lambda d: -d.excess)

    def worst(self) -> TensorDiff | None:
        """The comparison closest to (or furthest beyond) its tolerance."""
        return max(self.diffs, key=lambda d: (d.excess, d.rel), default=None)

    def worst_by_pair(self) -> dict[tuple[str, str], TensorDiff]:
        """Per pair of variants, the tensor with the largest relative difference."""
        out: dict[tuple[str, str], TensorDiff] = {}
        for d in self.diffs:
            key = (d.a, d.b)
            if key not in out or d.rel > out[key].rel:
                out[key] = d
        return out

    def table(self) -> str:
        """A markdown table of the worst relative difference per pair."""
        rows = ["| pair | dtype | worst tensor | max rel diff | tol |", "|---|---|---|---|---|"]
        for (a, b), d in sorted(self.worst_by_pair().items()):
            rows.append(f"| {a} vs {b} | {self.dtype} | {d.tensor} | {d.rel:.2g} | {d.tol:.0e} |")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


# ------------------------------------------------------------------------------------------
# inputs: a mapping of names to NumPy arrays, or to one level of nested mappings (parameters)


def _flatten(inputs: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    leaves: list[tuple[str, np.ndarray]] = []
    for key, value in inputs.items():
        if isinstance(value, Mapping):
            for sub, leaf in value.items():
                leaves.append((f"{key}/{sub}", np.asarray(leaf)))
        elif value is None:
            continue
        else:
            leaves.append((key, np.asarray(value)))
    return leaves


def _rebuild(inputs: Mapping[str, Any], paths: Sequence[str], arrays: Sequence[Any]) -> dict:
    out: dict[str, Any] = {k: ({} if isinstance(v, Mapping) else None) for k, v in inputs.items()}
    for path, arr in zip(paths, arrays, strict=True):
        key, _, sub = path.partition("/")
        if sub:
            out[key][sub] = arr
        else:
            out[key] = arr
    return out


def _flatten_grads(grads: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {path: np.asarray(to_numpy(g), dtype=np.float64) for path, g in _flatten(grads)}


def _select(
    paths: Sequence[str], leaves: Sequence[np.ndarray], wrt: Sequence[str] | None
) -> list[int]:
    if wrt is None:
        return [i for i, a in enumerate(leaves) if np.issubdtype(a.dtype, np.floating)]
    chosen: list[int] = []
    for name in wrt:
        hits = [i for i, p in enumerate(paths) if p == name or p.startswith(name + "/")]
        if not hits:
            raise ValueError(f"wrt names {name!r}, which is not among the inputs {list(paths)}")
        for i in hits:
            if not np.issubdtype(leaves[i].dtype, np.floating):
                raise ValueError(f"cannot differentiate {paths[i]!r}: dtype {leaves[i].dtype}")
        chosen.extend(i for i in hits if i not in chosen)
    return chosen


def _framework(variant: str) -> str:
    return variant.split("[", 1)[0]


def _has_autograd(name: str) -> bool:
    """Whether backend ``name`` differentiates (NumPy does not: its function gives its own
    gradients, and it runs in eager mode only)."""
    return get_backend(name).has_autograd


def _variant(name: str, mode: str) -> str:
    return name if mode == "eager" or not _has_autograd(name) else f"{name}[{mode}]"


def _device_scope(name: str, dtype: str) -> contextlib.AbstractContextManager[None]:
    """Where framework ``name`` can compute ``dtype`` (MLX float64: its CPU stream)."""
    return get_backend(name).device_scope(dtype)


def run_backend(
    name: str,
    fn: Callable[..., Any],
    inputs: Mapping[str, Any],
    *,
    wrt: Sequence[str] | None = None,
    dtype: str = "float32",
    mode: str = "eager",
) -> tuple[float, dict[str, np.ndarray]]:
    """Run ``fn(**inputs)`` (inputs converted to framework ``name``, floating ones to ``dtype``)
    and its gradient with respect to the ``wrt`` inputs; return ``(value, {path: grad})`` in
    NumPy float64.

    ``name='numpy'``: NumPy has no autograd, so ``fn`` itself must return ``(value, grads)``
    with ``grads`` keyed like ``inputs`` (a nested mapping for nested inputs), e.g. a closed form.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    leaves = _flatten(inputs)
    paths = [p for p, _ in leaves]
    arrays = [a for _, a in leaves]
    argnums = _select(paths, arrays, wrt)
    wanted = [paths[i] for i in argnums]
    if not _has_autograd(name):
        converted = [from_numpy(name, a, dtype) for a in arrays]
        value, grads = fn(**_rebuild(inputs, paths, converted))
        flat = _flatten_grads(grads)
        missing = [p for p in wanted if p not in flat]
        if missing:
            raise ValueError(f"the {name} function's gradients lack {missing}")
        return float(np.asarray(value)), {p: flat[p] for p in wanted}
    with _device_scope(name, dtype):
        converted = [from_numpy(name, a, dtype) for a in arrays]

        def flat_fn(*args: Any) -> Any:
            return fn(**_rebuild(inputs, paths, args))

        value, grads = value_and_grad(name, flat_fn, converted, argnums=argnums, mode=mode)
        out = {
            p: np.asarray(to_numpy(g), dtype=np.float64) for p, g in zip(wanted, grads, strict=True)
        }
        return float(np.asarray(to_numpy(value), dtype=np.float64)), out


def run_backend_vmapped(
    name: str,
    fn: Callable[..., Any],
    inputs: Mapping[str, Any],
    batched: Sequence[str],
    *,
    wrt: Sequence[str] | None = None,
    dtype: str = "float32",
    mode: str = "eager",
) -> list[tuple[float, dict[str, np.ndarray]]]:
    """Like [`run_backend`][], under the framework's ``vmap``: the ``batched`` inputs carry a
    leading axis ``K`` that is mapped over (the others are shared); returns one
    ``(value, {path: grad})`` per slice, to compare with eager runs on each slice.
    ``mode='compiled'`` compiles the vmapped function (``jax.jit(jax.vmap(...))``, ...)."""
    leaves = _flatten(inputs)
    paths = [p for p, _ in leaves]
    arrays = [a for _, a in leaves]
    argnums = _select(paths, arrays, wrt)
    wanted = [paths[i] for i in argnums]
    mapped = [
        i for i, p in enumerate(paths) if any(p == b or p.startswith(b + "/") for b in batched)
    ]
    if not mapped:
        raise ValueError(f"batched names {list(batched)} match none of the inputs {paths}")
    sizes = {arrays[i].shape[0] for i in mapped}
    if len(sizes) != 1:
        raise ValueError(f"batched inputs have different leading sizes {sorted(sizes)}")
    with _device_scope(name, dtype):
        converted = [from_numpy(name, a, dtype) for a in arrays]

        def flat_fn(*args: Any) -> Any:
            return fn(**_rebuild(inputs, paths, args))

        values, grads = vmap_value_and_grad(name, flat_fn, converted, argnums, mapped, mode)
        values = np.asarray(to_numpy(values), dtype=np.float64)
        grads_np = [np.asarray(to_numpy(g), dtype=np.float64) for g in grads]
    return [
        (float(values[k]), {p: g[k] for p, g in zip(wanted, grads_np, strict=True)})
        for k in range(sizes.pop())
    ]


def _compare(
    tensor: str, a: str, b: str, x: np.ndarray, y: np.ndarray, tol: float, atol: float
) -> TensorDiff:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    # the fields of a comparison that cannot be made: infinitely far apart, scale unknown
    unmatched = (tensor, a, b, math.inf, math.nan, math.inf, tol, atol)
    if x.shape != y.shape:
        return TensorDiff(*unmatched, note=f"shapes differ: {x.shape} vs {y.shape}")
    fx, fy = np.isfinite(x), np.isfinite(y)
    if not (fx.all() and fy.all()):
        same = np.array_equal(x, y, equal_nan=True)
        if not same:
            bad = np.argwhere(~(fx & fy))
            idx = tuple(int(i) for i in bad[0]) if bad.size else ()
            return TensorDiff(
                *unmatched,
                idx,
                float(x[idx]) if x.ndim else float(x),
                float(y[idx]) if y.ndim else float(y),
                note=f"non-finite values ({int((~fx).sum())} in {a}, {int((~fy).sum())} in {b})",
            )
        x, y = np.where(fx, x, 0.0), np.where(fy, y, 0.0)
    diff = np.abs(x - y)
    if diff.size == 0:
        return TensorDiff(tensor, a, b, 0.0, 0.0, 0.0, tol, atol)
    flat = int(np.argmax(diff))
    idx = tuple(int(i) for i in np.unravel_index(flat, diff.shape))
    max_abs = float(diff.reshape(-1)[flat])
    scale = float(max(np.abs(x).max(), np.abs(y).max()))
    rel = 0.0 if max_abs == 0.0 else (max_abs / scale if scale > 0 else math.inf)
    return TensorDiff(
        tensor,
        a,
        b,
        max_abs,
        scale,
        rel,
        tol,
        atol,
        idx,
        float(x.reshape(-1)[flat]),
        float(y.reshape(-1)[flat]),
    )


def compare_results(
    results: Mapping[str, tuple[float, Mapping[str, np.ndarray]]],
    *,
    dtype: str = "float32",
    tol: float | None = None,
    atol: float = 0.0,
    reference: str | None = None,
) -> Agreement:
    """Compare ``{variant: (value, {tensor: grad})}`` pairwise (or each against ``reference``)."""
    report = Agreement(dtype=dtype)
    names = list(results)
    for name in names:
        report.values[name] = float(results[name][0])
        report.grads[name] = {
            k: np.asarray(v, dtype=np.float64) for k, v in results[name][1].items()
        }
    if reference is not None:
        if reference not in results:
            raise ValueError(f"reference {reference!r} is not among the variants {names}")
        pairs = [(n, reference) for n in names if n != reference]
    else:
        pairs = list(itertools.combinations(names, 2))
    for a, b in pairs:
        t = tolerance(dtype, a, b) if tol is None else tol
        report.diffs.append(
            _compare(
                VALUE, a, b, np.asarray(report.values[a]), np.asarray(report.values[b]), t, atol
            )
        )
        keys = list(report.grads[b])
        for k in report.grads[a]:
            if k not in keys:
                keys.append(k)
        for k in keys:
            if k not in report.grads[a] or k not in report.grads[b]:
                report.diffs.append(
                    TensorDiff(
                        k,
                        a,
                        b,
                        math.inf,
                        math.nan,
                        math.inf,
                        t,
                        atol,
                        note="gradient missing on one side",
                    )
                )
                continue
            report.diffs.append(_compare(k, a, b, report.grads[a][k], report.grads[b][k], t, atol))
    return report


def assert_backends_agree(
    fns_by_backend: Mapping[str, Callable[..., Any]] | Callable[..., Any],
    inputs: Mapping[str, Any],
    tol: float | None = None,
    *,
    wrt: Sequence[str] | None = None,
    dtype: str = "float32",
    modes: Sequence[str] = ("eager",),
    atol: float = 0.0,
    reference: str | None = None,
) -> Agreement:
    """Check that every backend gives the same value and gradients; return the [`Agreement`][].

    Args:
        fns_by_backend: ``{'torch': f, 'jax': f, 'mlx': f, 'numpy': f_ref}``: a scalar-valued
            function per backend, called as ``f(**inputs)`` with the inputs converted to that
            framework. gategrad's own functions are framework-neutral, so one function often
            serves every backend. A single callable means every installed framework of
            ``FRAMEWORKS``. ``'numpy'`` has no autograd: its function returns
            ``(value, grads)`` with ``grads`` keyed like ``inputs`` (a closed-form reference).
        inputs: ``{name: np.ndarray}``, or ``{name: {sub: np.ndarray}}`` for parameter dicts.
            Floating arrays are cast to ``dtype``; integer and boolean arrays keep their kind.
            ``None`` values are passed through as ``None``.
        tol: scale-relative tolerance ``max|a-b| <= tol * max(|a|, |b|)`` for every tensor;
            ``None``: [`tolerance`][] per pair (float32: 1e-4; float64: 1e-12, MLX 1e-4).
        wrt: input names (or ``'name/sub'`` paths) to differentiate; default every floating
            input.
        dtype: ``'float32'`` or ``'float64'`` (MLX float64 runs on its CPU stream).
        modes: any of ``'eager'`` and ``'compiled'`` (``torch.compile(fullgraph=True)``,
            ``jax.jit``, ``mx.compile``); every backend runs in every mode, so
            ``modes=('eager', 'compiled')`` also compares each backend with itself.
        atol: an absolute slack added to every bound (default 0).
        reference: compare every variant with this one only (e.g. ``'numpy'``); default: all
            pairs.

    Raises:
        BackendDisagreement: (an ``AssertionError``) naming the worst tensor and backend pair,
            with ``max|a-b|``, the scale and the element where they differ most.
        ImportError: a named framework is not installed (the message names the pip extra).
    """
    if callable(fns_by_backend):
        fns = {n: fns_by_backend for n in FRAMEWORKS if is_available(n)}
    else:
        fns = dict(fns_by_backend)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    runs = [(name, mode) for name in fns for mode in (modes if _has_autograd(name) else ("eager",))]
    if len(runs) < 2:
        raise ValueError(
            f"need at least two backends or modes to compare, got {[_variant(*r) for r in runs]}"
            " (is only one framework installed?)"
        )
    results: dict[str, tuple[float, dict[str, np.ndarray]]] = {}
    for name, mode in runs:
        results[_variant(name, mode)] = run_backend(
            name, fns[name], inputs, wrt=wrt, dtype=dtype, mode=mode
        )
    report = compare_results(results, dtype=dtype, tol=tol, atol=atol, reference=reference)
    failures = report.failures
    if failures:
        worst = failures[0]
        lines = [f"backends disagree ({dtype}) on {worst.describe()}"]
        if len(failures) > 1:
            lines.append(f"{len(failures)} comparisons out of tolerance; the next ones:")
            lines.extend(f"  {d.describe()}" for d in failures[1:6])
        raise BackendDisagreement("\n".join(lines), report, worst)
    return report
