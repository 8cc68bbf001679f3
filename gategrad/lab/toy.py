"""The embedded toy: preference learning of a shared-feature softmax classifier, in NumPy.

Why not one categorical: with a single tied categorical (chosen and rejected sharing one set of
logits), the ``+pi`` terms of the chosen and rejected branches cancel and squeezing cannot
appear. Here every example has its own context vector, and all contexts share a common
direction (``c_i . c_j ~ shared^2``), so the negative gradient on one example's rejected class
leaks into the other examples' distributions, exactly as shared features do in a transformer.

Setup (per seed; see :class:`gategrad.lab.config.ToyOptions`):

- a response is ``response_len`` tokens (default 4); every response position ``t`` of example
  ``i`` has its own context ``c_it`` from :func:`gategrad.testing.models.make_shared_contexts`
  (so ``seq``, ``q10`` and the per-token gate see different probabilities, and give different
  numbers);
- a random teacher ``softmax(c W_T)`` labels every position: chosen token ~ teacher
  (on-distribution), rejected token uniform among the other classes;
- the policy is ``softmax(c W + b)`` at every position, with
  :func:`gategrad.testing.models.init_softmax_params`; a response's log-prob is the sum over
  its positions;
- SFT warm-up: the policy is distilled from the teacher on the training contexts
  (``sft="extended"``: towards the mixture of the teacher, the chosen and the rejected tokens,
  Ren & Sutherland's extended SFT); the reference model is the policy after SFT;
- full-batch steps of the preference loss with the closed-form gradients of
  :mod:`gategrad.lab._numpy_grads`, the gate applied to the rejected branch only;
- checkpoints: ``chosen``/``rejected`` on the training pairs (the ones being optimised), and on
  the held-out contexts their own labels (``heldout_chosen``/``heldout_rejected``), the
  per-position argmax, top-1 mass and entropy, and five probe sets of random labels ("others").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gategrad.metrics import sequence_metrics
from gategrad.testing.models import SoftmaxConfig, init_softmax_params, make_shared_contexts

from . import _numpy_grads as ng
from .config import LabConfig
from .methods import Method

__all__ = ["ToyData", "make_toy_data", "run_toy", "toy_step"]


class ToyData:
    """Contexts ``(N, L, D)``, labels ``(N, L)`` and probes ``(n_probes, N_heldout, L)`` of one
    seed (plain NumPy arrays; ``L = response_len``)."""

    def __init__(self, cfg: LabConfig, seed: int) -> None:
        o = cfg.toy
        rng = np.random.default_rng(seed)
        n, length = o.n_train + o.n_heldout, o.response_len
        x = make_shared_contexts(n * length, o.dim, o.shared, seed=seed).reshape(n, length, o.dim)
        teacher = rng.normal(0.0, o.teacher_scale, size=(o.dim, o.vocab))
        pt = np.exp(ng.log_softmax(x @ teacher))
        u = rng.random((n, length, 1))  # inverse-CDF sampling of the teacher, per position
        chosen = np.minimum((u > np.cumsum(pt, axis=-1)).sum(axis=-1), o.vocab - 1)
        offset = rng.integers(1, o.vocab, size=(n, length))  # any class but the chosen one
        rejected = (chosen + offset) % o.vocab
        self.length = length
        self.x_train, self.x_heldout = x[: o.n_train], x[o.n_train :]
        self.chosen_train, self.chosen_heldout = chosen[: o.n_train], chosen[o.n_train :]
        self.rejected_train, self.rejected_heldout = rejected[: o.n_train], rejected[o.n_train :]
        self.teacher_train = pt[: o.n_train]
        self.probes = rng.integers(0, o.vocab, size=(o.n_probes, o.n_heldout, length))
        self.params0 = init_softmax_params(SoftmaxConfig(o.vocab, o.dim), seed=seed)

    @property
    def targets_train(self) -> np.ndarray:
        """``(N * L, 2)``: the chosen and rejected token of every training position."""
        return np.stack([self.chosen_train.ravel(), self.rejected_train.ravel()], axis=1)


def make_toy_data(cfg: LabConfig, seed: int) -> ToyData:
    """The toy's data and initial parameters for ``seed``."""
    return ToyData(cfg, seed)


