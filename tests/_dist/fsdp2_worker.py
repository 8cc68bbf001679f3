"""FSDP2 worker of tests/test_distributed_engines.py: a gated DPO step on a tiny Llama.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        tests/_dist/fsdp2_worker.py OUT_DIR

Each rank holds 2 of the 4 pairs, laid out ``[chosen; rejected]``; the policy is sharded with
``torch.distributed.fsdp.fully_shard`` (each decoder layer, then the root) on a CPU mesh over
gloo. The gate is ``gategrad.torch.hook`` on the root module, installed before ``fully_shard``
(the order TRL and accelerate produce) or after it. Rank 0 saves, per mode, the global loss
(the mean of the ranks' losses), the full gradients (``DTensor.full_tensor()``), the gate
weights of every rank and the warnings that mention a view. The test computes the same step in
one process (the functions below, imported) and compares.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import numpy as np
import torch
import transformers

import gategrad
import gategrad.torch as gtorch
from gategrad import Gate

VOCAB = 32
PAIRS = 4  # the global batch: 4 pairs, 2 per rank
T = 12
# engages on this model: p (the geometric mean of token probabilities) is about 1/VOCAB
GATE = Gate(shape="sigmoid", alpha=50.0, tau=0.05)
GATE_ONE = Gate(shape=lambda p: p * 0 + 1)
TEMP = 0.8  # a logits temperature, applied in place in the "in-place" mode
MODES = ("before", "after", "before_inplace")


def make_model(seed: int) -> Any:
    """A random-init two-layer Llama (hidden size 16), built from a config (offline)."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float()


def make_batch(n_pairs: int = PAIRS, seed: int = 0) -> dict[str, np.ndarray]:
    """Prompt + response ids, right-padded: arrays ``(2, n_pairs, T)`` (chosen, rejected)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(2, n_pairs, T))
    attn = np.zeros((2, n_pairs, T), dtype=np.int64)
    resp = np.zeros((2, n_pairs, T), dtype=bool)
    for side in range(2):
        for i in range(n_pairs):
            prompt, length = int(rng.integers(2, 4)), int(rng.integers(5, T + 1))
            attn[side, i, :length] = 1
            resp[side, i, prompt:length] = True
    return {"input_ids": np.where(attn == 1, ids, 0), "attention_mask": attn, "resp": resp}


def rows(batch: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Pairs ``lo:hi`` as ``[chosen; rejected]`` rows (what one rank holds)."""
    return {
        k: torch.from_numpy(np.concatenate([v[0, lo:hi], v[1, lo:hi]])) for k, v in batch.items()
    }


def install_hook(model: Any, local: dict[str, torch.Tensor], gate: Gate) -> gtorch.GateHook:
    resp = local["resp"]
    return gtorch.hook(model, gate, rejected_rows="second_half", mask=lambda a, k, o: resp[:, 1:])


def dpo_step(
    model: Any,
    ref: Any,
    local: dict[str, torch.Tensor],
    *,
    loss_gate: Gate | None = None,
    temp: float | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Forward and backward of sigmoid DPO (beta 0.5) on local rows; returns the loss."""
    ids, attn, resp = local["input_ids"], local["attention_mask"], local["resp"]
    logits = model(input_ids=ids, attention_mask=attn).logits
    if temp is not None:
        logits = logits.div_(temp) if inplace else logits / temp
    lp, mask = gategrad.token_logps(logits, ids, resp)
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, attention_mask=attn).logits
        ref_lp, _ = gategrad.token_logps(ref_logits / temp if temp else ref_logits, ids, resp)
    loss, _ = gategrad.stacked_preference_loss(
        "sigmoid", lp, ref_lp, mask=mask, beta=0.5, gate=loss_gate
    )
    loss.backward()
    return loss.detach()


def full_grads(model: Any) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    mesh = init_device_mesh("cpu", (world,))
    per_rank = PAIRS // world
    local = rows(make_batch(), rank * per_rank, (rank + 1) * per_rank)
    result: dict[str, Any] = {}
    try:
        for mode in MODES:
            model, ref = make_model(0), make_model(1).requires_grad_(False)
            before = mode.startswith("before")
            handle = install_hook(model, local, GATE) if before else None
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if not before:
                handle = install_hook(model, local, GATE)
            assert isinstance(handle, gtorch.GateHook)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = dpo_step(
                    model, ref, local, temp=TEMP if "inplace" in mode else None, inplace=True
                )
            handle.remove()
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            weights = [torch.zeros(per_rank) for _ in range(world)]
            dist.all_gather(weights, handle.last_stats.weight.detach().float().reshape(-1))
            result[mode] = {
                "loss": float(loss),
                "grads": full_grads(model),
                "weights": torch.cat(weights),
                "calls": handle.calls,
                "view_warnings": [str(w.message) for w in caught if "view" in str(w.message)],
            }
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "fsdp2.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
