"""What the benchmark times, written once for every framework.

Each measured callable is built from the framework's gategrad backend object (``from_numpy``,
``compile``, ``vjp``, ``evaluate``, array operations). What a backend does not provide, or
provides in a form a timed loop cannot use, is one entry per framework in :data:`FRAMEWORK_OPS`:
its optimizer, its compile call (options and ahead-of-time compilation), how to wait for a
result, its peak-memory counter and its fused ``log_softmax``.

- :class:`StepRunner`: one DPO training step (forward, backward, AdamW update) of the test kit's
  transformer, eager or compiled (sections 1 and 3);
- :func:`loss_only_fn`: the loss alone, forward and backward from per-token log-probs
  (section 1b);
- :class:`LogpsCase`: one implementation of per-token log-probs (section 2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

import gategrad
from gategrad import Backend
from gategrad.testing.models import (
    TransformerConfig,
    init_transformer_params,
    params_from_numpy,
    transformer_logits,
)

from . import _memory
from ._config import LOGPS_MODES, StepMode, StepSize, Variant, log

Params = dict[str, Any]
LR = 1e-4
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's and mlx.optimizers.AdamW's default

# ---------------------------------------------------------------------------------------------
# what differs between frameworks


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """How to compile: ``example_args`` (compile ahead of time for these, where the framework
    does: JAX, whose compiled object has the ``memory_analysis``), ``donate`` (arguments whose
    buffers the result may reuse), ``fullgraph`` and ``compiler`` (``torch.compile``'s)."""

    example_args: tuple[Any, ...] = ()
    donate: tuple[int, ...] = ()
    fullgraph: bool = True
    compiler: str = "inductor"


class Optimizer(Protocol):
    """AdamW as a pure update (``state`` in, ``state`` out), whatever the framework's own API."""

    def init(self, params: Params) -> Any: ...

    def update(self, params: Params, grads: Params, state: Any) -> tuple[Params, Any]: ...

    def zero_grad(self) -> None:
        """Release the last step's gradients (before the next forward, as ``zero_grad``)."""


class _TorchAdamW:
    """``torch.optim.AdamW`` (``foreach``), updating ``params`` in place."""

    def __init__(self, backend: Backend, params: Params) -> None:
        self.params = list(params.values())
        self.opt = backend.framework.optim.AdamW(self.params, lr=LR, foreach=True)

    def init(self, params: Params) -> Any:
        return None

    def update(self, params: Params, grads: Params, state: Any) -> tuple[Params, Any]:
        for k, p in params.items():
            p.grad = grads[k]
        self.opt.step()
        return params, state

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)


class _OptaxAdamW:
    """``optax.adamw``."""

    def __init__(self, backend: Backend, params: Params) -> None:
        import optax

        self.optax = optax
        self.tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

    def init(self, params: Params) -> Any:
        return self.tx.init(params)

    def update(self, params: Params, grads: Params, state: Any) -> tuple[Params, Any]:
        updates, state = self.tx.update(grads, state, params)
        return self.optax.apply_updates(params, updates), state

    def zero_grad(self) -> None:
        pass


class _MlxAdamW:
    """``mlx.optimizers.AdamW``, its state passed in and out (so ``mx.compile`` sees it)."""

    def __init__(self, backend: Backend, params: Params) -> None:
        import mlx.optimizers

        self.opt = mlx.optimizers.AdamW(learning_rate=LR, weight_decay=WEIGHT_DECAY)

    def init(self, params: Params) -> Any:
        self.opt.init(params)
        return self.opt.state

    def update(self, params: Params, grads: Params, state: Any) -> tuple[Params, Any]:
        self.opt.state = state
        return self.opt.apply_gradients(grads, params), self.opt.state

    def zero_grad(self) -> None:
        pass


def _plain_compile(backend: Backend, fn: Callable[..., Any], spec: CompileSpec) -> Any:
    return backend.compile(fn)


