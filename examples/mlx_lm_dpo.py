"""Gated DPO on an mlx-lm model: a tiny llama built from ``ModelArgs``, offline.

    python examples/mlx_lm_dpo.py            # 30 steps
    python examples/mlx_lm_dpo.py --quick    # 3 steps (what the tests run)

The task is synthetic: after a prompt of random tokens, the chosen response counts upwards from
the prompt's last token and the rejected one repeats it. The step is compiled with
``mx.compile``; the gate (the paper's sigmoid gate) scales the gradient of the rejected
log-probs only. On Apple Silicon this runs on the GPU (Metal) in float32; on Linux it runs on
MLX's CPU build (``pip install 'mlx[cpu]' 'mlx-lm[cpu]'``).
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx_lm.models import llama

from gategrad import Gate
from gategrad.integrations import mlx_lm as gm

VOCAB = 32


def tiny_llama(seed: int, hidden: int = 32, layers: int = 2) -> llama.Model:
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def synthetic_pairs(rng: np.random.Generator, n: int) -> tuple[list, list, list]:
    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        p = rng.integers(1, VOCAB, size=int(rng.integers(2, 5))).tolist()
        k = int(rng.integers(2, 6))
        prompts.append(p)
        chosen.append([(p[-1] + i + 1) % (VOCAB - 1) + 1 for i in range(k)])
        rejected.append([p[-1]] * int(rng.integers(1, 6)))
    return prompts, chosen, rejected


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 steps, batch 4 (for tests)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--loss-type", default="sigmoid")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--no-gate", action="store_true", help="plain DPO, for comparison")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch = 3, 4

    model = tiny_llama(seed=0)
    ref = tiny_llama(seed=0)
    ref.update(model.parameters())
    ref.freeze()
    gate = None if args.no_gate else Gate()
    step = gm.make_train_step(
        model,
        optim.Adam(learning_rate=args.lr),
        gate=gate,
        loss_type=args.loss_type,
        beta=args.beta,
        ref_model=None if args.loss_type == "simpo" else ref,
        compile=not args.no_compile,
    )
    rng = np.random.default_rng(0)
    history = []
    print(f"mlx {mx.__version__} on {mx.default_device()}; gate={gate}")
    for i in range(args.steps):
        batch = gm.make_batch(*synthetic_pairs(rng, args.batch))
        t0 = time.perf_counter()
        loss, metrics = step(batch)
        seconds = time.perf_counter() - t0
        values = {k: v.item() for k, v in metrics.items()}
        history.append({"step": i + 1, "loss": loss.item(), **values, "seconds": seconds})
        print(
            f"step {i + 1:3d}  loss={loss.item():.4f}  margin={values['rewards/margins']:.4f}  "
            f"gate/mean={values.get('gate/mean', 1.0):.3f}  ({seconds:.2f} s)"
        )
    return history


if __name__ == "__main__":
    main()
