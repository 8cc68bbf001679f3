"""The paper's protocol on a tiny decoder-only transformer (torch, jax or mlx).

Per seed (all data and initial weights are NumPy, so every framework starts from the same
numbers):

1. a synthetic language (:mod:`gategrad.lab.grammar`) and the tiny transformer of
   :mod:`gategrad.testing.models` initialised with ``init_transformer_params(cfg, seed)``;
2. **SFT warm-up**: ``sft_steps`` Adam steps of next-token cross-entropy on fresh samples of the
   language (whole sequences); with ``sft="extended"`` every step also takes ``sft_batch // 4``
   training pairs, chosen **and** rejected sequences (Ren & Sutherland's extended SFT);
3. **preference pairs**: chosen = a language sample (on-distribution), rejected = the same prompt
   with uniformly random content tokens (off-policy and low-probability under the SFT model);
   the reference model is the SFT model;
4. for each method (loss x gate): ``steps`` Adam steps on mini-batches of ``batch_size`` pairs
   (the same batch order for every method of a seed), starting from the SFT weights;
5. **checkpoints** every ``eval_every`` steps (and at step 0): mean log-probs of held-out chosen
   and rejected responses, the five probe sets, the argmax / except-argmax / top-1 / entropy
   metrics of :mod:`gategrad.metrics` on the held-out chosen contexts, and the chosen and
   rejected log-probs of (up to ``n_heldout``) training pairs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from gategrad.testing.models import TransformerConfig, init_transformer_params

from .config import LabConfig
from .engines import get_engine
from .grammar import PROBE_SETS, LabData, make_lab_data, make_language
from .methods import Method

__all__ = ["model_config", "run_transformer"]


def model_config(cfg: LabConfig) -> TransformerConfig:
    """The :class:`TransformerConfig` of a lab config."""
    o = cfg.transformer
    return TransformerConfig(
        vocab=3 + o.n_topics + o.n_content,
        d_model=o.d_model,
        n_heads=o.n_heads,
        n_layers=o.n_layers,
        d_ff=o.d_ff,
        max_len=o.prompt_len + o.response_len + 3,
    )


class _EvalSet:
    """All evaluation sequences stacked once, with the slices of each group."""

    def __init__(self, data: LabData, n_train: int) -> None:
        groups = [
            ("chosen", data.heldout_chosen),
            ("rejected", data.heldout_rejected),
            *((f"probe:{k}", data.probes[k]) for k in PROBE_SETS),
            ("train_chosen", data.train_chosen[:n_train]),
            ("train_rejected", data.train_rejected[:n_train]),
        ]
        self.tokens = np.concatenate([g for _, g in groups])
        self.slices: dict[str, slice] = {}
        start = 0
        for name, g in groups:
            self.slices[name] = slice(start, start + len(g))
            start += len(g)
        self.mask = data.mask

    def checkpoint(self, engine: Any, params: Any) -> dict[str, Any]:
        m = engine.evaluate(params, self.tokens, self.mask)
        s = self.slices

        def mean(key: str, group: str) -> float:
            return float(np.mean(m[key][s[group]]))

        probes = {k: mean("logp", f"probe:{k}") for k in PROBE_SETS}
        return {
            "chosen": mean("logp", "chosen"),
            "rejected": mean("logp", "rejected"),
            "argmax": mean("argmax_logp", "chosen"),
            "except_argmax": mean("except_argmax", "chosen"),
            "top1": mean("top1", "chosen"),
            "entropy": mean("entropy", "chosen"),
            "others": float(np.mean(list(probes.values()))),
            "probes": probes,
            "train_chosen": mean("logp", "train_chosen"),
            "train_rejected": mean("logp", "train_rejected"),
        }


def _batches(seed: int, n_pairs: int, batch: int, steps: int) -> list[np.ndarray]:
    """Index batches for ``steps`` steps: a fresh permutation per epoch, the same for every
    method of a seed."""
    rng = np.random.default_rng([seed, 0xBA7C])
    out: list[np.ndarray] = []
    order = np.empty(0, dtype=np.int64)
    while len(out) < steps:
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(n_pairs)])
        out.append(order[:batch])
        order = order[batch:]
    return out


def run_transformer(
    cfg: LabConfig,
    methods: list[Method] | None = None,
    on_step: Callable[[int], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every method on every seed; return one record per (method, seed).

    Records as :func:`gategrad.lab.toy.run_toy`, plus ``"sft"`` facts of the seed (final SFT
    loss, the language's entropy rate, wall time). ``on_step(n)`` is called as steps complete
    and ``on_phase(text)`` when a new phase (SFT, a method) starts.
    """
    cfg = cfg.resolved()
    o = cfg.transformer
    methods = cfg.methods() if methods is None else methods
    mcfg = model_config(cfg)
    engine = get_engine(cfg.settled().backend, mcfg, o.dtype, o.threads)
    try:
        return _run(cfg, methods, engine, on_step, on_phase)
    finally:
        engine.close()


