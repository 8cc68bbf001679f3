"""The training engine of the transformer lab: one engine for torch, jax and mlx.

:class:`Engine` wraps the tiny transformer of :mod:`gategrad.testing.models` on one
:class:`gategrad._backend.Backend` and exposes the few operations the experiment loop needs;
every number it returns is NumPy. The preference step is
:func:`gategrad.losses.stacked_preference_loss` (on the ``[chosen; rejected]`` batch of one
forward pass) with the method's :class:`gategrad.Gate`, the same code on every framework; the
optimiser is Adam with PyTorch's formula (:func:`adam_update`), written once against the
backend, so all three frameworks take the same steps up to floating-point rounding.

Interface (duck-typed; used by :mod:`gategrad.lab.transformer`):

- ``load(np_params) -> params``: the parameters, from NumPy (float64) ones, as one flat vector
  of the framework (opaque to the caller; :meth:`Engine.unflatten` gives the model's dict);
- ``token_logps(params, tokens, mask) -> (B, T-1)``: per-token log-probs;
- ``evaluate(params, tokens, mask) -> {metric: (B,)}``: :func:`gategrad.metrics.sequence_metrics`;
- ``close()``: undo global settings (PyTorch's thread count);
- ``trainer(params, lr) -> Trainer`` with ``sft_step(tokens, mask) -> loss``,
  ``pref_step(method, chosen, rejected, mask, ref_chosen, ref_rejected, beta) -> {"loss",
  "gate"}`` and ``params``.

Tokens and masks are NumPy ``(B, T)`` integer arrays; ``ref_*`` are NumPy per-token log-probs.

How a step differentiates. Every objective is a function of the per-token log-probs ``lp``
(``objective(lp, valid, z, *extra)``: the SFT cross-entropy or the preference loss), so the
gate acts exactly where :func:`gategrad.preference_loss` puts it: on the cotangent of the
rejected log-probs. The engine runs it one of two ways, by what the backend's autograd is:

- **one pass**, for an autograd over concrete values (PyTorch's tape, MLX's lazy graph):
  ``value_and_grad`` of ``objective(model(params))`` with respect to the parameters, eagerly:
  one forward and one backward per step (a separate ``vjp`` of the model would run MLX's
  forward twice, since ``mx.vjp`` recomputes it);
- **staged**, for an autograd that traces (JAX, whose eager steps would re-trace the model on
  every call): the model's log-probs, their pullback (``backend.vjp``) and the Adam update are
  compiled once per shape, as XLA compiles slowly on the CPU, and each method compiles only
  the small ``value_and_grad`` of its objective with respect to ``lp``, whose gradient is the
  cotangent that the pullback turns into parameter gradients (the forward runs twice).

``value_and_grad`` has no auxiliary output, so the gate's mean leaves the objective as the
gradient of ``z * stop_gradient(gate_mean)`` at ``z = 0`` (a term worth zero, with no gradient
for the parameters).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np

from gategrad import scale_grad, token_logps
from gategrad._backend import Array, Backend
from gategrad._dispatch import get_backend
from gategrad.losses import stacked_preference_loss
from gategrad.metrics import sequence_metrics
from gategrad.testing.models import (
    TransformerConfig,
    params_from_numpy,
    transformer_logits,
    transformer_param_shapes,
)

from .config import TRANSFORMER_BACKENDS

__all__ = ["Engine", "Trainer", "adam_update", "get_engine"]

Params = dict[str, Array]
#: ``objective(lp, valid, z, *extra) -> loss + z * stop_gradient(gate_mean)`` (a scalar).
Objective = Callable[..., Array]

_BETAS = (0.9, 0.999)
_EPS = 1e-8


def get_engine(
    backend: str, cfg: TransformerConfig, dtype: str = "float32", threads: int = 1
) -> Engine:
    """The engine for ``backend`` (``torch``, ``jax`` or ``mlx``); ``ImportError`` names the
    pip extra when the framework is missing, ``ValueError`` any other name."""
    choose = ", ".join(TRANSFORMER_BACKENDS)
    try:
        b = get_backend(backend)
    except ImportError as err:
        raise ImportError(
            f"the {backend} backend of the lab needs {backend}: pip install 'gategrad[{backend}]'"
            f" ({err})"
        ) from err
    except ValueError:
        raise ValueError(f"unknown backend {backend!r}; choose {choose}") from None
    if not b.has_autograd:
        raise ValueError(
            f"the {backend} backend has no autograd to train the transformer; choose {choose}"
        )
    return Engine(b, cfg, dtype, threads)


def adam_update(
    b: Backend, p: Array, g: Array, m: Array, v: Array, step_size: float, c2: float
) -> tuple[Array, Array, Array]:
    """One Adam step as ``torch.optim.Adam`` computes it, on arrays (or leaves) ``p``, gradient
    ``g`` and moving averages ``m``, ``v`` (``betas=(0.9, 0.999)``): ``step_size = lr / (1 -
    beta1**t)``, ``c2 = sqrt(1 - beta2**t)`` and ``p -= step_size * m / (sqrt(v) / c2 + 1e-8)``.
    Returns the new ``(p, m, v)``."""
    b1, b2 = _BETAS
    m = m + (1.0 - b1) * (g - m)
    v = v * b2 + (1.0 - b2) * (g * g)
    return p - step_size * (m / (b.sqrt(v) / c2 + _EPS)), m, v


def _with_gate(b: Backend, loss: Array, gate: Array | None, z: Array) -> Array:
    """``loss + z * stop_gradient(gate)``: at ``z = 0`` the value is ``loss`` and the gradient
    with respect to ``z`` is the gate (1 when ungated)."""
    return loss + z * (1.0 if gate is None else b.stop_gradient(gate))


def _sft_objective(b: Backend) -> Objective:
    """Next-token cross-entropy: minus the mean log-prob over the counted tokens."""

    def objective(lp: Array, valid: Array, z: Array) -> Array:
        count = b.sum(b.astype(valid, lp.dtype), axis=None)
        return _with_gate(b, -(b.sum(lp, axis=None) / count), None, z)

    return objective


def _pref_objective(b: Backend, method: Any, beta: float) -> Objective:
    """The method's preference loss on stacked ``[chosen; rejected]`` per-token log-probs
    ``lp`` and reference ones ``ref`` (the ``zero`` baseline drops the rejected gradient with
    ``scale_grad(., 0)``)."""

    def objective(lp: Array, valid: Array, z: Array, ref: Array) -> Array:
        if method.gate_kind == "zero":
            n = lp.shape[0] // 2
            lp = b.concatenate([lp[:n], scale_grad(lp[n:], 0.0)])
        loss, metrics = stacked_preference_loss(
            method.loss_type,
            lp,
            ref,
            mask=valid,
            beta=beta,
            gate=method.gate,
            **method.loss_params,
        )
        return _with_gate(b, loss, metrics.get("gate/mean"), z)

    return objective


class Engine:
    """The tiny transformer on one backend (see the module docstring).

    The parameters are one flat vector (the engine's ``params``), viewed as the model's dict
    of arrays in each forward pass, so Adam's dozen operations act on three arrays per step,
    not on three per parameter tensor (eager PyTorch pays per operation). ``staged``: compile
    the model's passes once and each objective separately (default: where the backend's
    autograd traces, JAX); otherwise every step is one eager ``value_and_grad``.
    """

    def __init__(
        self,
        backend: Backend,
        cfg: TransformerConfig,
        dtype: str = "float32",
        threads: int = 1,
        *,
        staged: bool | None = None,
    ) -> None:
        staged = backend.traces if staged is None else staged
        self.b, self.cfg, self.dtype, self.staged = backend, cfg, dtype, staged
        self.name = backend.name
        self._shapes = transformer_param_shapes(cfg)
        stage = backend.compile if staged else _identity
        self._cache: dict[Any, Callable[..., Any]] = {}
        self._forward = stage(self._logps)
        self._metrics = stage(self._sequence_metrics)
        self._pullback = stage(self._logps_pullback)
        self._adam = stage(partial(adam_update, backend))
        self._np_dtype = np.dtype(dtype)
        self._masks: dict[Any, Array] = {}
        with self.scope():
            self._zero = backend.from_numpy(np.zeros((), self._np_dtype))  # the gate's probe
        self._threads = backend.set_threads(threads)

    # --- the model ------------------------------------------------------------------------
    def unflatten(self, flat: Array) -> Params:
        """The model's parameter dict: reshaped slices (views) of the flat vector."""
        out, start = {}, 0
        for name, shape in self._shapes.items():
            size = math.prod(shape)
            out[name] = self.b.reshape(flat[start : start + size], shape)
            start += size
        return out

    def _logps(self, flat: Array, toks: Array, mask: Array) -> tuple[Array, Array]:
        logits = transformer_logits(self.unflatten(flat), toks, self.cfg)
        return token_logps(logits, toks, mask)

    def _sequence_metrics(self, flat: Array, toks: Array, mask: Array) -> dict[str, Array]:
        return sequence_metrics(
            transformer_logits(self.unflatten(flat), toks, self.cfg), toks, mask
        )

    def _logps_pullback(self, flat: Array, toks: Array, mask: Array, cot: Array) -> Array:
        """``cot^T d lp / d params`` (the forward runs again: staged mode only)."""
        _, pullback = self.b.vjp(lambda p: self._logps(p, toks, mask)[0], flat)
        return pullback(cot)

    # --- conversion -----------------------------------------------------------------------
    @contextmanager
    def scope(self) -> Iterator[None]:
        """Where arrays of the engine's dtype can be computed (MLX float64: the CPU)."""
        with self.b.device_scope(self.dtype):
            yield

    def batch(self, tokens: np.ndarray, mask: np.ndarray) -> tuple[Array, Array]:
        """NumPy tokens and their mask (broadcast to them; converted once per value) as backend
        arrays."""
        key = (mask.shape, mask.tobytes(), len(tokens))
        if key not in self._masks:
            full = np.broadcast_to(mask, (len(tokens), mask.shape[-1]))
            self._masks[key] = self.b.from_numpy(full.astype(np.int32))
        return self.b.from_numpy(tokens.astype(np.int32)), self._masks[key]

    def array(self, a: np.ndarray) -> Array:
        """A NumPy float array as a backend array of the engine's dtype (cast in NumPy: one
        transfer, no conversion in the framework)."""
        return self.b.from_numpy(np.asarray(a, dtype=self._np_dtype))

    def numpy(self, x: Array) -> np.ndarray:
        return np.asarray(self.b.to_numpy(x), dtype=np.float64)

    # --- the interface --------------------------------------------------------------------
    def close(self) -> None:
        """Restore the thread count that was set before this engine."""
        self.b.set_threads(self._threads)

    def load(self, np_params: dict[str, np.ndarray]) -> Array:
        """The flat parameter vector of ``np_params`` (the keys of ``init_transformer_params``)."""
        b = self.b
        with self.scope():
            params = params_from_numpy(np_params, b.name, self.dtype)
            return b.concatenate([b.reshape(params[k], (-1,)) for k in self._shapes])

    def token_logps(self, params: Array, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        with self.scope():
            lp, _ = self._forward(params, *self.batch(tokens, mask))
            return self.numpy(lp)

    def evaluate(
        self, params: Array, tokens: np.ndarray, mask: np.ndarray
    ) -> dict[str, np.ndarray]:
        with self.scope():
            m = self._metrics(params, *self.batch(tokens, mask))
            return {k: self.numpy(v) for k, v in m.items()}

    def trainer(self, params: Array, lr: float) -> Trainer:
        return Trainer(self, params, lr)

    # --- gradients ------------------------------------------------------------------------
    def loss_fn(self, key: Any, build: Callable[[], Objective]) -> Callable[..., Any]:
        """``build()``'s objective, cached by ``key``; staged: its ``value_and_grad`` with
        respect to ``(lp, z)``, compiled."""
        if key not in self._cache:
            b, objective = self.b, build()
            if self.staged:

                def on_lp(lp: Array, valid: Array, z: Array, *extra: Array) -> Any:
                    return b.value_and_grad(
                        lambda lp1, z1: objective(lp1, valid, z1, *extra), [lp, z], argnums=(0, 1)
                    )

                self._cache[key] = b.compile(on_lp)
            else:
                self._cache[key] = objective
        return self._cache[key]

    def loss_and_grads(
        self, fn: Callable[..., Any], params: Array, toks: Array, mask: Array, *extra: Array
    ) -> tuple[Array, Array, Array]:
        """``(loss, gate, d loss / d params)`` of a :meth:`loss_fn` at the model's log-probs of
        ``toks``."""
        if self.staged:
            lp, valid = self._forward(params, toks, mask)
            loss, (cot, gate) = fn(lp, valid, self._zero, *extra)
            return loss, gate, self._pullback(params, toks, mask, cot)

        def whole(flat: Array, z: Array) -> Array:
            return fn(*self._logps(flat, toks, mask), z, *extra)

        loss, (grads, gate) = self.b.value_and_grad(whole, [params, self._zero], argnums=(0, 1))
        return loss, gate, grads

    def update(
        self, params: Array, grads: Array, m: Array, v: Array, lr: float, t: int
    ) -> tuple[Array, Array, Array]:
        """Adam step ``t`` (from 1) at learning rate ``lr``: the new ``(params, m, v)``."""
        b1, b2 = _BETAS
        out = self._adam(params, grads, m, v, lr / (1.0 - b1**t), (1.0 - b2**t) ** 0.5)
        self.b.evaluate(*out)
        return out


def _identity(fn: Callable[..., Any]) -> Callable[..., Any]:
    return fn


class Trainer:
    """Adam from ``params`` (not modified) with learning rate ``lr``."""

    def __init__(self, engine: Engine, params: Array, lr: float) -> None:
        self.e, self.params, self.lr, self.t = engine, params, lr, 0
        with engine.scope():
            self._m = engine.b.full_like(params, 0.0)
            self._v = engine.b.full_like(params, 0.0)

    def _step(
        self,
        key: Any,
        build: Callable[[], Objective],
        tokens: np.ndarray,
        mask: np.ndarray,
        *extra: np.ndarray,
    ) -> tuple[float, float]:
        e = self.e
        with e.scope():
            fn = e.loss_fn(key, build)
            toks, m = e.batch(tokens, mask)
            loss, gate, grads = e.loss_and_grads(
                fn, self.params, toks, m, *(e.array(a) for a in extra)
            )
            self.t += 1
            self.params, self._m, self._v = e.update(
                self.params, grads, self._m, self._v, self.lr, self.t
            )
            return float(e.numpy(loss)), float(e.numpy(gate))

    def sft_step(self, tokens: np.ndarray, mask: np.ndarray) -> float:
        b = self.e.b
        return self._step("sft", lambda: _sft_objective(b), tokens, mask)[0]

    def pref_step(
        self,
        method: Any,
        chosen: np.ndarray,
        rejected: np.ndarray,
        mask: np.ndarray,
        ref_c: np.ndarray,
        ref_r: np.ndarray,
        beta: float,
    ) -> dict[str, float]:
        b = self.e.b
        key = (method.key, method.gate, tuple(sorted(method.loss_params.items())), float(beta))
        loss, gate = self._step(
            key,
            lambda: _pref_objective(b, method, beta),
            np.concatenate([chosen, rejected]),
            mask,
            np.concatenate([ref_c, ref_r]),
        )
        return {"loss": loss, "gate": gate}
