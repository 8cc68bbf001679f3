"""The JAX + optax example: two jitted gated-DPO steps agree with the torch backend.

Both frameworks run the conformance kit's tiny transformer on the same float64 weights; at each
step the JAX weights are copied to torch, which recomputes the loss and the gradients.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="install the jax extra")
optax = pytest.importorskip("optax", reason="install the optax extra")
torch = pytest.importorskip("torch", reason="the torch side of the comparison needs PyTorch")

import gategrad  # noqa: E402
from gategrad import Gate  # noqa: E402
from gategrad.testing.models import init_transformer_params  # noqa: E402
from gategrad.testing.models import jax_models as jm  # noqa: E402
from gategrad.testing.models import torch_models as tm  # noqa: E402

jax.config.update("jax_enable_x64", True)

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "jax_optax_dpo.py"
# engages on this model (p is about 0.05 to 0.2): weights strictly between 0 and 1, per row
GATE = Gate(shape="sigmoid", alpha=50.0, tau=0.15)
TOL64 = 1e-12  # scale-relative, float64 torch vs jax (docs: measured 3.3e-15)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("jax_optax_dpo_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_loss_and_grads(example, np_params, np_ref, batch, gate):
    cfg = example.CFG
    params = {k: v.requires_grad_() for k, v in tm.params_from_numpy(np_params, "float64").items()}
    ref = tm.params_from_numpy(np_ref, "float64")
    ids = torch.from_numpy(batch["input_ids"]).long()
    attn = torch.from_numpy(batch["attention_mask"])
    resp = torch.from_numpy(batch["response_mask"])

    def logps(p):
        return gategrad.token_logps(tm.transformer_logits(p, ids, cfg, attn), ids, resp)

    lp, mask = logps(params)
    with torch.no_grad():
        ref_lp, _ = logps(ref)
    n = lp.shape[0] // 2
    loss, metrics = gategrad.preference_loss(
        "sigmoid",
        lp[:n],
        lp[n:],
        ref_lp[:n],
        ref_lp[n:],
        beta=0.1,
        gate=gate,
        chosen_mask=mask[:n],
        rejected_mask=mask[n:],
    )
    names = list(params)
    grads = torch.autograd.grad(loss, [params[k] for k in names])
    return float(loss.detach()), {k: g.numpy() for k, g in zip(names, grads, strict=True)}, metrics


def assert_close(a: dict, b: dict, tol: float):
    assert a.keys() == b.keys()
    for k in a:
        scale = float(np.max(np.abs(b[k]))) or 1.0
        err = float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k]))))
        assert err <= tol * scale, f"{k}: max|jax - torch| = {err:.3g}, scale {scale:.3g}"


@pytest.fixture(scope="module")
def gated_run(example):
    """Two jitted, gated optax steps; torch recomputes each step on the JAX weights."""
    cfg = example.CFG
    batch = example.make_batch(np.random.default_rng(0), 3)
    np_ref = init_transformer_params(cfg, seed=1)
    ref = jm.params_from_numpy(np_ref, "float64")
    params = jm.params_from_numpy(init_transformer_params(cfg, seed=0), "float64")
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    step = example.make_train_step(optimizer, gate=GATE)
    steps = []
    for _ in range(2):
        np_params = jm.to_numpy(params)
        params, opt_state, loss, metrics, grads = step(params, opt_state, ref, batch)
        jax_side = (float(loss), jm.to_numpy(grads), {k: float(v) for k, v in metrics.items()})
        gated = torch_loss_and_grads(example, np_params, np_ref, batch, GATE)
        plain = torch_loss_and_grads(example, np_params, np_ref, batch, None)
        steps.append({"jax": jax_side, "torch": gated, "torch_plain": plain})
    return steps, step._cache_size()


@pytest.mark.conformance
def test_two_jitted_steps_match_torch(gated_run):
    steps, compilations = gated_run
    assert compilations == 1  # one jit compilation serves both steps
    for s in steps:
        (loss, grads, metrics), (t_loss, t_grads, t_metrics) = s["jax"], s["torch"]
        assert math.isclose(loss, t_loss, rel_tol=TOL64)
        assert_close(grads, t_grads, TOL64)
        for key in ("rewards/margins", "logps/rejected", "gate/mean", "gate/p_mean"):
            assert math.isclose(metrics[key], float(t_metrics[key]), rel_tol=1e-10), key
        assert 0.05 < metrics["gate/mean"] < 0.95  # the gate is engaged at both steps


def test_gate_changes_only_the_gradient(gated_run):
    steps, _ = gated_run
    for s in steps:
        (loss, grads, _), (p_loss, p_grads, _) = s["jax"], s["torch_plain"]
        assert math.isclose(loss, p_loss, rel_tol=TOL64)  # the loss value is untouched
        assert any(not np.allclose(grads[k], p_grads[k], rtol=1e-6) for k in grads)


@pytest.mark.slow
def test_example_quick(example, capsys):
    history = example.main(["--quick"])
    assert len(history) == 3
    assert history[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(0.0 <= h["gate/mean"] <= 1.0 for h in history)
    assert "step   3" in capsys.readouterr().out
