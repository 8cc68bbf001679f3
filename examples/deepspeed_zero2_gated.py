"""Gate a DPO step under DeepSpeed ZeRO-2 (2 CPU processes) and compare it with one process.

Not run by the test suite: DeepSpeed is not a gategrad dependency, and its first launch
compiles a CPU communication op (minutes). tests/test_examples.py skips this script when
DeepSpeed is not installed. Run it by hand:

    pip install ".[torch]" transformers
    DS_BUILD_OPS=0 pip install deepspeed       # from its source archive: needs `wheel`
    python examples/deepspeed_zero2_gated.py --quick

Without a launcher it starts itself under ``torchrun`` with 2 processes (``DS_ACCELERATOR=cpu``,
gloo). Each rank holds 2 of 4 preference pairs, laid out ``[chosen; rejected]``; the policy is
a tiny random-init ``LlamaForCausalLM`` built from a config (offline). The gate is
``gategrad.torch.hook`` on the policy, installed before ``deepspeed.initialize`` (as
``attach`` does under ``accelerate launch`` with a DeepSpeed config). Under ZeRO ``p.grad`` is
``None``: after the backward, rank 0 reads the full averaged gradients with
``deepspeed.utils.safe_get_full_grad`` (before ``engine.step``) and compares them with one
process's step on the 4 pairs, within 1e-5 of each tensor's scale (float32: the same sums,
grouped per rank). ``--steps N`` trains N steps (``--quick``: 1) and prints the losses.
"""

# requires: deepspeed transformers  (tests/test_examples.py skips the script without them)

from __future__ import annotations

import argparse
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import transformers  # noqa: E402

import gategrad  # noqa: E402
import gategrad.torch as gtorch  # noqa: E402
from gategrad import Gate  # noqa: E402

VOCAB, T, PAIRS = 32, 12, 4
GATE = Gate(shape="sigmoid", alpha=50.0, tau=0.05)  # engages here: p is about 1/VOCAB
TOL = 1e-5


def make_model(seed: int) -> transformers.LlamaForCausalLM:
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
    return transformers.LlamaForCausalLM(config)


def make_pairs(seed: int = 0) -> dict[str, torch.Tensor]:
    """``(2, PAIRS, T)`` ids, attention masks and response masks (chosen, rejected)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, PAIRS, T), generator=g)
    attn = torch.zeros(2, PAIRS, T, dtype=torch.long)
    resp = torch.zeros(2, PAIRS, T, dtype=torch.bool)
    for side in range(2):
        for i in range(PAIRS):
            prompt = int(torch.randint(2, 4, (1,), generator=g))
            length = int(torch.randint(5, T + 1, (1,), generator=g))
            attn[side, i, :length] = 1
            resp[side, i, prompt:length] = True
    return {"input_ids": ids * attn, "attention_mask": attn, "resp": resp}


def rows(pairs: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    return {k: torch.cat([v[0, lo:hi], v[1, lo:hi]]) for k, v in pairs.items()}


def dpo_loss(model, ref, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["resp"]
    lp, mask = gategrad.token_logps(model(input_ids=ids, attention_mask=attn).logits, ids, resp)
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, attention_mask=attn).logits
        ref_lp, _ = gategrad.token_logps(ref_logits, ids, resp)
    loss, _ = gategrad.stacked_preference_loss("sigmoid", lp, ref_lp, mask=mask, beta=0.5)
    return loss


def hook(model, batch: dict[str, torch.Tensor]) -> gtorch.GateHook:
    resp = batch["resp"]
    return gtorch.hook(model, GATE, rejected_rows="second_half", mask=lambda a, k, o: resp[:, 1:])


def one_process_grads(gated: bool = True) -> dict[str, torch.Tensor]:
    model, ref = make_model(0), make_model(1).requires_grad_(False)
    batch = rows(make_pairs(), 0, PAIRS)
    handle = hook(model, batch) if gated else None
    dpo_loss(model, ref, batch).backward()
    if handle is not None:
        handle.remove()
    return {n: p.grad for n, p in model.named_parameters()}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Over the tensors: max |a - b| / max |b| (scale-relative)."""
    return max(float((a[n] - b[n]).abs().max()) / float(b[n].abs().max()) for n in b)


def main(steps: int) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"run with 2 processes, got {world}"
    per_rank = PAIRS // world
    batch = rows(make_pairs(), rank * per_rank, (rank + 1) * per_rank)
    model, ref = make_model(0), make_model(1).requires_grad_(False)
    handle = hook(model, batch)  # before initialize, as accelerate and TRL do
    config = {
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    for step in range(steps):
        loss = dpo_loss(engine, ref, batch)
        engine.backward(loss)
        if step == 0:
            grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
            if rank == 0:
                worst = largest_difference(grads, one_process_grads())
                ungated = largest_difference(grads, one_process_grads(gated=False))
                print(
                    f"ZeRO-2 vs one process: largest gradient difference {worst:.2e} "
                    f"(vs the ungated gradient: {ungated:.2f})"
                )
                assert worst <= TOL, f"{worst} > {TOL}"
                assert ungated > 0.1, "the gate did not change the gradient"
        engine.step()
        loss = loss.detach()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        if rank == 0:
            gate_mean = float(handle.last_stats.weight.mean())
            print(f"step {step}: loss {float(loss):.5f}, gate/mean {gate_mean:.3f}")
    handle.remove()
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 step")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:  # not under a launcher: start 2 processes
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc_per_node", "2", __file__, *sys.argv[1:]]
        sys.exit(subprocess.call(launcher))
    main(1 if args.quick else args.steps)
