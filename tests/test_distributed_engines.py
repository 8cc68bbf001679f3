"""Distributed engines, 2 CPU processes over gloo, each against one process on the same batch.

- FSDP2 (``torch.distributed.fsdp.fully_shard``), launched with torchrun: the gate is
  ``gategrad.torch.hook`` on a tiny random-init Llama, installed before ``fully_shard`` (the
  order TRL and accelerate produce) and after it. Losses and full (gathered) gradients equal
  one process's; the gated output is not a view (no FSDP2 warning) and an in-place op on it
  (a temperature, ``logits.div_``) gives the right gradient.
- TRL's ``DPOTrainer`` gated with ``gategrad.integrations.trl.attach``, launched with
  ``accelerate launch --num_processes 2`` (DDP over gloo): loss, gradients, parameters after the
  step and the logged gate statistics equal one process's; gate 1 equals plain TRL bit for bit.

For TRL the one-process reference runs the same two micro-batches of 2 pairs with 2
gradient-accumulation steps: a single batch of 4 is padded to another length, which moves
plain TRL's gradients on this model by up to 5e-3 relative, with or without gategrad.

The workers live in ``tests/_dist/``. They run with this checkout first on ``PYTHONPATH``, so
the code tested is the checkout's, offline (``HF_HUB_OFFLINE=1``), one thread per process.

Tolerance (float32, scale-relative: the largest error of a tensor over its largest entry):
the distributed step computes the same sums as one process, grouped differently (each rank
sums its own rows, then the ranks' results are averaged), and with batches padded to another
length (other matmul shapes, so other blockings). Each gradient entry is a sum of at most a few
hundred float32 products (2 x 4 rows x 11 positions, times the hidden width 16 to 32), so a
regrouping moves it by at most about n * eps = 300 * 6e-8 = 2e-5 of the tensor's scale in the
worst case and about sqrt(n) * eps = 1e-6 in practice; 1e-5 sits between. Losses are means of
4 terms: 1e-6, relative. A gate that did nothing would miss by 0.1 or more (checked below).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the distributed tests need PyTorch")
pytest.importorskip("transformers", reason="the distributed tests use a tiny transformers Llama")

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "tests" / "_dist"
TOL32 = 1e-5  # gradients, scale-relative (see the module docstring)
LOSS_TOL = 1e-6  # losses, relative
ENGAGED = 0.1  # a gated gradient differs from the ungated one by more than this (relative)

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    }
    return env


def _launch(args: list[str], cwd: Path, timeout: float = 600) -> float:
    """Run a launcher command; fail with its output on a non-zero exit. Returns the seconds."""
    start = time.perf_counter()
    proc = subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{' '.join(args)}\n{proc.stdout[-6000:]}\n{proc.stderr[-12000:]}"
    return time.perf_counter() - start


def rel_err(a: dict, b: dict) -> dict[str, float]:
    """Per tensor: max |a - b| over max |b| (scale-relative)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return {k: float((a[k] - b[k]).abs().max()) / (float(b[k].abs().max()) or 1.0) for k in b}


def assert_close(a: dict, b: dict, tol: float, what: str) -> None:
    errs = rel_err(a, b)
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, f"{what}: {worst} differs by {errs[worst]:.3g} > {tol}"


def assert_engaged(gated: dict, plain: dict) -> None:
    errs = rel_err(gated, plain)
    assert max(errs.values()) > ENGAGED, f"the gate did not change the gradient: {errs}"


# --------------------------------------------------------------------------------------------
# FSDP2


