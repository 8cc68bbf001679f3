"""Distributed training: the gate is elementwise on each process's (or device's) local rows.

- torch DDP, gloo backend, 2 processes spawned by the test on this machine: the averaged
  gradients of a gated DPO step equal the single-process gradients on the combined batch, with
  the gate in the loss (``preference_loss(gate=...)``) and with the module hook
  (``gategrad.torch.hook`` on each rank's model).
- JAX: with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (in a subprocess, since the
  flag must precede JAX's start), a batch sharded over 2 devices with ``NamedSharding`` gives the
  same gated gradients as one device.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
from _backends import stacked_pair_loss

torch = pytest.importorskip("torch", reason="the DDP test needs PyTorch")

import gategrad  # noqa: E402
from gategrad import Gate  # noqa: E402
from gategrad.testing.models import TransformerConfig, init_transformer_params  # noqa: E402

pytestmark = pytest.mark.slow

CFG = TransformerConfig(vocab=32, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=12)
GATE = Gate(shape="sigmoid", alpha=50.0, tau=0.05)  # engages on this model: g in (0, 1)
PAIRS = 4  # combined batch: 4 pairs, 2 per rank
WORLD = 2
TOL32 = 1e-5  # scale-relative, float32


def make_batch(n_pairs: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = CFG.max_len
    ids = rng.integers(1, CFG.vocab, size=(2, n_pairs, t))
    attn = np.zeros((2, n_pairs, t), dtype=np.int64)
    resp = np.zeros((2, n_pairs, t), dtype=bool)
    for side in range(2):
        for i in range(n_pairs):
            prompt, length = int(rng.integers(2, 4)), int(rng.integers(4, t + 1))
            attn[side, i, :length] = 1
            resp[side, i, prompt:length] = True
    ids = np.where(attn == 1, ids, 0)
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}  # (2, B, T)


def rows(batch: dict[str, np.ndarray], lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Pairs ``lo:hi`` laid out as ``[chosen; rejected]`` rows (what each rank holds)."""
    return {
        k: torch.from_numpy(np.concatenate([v[0, lo:hi], v[1, lo:hi]])) for k, v in batch.items()
    }