def _torch_compile(backend: Backend, fn: Callable[..., Any], spec: CompileSpec) -> Any:
    # Not backend.compile: that resets dynamo, which would drop the other variants' graphs
    # (and it takes no compile backend).
    torch = backend.framework
    dyn = torch._dynamo.config
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dyn, knob):
            setattr(dyn, knob, max(64, getattr(dyn, knob)))
    return torch.compile(fn, fullgraph=spec.fullgraph, dynamic=False, backend=spec.compiler)


def _jax_compile(backend: Backend, fn: Callable[..., Any], spec: CompileSpec) -> Any:
    jit = backend.framework.jit(fn, donate_argnums=spec.donate)
    return jit.lower(*spec.example_args).compile()


def _vjp_value_and_grad(backend: Backend, fn: Callable[[Params], Any]) -> Callable[..., Any]:
    """``params -> (fn(params), d fn / d params)`` from :meth:`Backend.vjp` (traceable)."""

    def value_and_grad(params: Params) -> tuple[Any, Params]:
        value, pullback = backend.vjp(fn, params)
        return value, pullback(backend.full_like(value, 1.0))

    return value_and_grad


def _mlx_value_and_grad(backend: Backend, fn: Callable[[Params], Any]) -> Callable[..., Any]:
    # MLX's Backend.vjp recomputes the forward in its pullback and takes no dict of arrays
    return backend.framework.value_and_grad(fn)


def _torch_block(backend: Backend, tree: Any, device: str) -> None:
    if device.startswith("cuda"):
        backend.framework.cuda.synchronize(device)


def _jax_block(backend: Backend, tree: Any, device: str) -> None:
    backend.framework.block_until_ready(tree)


def _evaluate(backend: Backend, tree: Any, device: str) -> None:
    backend.evaluate(tree)


def _no_peak(backend: Backend, probe: _memory.Probe) -> dict[str, Any]:
    return {}


def _log_softmax(backend: Backend, x: Any) -> Any:
    return x - backend.logsumexp(x)[..., None]


def _describe_torch(backend: Backend) -> dict[str, Any]:
    torch = backend.framework
    info: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


@dataclasses.dataclass(frozen=True)
class FrameworkOps:
    """What the benchmark needs of a framework beyond its backend object.

    ``place(backend, device)``: an array on the torch ``--device`` (``from_numpy``'s ``like``),
    ``None`` where the framework takes its default device (then ``rss``: no RSS subprocesses,
    as the arrays may live elsewhere). ``value_and_grad(backend, fn)``: a traceable
    ``params -> (value, grads)``. ``block(backend, tree, device)``: wait until ``tree`` is
    computed. ``peak``: the peak-memory counter. ``log_softmax``: the fused kernel section 2
    compares with. ``retain_grads``: as ``.grad`` does, a call's gradient stays allocated until
    the next call releases it, first thing (the memory counter sees it freed, not held).
    ``on_gpu``: whether the framework's default device is a GPU (one without a ``--device``).
    ``describe``: what the report's machine line says of the framework (threads, device).
    """

    optimizer: Callable[[Backend, Params], Optimizer]
    compile: Callable[[Backend, Callable[..., Any], CompileSpec], Any] = _plain_compile
    value_and_grad: Callable[[Backend, Callable[[Params], Any]], Callable[..., Any]] = (
        _vjp_value_and_grad
    )
    block: Callable[[Backend, Any, str], None] = _evaluate
    place: Callable[[Backend, str], Any] = lambda backend, device: None
    peak: Callable[[Backend, _memory.Probe], dict[str, Any]] = _no_peak
    log_softmax: Callable[[Backend, Any], Any] = _log_softmax
    rss: bool = False
    retain_grads: bool = False
    on_gpu: Callable[[Backend], bool] = lambda backend: False
    describe: Callable[[Backend], dict[str, Any]] = lambda backend: {}


