"""Per-framework training engines of the transformer lab (torch, jax, mlx).

An engine wraps the tiny transformer of :mod:`gategrad.testing.models` for one framework and
exposes the few operations the backend-neutral experiment loop needs; every number it returns
is NumPy. The preference step is :func:`gategrad.losses.preference_loss`, the same code on every
framework, with the method's :class:`gategrad.Gate`; the optimiser is Adam with PyTorch's
formula (``betas=(0.9, 0.999)``, ``eps=1e-8``, bias-corrected), written out for JAX and MLX so
all three frameworks take the same steps up to floating-point rounding.

Interface (duck-typed; see :class:`TorchEngine`):

- ``load(np_params) -> params``: framework parameters from NumPy (float64) ones;
- ``token_logps(params, tokens, mask) -> (B, T-1)``: per-token log-probs;
- ``evaluate(params, tokens, mask) -> {metric: (B,)}``: :func:`gategrad.metrics.sequence_metrics`;
- ``close()``: undo global settings (PyTorch's thread count);
- ``trainer(params, lr) -> Trainer`` with ``sft_step(tokens, mask) -> loss``,
  ``pref_step(method, chosen, rejected, mask, ref_chosen, ref_rejected, beta) -> {"loss",
  "gate"}`` and ``params``.

Tokens and masks are NumPy ``(B, T)`` integer arrays; ``ref_*`` are NumPy per-token log-probs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gategrad.testing.models import TransformerConfig

__all__ = ["get_engine"]

_BETAS = (0.9, 0.999)
_EPS = 1e-8


def get_engine(backend: str, cfg: TransformerConfig, dtype: str = "float32", threads: int = 1):
    """The engine for ``backend`` (``torch``, ``jax`` or ``mlx``); ``ImportError`` names the
    pip extra when the framework is missing."""
    try:
        if backend == "torch":
            return TorchEngine(cfg, dtype, threads)
        if backend == "jax":
            return JaxEngine(cfg, dtype)
        if backend == "mlx":
            return MlxEngine(cfg, dtype)
    except ImportError as err:
        raise ImportError(
            f"the {backend} backend of the lab needs {backend}: pip install 'gategrad[{backend}]'"
            f" ({err})"
        ) from err
    raise ValueError(f"unknown backend {backend!r}; choose torch, jax or mlx")


def _zero_grad(method: Any, rejected: Any) -> Any:
    from gategrad import scale_grad

    return scale_grad(rejected, 0.0) if method.gate_kind == "zero" else rejected


def _pref_loss(method: Any, lp: Any, valid: Any, ref_c: Any, ref_r: Any, beta: float) -> Any:
    """The preference loss on a stacked ``[chosen; rejected]`` batch of per-token log-probs."""
    from gategrad.losses import preference_loss

    b = lp.shape[0] // 2
    loss, metrics = preference_loss(
        method.loss_type,
        lp[:b],
        _zero_grad(method, lp[b:]),
        ref_c,
        ref_r,
        beta=beta,
        gate=method.gate,
        chosen_mask=valid[:b],
        rejected_mask=valid[b:],
        **method.loss_params,
    )
    return loss, metrics.get("gate/mean")


def _full(mask: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(mask, (n, mask.shape[-1])))


# ------------------------------------------------------------------------------------------
# PyTorch


class TorchEngine:
    """Eager PyTorch on the CPU (or wherever the parameters live)."""

    name = "torch"

    def __init__(self, cfg: TransformerConfig, dtype: str = "float32", threads: int = 1) -> None:
        import torch

        from gategrad.testing.models import torch_models

        self.torch, self.tm, self.cfg, self.dtype = torch, torch_models, cfg, dtype
        self._threads = torch.get_num_threads()
        if threads > 0:
            torch.set_num_threads(threads)

    def close(self) -> None:
        """Restore the thread count that was set before this engine."""
        self.torch.set_num_threads(self._threads)

    def load(self, np_params: dict[str, np.ndarray]) -> dict[str, Any]:
        return self.tm.params_from_numpy(np_params, self.dtype)

    def _lp(self, params: dict[str, Any], tokens: np.ndarray, mask: np.ndarray) -> Any:
        from gategrad import token_logps

        toks = self.torch.as_tensor(tokens)
        logits = self.tm.transformer_logits(params, toks, self.cfg)
        return logits, toks, token_logps(logits, toks, self.torch.as_tensor(mask))

    def token_logps(self, params: dict[str, Any], tokens: np.ndarray, mask: np.ndarray) -> Any:
        with self.torch.no_grad():
            _, _, (lp, _) = self._lp(params, tokens, _full(mask, len(tokens)))
        return lp.double().numpy()

    def evaluate(self, params: dict[str, Any], tokens: np.ndarray, mask: np.ndarray) -> dict:
        from gategrad.metrics import sequence_metrics

        with self.torch.no_grad():
            toks = self.torch.as_tensor(tokens)
            logits = self.tm.transformer_logits(params, toks, self.cfg)
            m = sequence_metrics(logits, toks, self.torch.as_tensor(_full(mask, len(tokens))))
        return {k: v.double().numpy() for k, v in m.items()}

    def trainer(self, params: dict[str, Any], lr: float) -> _TorchTrainer:
        return _TorchTrainer(self, params, lr)


class _TorchTrainer:
    def __init__(self, engine: TorchEngine, params: dict[str, Any], lr: float) -> None:
        torch = engine.torch
        self.e = engine
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self._list = list(self.params.values())
        self._m = [torch.zeros_like(p) for p in self._list]
        self._v = [torch.zeros_like(p) for p in self._list]
        self.lr, self.t = lr, 0

    def _apply(self, loss: Any) -> None:
        """Adam as ``torch.optim.Adam(foreach=True)`` computes it (that class imports
        ``torch._dynamo``, which costs seconds, so the update is written out)."""
        torch = self.e.torch
        grads = torch.autograd.grad(loss, self._list)
        self.t += 1
        b1, b2 = _BETAS
        with torch.no_grad():
            torch._foreach_lerp_(self._m, grads, 1.0 - b1)
            torch._foreach_mul_(self._v, b2)
            torch._foreach_addcmul_(self._v, grads, grads, 1.0 - b2)
            c1 = 1.0 - b1**self.t
            c2 = (1.0 - b2**self.t) ** 0.5
            denom = torch._foreach_sqrt(self._v)
            torch._foreach_div_(denom, c2)
            torch._foreach_add_(denom, _EPS)
            torch._foreach_addcdiv_(self._list, self._m, denom, -self.lr / c1)

    def sft_step(self, tokens: np.ndarray, mask: np.ndarray) -> float:
        _, _, (lp, valid) = self.e._lp(self.params, tokens, _full(mask, len(tokens)))
        loss = -(lp.sum() / valid.sum())
        self._apply(loss)
        return float(loss.detach())

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
        torch = self.e.torch
        toks = np.concatenate([chosen, rejected])
        _, _, (lp, valid) = self.e._lp(self.params, toks, _full(mask, len(toks)))
        dt = lp.dtype
        loss, gate = _pref_loss(
            method,
            lp,
            valid,
            torch.as_tensor(ref_c, dtype=dt),
            torch.as_tensor(ref_r, dtype=dt),
            beta,
        )
        self._apply(loss)
        return {"loss": float(loss.detach()), "gate": 1.0 if gate is None else float(gate)}


# ------------------------------------------------------------------------------------------
# JAX


def _jax_adam(jax: Any, params: Any, grads: Any, state: Any, lr: Any) -> tuple[Any, Any]:
    m, v, t = state
    tm = jax.tree_util.tree_map
    t = t + 1.0
    b1, b2 = _BETAS
    m = tm(lambda a, g: b1 * a + (1.0 - b1) * g, m, grads)
    v = tm(lambda a, g: b2 * a + (1.0 - b2) * g * g, v, grads)
    c1 = 1.0 - b1**t
    c2 = jax.numpy.sqrt(1.0 - b2**t)
    params = tm(lambda p, a, s: p - (lr / c1) * a / (jax.numpy.sqrt(s) / c2 + _EPS), params, m, v)
    return params, (m, v, t)


class JaxEngine:
    """``jax.jit``-compiled model passes.

    XLA compiles slowly on the CPU, so the model is compiled once (a forward pass, and a
    backward pass that takes the cotangent of the per-token log-probs and applies Adam), and
    each method compiles only its small loss-and-gradient function on the log-probs. The gate
    therefore acts exactly where :func:`gategrad.preference_loss` puts it: on the cotangent of
    the rejected log-probs.
    """

    name = "jax"

    def __init__(self, cfg: TransformerConfig, dtype: str = "float32") -> None:
        import jax
        import jax.numpy as jnp

        from gategrad.testing.models import jax_models

        if dtype == "float64" and not jax.config.read("jax_enable_x64"):
            jax.config.update("jax_enable_x64", True)
        self.jax, self.jnp, self.jm, self.cfg, self.dtype = jax, jnp, jax_models, cfg, dtype
        self._loss_fns: dict[Any, Any] = {}

        def lp_fn(params: Any, toks: Any, mask: Any) -> Any:
            from gategrad import token_logps

            logits = jax_models.transformer_logits(params, toks, cfg)
            return token_logps(logits, toks, mask)

        def eval_fn(params: Any, toks: Any, mask: Any) -> Any:
            from gategrad.metrics import sequence_metrics

            logits = jax_models.transformer_logits(params, toks, cfg)
            return sequence_metrics(logits, toks, mask)

        def bwd_fn(params: Any, state: Any, toks: Any, mask: Any, cot: Any, lr: Any) -> Any:
            _, vjp = jax.vjp(lambda p: lp_fn(p, toks, mask)[0], params)
            (grads,) = vjp(cot)
            return _jax_adam(jax, params, grads, state, lr)

        self._lp = jax.jit(lp_fn)
        self._eval = jax.jit(eval_fn)
        self._bwd = jax.jit(bwd_fn)

    def _dt(self) -> Any:
        return self.jnp.float64 if self.dtype == "float64" else self.jnp.float32

    def close(self) -> None:
        pass

    def load(self, np_params: dict[str, np.ndarray]) -> dict[str, Any]:
        return self.jm.params_from_numpy(np_params, self.dtype)

    def token_logps(self, params: Any, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        lp, _ = self._lp(params, tokens, _full(mask, len(tokens)))
        return np.asarray(lp, dtype=np.float64)

    def evaluate(self, params: Any, tokens: np.ndarray, mask: np.ndarray) -> dict:
        m = self._eval(params, tokens, _full(mask, len(tokens)))
        return {k: np.asarray(v, dtype=np.float64) for k, v in m.items()}

    def loss_fn(self, method: Any, beta: float) -> Any:
        """``(lp, valid, ref_c, ref_r) -> ((loss, gate), d loss / d lp)``, jitted per method."""
        key = (method.key, method.gate, tuple(sorted(method.loss_params.items())), float(beta))
        if key not in self._loss_fns:
            jax = self.jax

            def on_lp(lp: Any, valid: Any, rc: Any, rr: Any) -> Any:
                loss, gate = _pref_loss(method, lp, valid, rc, rr, beta)
                return loss, (self.jnp.ones_like(loss) if gate is None else gate)

            self._loss_fns[key] = jax.jit(jax.value_and_grad(on_lp, has_aux=True))
        return self._loss_fns[key]

    def trainer(self, params: Any, lr: float) -> _JaxTrainer:
        return _JaxTrainer(self, params, lr)


class _JaxTrainer:
    def __init__(self, engine: JaxEngine, params: Any, lr: float) -> None:
        jnp = engine.jnp
        self.e, self.params = engine, params
        zeros = engine.jax.tree_util.tree_map(jnp.zeros_like, params)
        self.state = (zeros, zeros, jnp.zeros((), engine._dt()))
        self.lr = jnp.asarray(lr, engine._dt())

    def sft_step(self, tokens: np.ndarray, mask: np.ndarray) -> float:
        m = _full(mask, len(tokens))
        lp, valid = self.e._lp(self.params, tokens, m)
        count = float(np.asarray(valid).sum())
        loss = -float(np.asarray(lp).sum()) / count
        cot = -np.asarray(valid, dtype=np.asarray(lp).dtype) / count
        self.params, self.state = self.e._bwd(self.params, self.state, tokens, m, cot, self.lr)
        return loss

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
        fn = self.e.loss_fn(method, beta)
        toks = np.concatenate([chosen, rejected])
        m = _full(mask, len(toks))
        lp, valid = self.e._lp(self.params, toks, m)
        dt = lp.dtype
        (loss, gate), cot = fn(lp, valid, np.asarray(ref_c, dt), np.asarray(ref_r, dt))
        self.params, self.state = self.e._bwd(self.params, self.state, toks, m, cot, self.lr)
        return {"loss": float(loss), "gate": float(gate)}


# ------------------------------------------------------------------------------------------
# MLX


class MlxEngine:
    """Eager MLX (``mx.value_and_grad``) with ``mlx.optimizers.Adam(bias_correction=True)``.

    MLX's CPU backend is several times slower than PyTorch for this tiny model.
    """

    name = "mlx"

    def __init__(self, cfg: TransformerConfig, dtype: str = "float32") -> None:
        import mlx.core as mx
        import mlx.optimizers as optim

        from gategrad.testing.models import mlx_models

        self.mx, self.optim, self.mm, self.cfg, self.dtype = mx, optim, mlx_models, cfg, dtype
        self._fns: dict[Any, Any] = {}

    def _dt(self) -> Any:
        return self.mx.float64 if self.dtype == "float64" else self.mx.float32

    def close(self) -> None:
        pass

    def load(self, np_params: dict[str, np.ndarray]) -> dict[str, Any]:
        return self.mm.params_from_numpy(np_params, self.dtype)

    def _lp(self, params: Any, toks: Any, mask: Any) -> Any:
        from gategrad import token_logps

        logits = self.mm.transformer_logits(params, toks, self.cfg)
        return token_logps(logits, toks, mask)

    def _arr(self, a: np.ndarray) -> Any:
        return self.mx.array(np.asarray(a, dtype=np.int32))

    def token_logps(self, params: Any, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        lp, _ = self._lp(params, self._arr(tokens), self._arr(_full(mask, len(tokens))))
        return np.array(lp.astype(self.mx.float32) if self.dtype != "float64" else lp).astype(
            np.float64
        )

    def evaluate(self, params: Any, tokens: np.ndarray, mask: np.ndarray) -> dict:
        from gategrad.metrics import sequence_metrics

        toks = self._arr(tokens)
        logits = self.mm.transformer_logits(params, toks, self.cfg)
        m = sequence_metrics(logits, toks, self._arr(_full(mask, len(tokens))))
        return {k: np.array(v).astype(np.float64) for k, v in m.items()}

    def cached(self, key: Any, build: Any) -> Any:
        """``build()``, cached by ``key``. (``mx.compile`` gave no measurable speed-up on a
        2-core CPU for this model, so the functions run eagerly.)"""
        if key not in self._fns:
            self._fns[key] = build()
        return self._fns[key]

    def sft_value_and_grad(self) -> Any:
        def loss_fn(p: Any, toks: Any, m: Any) -> Any:
            lp, valid = self._lp(p, toks, m)
            return -(lp.sum() / valid.astype(lp.dtype).sum())

        return self.mx.value_and_grad(loss_fn)

    def pref_value_and_grad(self, method: Any, beta: float) -> Any:
        mx = self.mx

        def loss_fn(p: Any, toks: Any, m: Any, rc: Any, rr: Any) -> Any:
            lp, valid = self._lp(p, toks, m)
            loss, gate = _pref_loss(method, lp, valid, rc, rr, beta)
            return loss, (mx.ones_like(loss) if gate is None else gate)

        return mx.value_and_grad(loss_fn)

    def trainer(self, params: Any, lr: float) -> _MlxTrainer:
        return _MlxTrainer(self, params, lr)


class _MlxTrainer:
    def __init__(self, engine: MlxEngine, params: Any, lr: float) -> None:
        self.e = engine
        self.params = dict(params)
        self.opt = engine.optim.Adam(
            learning_rate=lr, betas=list(_BETAS), eps=_EPS, bias_correction=True
        )

    def _apply(self, grads: Any) -> None:
        self.params = self.opt.apply_gradients(grads, self.params)
        self.e.mx.eval(self.params, self.opt.state)

    def sft_step(self, tokens: np.ndarray, mask: np.ndarray) -> float:
        e = self.e
        fn = e.cached("sft", lambda: e.sft_value_and_grad())
        loss, grads = fn(self.params, e._arr(tokens), e._arr(_full(mask, len(tokens))))
        self._apply(grads)
        return float(loss.item())

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
        mx, e = self.e.mx, self.e
        key = (method.key, method.gate, tuple(sorted(method.loss_params.items())), float(beta))
        fn = e.cached(key, lambda: e.pref_value_and_grad(method, beta))
        toks_np = np.concatenate([chosen, rejected])
        (loss, gate), grads = fn(
            self.params,
            e._arr(toks_np),
            e._arr(_full(mask, len(toks_np))),
            mx.array(ref_c, dtype=e._dt()),
            mx.array(ref_r, dtype=e._dt()),
        )
        self._apply(grads)
        return {"loss": float(loss.item()), "gate": float(gate.item())}