class TinyLM(torch.nn.Module):
    """The conformance kit's tiny transformer as an ``nn.Module`` (for DDP)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        from gategrad.testing.models import torch_models as tm

        self.tm = tm
        params = tm.params_from_numpy(init_transformer_params(CFG, seed), "float32")
        self.params = torch.nn.ParameterDict(
            {k.replace(".", "__"): torch.nn.Parameter(v) for k, v in params.items()}
        )

    def forward(self, input_ids, attention_mask=None):
        params = {k.replace("__", "."): v for k, v in self.params.items()}
        return self.tm.transformer_logits(params, input_ids, CFG, attention_mask)


def dpo_step_grads(model, ref, local, mode: str) -> tuple[float, dict[str, torch.Tensor]]:
    """One gated DPO forward/backward on local rows; gate in the loss or in a module hook."""
    ids, attn, resp = local["input_ids"], local["attention_mask"], local["response_mask"]
    inner = getattr(model, "module", model)
    handle = None
    if mode == "hook":
        handle = gategrad.torch.hook(
            inner, GATE, rejected_rows="second_half", mask=lambda a, k, o: resp[:, 1:]
        )
    logits = model(ids, attention_mask=attn)
    if handle is not None:
        handle.remove()
    lp, mask = gategrad.token_logps(logits, ids, resp)
    with torch.no_grad():
        ref_lp, _ = gategrad.token_logps(ref(ids, attention_mask=attn), ids, resp)
    loss, _ = stacked_pair_loss(lp, ref_lp, mask, beta=0.5, gate=GATE if mode == "loss" else None)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in inner.named_parameters()}
    inner.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(TinyLM(seed=0))
        ref = TinyLM(seed=1).requires_grad_(False)
        per_rank = PAIRS // WORLD
        local = rows(make_batch(PAIRS), rank * per_rank, (rank + 1) * per_rank)
        result = {mode: dpo_step_grads(model, ref, local, mode) for mode in ("loss", "hook")}
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def assert_close(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = float(b[k].abs().max()) or 1.0
        err = float((a[k] - b[k]).abs().max())
        assert err <= tol * scale, f"{k}: {err:.3g} > {tol} * {scale:.3g}"


def test_ddp_gloo_two_processes_equal_single_process(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend [allowed-skip]")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")

    torch.set_num_threads(1)
    model, ref = TinyLM(seed=0), TinyLM(seed=1).requires_grad_(False)
    combined = rows(make_batch(PAIRS), 0, PAIRS)
    single = {mode: dpo_step_grads(model, ref, combined, mode) for mode in ("loss", "hook")}
    plain = dpo_step_grads(model, ref, combined, "none")
    for mode in ("loss", "hook"):
        assert_close(ddp[mode][1], single[mode][1], TOL32)
    assert_close(single["hook"][1], single["loss"][1], TOL32)
    # the gate is engaged: the gated gradient is not the plain one
    assert any(
        float((single["loss"][1][k] - plain[1][k]).abs().max())
        > 1e-3 * float(plain[1][k].abs().max())
        for k in plain[1]
    )


JAX_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import gategrad
    from gategrad import Gate
    from gategrad.testing.models import TransformerConfig, init_transformer_params
    from gategrad.testing.models import jax_models as jm

    assert len(jax.devices()) == 2, jax.devices()
    cfg = TransformerConfig(vocab=32, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=12)
    gate = Gate(shape="sigmoid", alpha=50.0, tau=0.05)
    rng = np.random.default_rng(0)
    B, T = 4, cfg.max_len
    ids = rng.integers(1, cfg.vocab, size=(2, B, T)).astype(np.int32)
    resp = np.zeros((2, B, T), dtype=bool)
    for s in range(2):
        for i in range(B):
            resp[s, i, int(rng.integers(2, 4)):int(rng.integers(5, T + 1))] = True
    params = jm.params_from_numpy(init_transformer_params(cfg, 0), "float32")
    ref = jm.params_from_numpy(init_transformer_params(cfg, 1), "float32")

    def logps(p, x, m):  # (2, B, T): chosen and rejected sides, one forward for both
        flat = x.reshape(-1, x.shape[-1])
        lp, mask = gategrad.token_logps(jm.transformer_logits(p, flat, cfg), flat,
                                        m.reshape(flat.shape))
        return lp.reshape(2, -1, lp.shape[-1]), mask.reshape(2, -1, mask.shape[-1])

    def loss_fn(p, x, m):
        lp, mask = logps(p, x, m)
        ref_lp, _ = logps(jax.lax.stop_gradient(ref), x, m)
        return gategrad.preference_loss(
            "sigmoid", lp[0], lp[1], ref_lp[0], ref_lp[1], beta=0.5, gate=gate,
            chosen_mask=mask[0], rejected_mask=mask[1])

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))

    inputs = (ids, resp)  # (2, B, T): the pairs' axis B is sharded over the 2 devices
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = tuple(jax.device_put(x, NamedSharding(mesh, P(None, "data"))) for x in inputs)
    assert all(len(x.sharding.device_set) == 2 for x in sharded)
    single = tuple(jax.device_put(x, jax.devices()[0]) for x in inputs)
    (l1, m1), g1 = step(params, *single)
    (l2, m2), g2 = step(params, *sharded)
    assert abs(float(l1) - float(l2)) <= 1e-6 * abs(float(l1)), (l1, l2)
    g_mean = float(m1["gate/mean"])
    assert 0.05 < g_mean < 0.95, g_mean  # the gate is engaged
    assert abs(g_mean - float(m2["gate/mean"])) <= 1e-6, (m1, m2)
    for k in g1:
        a, b = np.asarray(g1[k]), np.asarray(g2[k])
        scale = float(np.abs(a).max()) or 1.0
        assert float(np.abs(a - b).max()) <= 1e-5 * scale, k
    print("OK sharded == single device;", len(g1), "tensors; gate/mean", g_mean)
    """
)


def test_jax_namedsharding_two_host_devices_equal_one_device():
    pytest.importorskip("jax", reason="install the jax extra")
    # optimization level 0 roughly halves XLA's CPU compile time; compared within float32
    flags = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tempfile.gettempdir(),  # outside the repository: import the installed gategrad
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK sharded == single device" in proc.stdout
