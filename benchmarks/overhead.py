"""Measure what the gate costs: a DPO training step, per-token log-probs, gate mechanisms.

    python benchmarks/overhead.py                 # full run (about 8 minutes on 2 CPU cores)
    python benchmarks/overhead.py --smoke         # tiny sizes, one repetition (what CI runs)
    python benchmarks/overhead.py --device cuda   # torch on CUDA; JAX and MLX use their default

Sections (docs/benchmarks.md explains how to read the tables):

1. ``step``: one DPO training step (forward, backward, AdamW update) of a small decoder-only
   transformer, ungated versus gated (``example/seq``, ``example/q10``, ``token/log_sigmoid``),
   in torch eager (value checks on and off), ``torch.compile``, ``jax.jit`` and ``mx.compile``.
2. ``logps``: :func:`gategrad.token_logps` against ``log_softmax`` + ``gather`` and against
   TRL's ``selective_log_softmax`` (when TRL is installed); forward only, and forward + backward.
3. ``mechanism``: the custom-gradient primitive (``gate_weights`` + :func:`gategrad.scale_grad`)
   against the naive detach mix ``g * x + stop_gradient((1 - g) * x)``, on the same step.

Timing: the variants of one group run interleaved (A B C A B C ..., the order rotating every
repetition) in one process, after warm-up (compilation) steps, so that machine drift cancels in
the per-repetition ratio ``t(variant) / t(baseline)``. Reported: the median ratio, its
interquartile range and its min-max. Each group gets a time budget (and 5 to 40 repetitions);
a global deadline (``--deadline``) shrinks the budgets of late groups.

Peak memory, gated versus ungated:

- torch on CPU: ``torch.profiler``'s memory events (the peak of the live bytes allocated during
  one step), and, per variant, a subprocess (``--_child``) that reports ``getrusage`` maximum RSS
  over the whole child and the Linux high-water mark over the measured steps alone (reset after
  warm-up through ``/proc/self/clear_refs``);
- torch on CUDA: ``torch.cuda.max_memory_allocated``;
- JAX: XLA's ``memory_analysis()`` of the compiled step (its temporary buffers);
- MLX: ``mx.get_peak_memory()``.

Output: a Markdown report (printed, and written to ``<out>/overhead.md``) and the raw numbers
as JSON (``<out>/overhead.json``); ``--out`` defaults to ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

RESULT_TAG = "@@GATEGRAD-BENCH-RESULT@@"
HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------------------------
# sizes


@dataclasses.dataclass(frozen=True)
class StepSize:
    """The DPO step: ``rows`` sequences (``rows // 2`` preference pairs) of ``seq`` tokens."""

    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    vocab: int
    seq: int
    rows: int

    def describe(self) -> str:
        return (
            f"d={self.d_model}, {self.n_layers} layers, {self.n_heads} heads, "
            f"d_ff={self.d_ff}, V={self.vocab}, T={self.seq}, B={self.rows} "
            f"({self.rows // 2} pairs)"
        )


@dataclasses.dataclass(frozen=True)
class LogpsSize:
    """The per-token log-prob comparison: logits ``(rows, seq, V)`` for each ``V``."""

    rows: int
    seq: int
    vocabs: tuple[int, ...]


#: torch and JAX (and MLX on a GPU). T=128 rather than 256 and 4 layers keep the full run
#: (about 30 compilations included) under 10 minutes on 2 CPU cores.
STEP_FULL = StepSize(d_model=256, n_layers=4, n_heads=4, d_ff=1024, vocab=8192, seq=128, rows=8)
#: MLX on a CPU: its CPU matmul runs at about 1/10 of torch's here (Linux), so a smaller model.
STEP_MLX_CPU = StepSize(d_model=128, n_layers=2, n_heads=4, d_ff=512, vocab=2048, seq=64, rows=8)
STEP_SMOKE = StepSize(d_model=32, n_layers=1, n_heads=2, d_ff=64, vocab=128, seq=16, rows=4)
LOGPS_FULL = LogpsSize(rows=8, seq=128, vocabs=(8192, 32768))
LOGPS_SMOKE = LogpsSize(rows=2, seq=8, vocabs=(64,))

# ---------------------------------------------------------------------------------------------
# variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of a comparison.

    ``gate``: :class:`gategrad.Gate` keyword arguments (``None``: ungated).
    ``mechanism``: ``'api'`` (``preference_loss(gate=...)``), ``'primitive'`` (``gate_weights``,
    then :func:`gategrad.scale_grad`, then the ungated loss) or ``'detach'`` (``gate_weights``,
    then ``g * x + stop_gradient((1 - g) * x)``, then the ungated loss).
    ``checks``: :func:`gategrad.value_checks` during the step (only eager mode runs checks).
    ``baseline``: the variant its ratios are taken against.
    """

    name: str
    gate: dict[str, Any] | None = None
    mechanism: str = "api"
    checks: bool = True
    baseline: str | None = "ungated"

    def make_gate(self) -> Any:
        from gategrad import Gate

        return None if self.gate is None else Gate(**self.gate)


UNGATED = Variant("ungated", baseline=None)
GATED = (
    Variant("example/seq", {"estimator": "seq"}),
    Variant("example/q10", {"estimator": "q10"}),
    Variant("token/log_sigmoid", {"shape": "log_sigmoid", "granularity": "token"}),
)
NOCHECKS = (
    Variant("ungated [checks off]", checks=False, baseline=None),
    *(
        dataclasses.replace(
            v, name=f"{v.name} [checks off]", checks=False, baseline="ungated [checks off]"
        )
        for v in GATED
    ),
)
MECHANISMS = (
    Variant("primitive", {"estimator": "seq"}, mechanism="primitive"),
    Variant("detach-mix", {"estimator": "seq"}, mechanism="detach"),
)
ALL_VARIANTS = {v.name: v for v in (UNGATED, *GATED, *NOCHECKS, *MECHANISMS)}

#: Step modes, in run order: mode -> (framework, variants).
STEP_MODES: dict[str, tuple[str, tuple[Variant, ...]]] = {
    "torch-eager": ("torch", (UNGATED, *GATED, *NOCHECKS, *MECHANISMS)),
    "torch-compile": ("torch", (UNGATED, *GATED, *MECHANISMS)),
    "jax-jit": ("jax", (UNGATED, *GATED, *MECHANISMS)),
    "mlx-compile": ("mlx", (UNGATED, *GATED, *MECHANISMS)),
}
#: ``--smoke`` keeps the compiled modes to two compilations each (MLX compiles fast: all).
SMOKE_COMPILED = ("ungated", "example/q10")
#: ``--smoke`` measures memory for these only.
SMOKE_MEMORY = ("ungated", "example/seq", "example/q10")

LOGPS_IMPLS = {
    "torch": ("token_logps", "log_softmax+gather", "trl.selective_log_softmax"),
    "jax": ("token_logps", "log_softmax+gather"),
    "mlx": ("token_logps", "log_softmax+gather"),
}
LOGPS_MODE = {"torch": "eager", "jax": "jax.jit", "mlx": "mx.compile"}
PASSES = ("fwd", "fwd+bwd")

# ---------------------------------------------------------------------------------------------
# small utilities


def log(msg: str) -> None:
    cpu = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    stamp = f"{time.strftime('%H:%M:%S')} cpu {cpu:.0f}s"
    print(f"[overhead {stamp}] {msg}", file=sys.stderr, flush=True)


def have(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def framework_available(fw: str) -> bool:
    return have("mlx") and have("mlx.core") if fw == "mlx" else have(fw)


def ratio_stats(ratios: list[float]) -> dict[str, Any]:
    """Median, interquartile range and min-max of per-repetition ratios."""
    a = np.asarray([r for r in ratios if math.isfinite(r)], dtype=np.float64)
    if a.size == 0:
        nan = float("nan")
        return {"median": nan, "p25": nan, "p75": nan, "min": nan, "max": nan, "n": 0}
    p25, med, p75 = np.percentile(a, [25, 50, 75])
    return {
        "median": float(med),
        "p25": float(p25),
        "p75": float(p75),
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
    }


def read_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process in KiB (Linux), else ``{}``."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def reset_hwm() -> bool:
    """Reset the Linux peak-RSS high-water mark to the current RSS (``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024.0


class Clock:
    """The run's deadline. Each timing group gets its default budget, or less: never more than
    its share (in proportion to the default budgets still to come) of half the time left; the
    other half pays for set-up, compilation and memory measurements."""

    def __init__(self, deadline_s: float, planned_s: float) -> None:
        self.t0 = time.perf_counter()
        self.deadline_s = deadline_s
        self.planned_s = planned_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def budget(self, default_s: float) -> float:
        left = self.deadline_s - self.elapsed()
        share = 0.5 * left * default_s / max(default_s, self.planned_s)
        self.planned_s = max(0.0, self.planned_s - default_s)
        return max(0.0, min(default_s, share))


# ---------------------------------------------------------------------------------------------
# the DPO step, written once for every framework


def make_batch(size: StepSize, seed: int = 0) -> dict[str, np.ndarray]:
    """``input_ids`` ``(rows, seq)`` and ``response_mask`` (prompt and right padding are 0).

    Rows ``[chosen; rejected]``: row ``i`` and row ``rows // 2 + i`` form one pair.
    """
    rng = np.random.default_rng(seed)
    rows, seq = size.rows, size.seq
    ids = rng.integers(0, size.vocab, size=(rows, seq)).astype(np.int32)
    resp = np.zeros((rows, seq), dtype=bool)
    for i in range(rows):
        start = int(rng.integers(max(1, seq // 8), max(2, seq // 4) + 1))
        stop = int(rng.integers(max(start + 2, (3 * seq) // 4), seq + 1))
        resp[i, start:stop] = True
    return {"input_ids": ids, "response_mask": resp}


def model_config(size: StepSize) -> Any:
    from gategrad.testing.models import TransformerConfig

    return TransformerConfig(
        vocab=size.vocab,
        d_model=size.d_model,
        n_heads=size.n_heads,
        n_layers=size.n_layers,
        d_ff=size.d_ff,
        max_len=size.seq,
    )


_INPUTS: dict[StepSize, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}


def step_inputs(size: StepSize) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Initial float32 parameters and the batch, with the reference model's per-token log-probs
    (``ref_logps``: the reference is the initial policy, computed once in NumPy)."""
    if size not in _INPUTS:
        import gategrad
        from gategrad.testing.models import init_transformer_params
        from gategrad.testing.models import numpy_models as nm

        cfg = model_config(size)
        np_params = nm.params_from_numpy(init_transformer_params(cfg, seed=0), "float32")
        batch = make_batch(size)
        logits = nm.transformer_logits(np_params, batch["input_ids"], cfg)
        ref, _ = gategrad.token_logps(logits, batch["input_ids"], batch["response_mask"])
        batch["ref_logps"] = np.asarray(ref, dtype=np.float32)
        _INPUTS[size] = (np_params, batch)
    return _INPUTS[size]


def dpo_loss(
    fw: str, logits: Any, ids: Any, resp: Any, ref_c: Any, ref_r: Any, variant: Variant, gate: Any
) -> Any:
    """The DPO loss of one step from the policy's logits, gated as ``variant`` says.

    The reference log-probs are precomputed (as TRL's ``precompute_ref_log_probs``): the step
    holds the policy's forward, backward and update only, which makes the gate's share of the
    step as large as it gets.
    """
    import gategrad

    logps, mask = gategrad.token_logps(logits, ids, resp)
    n = logps.shape[0] // 2
    pc, pr, mc, mr = logps[:n], logps[n:], mask[:n], mask[n:]
    if variant.mechanism != "api":
        weight = gategrad.gate_weights(pr, gate, mr).weight[:, None]
        if variant.mechanism == "primitive":
            pr = gategrad.scale_grad(pr, weight)
        else:  # the naive detach mix: the same value up to rounding, gradient g * grad
            pr = weight * pr + gategrad.get_backend(fw).stop_gradient((1.0 - weight) * pr)
        gate = None
    loss, _ = gategrad.preference_loss(
        "sigmoid", pc, pr, ref_c, ref_r, beta=0.1, gate=gate, chosen_mask=mc, rejected_mask=mr
    )
    return loss


# ---------------------------------------------------------------------------------------------
# step runners: built (and warmed up) once, then ``step()`` runs one synchronised training step


class Runner:
    """One variant's model, optimizer and compiled step."""

    note = ""

    def step(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def warmup(self, steps: int) -> None:
        for _ in range(steps):
            self.step()

    def framework_peak(self) -> dict[str, Any]:
        """The framework's own peak-memory counter over one step, where it has one."""
        return {}


_TORCH_MODEL: dict[tuple[StepSize, str], Callable[..., Any]] = {}
#: ``torch.compile`` backend (``--torch-backend``; the smoke run uses ``aot_eager``).
TORCH_BACKEND = ["inductor"]


class TorchRunner(Runner):
    """torch eager, or ``torch.compile``: the model and the loss as two ``fullgraph`` regions.

    The model region is compiled once and shared by every variant (it is the same model); the
    loss region (``token_logps``, the gate, ``preference_loss``) is compiled per variant.
    """

    def __init__(self, mode: str, variant: Variant, size: StepSize, device: str) -> None:
        import torch

        from gategrad.testing.models import torch_models as tm

        self.torch = torch
        self.device = torch.device(device)
        self.variant = variant
        np_params, batch = step_inputs(size)
        cfg = model_config(size)
        params = tm.params_from_numpy(np_params, "float32", device=self.device)
        for p in params.values():
            p.requires_grad_(True)
        self.params = params
        ids = torch.as_tensor(batch["input_ids"], dtype=torch.int64, device=self.device)
        resp = torch.as_tensor(batch["response_mask"], device=self.device)
        ref = torch.as_tensor(batch["ref_logps"], device=self.device)
        n = size.rows // 2
        self.args = (ids, resp, ref[:n].clone(), ref[n:].clone())
        self.opt = torch.optim.AdamW(list(params.values()), lr=1e-4, foreach=True)
        gate = variant.make_gate()

        def model(params: Any, ids: Any) -> Any:
            return tm.transformer_logits(params, ids, cfg)

        def loss(logits: Any, ids: Any, resp: Any, ref_c: Any, ref_r: Any) -> Any:
            return dpo_loss("torch", logits, ids, resp, ref_c, ref_r, variant, gate)

        if mode == "torch-compile":
            dyn = torch._dynamo.config
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(dyn, knob):
                    setattr(dyn, knob, max(64, getattr(dyn, knob)))
            key = (size, str(self.device))
            if key not in _TORCH_MODEL:
                _TORCH_MODEL[key] = torch.compile(
                    model, fullgraph=True, dynamic=False, backend=TORCH_BACKEND[0]
                )
            self.model = _TORCH_MODEL[key]
            self.loss_eager: Callable[..., Any] | None = loss
            self.loss = torch.compile(loss, fullgraph=True, dynamic=False, backend=TORCH_BACKEND[0])
        else:
            self.model, self.loss = model, loss
            self.loss_eager = None

    def step(self) -> None:
        gg = _gategrad()
        old = gg.value_checks()
        gg.value_checks(self.variant.checks)
        try:
            self.opt.zero_grad(set_to_none=True)
            ids, resp, ref_c, ref_r = self.args
            loss = self.loss(self.model(self.params, ids), ids, resp, ref_c, ref_r)
            loss.backward()
            self.opt.step()
            if self.device.type == "cuda":
                self.torch.cuda.synchronize(self.device)
        finally:
            gg.value_checks(old)

    def warmup(self, steps: int) -> None:
        try:
            self.step()
        except Exception as err:  # a graph break under fullgraph=True: fall back, and say so
            if self.loss_eager is None:
                raise
            log(
                f"torch.compile(fullgraph=True) of the loss failed for {self.variant.name}: "
                f"{type(err).__name__}: {str(err)[:200]}; using fullgraph=False"
            )
            self.note = "graph break in the loss: compiled with fullgraph=False"
            self.loss = self.torch.compile(
                self.loss_eager, fullgraph=False, dynamic=False, backend=TORCH_BACKEND[0]
            )
            self.step()
        for _ in range(steps - 1):
            self.step()

    def framework_peak(self) -> dict[str, Any]:
        torch = self.torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            peak = torch.cuda.max_memory_allocated(self.device)
            return {
                "counter": "torch.cuda.max_memory_allocated",
                "increment_mib": (peak - base) / 2**20,
            }
        peak = torch_profiler_peak(self.step)
        if peak is None:
            return {}
        return {"counter": "torch.profiler", "increment_mib": peak / 2**20}


def torch_profiler_peak(fn: Callable[[], Any]) -> int | None:
    """Peak of the CPU bytes allocated and still live inside ``fn``, from ``torch.profiler``.

    The profiler's memory events (allocations positive, frees negative) are summed in time
    order; the maximum of the running sum is the memory ``fn`` needs on top of what was live
    before it.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        cpu = torch.autograd.DeviceType.CPU
        mem = sorted(
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type() == cpu
        )
    except Exception as err:  # the profiler's event API is private and may move
        log(f"torch.profiler memory measurement unavailable: {err!r}")
        return None
    live = peak = 0
    for _, nbytes in mem:
        live += nbytes
        peak = max(peak, live)
    return peak


class JaxRunner(Runner):
    """``jax.jit`` of the whole step (loss, gradient, AdamW), compiled ahead of time."""

    def __init__(self, mode: str, variant: Variant, size: StepSize, device: str) -> None:
        import jax
        import jax.numpy as jnp

        from gategrad.testing.models import jax_models as jm

        self.jax = jax
        np_params, batch = step_inputs(size)
        cfg = model_config(size)
        params = jm.params_from_numpy(np_params, "float32")
        ids = jnp.asarray(batch["input_ids"])
        resp = jnp.asarray(batch["response_mask"])
        ref = jnp.asarray(batch["ref_logps"])
        n = size.rows // 2
        self.args = (ids, resp, ref[:n], ref[n:])
        gate = variant.make_gate()
        lr, b1, b2, eps, wd = 1e-4, 0.9, 0.999, 1e-8, 0.01

        def loss_fn(params: Any, ids: Any, resp: Any, ref_c: Any, ref_r: Any) -> Any:
            logits = jm.transformer_logits(params, ids, cfg)
            return dpo_loss("jax", logits, ids, resp, ref_c, ref_r, variant, gate)

        def step(state: Any, ids: Any, resp: Any, ref_c: Any, ref_r: Any) -> Any:
            params, mu, nu, count = state
            loss, grads = jax.value_and_grad(loss_fn)(params, ids, resp, ref_c, ref_r)
            count = count + 1
            tmap = jax.tree_util.tree_map
            mu = tmap(lambda m, g: b1 * m + (1 - b1) * g, mu, grads)
            nu = tmap(lambda v, g: b2 * v + (1 - b2) * g * g, nu, grads)
            c1, c2 = 1 - b1**count, 1 - b2**count
            params = tmap(
                lambda p, m, v: p - lr * ((m / c1) / (jnp.sqrt(v / c2) + eps) + wd * p),
                params,
                mu,
                nu,
            )
            return (params, mu, nu, count), loss

        mu, nu = (jax.tree_util.tree_map(jnp.zeros_like, params) for _ in range(2))
        self.state = (params, mu, nu, jnp.zeros((), jnp.float32))
        self.compiled = jax.jit(step, donate_argnums=(0,)).lower(self.state, *self.args).compile()

    def step(self) -> None:
        self.state, loss = self.compiled(self.state, *self.args)
        self.jax.block_until_ready((self.state, loss))

    def framework_peak(self) -> dict[str, Any]:
        ma = self.compiled.memory_analysis()
        if ma is None:
            return {}
        out = {"counter": "XLA memory_analysis", "increment_mib": ma.temp_size_in_bytes / 2**20}
        stats = self.jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
        return out


class MlxRunner(Runner):
    """``mx.compile`` of the whole step, closing over parameters and optimizer state."""

    def __init__(self, mode: str, variant: Variant, size: StepSize, device: str) -> None:
        import mlx.core as mx
        import mlx.optimizers as optim

        from gategrad.testing.models import mlx_models as mm

        self.mx = mx
        np_params, batch = step_inputs(size)
        cfg = model_config(size)
        params = mm.params_from_numpy(np_params, "float32")
        ids = mx.array(batch["input_ids"])
        resp = mx.array(batch["response_mask"])
        ref = mx.array(batch["ref_logps"])
        n = size.rows // 2
        self.args = (ids, resp, ref[:n], ref[n:])
        mx.eval(*self.args)
        gate = variant.make_gate()
        opt = optim.AdamW(learning_rate=1e-4)
        opt.init(params)

        def loss_fn(params: Any, ids: Any, resp: Any, ref_c: Any, ref_r: Any) -> Any:
            logits = mm.transformer_logits(params, ids, cfg)
            return dpo_loss("mlx", logits, ids, resp, ref_c, ref_r, variant, gate)

        grad_fn = mx.value_and_grad(loss_fn)

        def step(ids: Any, resp: Any, ref_c: Any, ref_r: Any) -> Any:
            loss, grads = grad_fn(params, ids, resp, ref_c, ref_r)
            params.update(opt.apply_gradients(grads, params))
            return loss

        self.state = [params, opt.state]
        self.compiled = mx.compile(step, inputs=self.state, outputs=self.state)

    def step(self) -> None:
        loss = self.compiled(*self.args)
        self.mx.eval(loss, self.state)

    def framework_peak(self) -> dict[str, Any]:
        mx = self.mx
        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        self.step()
        return {
            "counter": "mx.get_peak_memory",
            "increment_mib": (mx.get_peak_memory() - base) / 2**20,
        }


RUNNERS: dict[str, type[Runner]] = {"torch": TorchRunner, "jax": JaxRunner, "mlx": MlxRunner}


def _gategrad() -> Any:
    import gategrad

    return gategrad


def build_runner(mode: str, variant: Variant, size: StepSize, device: str) -> Runner:
    return RUNNERS[STEP_MODES[mode][0]](mode, variant, size, device)  # type: ignore[call-arg]


# ---------------------------------------------------------------------------------------------
# timing: interleaved repetitions


def interleave(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Seconds per call of each function; every repetition calls each once, in rotated order.

    The garbage collector is paused while timing (collected before), as in ``timeit``.
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def plan_reps(seconds_per_rep: float, budget_s: float, min_reps: int, max_reps: int) -> int:
    if seconds_per_rep <= 0:
        return max_reps
    return int(max(min_reps, min(max_reps, budget_s // seconds_per_rep)))


def time_ratios(times: dict[str, list[float]], name: str, base: str) -> dict[str, Any]:
    """Statistics of the per-repetition ratio, plus the ratio of the fastest calls
    (``min_over_min``: on a busy machine the fastest call is the least disturbed one)."""
    out = ratio_stats([a / b for a, b in zip(times[name], times[base], strict=True)])
    out["min_over_min"] = min(times[name]) / min(times[base])
    return out


# ---------------------------------------------------------------------------------------------
# memory children: one subprocess per measurement


def start_children(specs: dict[str, dict[str, Any]], timeout_s: float) -> Callable[[], Any]:
    """Start the children, two at a time (RSS is per process: they do not disturb each other's
    measurement); the returned function waits for their results. The full run waits at once,
    so that nothing is timed meanwhile; the smoke run lets them overlap its (meaningless)
    timings."""
    from concurrent.futures import ThreadPoolExecutor

    if not specs:
        return dict
    workers = max(1, min(2, os.cpu_count() or 1, len(specs)))
    pool = ThreadPoolExecutor(max_workers=workers)
    futures = {k: pool.submit(run_child, spec, timeout_s) for k, spec in specs.items()}

    def results() -> dict[str, Any]:
        try:
            return {k: f.result() for k, f in futures.items()}
        finally:
            pool.shutdown()

    return results


def run_children(specs: dict[str, dict[str, Any]], timeout_s: float) -> dict[str, Any]:
    return dict(start_children(specs, timeout_s)())


def run_child(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run ``overhead.py --_child spec`` and return its result (``error`` on failure)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"child timed out after {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return dict(json.loads(line[len(RESULT_TAG) :]))
    tail = (proc.stderr or "").strip().splitlines()[-5:]
    return {"error": f"child exited with {proc.returncode}: " + " | ".join(tail)}


def child_main(spec: dict[str, Any]) -> None:
    """Entry point of a memory child: measure, print one tagged JSON line."""
    try:
        if spec["section"] == "step":
            size = StepSize(**spec["size"])
            TORCH_BACKEND[0] = spec.get("torch_backend", "inductor")
            runner = build_runner(spec["mode"], ALL_VARIANTS[spec["variant"]], size, spec["device"])
            runner.warmup(spec["warmup"])
            result = memory_phase(runner.step, spec["steps"])
        else:
            data = logps_inputs(spec["rows"], spec["seq"], spec["vocab"])
            case = LogpsCase(spec["fw"], spec["impl"], data, spec["pass"], spec["device"])
            del data
            for _ in range(spec["warmup"]):
                case.run()
            result = memory_phase(case.run, spec["steps"])
    except Exception as err:
        traceback.print_exc()
        result = {"error": repr(err)}
    print(RESULT_TAG + json.dumps(result), flush=True)


def memory_phase(run: Callable[[], None], steps: int) -> dict[str, Any]:
    """Peak RSS: over the whole process (``ru_maxrss``) and over ``steps`` calls of ``run``
    (the high-water mark reset just before them; Linux only)."""
    gc.collect()
    before = read_status().get("VmRSS")
    reset = reset_hwm()
    for _ in range(steps):
        run()
    status = read_status()
    out: dict[str, Any] = {"maxrss_mib": maxrss_mib()}
    if reset and before is not None and "VmHWM" in status:
        out["steady_hwm_mib"] = status["VmHWM"] / 1024.0
        out["steady_increment_mib"] = (status["VmHWM"] - before) / 1024.0
    return out


def mem_ratio(a: float | None, b: float | None) -> dict[str, float | None] | None:
    if a is None or b is None:
        return None
    # A ratio of two amounts below 1 MiB (XLA's temporaries of a fused kernel, say) says
    # nothing: it is None then, and the difference in MiB is what counts.
    ratio = a / b if b >= 1.0 else (1.0 if a == b else None)
    return {"ratio": ratio, "delta_mib": a - b}


# ---------------------------------------------------------------------------------------------
# sections 1 and 3: the training step


@dataclasses.dataclass
class Config:
    smoke: bool
    device: str
    out: str
    step_size: StepSize
    mlx_size: StepSize
    logps_size: LogpsSize
    warmup: int
    min_reps: int
    max_reps: int
    step_budget_s: float
    logps_budget_s: float
    gate_cost_budget_s: float
    rss_modes: tuple[str, ...]
    torch_backend: str
    child_timeout_s: float
    modes: tuple[str, ...]
    sections: tuple[str, ...]
    clock: Clock


def step_variants(cfg: Config, mode: str) -> tuple[Variant, ...]:
    variants = STEP_MODES[mode][1]
    if cfg.smoke and mode in ("torch-compile", "jax-jit"):
        variants = tuple(v for v in variants if v.name in SMOKE_COMPILED)
    return variants


def section_step(cfg: Config) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode in cfg.modes:
        fw = STEP_MODES[mode][0]
        if not framework_available(fw):
            results[mode] = {"skipped": f"{fw} is not installed"}
            log(f"step/{mode}: skipped ({fw} is not installed)")
            continue
        try:
            results[mode] = step_mode(cfg, mode, step_variants(cfg, mode))
        except Exception as err:
            traceback.print_exc()
            results[mode] = {"error": f"{type(err).__name__}: {err}"[:500]}
            log(f"step/{mode}: failed: {err!r}")
        gc.collect()
    return results


def mode_size(cfg: Config, mode: str) -> StepSize:
    return cfg.mlx_size if mode == "mlx-compile" else cfg.step_size


def step_mode(cfg: Config, mode: str, variants: tuple[Variant, ...]) -> dict[str, Any]:
    fw = STEP_MODES[mode][0]
    device = cfg.device if fw == "torch" else "default"
    size = mode_size(cfg, mode)
    t0 = time.perf_counter()
    specs = {}
    if mode in cfg.rss_modes and fw == "torch" and cfg.device == "cpu":
        specs = {
            v.name: {
                "section": "step",
                "mode": mode,
                "variant": v.name,
                "device": cfg.device,
                "size": dataclasses.asdict(size),
                "torch_backend": cfg.torch_backend,
                "warmup": 2,
                "steps": 2,
            }
            for v in variants
            # (the mechanisms' memory comes from the framework counter)
            if v.checks and v.mechanism == "api" and (not cfg.smoke or v.name in SMOKE_MEMORY[:2])
        }
    early = start_children(specs, cfg.child_timeout_s) if cfg.smoke else None
    runners: dict[str, Runner] = {}
    setup: dict[str, float] = {}
    for v in variants:
        log(f"step/{mode}: building and warming up {v.name}")
        s0 = time.perf_counter()
        runner = build_runner(mode, v, size, device)
        runner.warmup(cfg.warmup)
        setup[v.name] = time.perf_counter() - s0
        runners[v.name] = runner
    per_rep = 0.0
    for runner in runners.values():  # one more step each, to plan the repetitions
        s0 = time.perf_counter()
        runner.step()
        per_rep += time.perf_counter() - s0
    budget = cfg.clock.budget(cfg.step_budget_s)
    reps = plan_reps(per_rep, budget, cfg.min_reps, cfg.max_reps)
    log(
        f"step/{mode}: {reps} interleaved repetitions of {len(runners)} variants (~{per_rep:.2f}"
        f" s per repetition; set-up took {time.perf_counter() - t0:.0f} s)"
    )
    times = interleave({n: r.step for n, r in runners.items()}, reps)
    rows: dict[str, Any] = {}
    for v in variants:
        row: dict[str, Any] = {
            "median_ms": 1e3 * float(np.median(times[v.name])),
            "setup_s": setup[v.name],
        }
        if v.baseline is not None:
            row["baseline"] = v.baseline
            row["time_ratio"] = time_ratios(times, v.name, v.baseline)
        if runners[v.name].note:
            row["note"] = runners[v.name].note
        # The value checks allocate (B, T) booleans at most: not measured apart. The smoke run
        # measures two variants (the profiler's start-up costs seconds).
        if v.checks and (not cfg.smoke or v.name in SMOKE_MEMORY):
            row["framework_memory"] = runners[v.name].framework_peak()
        rows[v.name] = row
    mech = {}
    if "primitive" in times and "detach-mix" in times:
        mech["detach_over_primitive"] = time_ratios(times, "detach-mix", "primitive")
    del runners
    gc.collect()
    if specs:
        log(f"step/{mode}: {len(specs)} RSS subprocesses")
        done = early() if early is not None else run_children(specs, cfg.child_timeout_s)
        for name, result in done.items():
            rows[name]["rss"] = result
    for v in variants:
        if v.baseline is None or not v.checks:
            continue
        row, base = rows[v.name], rows[v.baseline]
        mem = {}
        for src, key in (
            ("framework_memory", "increment_mib"),
            ("rss", "maxrss_mib"),
            ("rss", "steady_hwm_mib"),
        ):
            r = mem_ratio((row.get(src) or {}).get(key), (base.get(src) or {}).get(key))
            if r is not None:
                mem[f"{src}.{key}"] = r
        row["memory_ratio"] = mem
    return {
        "framework": fw,
        "size": dataclasses.asdict(size),
        "reps": reps,
        "variants": rows,
        "mechanism": mech,
    }


def mechanism_section(step: dict[str, Any]) -> dict[str, Any]:
    """Section 3 from the step runs: primitive and detach mix against ungated and each other."""
    out: dict[str, Any] = {}
    for mode, res in step.items():
        rows = res.get("variants", {})
        if "primitive" not in rows or "detach-mix" not in rows:
            if "detach-mix" in rows:
                out[mode] = {"detach-mix": rows["detach-mix"]}
            continue
        out[mode] = {
            "primitive": rows["primitive"],
            "detach-mix": rows["detach-mix"],
            "detach_over_primitive": res["mechanism"].get("detach_over_primitive"),
        }
    return out


# ---------------------------------------------------------------------------------------------
# the gate's own cost: the loss alone (forward and backward from the per-token log-probs)

#: (mode, framework, value checks) of the loss-only measurement.
GATE_COST_MODES = (
    ("torch-eager", "torch", True),
    ("torch-eager [checks off]", "torch", False),
    ("jax-jit", "jax", True),
    ("mlx-compile", "mlx", True),
)


def loss_only_fn(fw: str, size: StepSize, variant: Variant, checks: bool) -> Callable[[], None]:
    """The DPO loss and its gradient from per-token log-probs ``(B, T - 1)``: the step minus
    the model, where everything the gate adds happens."""
    import gategrad

    rng = np.random.default_rng(1)
    shape = (size.rows, size.seq - 1)
    lp_np = (rng.standard_normal(shape) - 9.0).astype(np.float32)
    ref_np = (lp_np + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    mask_np = make_batch(size)["response_mask"][:, 1:]
    n = size.rows // 2
    gate = variant.make_gate()

    def loss(lp: Any, ref: Any, mask: Any) -> Any:
        value, _ = gategrad.preference_loss(
            "sigmoid",
            lp[:n],
            lp[n:],
            ref[:n],
            ref[n:],
            beta=0.1,
            gate=gate,
            chosen_mask=mask[:n],
            rejected_mask=mask[n:],
        )
        return value

    if fw == "torch":
        import torch

        lp = torch.as_tensor(lp_np).requires_grad_(True)
        ref, mask = torch.as_tensor(ref_np), torch.as_tensor(mask_np)

        def run() -> None:
            old = gategrad.value_checks()
            gategrad.value_checks(checks)
            try:
                loss(lp, ref, mask).backward()
                lp.grad = None
            finally:
                gategrad.value_checks(old)

        return run
    if fw == "jax":
        import jax
        import jax.numpy as jnp

        args = (jnp.asarray(lp_np), jnp.asarray(ref_np), jnp.asarray(mask_np))
        compiled = jax.jit(jax.grad(loss)).lower(*args).compile()
        return lambda: compiled(*args).block_until_ready()
    import mlx.core as mx

    args = (mx.array(lp_np), mx.array(ref_np), mx.array(mask_np))
    mx.eval(*args)
    compiled = mx.compile(mx.grad(loss))
    return lambda: mx.eval(compiled(*args))


def section_gate_cost(cfg: Config, step: dict[str, Any]) -> dict[str, Any]:
    """Microseconds the gate adds to the loss, and the step ratio that implies."""
    results: dict[str, Any] = {}
    for mode, fw, checks in GATE_COST_MODES:
        if not framework_available(fw):
            results[mode] = {"skipped": f"{fw} is not installed"}
            continue
        try:
            size = cfg.mlx_size if fw == "mlx" else cfg.step_size
            variants: tuple[Variant, ...] = (UNGATED, *GATED)
            if cfg.smoke and fw == "jax":  # two compilations only
                variants = tuple(v for v in variants if v.name in SMOKE_COMPILED)
            fns = {v.name: loss_only_fn(fw, size, v, checks) for v in variants}
            for fn in fns.values():
                for _ in range(3 * cfg.warmup):
                    fn()
            per_rep = 0.0
            for fn in fns.values():
                s0 = time.perf_counter()
                fn()
                per_rep += time.perf_counter() - s0
            reps = plan_reps(per_rep, cfg.gate_cost_budget_s, cfg.min_reps, 20 * cfg.max_reps)
            times = interleave(fns, reps)
            step_mode_name = "torch-eager" if fw == "torch" else mode
            base_row = step.get(step_mode_name, {}).get("variants", {})
            base_name = "ungated" if checks else "ungated [checks off]"
            step_ms = (base_row.get(base_name) or {}).get("median_ms")
            rows: dict[str, Any] = {
                "ungated": {"median_us": 1e6 * float(np.median(times["ungated"]))}
            }
            for v in variants[1:]:
                deltas = [
                    1e6 * (a - b) for a, b in zip(times[v.name], times["ungated"], strict=True)
                ]
                delta = float(np.median(deltas))
                rows[v.name] = {
                    "median_us": 1e6 * float(np.median(times[v.name])),
                    "added_us": delta,
                    "added_us_iqr": [float(x) for x in np.percentile(deltas, [25, 75])],
                }
                if step_ms:
                    rows[v.name]["implied_step_ratio"] = 1.0 + delta / (1e3 * step_ms)
            results[mode] = {
                "reps": reps,
                "size": dataclasses.asdict(size),
                "step_ms": step_ms,
                "variants": rows,
            }
            log(f"gate cost/{mode}: {reps} repetitions")
        except Exception as err:
            traceback.print_exc()
            results[mode] = {"error": f"{type(err).__name__}: {err}"[:500]}
            log(f"gate cost/{mode}: failed: {err!r}")
    return results


# ---------------------------------------------------------------------------------------------
# section 2: per-token log-probs


def logps_inputs(rows: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "logits": rng.standard_normal((rows, seq, vocab), dtype=np.float32) * 2.0,
        "labels": rng.integers(0, vocab, size=(rows, seq)).astype(np.int64),
        "mask": rng.random((rows, seq)) < 0.9,
        "cot": rng.standard_normal((rows, seq), dtype=np.float32),
    }


def torch_logps_fn(impl: str) -> Callable[[Any, Any, Any], Any]:
    """``(logits, labels, mask) -> (B, T)`` per-token log-probs, 0 outside the mask."""
    import torch

    import gategrad

    if impl == "token_logps":
        return lambda x, y, m: gategrad.token_logps(x, y, m, shift=False)[0]
    if impl == "log_softmax+gather":

        def plain(x: Any, y: Any, m: Any) -> Any:
            picked = x.log_softmax(-1).gather(-1, y[..., None])[..., 0]
            return torch.where(m, picked, torch.zeros((), dtype=picked.dtype, device=x.device))

        return plain
    from trl.trainer.utils import selective_log_softmax

    def trl(x: Any, y: Any, m: Any) -> Any:
        picked = selective_log_softmax(x, y)
        return torch.where(m, picked, torch.zeros((), dtype=picked.dtype, device=x.device))

    return trl


class LogpsCase:
    """One (framework, implementation, pass) callable, synchronised, with its memory counter."""

    def __init__(
        self, fw: str, impl: str, data: dict[str, np.ndarray], pas: str, device: str
    ) -> None:
        self.fw, self.impl, self.pas = fw, impl, pas
        self.smoke = False
        self.run: Callable[[], None]
        getattr(self, f"_build_{fw}")(data, device)

    def _build_torch(self, data: dict[str, np.ndarray], device: str) -> None:
        import torch

        dev = self.device = torch.device(device)
        x = torch.as_tensor(data["logits"], device=dev)
        y = torch.as_tensor(data["labels"], device=dev)
        m = torch.as_tensor(data["mask"], device=dev)
        cot = torch.as_tensor(data["cot"], device=dev)
        fn = torch_logps_fn(self.impl)

        def sync() -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        if self.pas == "fwd":  # as for the reference model: no graph

            def run() -> None:
                with torch.no_grad():
                    fn(x, y, m)
                sync()

        else:
            x.requires_grad_(True)

            def run() -> None:
                x.grad = None
                (fn(x, y, m) * cot).sum().backward()
                sync()

        self.run = run

    def _build_jax(self, data: dict[str, np.ndarray], device: str) -> None:
        import jax
        import jax.numpy as jnp

        import gategrad

        x = jnp.asarray(data["logits"])
        y = jnp.asarray(data["labels"].astype(np.int32))
        m = jnp.asarray(data["mask"])
        cot = jnp.asarray(data["cot"])
        if self.impl == "token_logps":

            def f(x: Any) -> Any:
                return gategrad.token_logps(x, y, m, shift=False)[0]

        else:

            def f(x: Any) -> Any:
                lsm = jax.nn.log_softmax(x, axis=-1)
                return jnp.where(m, jnp.take_along_axis(lsm, y[..., None], axis=-1)[..., 0], 0.0)

        g = f if self.pas == "fwd" else jax.grad(lambda x: jnp.sum(f(x) * cot))
        self.compiled = jax.jit(g).lower(x).compile()
        self.run = lambda: self.compiled(x).block_until_ready()

    def _build_mlx(self, data: dict[str, np.ndarray], device: str) -> None:
        import mlx.core as mx

        import gategrad

        x = mx.array(data["logits"])
        y = mx.array(data["labels"].astype(np.int32))
        m = mx.array(data["mask"])
        cot = mx.array(data["cot"])
        mx.eval(x, y, m, cot)
        if self.impl == "token_logps":

            def f(x: Any) -> Any:
                return gategrad.token_logps(x, y, m, shift=False)[0]

        else:

            def f(x: Any) -> Any:
                lsm = x - mx.logsumexp(x, axis=-1, keepdims=True)
                return mx.where(m, mx.take_along_axis(lsm, y[..., None], axis=-1)[..., 0], 0.0)

        g = f if self.pas == "fwd" else mx.grad(lambda x: mx.sum(f(x) * cot))
        compiled = mx.compile(g)
        self.run = lambda: mx.eval(compiled(x))

    def framework_peak(self) -> dict[str, Any]:
        """Peak memory of one call on top of the inputs, from the framework's counter."""
        if self.fw == "torch":
            import torch

            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                self.run()
                peak = torch.cuda.max_memory_allocated(self.device) - base
                return {"counter": "torch.cuda.max_memory_allocated", "increment_mib": peak / 2**20}
            # the least of two: the first profiled call may count allocator warm-up
            tries = 1 if self.smoke else 2
            peaks = [
                p for p in (torch_profiler_peak(self.run) for _ in range(tries)) if p is not None
            ]
            if not peaks:
                return {}
            return {"counter": "torch.profiler", "increment_mib": min(peaks) / 2**20}
        if self.fw == "jax":
            ma = self.compiled.memory_analysis()
            if ma is None:
                return {}
            return {
                "counter": "XLA memory_analysis",
                "increment_mib": ma.temp_size_in_bytes / 2**20,
            }
        import mlx.core as mx

        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        self.run()
        return {
            "counter": "mx.get_peak_memory",
            "increment_mib": (mx.get_peak_memory() - base) / 2**20,
        }


def section_logps(cfg: Config) -> dict[str, Any]:
    results: dict[str, Any] = {}
    size = cfg.logps_size
    for fw, impls in LOGPS_IMPLS.items():
        if not framework_available(fw):
            results[fw] = {"skipped": f"{fw} is not installed"}
            continue
        if fw == "torch" and not have("trl"):
            impls = impls[:2]
            log("logps: TRL is not installed; no comparison with selective_log_softmax")
        for vocab in size.vocabs:
            data = logps_inputs(size.rows, size.seq, vocab)
            for pas in PASSES[1:] if cfg.smoke else PASSES:
                key = f"{fw}/V={vocab}/{pas}"
                try:
                    results[key] = logps_group(cfg, fw, impls, data, pas, vocab)
                except Exception as err:
                    traceback.print_exc()
                    results[key] = {"error": f"{type(err).__name__}: {err}"[:500]}
                    log(f"logps/{key}: failed: {err!r}")
                gc.collect()
            del data
    return results


def logps_group(
    cfg: Config, fw: str, impls: tuple[str, ...], data: dict[str, np.ndarray], pas: str, vocab: int
) -> dict[str, Any]:
    device = cfg.device if fw == "torch" else "default"
    cases = {impl: LogpsCase(fw, impl, data, pas, device) for impl in impls}
    for case in cases.values():
        case.smoke = cfg.smoke
    for case in cases.values():
        for _ in range(cfg.warmup):
            case.run()
    per_rep = 0.0
    for case in cases.values():
        s0 = time.perf_counter()
        case.run()
        per_rep += time.perf_counter() - s0
    reps = plan_reps(per_rep, cfg.clock.budget(cfg.logps_budget_s), cfg.min_reps, cfg.max_reps)
    log(f"logps/{fw}/V={vocab}/{pas}: {reps} repetitions (~{per_rep:.2f} s each)")
    times = interleave({n: c.run for n, c in cases.items()}, reps)
    rows: dict[str, Any] = {}
    for impl in impls:
        rows[impl] = {
            "median_ms": 1e3 * float(np.median(times[impl])),
            "framework_memory": cases[impl].framework_peak(),
        }
    del cases
    gc.collect()
    rss_v = cfg.logps_size.vocabs[-1]
    if "logps" in cfg.rss_modes and fw == "torch" and cfg.device == "cpu" and vocab == rss_v:
        specs = {
            impl: {
                "section": "logps",
                "fw": fw,
                "impl": impl,
                "pass": pas,
                "device": cfg.device,
                "rows": int(data["labels"].shape[0]),
                "seq": int(data["labels"].shape[1]),
                "vocab": vocab,
                "warmup": 1,
                "steps": 2,
            }
            for impl in impls[:2]  # TRL's memory: from the profiler (an RSS child costs ~10 s)
        }
        log(f"logps/{fw}/V={vocab}/{pas}: {len(specs)} RSS subprocesses")
        for impl, result in run_children(specs, cfg.child_timeout_s).items():
            rows[impl]["rss"] = result
    ours = rows["token_logps"]
    for impl in impls[1:]:
        row = rows[impl]
        row["token_logps_time_ratio"] = time_ratios(times, "token_logps", impl)
        mem = {}
        for src, key in (("framework_memory", "increment_mib"), ("rss", "steady_increment_mib")):
            r = mem_ratio((ours.get(src) or {}).get(key), (row.get(src) or {}).get(key))
            if r is not None:
                mem[f"{src}.{key}"] = r
        row["token_logps_memory_ratio"] = mem
    return {"reps": reps, "shape": list(data["logits"].shape), "impls": rows}


# ---------------------------------------------------------------------------------------------
# machine description and report


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        keep = (
            "Model name",
            "CPU(s)",
            "Thread(s) per core",
            "Core(s) per socket",
            "L2 cache",
            "L3 cache",
            "Hypervisor vendor",
        )
        info["lscpu"] = {
            k.strip(): v.strip()
            for k, v in (line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
            if k.strip() in keep
        }
    with contextlib.suppress(OSError):
        info["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    from importlib import metadata

    for mod in ("gategrad", "torch", "jax", "jaxlib", "trl"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            info[mod] = metadata.version(mod)
    if framework_available("mlx"):
        import mlx.core as mx

        info["mlx"] = str(getattr(mx, "__version__", "?"))
        info["mlx_device"] = str(mx.default_device())
    if have("jax"):
        import jax

        info["jax_backend"] = jax.default_backend()
    if have("torch"):
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
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


def render(report: dict[str, Any]) -> str:
    meta = report["meta"]
    m = meta["machine"]
    cpu = m.get("lscpu", {}).get("Model name") or platform.processor() or "?"
    lines = [
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
        "",
        "Time ratios: **median** [interquartile range] (min-max) of the per-repetition ratio "
        "(variants interleaved), then the ratio of the fastest calls. Memory ratios: gated / "
        "ungated peak (difference in MiB; '-' where both are below 1 MiB).",
        "",
    ]
    if "step" in report:
        lines += [
            "## 1. DPO training step, gated / ungated",
            "",
            "Forward, backward and AdamW update; float32; reference log-probs precomputed. "
            "Sizes: "
            + "; ".join(
                f"{mode}: {StepSize(**res['size']).describe()}"
                for mode, res in report["step"].items()
                if "size" in res
            )
            + ".",
            "",
            "| mode | variant | step ms | time ratio | framework peak ratio | RSS ratio (whole "
            "child) | RSS ratio (steps) |",
            "|---|---|---:|---|---|---|---|",
        ]
        for mode, res in report["step"].items():
            if "variants" not in res:
                lines.append(f"| {mode} | {res.get('skipped') or res.get('error')} | | | | | |")
                continue
            for name, row in res["variants"].items():
                if name in ("primitive", "detach-mix"):
                    continue
                mr = row.get("memory_ratio", {})
                counter = (row.get("framework_memory") or {}).get("counter")
                fwm = mr.get("framework_memory.increment_mib")
                ratio = fmt_ratio(row.get("time_ratio")) if row.get("baseline") else "baseline"
                note = f" ({row['note']})" if row.get("note") else ""
                lines.append(
                    f"| {mode} | {name}{note} | {row['median_ms']:.1f} | {ratio} | "
                    + (
                        f"{fmt_mem(fwm)} {counter}"
                        if fwm
                        else ("-" if not row.get("baseline") else "n/a")
                    )
                    + f" | {fmt_mem(mr.get('rss.maxrss_mib'))} | "
                    f"{fmt_mem(mr.get('rss.steady_hwm_mib'))} |"
                )
        lines.append("")
    if report.get("gate_cost"):
        lines += [
            "## 1b. The gate's own cost: the loss alone, gated - ungated",
            "",
            "Forward and backward of `preference_loss` from the per-token log-probs (the step "
            "without the model), interleaved. *Implied step ratio*: 1 + (added time) / (ungated "
            "step time of section 1), what the gate costs the step without the noise of timing "
            "a whole step.",
            "",
            "| mode | ungated loss µs | variant | added µs [IQR] | implied step ratio |",
            "|---|---:|---|---|---|",
        ]
        for mode, res in report["gate_cost"].items():
            if "variants" not in res:
                lines.append(f"| {mode} | {res.get('skipped') or res.get('error')} | | | |")
                continue
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
        lines.append("")
    if report.get("mechanism"):
        lines += [
            "## 3. Gate mechanism: custom-gradient primitive vs detach mix",
            "",
            "Both compute the `example/seq` gate weights with `gate_weights`, then apply them to "
            "the rejected per-token log-probs, then call the ungated loss.",
            "",
            "| mode | primitive / ungated | detach-mix / ungated | detach-mix / primitive "
            "| memory: primitive | memory: detach-mix |",
            "|---|---|---|---|---|---|",
        ]
        for mode, res in report["mechanism"].items():
            p, d = res.get("primitive", {}), res.get("detach-mix", {})

            def mem(row: dict[str, Any]) -> str:
                mr = row.get("memory_ratio", {})
                return fmt_mem(mr.get("framework_memory.increment_mib") or mr.get("rss.maxrss_mib"))

            lines.append(
                f"| {mode} | {fmt_ratio(p.get('time_ratio'))} | {fmt_ratio(d.get('time_ratio'))} "
                f"| {fmt_ratio(res.get('detach_over_primitive'))} | {mem(p)} | {mem(d)} |"
            )
        lines.append("")
    if "logps" in report:
        s = meta["logps_size"]
        lines += [
            "## 2. Per-token log-probs: token_logps / other implementation",
            "",
            f"float32 logits ({s['rows']}, {s['seq']}, V), aligned labels, a mask. `fwd`: no "
            "gradient (the reference model's case); `fwd+bwd`: the gradient of a weighted sum. "
            "Memory: the peak allocated on top of the inputs (a ratio below 1: token_logps needs "
            "less).",
            "",
            "| backend | V | pass | other | token_logps ms | other ms | time ratio | memory "
            "ratio (framework counter) | memory ratio (RSS, steps) |",
            "|---|---:|---|---|---:|---:|---|---|---|",
        ]
        for key, res in report["logps"].items():
            if "impls" not in res:
                lines.append(f"| {key} | {res.get('skipped') or res.get('error')} | | | | | | | |")
                continue
            fw, v, pas = key.split("/")
            ours = res["impls"]["token_logps"]
            for impl, row in res["impls"].items():
                if impl == "token_logps":
                    continue
                mr = row.get("token_logps_memory_ratio", {})
                lines.append(
                    f"| {fw} ({LOGPS_MODE[fw]}) | {v[2:]} | {pas} | {impl} | "
                    f"{ours['median_ms']:.1f} | {row['median_ms']:.1f} | "
                    f"{fmt_ratio(row.get('token_logps_time_ratio'))} | "
                    f"{fmt_mem(mr.get('framework_memory.increment_mib'))} | "
                    f"{fmt_mem(mr.get('rss.steady_increment_mib'))} |"
                )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# main


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
        "--out",
        default=os.path.join(HERE, "results"),
        help="folder for overhead.json and overhead.md",
    )
    p.add_argument(
        "--sections",
        default="step,logps",
        help="comma-separated: step (sections 1 and 3), logps (section 2)",
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
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: torch sees no CUDA device")
    smoke = args.smoke
    step = STEP_SMOKE if smoke else STEP_FULL
    overrides = {
        k: v
        for k, v in (("n_layers", args.layers), ("seq", args.seq), ("vocab", args.vocab))
        if v is not None
    }
    step = dataclasses.replace(step, **overrides)
    mlx_size = STEP_SMOKE if smoke else STEP_MLX_CPU
    if not smoke and framework_available("mlx"):
        import mlx.core as mx

        if mx.default_device().type == mx.DeviceType.gpu:
            mlx_size = step
    n_logps = 3 * 2 * len((LOGPS_SMOKE if smoke else LOGPS_FULL).vocabs)
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
        logps_size=LOGPS_SMOKE if smoke else LOGPS_FULL,
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
    import warnings

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
    if args._child is not None:
        with quiet_warnings():
            child_main(json.loads(args._child))
        return {}
    if args.smoke:
        smoke_environment()
    # on a GPU, JAX would otherwise take 75% of its memory at start-up, leaving torch none
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cfg = make_config(args)
    TORCH_BACKEND[0] = cfg.torch_backend
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
        }
    }
    with quiet_warnings():
        if "step" in cfg.sections:
            report["step"] = section_step(cfg)
            report["mechanism"] = mechanism_section(report["step"])
            report["gate_cost"] = section_gate_cost(cfg, report["step"])
        if "logps" in cfg.sections:
            report["logps"] = section_logps(cfg)
    report["meta"]["total_s"] = cfg.clock.elapsed()
    with contextlib.suppress(OSError):
        report["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    md = render(report)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "overhead.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(cfg.out, "overhead.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    log(f"wrote {cfg.out}/overhead.json and overhead.md; total {report['meta']['total_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
