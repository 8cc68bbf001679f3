"""Gated DPO with JAX and optax: a pure-JAX tiny transformer, ``jax.jit`` over the whole step.

    python examples/jax_optax_dpo.py            # 30 steps
    python examples/jax_optax_dpo.py --quick    # 3 steps (what the tests run)

The model is the conformance kit's tiny pre-LN transformer (``gategrad.testing.models``), a
dict of arrays. The task is synthetic: after a random prompt, the chosen response counts upwards
from the prompt's last token and the rejected one repeats it. Batches are right-padded, rows
``[chosen; rejected]``. One jitted function runs the policy and reference forwards, the gated
loss (:func:`gategrad.preference_loss`), the gradient and the optax update.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gategrad
from gategrad import Gate
from gategrad.testing.models import TransformerConfig, init_transformer_params
from gategrad.testing.models import jax_models as jm

CFG = TransformerConfig(vocab=32, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=16)


def make_batch(
    rng: np.random.Generator, n_pairs: int, cfg: TransformerConfig = CFG, length: int | None = None
) -> dict[str, np.ndarray]:
    """NumPy batch: ``input_ids``, ``attention_mask``, ``response_mask``, all ``(2B, T)``.

    ``T`` is fixed (``cfg.max_len`` by default) so that ``jax.jit`` compiles once.
    """
    length = cfg.max_len if length is None else length
    v = cfg.vocab
    ids = np.zeros((2 * n_pairs, length), dtype=np.int32)
    attn = np.zeros((2 * n_pairs, length), dtype=np.int32)
    resp = np.zeros((2 * n_pairs, length), dtype=bool)
    for i in range(n_pairs):
        prompt = rng.integers(1, v, size=int(rng.integers(2, 5))).tolist()
        chosen = [(prompt[-1] + k + 1) % (v - 1) + 1 for k in range(int(rng.integers(2, 6)))]
        rejected = [prompt[-1]] * int(rng.integers(1, 6))
        for row, response in ((i, chosen), (n_pairs + i, rejected)):
            seq = (prompt + response)[:length]
            ids[row, : len(seq)] = seq
            attn[row, : len(seq)] = 1
            resp[row, len(prompt) : len(seq)] = True
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def token_logps(params: Any, batch: dict[str, Any], cfg: TransformerConfig) -> tuple[Any, Any]:
    """Per-token log-probs ``(2B, T-1)`` of the response tokens, and their mask."""
    ids = jnp.asarray(batch["input_ids"])
    logits = jm.transformer_logits(params, ids, cfg, jnp.asarray(batch["attention_mask"]))
    return gategrad.token_logps(logits, ids, jnp.asarray(batch["response_mask"]))


def loss_fn(
    params: Any,
    ref_params: Any,
    batch: dict[str, Any],
    *,
    cfg: TransformerConfig = CFG,
    gate: Gate | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
) -> tuple[Any, dict[str, Any]]:
    """``(loss, metrics)`` of gated DPO: ``preference_loss`` on per-token log-probs."""
    logps, mask = token_logps(params, batch, cfg)
    ref_logps, _ = token_logps(jax.lax.stop_gradient(ref_params), batch, cfg)
    return gategrad.stacked_preference_loss(
        loss_type, logps, ref_logps, mask=mask, beta=beta, gate=gate
    )


def make_train_step(
    optimizer: optax.GradientTransformation,
    *,
    cfg: TransformerConfig = CFG,
    gate: Gate | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
) -> Callable[..., Any]:
    """``step(params, opt_state, ref_params, batch) -> (params, opt_state, loss, metrics, grads)``,
    jitted as a whole."""

    def step(params: Any, opt_state: Any, ref_params: Any, batch: dict[str, Any]) -> Any:
        grad_fn = jax.value_and_grad(
            lambda p: loss_fn(
                p, ref_params, batch, cfg=cfg, gate=gate, loss_type=loss_type, beta=beta
            ),
            has_aux=True,
        )
        (loss, metrics), grads = grad_fn(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, metrics, grads

    return jax.jit(step)


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 steps, batch 4 (for tests)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--loss-type", default="sigmoid")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--no-gate", action="store_true", help="plain DPO, for comparison")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch = 3, 4

    params = jm.params_from_numpy(init_transformer_params(CFG, seed=0), "float32")
    ref_params = jax.tree.map(jnp.copy, params)
    optimizer = optax.adamw(args.lr)
    opt_state = optimizer.init(params)
    gate = None if args.no_gate else Gate()
    step = make_train_step(optimizer, gate=gate, loss_type=args.loss_type, beta=args.beta)
    rng = np.random.default_rng(0)
    history = []
    print(f"jax {jax.__version__} on {jax.devices()[0]}; gate={gate}")
    for i in range(args.steps):
        batch = make_batch(rng, args.batch)
        t0 = time.perf_counter()
        params, opt_state, loss, metrics, _ = step(params, opt_state, ref_params, batch)
        row = {"step": i + 1, "loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        shown = "  ".join(
            f"{k}={v:.4f}"
            for k, v in row.items()
            if k in ("loss", "rewards/margins", "rewards/accuracies", "gate/mean", "gate/p_mean")
        )
        print(f"step {i + 1:3d}  {shown}")
    return history


if __name__ == "__main__":
    main()
