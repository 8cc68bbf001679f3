"""What the overhead benchmark measures: sizes, gate variants, modes and the run's settings."""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from typing import Any

import gategrad

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

    def make_gate(self) -> gategrad.Gate | None:
        return None if self.gate is None else gategrad.Gate(**self.gate)


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
#: ``--smoke`` keeps the slowly compiling modes to two compilations each (MLX compiles fast).
SMOKE_COMPILED = ("ungated", "example/q10")
#: ``--smoke`` measures memory for these only.
SMOKE_MEMORY = ("ungated", "example/seq", "example/q10")

# ---------------------------------------------------------------------------------------------
# modes


@dataclasses.dataclass(frozen=True)
class StepMode:
    """One way of running the training step.

    ``compile``: ``None`` (eager), ``'regions'`` (the model and the loss compiled apart, the
    gradient and the update eager: ``torch.compile``'s usual use) or ``'step'`` (the whole step,
    gradient and update included, as one compiled function). ``slow_compile``: ``--smoke``
    keeps :data:`SMOKE_COMPILED` only. ``cpu_size``: the model size on a CPU when it is not
    the common one.
    """

    name: str
    framework: str
    variants: tuple[Variant, ...]
    compile: str | None = None
    slow_compile: bool = False
    cpu_size: StepSize | None = None


#: Step modes, in run order.
STEP_MODES: dict[str, StepMode] = {
    m.name: m
    for m in (
        StepMode("torch-eager", "torch", (UNGATED, *GATED, *NOCHECKS, *MECHANISMS)),
        StepMode("torch-compile", "torch", (UNGATED, *GATED, *MECHANISMS), "regions", True),
        StepMode("jax-jit", "jax", (UNGATED, *GATED, *MECHANISMS), "step", True),
        StepMode(
            "mlx-compile", "mlx", (UNGATED, *GATED, *MECHANISMS), "step", cpu_size=STEP_MLX_CPU
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class GateCostMode:
    """One row group of section 1b: the loss alone, in ``step_mode``'s framework and size."""

    name: str
    step_mode: str
    checks: bool = True


GATE_COST_MODES = (
    GateCostMode("torch-eager", "torch-eager"),
    GateCostMode("torch-eager [checks off]", "torch-eager", checks=False),
    GateCostMode("jax-jit", "jax-jit"),
    GateCostMode("mlx-compile", "mlx-compile"),
)


@dataclasses.dataclass(frozen=True)
class LogpsMode:
    """How section 2 runs one framework: the implementations compared and the mode."""

    impls: tuple[str, ...]
    label: str
    compiled: bool


LOGPS_MODES = {
    "torch": LogpsMode(
        ("token_logps", "log_softmax+gather", "trl.selective_log_softmax"), "eager", False
    ),
    "jax": LogpsMode(("token_logps", "log_softmax+gather"), "jax.jit", True),
    "mlx": LogpsMode(("token_logps", "log_softmax+gather"), "mx.compile", True),
}
PASSES = ("fwd", "fwd+bwd")

# ---------------------------------------------------------------------------------------------
# the run's settings


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


@dataclasses.dataclass
class Config:
    """The settings of one run (made from the command line by ``overhead.make_config``)."""

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

    def size(self, mode: StepMode) -> StepSize:
        """The model size of ``mode``: its own CPU size where it has one, else the common one."""
        return self.mlx_size if mode.cpu_size is not None else self.step_size

    def step_variants(self, mode: StepMode) -> tuple[Variant, ...]:
        if self.smoke and mode.slow_compile:
            return tuple(v for v in mode.variants if v.name in SMOKE_COMPILED)
        return mode.variants


def log(msg: str) -> None:
    """A progress line on stderr, with the wall time and the CPU seconds used so far."""
    cpu = sum(
        getattr(resource.getrusage(who), f)
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
        for f in ("ru_utime", "ru_stime")
    )
    stamp = f"{time.strftime('%H:%M:%S')} cpu {cpu:.0f}s"
    print(f"[overhead {stamp}] {msg}", file=sys.stderr, flush=True)
