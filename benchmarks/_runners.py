"""What the benchmark times, written once for every framework.

Each measured callable is built from the framework's gategrad backend object alone, which
names no framework here: ``from_numpy`` and ``device_like`` (placement), ``compile`` (with its
options: compiler, donation, ahead-of-time), ``value_and_grad_fn`` (traceable), ``adamw`` (the
framework's own optimizer), ``evaluate`` (wait), ``peak_memory`` (its counter), ``log_softmax``
(its fused kernel) and the array operations.

- :class:`StepRunner`: one DPO training step (forward, backward, AdamW update) of the test kit's
  transformer, eager or compiled (sections 1 and 3);
- :func:`loss_only_fn`: the loss alone, forward and backward from per-token log-probs
  (section 1b);
- :class:`LogpsCase`: one implementation of per-token log-probs (section 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def place(backend: Backend, device: str) -> Any:
    """``from_numpy``'s ``like`` for the ``--device``: ``None`` where the framework takes its
    default device."""
    return backend.device_like(device)


def measures_rss(framework: str, device: str) -> bool:
    """Whether RSS subprocesses measure ``framework``: its arrays in this process's memory (on
    the CPU ``--device``, which the framework takes: not one with arrays on its default
    device, which may live elsewhere)."""
    if device != "cpu" or not gategrad.is_available(framework):
        return False
    return gategrad.get_backend(framework).device_like(device) is not None


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
        self.mode, self.variant, self.device, self.compiler = mode, variant, device, compiler
        self.note = ""
        np_params, batch = step_inputs(size)
        self.like = like = place(b, device)
        self.initial = np_params
        self.batch = (
            b.as_index(b.from_numpy(batch["input_ids"], like=like)),
            b.from_numpy(batch["response_mask"], like=like),
            b.from_numpy(batch["ref_logps"], like=like),
        )
        b.evaluate(*self.batch)
        self.reset()
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

    def reset(self) -> None:
        """Back to the initial state: fresh copies of the initial parameters and a fresh
        optimizer (its state initialised). Called before every step, outside the timed region,
        so that every step of every variant starts from the same model and optimizer state."""
        b = self.backend
        self.params = {
            k: b.from_numpy(np.array(v), like=self.like) for k, v in self.initial.items()
        }
        self.optimizer = b.adamw(self.params, LR, WEIGHT_DECAY)
        self.opt_state = self.optimizer.init(self.params)
        b.evaluate(self.params, self.opt_state)

    def fresh_step(self) -> None:
        """:meth:`reset`, then :meth:`step` (for the memory measurements)."""
        self.reset()
        self.step()

    def _compile(self, fn: Callable[..., Any], **options: Any) -> Any:
        # reset=False: the variants' graphs (and the shared model's) stay compiled together
        return self.backend.compile(fn, compiler=self.compiler, reset=False, **options)

    def train_step(
        self, params: Params, opt_state: Any, ids: Any, resp: Any, ref: Any
    ) -> tuple[Params, Any, Any]:
        """``(params, opt_state, loss)`` after one step: the loss and its gradient, AdamW."""

        def objective(p: Params) -> Any:
            return self.loss(self.model(p, ids), ids, resp, ref)

        value, grads = self.backend.value_and_grad_fn(objective)(params)
        params, opt_state = self.optimizer.update(params, grads, opt_state)
        return params, opt_state, value

    def step(self) -> None:
        with gategrad.value_checks(self.variant.checks):
            self.optimizer.zero_grad()
            self.params, self.opt_state, loss = self.train(self.params, self.opt_state, *self.batch)
            self.backend.evaluate(self.params, self.opt_state, loss)

    def warmup(self, steps: int) -> None:
        try:
            self.fresh_step()
        except Exception as err:  # a graph break under fullgraph=True: fall back, and say so
            if self.mode.compile != "regions":
                raise
            log(
                f"compiling the loss with fullgraph=True failed for {self.variant.name}: "
                f"{type(err).__name__}: {str(err)[:200]}; using fullgraph=False"
            )
            self.note = "graph break in the loss: compiled with fullgraph=False"
            self.loss = self._compile(self.loss_eager, fullgraph=False)
            self.fresh_step()
        for _ in range(steps - 1):
            self.fresh_step()

    def framework_peak(self) -> dict[str, Any]:
        """The framework's own peak-memory counter over one step, where it has one."""
        self.reset()
        return _memory.framework_peak(self.backend, self.step, self.train, self.device)


# ---------------------------------------------------------------------------------------------
# section 1b: the loss alone


def loss_only_fn(
    mode: StepMode, size: StepSize, variant: Variant, checks: bool
) -> Callable[[], None]:
    """The DPO loss and its gradient from per-token log-probs ``(B, T - 1)`` (on the CPU): the
    step minus the model, where everything the gate adds happens. Compiled where ``mode``
    compiles."""
    b = gategrad.get_backend(mode.framework)
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

        return b.value_and_grad_fn(loss)({"lp": lp})[1]

    fn = grad if mode.compile is None else b.compile(grad, reset=False, example_args=args)

    def run() -> None:
        with gategrad.value_checks(checks):
            b.evaluate(fn(*args))

    return run


# ---------------------------------------------------------------------------------------------
# section 2: per-token log-probs


def _token_logps(backend: Backend, x: Any, y: Any, m: Any) -> Any:
    return gategrad.token_logps(x, y, m, shift=False)[0]


def _log_softmax_gather(backend: Backend, x: Any, y: Any, m: Any) -> Any:
    picked = backend.take_along_axis(backend.log_softmax(x), y[..., None])[..., 0]
    return backend.where(m, picked, 0.0)


def _trl(backend: Backend, x: Any, y: Any, m: Any) -> Any:
    from trl.trainer.utils import selective_log_softmax

    return backend.where(m, selective_log_softmax(x, y), 0.0)


#: ``(backend, logits, labels, mask) -> (B, T)`` per-token log-probs, 0 outside the mask.
LOGPS_IMPLS: dict[str, Callable[[Backend, Any, Any, Any], Any]] = {
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
        self.device, self.smoke = device, smoke
        like = place(b, device)
        x = b.from_numpy(data["logits"], like=like)
        y = b.as_index(b.from_numpy(data["labels"].astype(np.int32), like=like))
        m = b.from_numpy(data["mask"], like=like)
        cot = b.from_numpy(data["cot"], like=like)
        b.evaluate(x, y, m, cot)
        logps = LOGPS_IMPLS[impl]

        def fwd(x: Any) -> Any:
            return logps(b, x, y, m)

        def fwd_bwd(x: Any) -> Any:
            def weighted(p: Params) -> Any:
                return b.sum(fwd(p["x"]) * cot, axis=None)

            return b.value_and_grad_fn(weighted)({"x": x})[1]

        fn = fwd if pas == "fwd" else fwd_bwd
        if LOGPS_MODES[fw].compiled:
            fn = b.compile(fn, reset=False, example_args=(x,))
        self.compiled = fn
        self.last: Any = None

        def run() -> None:
            self.last = None
            out = fn(x)
            b.evaluate(out)
            if b.keeps_grads:  # as ``.grad``: held until the next call releases it, first thing
                self.last = out

        self.run = run

    def framework_peak(self) -> dict[str, Any]:
        """Peak memory of one call on top of the inputs, from the framework's counter."""
        tries = 1 if self.smoke else 2
        return _memory.framework_peak(self.backend, self.run, self.compiled, self.device, tries)
