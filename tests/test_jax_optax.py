"""The JAX + optax example: two jitted gated-DPO steps agree with the torch backend.

Both frameworks run the conformance kit's tiny transformer on the same float64 weights; at each
step the JAX weights go to the kit's ``run_backend('torch', ...)``, which recomputes the loss and
the gradients, and the kit's ``compare_results`` compares them tensor by tensor (float64:
1e-12, scale-relative).
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest
from _backends import stacked_pair_loss

jax = pytest.importorskip("jax", reason="install the jax extra")
optax = pytest.importorskip("optax", reason="install the optax extra")
torch = pytest.importorskip("torch", reason="the torch side of the comparison needs PyTorch")

import gategrad  # noqa: E402
from gategrad import Gate  # noqa: E402
from gategrad.testing import compare_results, run_backend  # noqa: E402
from gategrad.testing.models import init_transformer_params  # noqa: E402
from gategrad.testing.models import jax_models as jm  # noqa: E402
from gategrad.testing.models import torch_models as tm  # noqa: E402

jax.config.update("jax_enable_x64", True)

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "jax_optax_dpo.py"
# engages on this model (p is about 0.05 to 0.2): weights strictly between 0 and 1, per row
GATE = Gate(shape="sigmoid", alpha=50.0, tau=0.15)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("jax_optax_dpo_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_loss_fn(example, gate, metrics_out: dict):
    """The example's loss with the kit's torch transformer, for ``run_backend``."""
    cfg = example.CFG

    def fn(params, ref, input_ids, attention_mask, response_mask):
        ids = input_ids.long()

        def logps(p):
            logits = tm.transformer_logits(p, ids, cfg, attention_mask)
            return gategrad.token_logps(logits, ids, response_mask)

        lp, mask = logps(params)
        with torch.no_grad():
            ref_lp, _ = logps(ref)
        loss, metrics = stacked_pair_loss(lp, ref_lp, mask, beta=0.1, gate=gate)
        metrics_out.update({k: float(v) for k, v in metrics.items()})
        return loss

    return fn


def torch_side(example, np_params, np_ref, batch, gate):
    """``(loss, {'params/<name>': grad}, metrics)`` from the kit's ``run_backend('torch', ...)``."""
    metrics: dict = {}
    inputs = {"params": np_params, "ref": np_ref, **batch}
    loss, grads = run_backend(
        "torch", torch_loss_fn(example, gate, metrics), inputs, wrt=["params"], dtype="float64"
    )
    return loss, grads, metrics


@pytest.fixture(scope="module")
def gated_run(example):
    """Two jitted, gated optax steps; at each, torch recomputes loss and grads."""
    cfg = example.CFG
    batch = example.make_batch(np.random.default_rng(0), 3)
    np_ref = init_transformer_params(cfg, seed=1)
    ref = jm.params_from_numpy(np_ref, "float64")
    params = jm.params_from_numpy(init_transformer_params(cfg, seed=0), "float64")
    adam = optax.adam(1e-3)
    traces = []  # the update runs in Python only while jax.jit traces the step

    def counting_update(*args, **kwargs):
        traces.append(1)
        return adam.update(*args, **kwargs)

    optimizer = optax.GradientTransformation(adam.init, counting_update)
    opt_state = optimizer.init(params)
    step = example.make_train_step(optimizer, gate=GATE)
    steps = []
    for _ in range(2):
        np_params = {k: np.array(v) for k, v in jm.to_numpy(params).items()}  # writable
        params, opt_state, loss, metrics, grads = step(params, opt_state, ref, batch)
        jax_grads = {f"params/{k}": np.asarray(v) for k, v in jm.to_numpy(grads).items()}
        steps.append(
            {
                "jax": (float(loss), jax_grads, {k: float(v) for k, v in metrics.items()}),
                "torch": torch_side(example, np_params, np_ref, batch, GATE),
                "torch_plain": torch_side(example, np_params, np_ref, batch, None),
            }
        )
    return steps, len(traces)


@pytest.mark.conformance
def test_two_jitted_steps_match_torch(gated_run):
    steps, compilations = gated_run
    assert compilations == 1  # one jit compilation serves both steps
    for s in steps:
        (loss, grads, metrics), (t_loss, t_grads, t_metrics) = s["jax"], s["torch"]
        report = compare_results(
            {"jax[optax step]": (loss, grads), "torch": (t_loss, t_grads)},
            dtype="float64",
            reference="torch",
        )
        assert report.ok, "\n".join(d.describe() for d in report.failures[:5])
        assert len(report.diffs) == 1 + len(grads)  # the value and every parameter
        for key in ("rewards/margins", "logps/rejected", "gate/mean", "gate/p_mean"):
            assert math.isclose(metrics[key], t_metrics[key], rel_tol=1e-10), key
        assert 0.05 < metrics["gate/mean"] < 0.95  # the gate is engaged at both steps


def test_gate_changes_only_the_gradient(gated_run):
    steps, _ = gated_run
    for s in steps:
        (loss, grads, _), (p_loss, p_grads, _) = s["jax"], s["torch_plain"]
        assert math.isclose(loss, p_loss, rel_tol=1e-12)  # the loss value is untouched
        assert any(not np.allclose(grads[k], p_grads[k], rtol=1e-6) for k in grads)


# The script itself (`python examples/jax_optax_dpo.py --quick`) runs in tests/test_examples.py.