def test_fsdp2_hook_before_and_after_fully_shard_equals_one_process(tmp_path: Path) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend [allowed-skip]")
    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch>=2.6")
    from _dist import fsdp2_worker as w

    seconds = _launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + [str(DIST / "fsdp2_worker.py"), str(tmp_path)],
        cwd=tmp_path,
    )
    print(f"FSDP2 launch: {seconds:.1f} s")
    dist_result = torch.load(tmp_path / "fsdp2.pt")

    torch.set_num_threads(1)
    batch = w.rows(w.make_batch(), 0, w.PAIRS)  # the global batch in one process

    def one_process(hook_gate=None, loss_gate=None, temp=None):
        model, ref = w.make_model(0), w.make_model(1).requires_grad_(False)
        handle = w.install_hook(model, batch, hook_gate) if hook_gate is not None else None
        loss = w.dpo_step(model, ref, batch, loss_gate=loss_gate, temp=temp)
        weights = None
        if handle is not None:
            handle.remove()
            weights = handle.last_stats.weight.detach().float().reshape(-1)
        return float(loss), w.full_grads(model), weights

    hooked = one_process(hook_gate=w.GATE)
    tempered = one_process(hook_gate=w.GATE, temp=w.TEMP)  # out of place, one process
    in_loss = one_process(loss_gate=w.GATE)  # an independent path: the gate in the loss
    plain = one_process()
    one = one_process(hook_gate=w.GATE_ONE)

    # the single-process references agree with each other, and the gate is engaged
    assert_close(hooked[1], in_loss[1], TOL32, "hook vs gate in the loss (one process)")
    assert all(torch.equal(one[1][k], plain[1][k]) for k in plain[1]), "gate 1 != no gate"
    assert_engaged(hooked[1], plain[1])
    assert 0.05 < float(hooked[2].mean()) < 0.95, hooked[2]

    for mode in w.MODES:
        got = dist_result[mode]
        want = tempered if "inplace" in mode else hooked
        assert got["calls"] == 1, (mode, got["calls"])
        assert abs(got["loss"] - want[0]) <= LOSS_TOL * abs(want[0]), (mode, got["loss"], want[0])
        assert_close(got["grads"], want[1], TOL32, f"FSDP2 ({mode}) vs one process")
        # every rank gated its own rows with the weights one process gives them
        torch.testing.assert_close(got["weights"], want[2], rtol=1e-6, atol=0)
        assert not got["view_warnings"], got["view_warnings"]


# --------------------------------------------------------------------------------------------
# TRL through accelerate launch

ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
# MULTI_GPU is accelerate's torchrun launcher; with use_cpu=True in the DPOConfig each process
# runs on the CPU over gloo (DDP). (distributed_type: MULTI_CPU expects mpirun and, without it,
# silently starts one process; the worker asserts 2.)
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
use_cpu: false
rdzv_backend: static
same_network: true
main_process_ip: 127.0.0.1
main_process_port: {port}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_trl_accelerate_launch_two_processes_equals_one_process(tmp_path: Path) -> None:
    for module in ("trl", "accelerate", "datasets", "tokenizers"):
        pytest.importorskip(module, reason="install the trl extra: pip install '.[trl]'")
    config = tmp_path / "accelerate.yaml"
    config.write_text(ACCELERATE_CONFIG.format(port=_free_port()), encoding="utf-8")
    worker = str(DIST / "trl_worker.py")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    two = _launch([*launch, "--num_processes", "2", worker, str(tmp_path)], cwd=tmp_path)
    one = _launch([sys.executable, worker, str(tmp_path)], cwd=tmp_path)
    print(f"TRL: accelerate launch (2 processes) {two:.1f} s, one process {one:.1f} s")
    dist_run = torch.load(tmp_path / "trl_world2.pt")
    single = torch.load(tmp_path / "trl_world1.pt")

    assert {r["world"] for r in dist_run.values()} == {2}
    for name in ("plain", "one", "gate"):
        got, want = dist_run[name], single[name]
        loss = want["log"]["loss"]
        assert abs(got["log"]["loss"] - loss) <= LOSS_TOL * abs(loss), (name, got["log"], loss)
        assert_close(got["grads"], want["grads"], TOL32, f"TRL {name}: gradients")
        assert_close(got["params"], want["params"], TOL32, f"TRL {name}: parameters")
    # the gate statistics, summed over the processes for logging, are the global batch's
    for key in ("gate/mean", "gate/min", "gate/p_mean", "gate/frac_below_half"):
        a, b = dist_run["gate"]["log"][key], single["gate"]["log"][key]
        assert abs(a - b) <= 1e-6, (key, a, b)
    assert 0.05 < dist_run["gate"]["log"]["gate/mean"] < 0.95  # engaged, per the logs
    # gate 1 is plain TRL bit for bit under accelerate; the engaged gate changes the gradient
    plain, gate_one = dist_run["plain"], dist_run["one"]
    assert gate_one["log"]["loss"] == plain["log"]["loss"]
    assert all(torch.equal(gate_one["grads"][k], plain["grads"][k]) for k in plain["grads"])
    assert all(torch.equal(gate_one["params"][k], plain["params"][k]) for k in plain["params"])
    assert_engaged(dist_run["gate"]["grads"], plain["grads"])
