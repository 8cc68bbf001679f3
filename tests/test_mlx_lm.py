"""``gategrad.integrations.mlx_lm``: gated DPO steps for mlx-lm models, on MLX's CPU build.

The first ``mx.compile`` on the CPU builds its fused kernels with the system C++ compiler and
caches them under ``$TMPDIR/mlx``; a cold cache makes the compiled test take a minute or more.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib

import pytest

mx = pytest.importorskip("mlx.core", reason="install mlx (on Linux: mlx[cpu])")
pytest.importorskip("mlx_lm", reason="install mlx-lm (on Linux: mlx-lm[cpu])")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import gategrad  # noqa: E402
from gategrad import Gate  # noqa: E402
from gategrad.integrations import mlx_lm as gm  # noqa: E402

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "mlx_lm_dpo.py"
GATE_ONE = Gate(shape=lambda p: p * 0 + 1)
GATE_ZERO = Gate(shape=lambda p: p * 0)


def load_example():
    spec = importlib.util.spec_from_file_location("mlx_lm_dpo_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


@pytest.fixture(scope="module")
def setup(example):
    model = example.tiny_llama(seed=0, hidden=16, layers=1)
    ref = example.tiny_llama(seed=0, hidden=16, layers=1)
    # a reference different from the policy, so the log-ratios are not zero
    ref.update(
        {k: v for k, v in example.tiny_llama(seed=1, hidden=16, layers=1).parameters().items()}
    )
    ref.freeze()
    batch = gm.make_batch(*example.synthetic_pairs(np.random.default_rng(0), 3))
    return model, ref, batch


def flat_grads(model, loss_fn, batch):
    (loss, metrics), grads = nn.value_and_grad(model, loss_fn)(model, batch)
    mx.eval(loss, grads)
    return loss, metrics, dict(tree_flatten(grads))


def test_make_batch_layout():
    batch = gm.make_batch([[5, 6], [7]], [[1, 2], [3]], [[4], [8, 9, 10]], pad_id=0)
    ids, mask = np.array(batch["input_ids"]), np.array(batch["response_mask"])
    assert ids.shape == mask.shape == (4, 4)
    assert ids.tolist() == [[5, 6, 1, 2], [7, 3, 0, 0], [5, 6, 4, 0], [7, 8, 9, 10]]
    assert mask.tolist()[2] == [False, False, True, False]
    with pytest.raises(ValueError, match="rejected response 1 is empty"):
        gm.make_batch([[1], [2]], [[3], [4]], [[5], []])


def test_gate_one_is_plain_and_gate_zero_detaches_rejected(setup):
    model, ref, batch = setup
    plain_loss, _, plain = flat_grads(model, gm.make_loss_fn(ref_model=ref), batch)
    loss1, m1, g1 = flat_grads(model, gm.make_loss_fn(gate=GATE_ONE, ref_model=ref), batch)
    assert loss1.item() == plain_loss.item()
    assert float(m1["gate/mean"]) == 1.0
    for k, v in plain.items():
        assert np.array_equal(np.array(g1[k]), np.array(v)), k

    def detached(model, batch):
        logps, mask = gm.sequence_token_logps(model, batch)
        r = gm.reference_logps(ref, batch)
        n = logps.shape[0] // 2
        return gategrad.preference_loss(
            "sigmoid",
            logps[:n],
            mx.stop_gradient(logps[n:]),
            r["ref_chosen_logps"],
            r["ref_rejected_logps"],
            chosen_mask=mask[:n],
            rejected_mask=mask[n:],
        )

    loss_d, _, gd = flat_grads(model, detached, batch)
    loss0, _, g0 = flat_grads(model, gm.make_loss_fn(gate=GATE_ZERO, ref_model=ref), batch)
    assert loss0.item() == loss_d.item() == plain_loss.item()
    # float32: the gated graph (g = 0) and the detached one send the same zero into the
    # rejected rows, but MLX may fuse and order the backward's reductions differently in the
    # two graphs: a sum over B*T <= 64 positions per weight entry, each product O(1), is
    # within ~64 ulps of the largest term (1e-5 relative); 1e-7 absolute for entries near 0
    for k, v in gd.items():
        np.testing.assert_allclose(np.array(g0[k]), np.array(v), rtol=1e-5, atol=1e-7)
    assert any(not np.allclose(np.array(g0[k]), np.array(plain[k])) for k in plain)


def test_precomputed_reference_equals_ref_model(setup):
    model, ref, batch = setup
    with_model = flat_grads(model, gm.make_loss_fn(gate=Gate(), ref_model=ref), batch)
    pre = dict(batch, **gm.reference_logps(ref, batch))
    with_batch = flat_grads(model, gm.make_loss_fn(gate=Gate()), pre)
    assert with_model[0].item() == with_batch[0].item()
    for k, v in with_model[2].items():
        assert np.array_equal(np.array(with_batch[2][k]), np.array(v)), k
    with pytest.raises(ValueError, match="reference log-probs"):
        gm.make_loss_fn(gate=Gate())(model, batch)


@pytest.mark.slow
def test_example_quick_compiled_matches_eager(example, capsys):
    """The example's compiled step (``mx.compile``) trains exactly like the eager one."""
    compiled = example.main(["--quick"])
    out = capsys.readouterr().out
    assert "step   3" in out and "gate/mean" in out
    eager = example.main(["--quick", "--no-compile"])
    assert len(compiled) == len(eager) == 3
    assert compiled[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy == reference
    assert compiled[-1]["loss"] < compiled[0]["loss"]
    for c, e in zip(compiled, eager, strict=True):
        assert 0.0 <= c["gate/mean"] <= 1.0 and 0.0 < c["gate/p_mean"] < 1.0
        for key in ("loss", "rewards/margins", "gate/mean", "gate/p_mean"):
            assert c[key] == pytest.approx(e[key], rel=1e-4, abs=1e-6), key