FRAMEWORK_OPS: dict[str, FrameworkOps] = {
    "torch": FrameworkOps(
        optimizer=_TorchAdamW,
        compile=_torch_compile,
        block=_torch_block,
        place=lambda backend, device: backend.framework.empty(0, device=device),
        peak=_memory.torch_peak,
        log_softmax=lambda backend, x: x.log_softmax(-1),
        rss=True,
        retain_grads=True,
        describe=_describe_torch,
    ),
    "jax": FrameworkOps(
        optimizer=_OptaxAdamW,
        compile=_jax_compile,
        block=_jax_block,
        peak=_memory.jax_peak,
        log_softmax=lambda backend, x: backend.framework.nn.log_softmax(x, axis=-1),
        describe=lambda backend: {"jax_backend": backend.framework.default_backend()},
    ),
    "mlx": FrameworkOps(
        optimizer=_MlxAdamW,
        value_and_grad=_mlx_value_and_grad,
        peak=_memory.mlx_peak,
        on_gpu=lambda backend: bool(
            backend.framework.default_device().type == backend.framework.DeviceType.gpu
        ),
        describe=lambda backend: {
            "mlx": str(getattr(backend.framework, "__version__", "?")),
            "mlx_device": str(backend.framework.default_device()),
        },
    ),
}


def ops_for(backend: Backend) -> FrameworkOps:
    return FRAMEWORK_OPS[backend.name]


def measures_rss(framework: str, device: str) -> bool:
    """Whether RSS subprocesses measure ``framework`` (its arrays in this process's memory)."""
    return FRAMEWORK_OPS[framework].rss and device == "cpu"


# ---------------------------------------------------------------------------------------------
# the problem: a batch, the model and the loss


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


def model_config(size: StepSize) -> TransformerConfig:
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
        cfg = model_config(size)
        np_params = params_from_numpy(init_transformer_params(cfg, seed=0), "numpy", "float32")
        batch = make_batch(size)
        logits = transformer_logits(np_params, batch["input_ids"], cfg)
        ref, _ = gategrad.token_logps(logits, batch["input_ids"], batch["response_mask"])
        batch["ref_logps"] = np.asarray(ref, dtype=np.float32)
        _INPUTS[size] = (np_params, batch)
    return _INPUTS[size]


def pair_loss(
    backend: Backend, logps: Any, ref: Any, mask: Any, variant: Variant, gate: Any
) -> Any:
    """The DPO loss of per-token log-probs ``(B, T)`` (rows ``[chosen; rejected]``), gated as
    ``variant`` says: through ``preference_loss(gate=...)``, or by hand (``gate_weights``, then
    the primitive or the detach mix, then the ungated loss)."""
    n = logps.shape[0] // 2
    pc, pr, mc, mr = logps[:n], logps[n:], mask[:n], mask[n:]
    if variant.mechanism != "api":
        weight = gategrad.gate_weights(pr, gate, mr).weight[:, None]
        if variant.mechanism == "primitive":
            pr = gategrad.scale_grad(pr, weight)
        else:  # the naive detach mix: the same value up to rounding, gradient g * grad
            pr = weight * pr + backend.stop_gradient((1.0 - weight) * pr)
        gate = None
    loss, _ = gategrad.preference_loss(
        "sigmoid", pc, pr, ref[:n], ref[n:], beta=0.1, gate=gate, chosen_mask=mc, rejected_mask=mr
    )
    return loss


def step_loss(
    backend: Backend, logits: Any, ids: Any, resp: Any, ref: Any, variant: Variant, gate: Any
) -> Any:
    """The DPO loss of one step from the policy's logits.

    The reference log-probs are precomputed (as TRL's ``precompute_ref_log_probs``): the step
    holds the policy's forward, backward and update only, which makes the gate's share of the
    step as large as it gets.
    """
    logps, mask = gategrad.token_logps(logits, ids, resp)
    return pair_loss(backend, logps, ref, mask, variant, gate)


# ---------------------------------------------------------------------------------------------
# section 1 and 3: the training step

#: The compiled model region, shared by every variant of a mode (it is the same model).
_MODELS: dict[tuple[str, StepSize, str, str], Callable[..., Any]] = {}