def _seq_logp(logp: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Summed log-probs ``(N,)`` of the responses ``labels`` ``(N, L)`` under ``logp``
    ``(N, L, V)``."""
    return np.take_along_axis(logp, labels[..., None], axis=-1)[..., 0].sum(axis=-1)


def _evaluate(params: dict[str, np.ndarray], data: ToyData) -> dict[str, Any]:
    w, b = params["W"], params["b"]
    logits = data.x_heldout @ w + b
    m = sequence_metrics(logits, data.chosen_heldout, shift=False)
    logp = ng.log_softmax(logits)
    train_logp = ng.log_softmax(data.x_train @ w + b)
    probes = {
        f"probe{k}": float(np.mean(_seq_logp(logp, lab))) for k, lab in enumerate(data.probes)
    }
    return {
        "chosen": float(np.mean(_seq_logp(train_logp, data.chosen_train))),
        "rejected": float(np.mean(_seq_logp(train_logp, data.rejected_train))),
        "argmax": float(np.mean(m["argmax_logp"])),
        "except_argmax": float(np.mean(m["except_argmax"])),
        "top1": float(np.mean(m["top1"])),
        "entropy": float(np.mean(m["entropy"])),
        "others": float(np.mean(list(probes.values()))),
        "probes": probes,
        "heldout_chosen": float(np.mean(m["logp"])),
        "heldout_rejected": float(np.mean(_seq_logp(logp, data.rejected_heldout))),
    }


class _Optimizer:
    """Plain SGD or Adam (PyTorch's formula) on a dict of float64 arrays."""

    def __init__(self, kind: str, lr: float, params: dict[str, np.ndarray]) -> None:
        if kind not in ("sgd", "adam"):
            raise ValueError(f"toy optimizer must be 'sgd' or 'adam', got {kind!r}")
        self.kind, self.lr, self.t = kind, lr, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.t += 1
        for k, g in grads.items():
            if self.kind == "sgd":
                params[k] -= self.lr * g
                continue
            self.m[k] = 0.9 * self.m[k] + 0.1 * g
            self.v[k] = 0.999 * self.v[k] + 0.001 * g * g
            mhat = self.m[k] / (1 - 0.9**self.t)
            vhat = self.v[k] / (1 - 0.999**self.t)
            params[k] -= self.lr * mhat / (np.sqrt(vhat) + 1e-8)


def toy_step(
    params: dict[str, np.ndarray],
    data: ToyData,
    method: Method,
    ref: tuple[np.ndarray, np.ndarray],
    beta: float,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Gradients of one full-batch preference step (and ``loss``, ``gate`` means).

    ``ref``: the reference model's (chosen, rejected) log-probs on the training contexts.
    """
    x = data.x_train
    n, length, dim = x.shape
    logits = x @ params["W"] + params["b"]  # (N, L, V)
    logp = ng.log_softmax(logits)
    tok_w = np.take_along_axis(logp, data.chosen_train[..., None], axis=-1)[..., 0]
    tok_l = np.take_along_axis(logp, data.rejected_train[..., None], axis=-1)[..., 0]
    lg = ng.loss_grads(
        method.loss_type,
        tok_w.sum(axis=1),
        tok_l.sum(axis=1),
        ref[0],
        ref[1],
        beta=beta,
        chosen_lengths=length,
        rejected_lengths=length,
        **method.loss_params,
    )
    # d loss / d (each token's log-prob) = d loss / d (the response's sum)
    d_w = np.repeat(lg.d_chosen[:, None], length, axis=1)
    d_l = np.repeat(lg.d_rejected[:, None], length, axis=1)
    gate_mean = 1.0
    if method.gate_kind == "zero":
        d_l, gate_mean = np.zeros_like(d_l), 0.0
    elif method.gate is not None:  # per-token log-probs (N, L): every estimator applies
        d_l, g = ng.gate_grad(d_l, tok_l, method.gate)
        gate_mean = float(np.mean(g))
    grads = ng.softmax_grads(
        x.reshape(n * length, dim),
        logits.reshape(n * length, -1),
        data.targets_train,
        np.stack([d_w.ravel(), d_l.ravel()], axis=1),
        probs=np.exp(logp).reshape(n * length, -1),
    )
    return grads, {"loss": lg.loss, "gate": gate_mean}


def sft_target(data: ToyData, mode: str) -> np.ndarray:
    """The SFT target distribution ``(N * L, V)`` of every training position: the teacher
    (``standard``) or the mean of the teacher, the chosen token and the rejected token
    (``extended``: SFT on the chosen and the rejected responses as well)."""
    pt = data.teacher_train.reshape(-1, data.teacher_train.shape[-1])
    if mode == "standard":
        return pt
    eye = np.eye(pt.shape[1])
    return (pt + eye[data.chosen_train.ravel()] + eye[data.rejected_train.ravel()]) / 3.0


def _sft(params: dict[str, np.ndarray], data: ToyData, cfg: LabConfig) -> None:
    """Distil :func:`sft_target` into the policy: full-batch cross-entropy on the training
    contexts (Adam, lr 0.05)."""
    opt = _Optimizer("adam", 0.05, params)
    x = data.x_train.reshape(-1, data.x_train.shape[-1])
    target = sft_target(data, cfg.sft)
    for _ in range(cfg.toy.sft_steps):
        probs = np.exp(ng.log_softmax(x @ params["W"] + params["b"]))
        dz = (probs - target) / x.shape[0]
        opt.step(params, {"W": x.T @ dz, "b": dz.sum(axis=0)})


def run_toy(
    cfg: LabConfig,
    methods: list[Method] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every method on every seed; return one record per (method, seed).

    Each record: ``{"method": key, "name", "seed", "checkpoints": [{"step", "chosen",
    "rejected", "argmax", "except_argmax", "top1", "entropy", "others", "probes",
    "train_chosen", "train_rejected", "loss", "gate"}, ...]}``. ``on_step(n)`` is called after
    every ``n`` optimisation steps (progress bars).
    """
    cfg = cfg.resolved()
    r = cfg.settled()
    methods = cfg.methods() if methods is None else methods
    records = []
    for seed in cfg.seeds:
        data = make_toy_data(cfg, seed)
        start = {k: v.copy() for k, v in data.params0.items()}
        _sft(start, data, cfg)
        logp0 = ng.log_softmax(data.x_train @ start["W"] + start["b"])
        ref = (_seq_logp(logp0, data.chosen_train), _seq_logp(logp0, data.rejected_train))
        first = _evaluate(start, data)
        for method in methods:
            params = {k: v.copy() for k, v in start.items()}
            opt = _Optimizer(cfg.toy.optimizer, r.lr, params)
            checkpoints = [{"step": 0, **first, "loss": float("nan"), "gate": float("nan")}]
            done = 0
            for step in range(1, r.steps + 1):
                grads, info = toy_step(params, data, method, ref, cfg.beta)
                opt.step(params, grads)
                if step % r.eval_every == 0 or step == r.steps:
                    checkpoints.append({"step": step, **_evaluate(params, data), **info})
                    if on_step is not None:
                        on_step(step - done)
                    done = step
            records.append(
                {
                    "method": method.key,
                    "name": method.name,
                    "seed": seed,
                    "checkpoints": checkpoints,
                }
            )
    return records
