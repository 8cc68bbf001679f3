"""The embedded toy: preference learning of a shared-feature softmax classifier, in NumPy.

Why not one categorical: with a single tied categorical (chosen and rejected sharing one set of
logits), the ``+pi`` terms of the chosen and rejected branches cancel and squeezing cannot
appear. Here every example has its own context vector, and all contexts share a common
direction (``c_i . c_j ~ shared^2``), so the negative gradient on one example's rejected class
leaks into the other examples' distributions, exactly as shared features do in a transformer.

Setup (per seed; see :class:`gategrad.lab.config.ToyOptions`):

- contexts ``c_i`` from :func:`gategrad.testing.models.make_shared_contexts`;
- a random teacher ``softmax(c W_T)`` labels every context: chosen ~ teacher (on-distribution),
  rejected uniform among the other classes;
- the policy is ``softmax(c W + b)`` with :func:`gategrad.testing.models.init_softmax_params`;
  SFT warm-up: the policy is distilled from the teacher on the training contexts; the reference
  model is the policy after SFT;
- full-batch steps of the preference loss with the closed-form gradients of
  :mod:`gategrad.lab._numpy_grads`, the gate applied to the rejected branch only;
- checkpoints: ``chosen``/``rejected`` on the training pairs (the ones being optimised), and on
  the held-out contexts their own labels (``heldout_chosen``/``heldout_rejected``), the
  per-context argmax, top-1 mass and entropy, and five probe sets of random labels ("others").

A one-class response is a one-token response, so the ``seq`` and ``q10`` estimators coincide
and the per-token gate is the per-example gate with the log-space shape.
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
    """Contexts, labels and probes of one seed (plain NumPy arrays)."""

    def __init__(self, cfg: LabConfig, seed: int) -> None:
        o = cfg.toy
        rng = np.random.default_rng(seed)
        n = o.n_train + o.n_heldout
        x = make_shared_contexts(n, o.dim, o.shared, seed=seed)
        teacher = rng.normal(0.0, o.teacher_scale, size=(o.dim, o.vocab))
        pt = np.exp(ng.log_softmax(x @ teacher))
        chosen = np.array([rng.choice(o.vocab, p=p / p.sum()) for p in pt])
        offset = rng.integers(1, o.vocab, size=n)  # any class but the chosen one
        rejected = (chosen + offset) % o.vocab
        self.x_train, self.x_heldout = x[: o.n_train], x[o.n_train :]
        self.chosen_train, self.chosen_heldout = chosen[: o.n_train], chosen[o.n_train :]
        self.rejected_train, self.rejected_heldout = rejected[: o.n_train], rejected[o.n_train :]
        self.teacher_train = pt[: o.n_train]
        self.targets_train = np.stack([self.chosen_train, self.rejected_train], axis=1)
        self.probes = rng.integers(0, o.vocab, size=(o.n_probes, o.n_heldout))
        self.params0 = init_softmax_params(SoftmaxConfig(o.vocab, o.dim), seed=seed)


def make_toy_data(cfg: LabConfig, seed: int) -> ToyData:
    """The toy's data and initial parameters for ``seed``."""
    return ToyData(cfg, seed)


def _evaluate(params: dict[str, np.ndarray], data: ToyData) -> dict[str, Any]:
    w, b = params["W"], params["b"]
    logits = (data.x_heldout @ w + b)[:, None, :]
    m = sequence_metrics(logits, data.chosen_heldout[:, None], shift=False)
    logp = ng.log_softmax(logits[:, 0])
    train_logp = ng.log_softmax(data.x_train @ w + b)
    probes = {f"probe{k}": float(np.mean(ng.pick(logp, lab))) for k, lab in enumerate(data.probes)}
    return {
        "chosen": float(np.mean(ng.pick(train_logp, data.chosen_train))),
        "rejected": float(np.mean(ng.pick(train_logp, data.rejected_train))),
        "argmax": float(np.mean(m["argmax_logp"])),
        "except_argmax": float(np.mean(m["except_argmax"])),
        "top1": float(np.mean(m["top1"])),
        "entropy": float(np.mean(m["entropy"])),
        "others": float(np.mean(list(probes.values()))),
        "probes": probes,
        "heldout_chosen": float(np.mean(m["logp"])),
        "heldout_rejected": float(np.mean(ng.pick(logp, data.rejected_heldout))),
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
    logits = x @ params["W"] + params["b"]
    logp = ng.log_softmax(logits)
    pi_w, pi_l = ng.pick(logp, data.chosen_train), ng.pick(logp, data.rejected_train)
    lg = ng.loss_grads(
        method.loss_type,
        pi_w,
        pi_l,
        ref[0],
        ref[1],
        beta=beta,
        chosen_lengths=1,
        rejected_lengths=1,
        **method.loss_params,
    )
    d_l = lg.d_rejected
    gate_mean = 1.0
    if method.gate_kind == "zero":
        d_l, gate_mean = np.zeros_like(d_l), 0.0
    elif method.gate is not None:
        # one-token responses as (B, 1) per-token log-probs: every estimator applies
        d2, g = ng.gate_grad(d_l[:, None], pi_l[:, None], method.gate)
        d_l = d2[:, 0]
        gate_mean = float(np.mean(g))
    targets = data.targets_train
    grads = ng.softmax_grads(
        x, logits, targets, np.stack([lg.d_chosen, d_l], axis=1), probs=np.exp(logp)
    )
    return grads, {"loss": lg.loss, "gate": gate_mean}


def _sft(params: dict[str, np.ndarray], data: ToyData, cfg: LabConfig) -> None:
    """Distil the teacher into the policy: full-batch cross-entropy to the teacher's
    distribution on the training contexts (Adam, lr 0.05)."""
    opt = _Optimizer("adam", 0.05, params)
    x, pt = data.x_train, data.teacher_train
    for _ in range(cfg.toy.sft_steps):
        probs = np.exp(ng.log_softmax(x @ params["W"] + params["b"]))
        dz = (probs - pt) / x.shape[0]
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
        ref = (ng.pick(logp0, data.chosen_train), ng.pick(logp0, data.rejected_train))
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