class StepRunner:
    """One variant's model, optimizer and training step: built (and warmed up) once, then
    :meth:`step` runs one synchronised step.

    ``mode.compile``: ``None`` runs eagerly; ``'regions'`` compiles the model (once, shared by
    the variants) and the loss (per variant: ``token_logps``, the gate, ``preference_loss``) as
    two ``fullgraph`` regions; ``'step'`` compiles the whole step, gradient and update included.
    """

    def __init__(
        self, mode: StepMode, variant: Variant, size: StepSize, device: str, compiler: str
    ) -> None:
        b = self.backend = gategrad.get_backend(mode.framework)
        self.ops = ops_for(b)
        self.mode, self.variant, self.device, self.compiler = mode, variant, device, compiler
        self.note = ""
        np_params, batch = step_inputs(size)
        like = self.ops.place(b, device)
        self.params = {k: b.from_numpy(np.array(v), like=like) for k, v in np_params.items()}
        self.batch = (
            b.as_index(b.from_numpy(batch["input_ids"], like=like)),
            b.from_numpy(batch["response_mask"], like=like),
            b.from_numpy(batch["ref_logps"], like=like),
        )
        b.evaluate(*self.batch)
        self.optimizer = self.ops.optimizer(b, self.params)
        self.opt_state = self.optimizer.init(self.params)
        cfg = model_config(size)
        gate = variant.make_gate()

        def model(params: Params, ids: Any) -> Any:
            return transformer_logits(params, ids, cfg)

        def loss(logits: Any, ids: Any, resp: Any, ref: Any) -> Any:
            return step_loss(b, logits, ids, resp, ref, variant, gate)

        self.model, self.loss, self.loss_eager = model, loss, loss
        if mode.compile == "regions":
            key = (b.name, size, device, compiler)
            if key not in _MODELS:
                _MODELS[key] = self._compile(model)
            self.model = _MODELS[key]
            self.loss = self._compile(loss)
        self.train: Callable[..., Any] = self.train_step
        if mode.compile == "step":
            example = (self.params, self.opt_state, *self.batch)
            self.train = self._compile(self.train_step, example_args=example, donate=(0, 1))

    def _compile(self, fn: Callable[..., Any], **spec: Any) -> Any:
        return self.ops.compile(self.backend, fn, CompileSpec(compiler=self.compiler, **spec))

    def train_step(
        self, params: Params, opt_state: Any, ids: Any, resp: Any, ref: Any
    ) -> tuple[Params, Any, Any]:
        """``(params, opt_state, loss)`` after one step: the loss and its gradient, AdamW."""

        def objective(p: Params) -> Any:
            return self.loss(self.model(p, ids), ids, resp, ref)

        value, grads = self.ops.value_and_grad(self.backend, objective)(params)
        params, opt_state = self.optimizer.update(params, grads, opt_state)
        return params, opt_state, value

    def step(self) -> None:
        with gategrad.value_checks(self.variant.checks):
            self.optimizer.zero_grad()
            self.params, self.opt_state, loss = self.train(self.params, self.opt_state, *self.batch)
            self.ops.block(self.backend, (self.params, self.opt_state, loss), self.device)

    def warmup(self, steps: int) -> None:
        try:
            self.step()
        except Exception as err:  # a graph break under fullgraph=True: fall back, and say so
            if self.mode.compile != "regions":
                raise
            log(
                f"compiling the loss with fullgraph=True failed for {self.variant.name}: "
                f"{type(err).__name__}: {str(err)[:200]}; using fullgraph=False"
            )
            self.note = "graph break in the loss: compiled with fullgraph=False"
            self.loss = self._compile(self.loss_eager, fullgraph=False)
            self.step()
        for _ in range(steps - 1):
            self.step()

    def framework_peak(self) -> dict[str, Any]:
        """The framework's own peak-memory counter over one step, where it has one."""
        probe = _memory.Probe(self.step, compiled=self.train, device=self.device)
        return self.ops.peak(self.backend, probe)


# ---------------------------------------------------------------------------------------------
# section 1b: the loss alone