def _run(
    cfg: LabConfig,
    methods: list[Method],
    engine: Any,
    on_step: Callable[[int], None] | None,
    on_phase: Callable[[str], None] | None,
) -> list[dict[str, Any]]:
    o = cfg.transformer
    r = cfg.settled()
    mcfg = model_config(cfg)
    records = []
    for seed in cfg.seeds:
        t0 = time.perf_counter()
        lang = make_language(
            seed, o.n_topics, o.n_content, o.concentration, o.prompt_len, o.response_len
        )
        data = make_lab_data(lang, seed, o.n_pairs, o.n_heldout, o.n_probe)
        evalset = _EvalSet(data, min(o.n_heldout, o.n_pairs))
        if on_phase is not None:
            on_phase(f"seed {seed}: SFT")
        trainer = engine.trainer(engine.load(init_transformer_params(mcfg, seed)), o.sft_lr)
        rng = np.random.default_rng([seed, 0x5F7])
        full = lang.full_mask(1)
        sft_loss = float("nan")
        extra = max(1, o.sft_batch // 4) if cfg.sft == "extended" else 0
        for _ in range(o.sft_steps):
            tokens, _ = lang.sample(rng, o.sft_batch)
            if extra:  # the pairs' chosen and rejected sequences, whole (as the samples)
                idx = rng.integers(0, o.n_pairs, size=extra)
                tokens = np.concatenate([tokens, data.train_chosen[idx], data.train_rejected[idx]])
            sft_loss = trainer.sft_step(tokens, full)
            if on_step is not None:
                on_step(1)
        sft = trainer.params
        ref_c = engine.token_logps(sft, data.train_chosen, data.mask)
        ref_r = engine.token_logps(sft, data.train_rejected, data.mask)
        first = evalset.checkpoint(engine, sft)
        sft_info = {
            "loss": sft_loss,
            "entropy_rate": lang.entropy_rate(),
            "seconds": time.perf_counter() - t0,
        }
        batches = _batches(seed, o.n_pairs, o.batch_size, r.steps)
        for method in methods:
            if on_phase is not None:
                on_phase(f"seed {seed}: {method.name}")
            t1 = time.perf_counter()
            tr = engine.trainer(sft, r.lr)
            checkpoints = [{"step": 0, **first, "loss": float("nan"), "gate": float("nan")}]
            losses, gates = [], []
            for step, idx in enumerate(batches, start=1):
                info = tr.pref_step(
                    method,
                    data.train_chosen[idx],
                    data.train_rejected[idx],
                    data.mask,
                    ref_c[idx],
                    ref_r[idx],
                    cfg.beta,
                )
                losses.append(info["loss"])
                gates.append(info["gate"])
                if on_step is not None:
                    on_step(1)
                if step % r.eval_every == 0 or step == r.steps:
                    checkpoints.append(
                        {
                            "step": step,
                            **evalset.checkpoint(engine, tr.params),
                            "loss": float(np.mean(losses)),
                            "gate": float(np.mean(gates)),
                        }
                    )
                    losses, gates = [], []
            records.append(
                {
                    "method": method.key,
                    "name": method.name,
                    "seed": seed,
                    "checkpoints": checkpoints,
                    "sft": sft_info,
                    "seconds": time.perf_counter() - t1,
                }
            )
    return records