def loss_only_fn(
    mode: StepMode, size: StepSize, variant: Variant, checks: bool
) -> Callable[[], None]:
    """The DPO loss and its gradient from per-token log-probs ``(B, T - 1)`` (on the CPU): the
    step minus the model, where everything the gate adds happens. Compiled where ``mode``
    compiles."""
    b = gategrad.get_backend(mode.framework)
    ops = ops_for(b)
    rng = np.random.default_rng(1)
    shape = (size.rows, size.seq - 1)
    lp_np = (rng.standard_normal(shape) - 9.0).astype(np.float32)
    ref_np = (lp_np + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    mask_np = make_batch(size)["response_mask"][:, 1:]
    args = tuple(b.from_numpy(a) for a in (lp_np, ref_np, mask_np))
    b.evaluate(*args)
    gate = variant.make_gate()

    def grad(lp: Any, ref: Any, mask: Any) -> Any:
        def loss(p: Params) -> Any:
            return pair_loss(b, p["lp"], ref, mask, variant, gate)

        return ops.value_and_grad(b, loss)({"lp": lp})[1]

    fn = grad if mode.compile is None else ops.compile(b, grad, CompileSpec(example_args=args))

    def run() -> None:
        with gategrad.value_checks(checks):
            ops.block(b, fn(*args), "cpu")

    return run


# ---------------------------------------------------------------------------------------------
# section 2: per-token log-probs


def _token_logps(backend: Backend, ops: FrameworkOps, x: Any, y: Any, m: Any) -> Any:
    return gategrad.token_logps(x, y, m, shift=False)[0]


def _log_softmax_gather(backend: Backend, ops: FrameworkOps, x: Any, y: Any, m: Any) -> Any:
    picked = backend.take_along_axis(ops.log_softmax(backend, x), y[..., None])[..., 0]
    return backend.where(m, picked, 0.0)


def _trl(backend: Backend, ops: FrameworkOps, x: Any, y: Any, m: Any) -> Any:
    from trl.trainer.utils import selective_log_softmax

    return backend.where(m, selective_log_softmax(x, y), 0.0)


#: ``(backend, ops, logits, labels, mask) -> (B, T)`` per-token log-probs, 0 outside the mask.
LOGPS_IMPLS: dict[str, Callable[[Backend, FrameworkOps, Any, Any, Any], Any]] = {
    "token_logps": _token_logps,
    "log_softmax+gather": _log_softmax_gather,
    "trl.selective_log_softmax": _trl,
}
#: The module an implementation needs (compared only where it is installed).
LOGPS_NEEDS = {"trl.selective_log_softmax": "trl"}


class LogpsCase:
    """One (framework, implementation, pass) callable, synchronised, with its memory counter.

    ``fwd``: the log-probs without a gradient (the reference model's case); ``fwd+bwd``: the
    gradient of their weighted sum. Compiled where :data:`LOGPS_MODES` says.
    """

    def __init__(
        self,
        fw: str,
        impl: str,
        data: dict[str, np.ndarray],
        pas: str,
        device: str,
        smoke: bool = False,
    ) -> None:
        b = self.backend = gategrad.get_backend(fw)
        ops = self.ops = ops_for(b)
        self.device, self.smoke = device, smoke
        like = ops.place(b, device)
        x = b.from_numpy(data["logits"], like=like)
        y = b.as_index(b.from_numpy(data["labels"].astype(np.int32), like=like))
        m = b.from_numpy(data["mask"], like=like)
        cot = b.from_numpy(data["cot"], like=like)
        b.evaluate(x, y, m, cot)
        logps = LOGPS_IMPLS[impl]

        def fwd(x: Any) -> Any:
            return logps(b, ops, x, y, m)

        def fwd_bwd(x: Any) -> Any:
            def weighted(p: Params) -> Any:
                return b.sum(fwd(p["x"]) * cot, axis=None)

            return ops.value_and_grad(b, weighted)({"x": x})[1]

        fn = fwd if pas == "fwd" else fwd_bwd
        if LOGPS_MODES[fw].compiled:
            fn = ops.compile(b, fn, CompileSpec(example_args=(x,)))
        self.compiled = fn
        self.last: Any = None

        def run() -> None:
            self.last = None
            out = fn(x)
            ops.block(b, out, device)
            if ops.retain_grads:
                self.last = out

        self.run = run

    def framework_peak(self) -> dict[str, Any]:
        """Peak memory of one call on top of the inputs, from the framework's counter."""
        probe = _memory.Probe(self.run, self.compiled, self.device, tries=1 if self.smoke else 2)
        return self.ops.peak(self.backend, probe)
