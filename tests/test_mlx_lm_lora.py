"""``gategrad.integrations.mlx_lm_lora``: mlx-lm-lora's DPO trainer, gated in one call.

Offline: a random-init tiny mlx-lm Llama built from a config in code, and rows in the format
of mlx-lm-lora's ``DPODataset`` (token ids and prompt lengths).

- The contract on mlx-lm-lora's own functions, batched by its own ``iterate_dpo_batches``
  (eager): for every loss type of its ``dpo_loss`` and every gate estimator, the loss value
  is bitwise mlx-lm-lora's; gate≡1 gives bitwise its gradient; gate≡0 gives bitwise the
  gradient with the rejected score detached; a gate in ``(0, 1)`` gives the gradient of the
  test's own mixture ``g*s + (1-g)*stop_gradient(s)`` of the rejected token scores, with ``g``
  computed here in NumPy float64.
- The whole ``train_dpo`` (its ``mx.compile``-d step, SGD, 2 iterations, evaluation): gate≡1
  and gate≡0 against plain mlx-lm-lora runs, the default gate against a loss-level reference.

mlx-lm-lora 5.10's ``train_dpo`` reads ``mx.device_info()["max_recommended_working_set_size"]``
(Metal only) and raises ``KeyError`` on MLX's CPU build; the ``metal_key`` fixture supplies it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core", reason="install mlx (on Linux: mlx[cpu])")
pytest.importorskip("mlx_lm", reason="install mlx-lm (on Linux: mlx-lm[cpu])")
pytest.importorskip("mlx_lm_lora", reason="install the extra: pip install 'gategrad[mlx-lm-lora]'")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import mlx_lm_lora  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm_lora.trainer import dpo_trainer as dt  # noqa: E402

from gategrad import Gate  # noqa: E402
from gategrad.integrations import mlx_lm_lora as gml  # noqa: E402

VOCAB = 32
GATE_ONE = Gate(shape=lambda p: p * 0 + 1)
GATE_ZERO = Gate(shape=lambda p: p * 0)
# token probabilities of the random-init model are near 1/VOCAB: this gate is open at p = 0.06,
# half-open at p = 0.03 and nearly shut at p = 0.005, so its weights differ between rows/tokens
ALPHA, TAU = 100.0, 0.03
ENGAGED = {
    est: Gate(shape="sigmoid", alpha=ALPHA, tau=TAU, estimator=est)
    for est in ("seq", "mean", "min", "q10")
}
ENGAGED["token"] = Gate(shape="sigmoid", alpha=ALPHA, tau=TAU, granularity="token")


def tiny_llama(seed: int) -> llama.Model:
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=16,
        num_hidden_layers=1,
        intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def make_rows(n: int = 4, seed: int = 0) -> list[dict]:
    """Rows as mlx-lm-lora's ``DPODataset`` yields them: prompt + response token ids."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        prompt = rng.integers(1, VOCAB, size=int(rng.integers(2, 4))).tolist()
        chosen = rng.integers(1, VOCAB, size=int(rng.integers(2, 6))).tolist()
        rejected = rng.integers(1, VOCAB, size=int(rng.integers(2, 7))).tolist()
        rows.append(
            {
                "chosen": prompt + chosen,
                "rejected": prompt + rejected,
                "chosen_prompt_length": len(prompt),
                "rejected_prompt_length": len(prompt),
            }
        )
    return rows


@pytest.fixture(scope="module")
def models():
    model, ref = tiny_llama(0), tiny_llama(1)
    ref.freeze()
    return model, ref


@pytest.fixture(scope="module")
def batch():
    (b,) = list(dt.iterate_dpo_batches(make_rows(), batch_size=4, max_seq_length=16))
    return b


def loss_wrapper(model, ref, batch, loss_type, loss_fn):
    """mlx-lm-lora 5.10's ``train_dpo.loss_wrapper``, looking up its functions on the module
    at call time (as the trainer does), so an installed gated scoring is used."""
    chosen, rejected, chosen_masks, rejected_masks = batch
    pc = dt.compute_score(dt.get_token_scores(model, chosen, chosen_masks), chosen_masks, loss_type)
    pr = dt.compute_score(
        dt.get_token_scores(model, rejected, rejected_masks), rejected_masks, loss_type
    )
    rc = dt.compute_score(
        mx.stop_gradient(dt.get_token_scores(ref, chosen, chosen_masks)), chosen_masks, loss_type
    )
    rr = dt.compute_score(
        mx.stop_gradient(dt.get_token_scores(ref, rejected, rejected_masks)),
        rejected_masks,
        loss_type,
    )
    return loss_fn(
        policy_chosen_score=pc,
        policy_rejected_score=pr,
        reference_chosen_score=rc,
        reference_rejected_score=rr,
        chosen_masks=chosen_masks,
        rejected_masks=rejected_masks,
        beta=0.5,
        delta=2.0,
        loss_type=loss_type,
    )


def value_and_grads(model, fn):
    (loss, *_), grads = nn.value_and_grad(model, fn)()
    mx.eval(loss, grads)
    return loss.item(), {k: np.array(v) for k, v in tree_flatten(grads)}


def reference_weights(scores: np.ndarray, mask: np.ndarray, gate_name: str) -> np.ndarray:
    """The test's own gate in float64: ``(B, 1)`` per response or ``(B, T)`` per token."""
    s = scores.astype(np.float64)
    if gate_name == "token":
        p = np.exp(s)
    else:
        rows = [np.exp(r[m]) for r, m in zip(s, mask, strict=True)]
        reduce = {
            "seq": lambda q: np.exp(np.mean(np.log(q))),
            "mean": np.mean,
            "min": np.min,
            "q10": lambda q: np.quantile(q, 0.1),
        }[gate_name]
        p = np.array([reduce(r) for r in rows])[:, None]
    return 1.0 / (1.0 + np.exp(-ALPHA * (p - TAU)))


def mixture_loss_fn(model, batch, gate_name):
    """``dpo_loss`` with the rejected token scores replaced by ``g*s + (1-g)*sg(s)``."""
    _, rejected, _, rejected_masks = batch
    mask = np.array(rejected_masks[:, 1:]).astype(bool)
    scores = np.array(dt.get_token_scores(model, rejected, rejected_masks))
    g = mx.array(reference_weights(scores, mask, gate_name).astype(np.float32))
    weights.append(np.broadcast_to(np.array(g), mask.shape)[mask])

    def loss_fn(**kw):
        s = dt.get_token_scores(model, rejected, rejected_masks)
        s = g * s + (1 - g) * mx.stop_gradient(s)
        kw["policy_rejected_score"] = dt.compute_score(s, rejected_masks, kw["loss_type"])
        return dt.dpo_loss(**kw)

    return loss_fn


weights: list[np.ndarray] = []


def test_tested_range_covers_installed_mlx_lm_lora():
    from packaging.version import Version

    v = Version(mlx_lm_lora.__version__.split("+")[0])
    lo, hi = (Version(x) for x in gml.TESTED_MLX_LM_LORA)
    assert lo <= v < hi
    assert set(gml.LOSS_TYPES) == {"sigmoid", "hinge", "ipo", "dpop"}


@pytest.mark.parametrize("loss_type", gml.LOSS_TYPES)
def test_contract_on_mlx_lm_lora_functions(models, batch, loss_type):
    model, ref = models

    def run(gate, inner=dt.dpo_loss):
        if gate is None:
            return value_and_grads(model, lambda: loss_wrapper(model, ref, batch, loss_type, inner))
        with gml.gated_scoring(model, gate, loss_fn=inner) as gs:
            return value_and_grads(
                model, lambda: loss_wrapper(model, ref, batch, loss_type, gs.loss_fn)
            )

    plain_loss, plain = run(None)
    # gate≡1: the gradient is bitwise mlx-lm-lora's (the cotangent is multiplied by 1.0)
    loss1, g1 = run(GATE_ONE)
    assert loss1 == plain_loss
    assert all(np.array_equal(g1[k], plain[k]) for k in plain)

    # gate≡0: bitwise the gradient with the rejected score detached (the rejected call's
    # contribution is exact zeros, and adding 0.0 is exact)
    def detached(**kw):
        kw["policy_rejected_score"] = mx.stop_gradient(kw["policy_rejected_score"])
        return dt.dpo_loss(**kw)

    loss0, g0 = run(GATE_ZERO)
    loss_d, gd = run(None, detached)
    assert loss0 == loss_d == plain_loss
    assert all(np.array_equal(g0[k], gd[k]) for k in gd)
    assert any(not np.array_equal(g0[k], plain[k]) for k in plain)

    for name, gate in ENGAGED.items():
        weights.clear()
        ref_loss, want = run(None, mixture_loss_fn(model, batch, name))
        got_loss, got = run(gate)
        assert got_loss == plain_loss  # the loss value never changes
        # the reference's forward g*s + (1-g)*s rounds (2 float32 ops per token)
        assert abs(ref_loss - plain_loss) <= 1e-6 * abs(plain_loss)
        w = np.concatenate(weights)
        # a mixture: neither open nor shut, and different between rows (or tokens)
        assert w.min() > 1e-3 and w.max() < 0.999 and np.ptp(w) > 1e-3, (name, w)
        for k, v in want.items():
            # float32 gradients; the only difference is g in float32 (gategrad) versus g
            # rounded from float64 (here): a few ulp of g, relative, through sums of <= 100
            # products of O(1) terms -> 1e-5 of the largest entry
            scale = float(np.abs(v).max()) or 1.0
            assert float(np.abs(got[k] - v).max()) <= 1e-5 * scale, (name, k)
        assert any(not np.allclose(got[k], plain[k], rtol=1e-4, atol=0) for k in plain), name


# -- the whole trainer ------------------------------------------------------------------------


@pytest.fixture
def metal_key(monkeypatch):
    """mlx-lm-lora's ``train_dpo`` sets MLX's wired-memory limit from a Metal-only key of
    ``mx.device_info()``; on the CPU build supply it (0: no wired memory), else leave MLX be."""
    info = mx.device_info()
    if "max_recommended_working_set_size" not in info:
        monkeypatch.setattr(
            mx, "device_info", lambda: {**info, "max_recommended_working_set_size": 0}
        )


class Reports:
    def __init__(self) -> None:
        self.train: list[float] = []
        self.val: list[float] = []

    def on_train_loss_report(self, info: dict) -> None:
        self.train.append(info["train_loss"])

    def on_val_loss_report(self, info: dict) -> None:
        self.val.append(info["val_loss"])


def train(tmp_path, gate=None, loss_fn=None, loss_type="sigmoid"):
    """Two iterations of mlx-lm-lora's ``train_dpo`` (batch 2, SGD), gated when ``gate``."""
    model, ref = tiny_llama(0), tiny_llama(1)
    ref.freeze()
    tmp_path.mkdir(parents=True, exist_ok=True)
    args = dt.DPOTrainingArgs(
        batch_size=2,
        iters=2,
        beta=0.5,
        steps_per_report=1,
        steps_per_eval=2,
        val_batches=1,
        steps_per_save=100,
        max_seq_length=16,
        adapter_file=str(tmp_path / "adapters.safetensors"),
    )
    rows, reports = make_rows(), Reports()
    np.random.seed(0)  # noqa: NPY002 (the trainer's batch order comes from np.random.permutation)
    kwargs = dict(args=args, training_callback=reports, loss_type=loss_type)
    if gate is None:
        kwargs["loss_fn"] = loss_fn or dt.dpo_loss
        dt.train_dpo(model, ref, optim.SGD(learning_rate=0.1), rows, rows[:2], **kwargs)
    else:
        gml.train_dpo(model, ref, optim.SGD(learning_rate=0.1), rows, rows[:2], **kwargs, gate=gate)
    assert dt.get_token_scores.__module__ == dt.__name__  # restored
    params = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    return reports, params


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        info = mx.device_info()
        if "max_recommended_working_set_size" not in info:
            mp.setattr(mx, "device_info", lambda: {**info, "max_recommended_working_set_size": 0})
        return train(tmp_path_factory.mktemp("plain"))


@pytest.mark.slow
def test_train_dpo_gate_one_is_plain(tmp_path, metal_key, plain_run):
    reports, params = train(tmp_path, GATE_ONE)
    assert reports.train == plain_run[0].train and len(reports.train) == 2
    assert reports.val == plain_run[0].val and len(reports.val) == 2
    assert all(np.array_equal(params[k], v) for k, v in plain_run[1].items())


@pytest.mark.slow
def test_train_dpo_gate_zero_is_detached_rejected(tmp_path, metal_key, plain_run):
    def detached(**kw):
        kw["policy_rejected_score"] = mx.stop_gradient(kw["policy_rejected_score"])
        return dt.dpo_loss(**kw)

    reports, params = train(tmp_path / "gated", GATE_ZERO)
    ref_reports, ref_params = train(tmp_path / "detached", loss_fn=detached)
    assert reports.train == ref_reports.train
    assert reports.train[0] == plain_run[0].train[0]  # same parameters: same loss value
    assert reports.val[0] == plain_run[0].val[0]  # evaluation before the first update
    assert all(np.array_equal(params[k], v) for k, v in ref_params.items())
    assert any(not np.array_equal(params[k], v) for k, v in plain_run[1].items())


@pytest.mark.slow
def test_train_dpo_default_gate_against_loss_level_reference(tmp_path, metal_key, plain_run):
    """Gate() (sigmoid, alpha=200, tau=0.02, seq) against the test's own gate on the summed
    score: ``g = sigmoid(200 (exp(score / n) - 0.02))``, ``g*s + (1-g)*sg(s)``."""

    def mixture(**kw):
        s, m = kw["policy_rejected_score"], kw["rejected_masks"]
        p = mx.exp(mx.stop_gradient(s) / m[:, 1:].sum(-1))
        g = mx.sigmoid(200.0 * (p - 0.02))
        kw["policy_rejected_score"] = g * s + (1 - g) * mx.stop_gradient(s)
        return dt.dpo_loss(**kw)

    reports, params = train(tmp_path / "gated", Gate())
    ref_reports, ref_params = train(tmp_path / "mixture", loss_fn=mixture)
    assert reports.train[0] == plain_run[0].train[0]  # the loss value never changes
    # step 2's loss follows one SGD update; float32 throughout: the two gates differ by the
    # rounding of exp(mean) (a few ulp) -> 1e-6 relative on the loss
    assert abs(reports.train[1] - ref_reports.train[1]) <= 1e-6 * abs(ref_reports.train[1])
    p0 = {k: np.array(v) for k, v in tree_flatten(tiny_llama(0).parameters())}
    for k, v in ref_params.items():
        # compare the updates (after - before): float32 updates of the same rounding as above,
        # plus one ulp of the parameter each from forming p - lr*grad -> 1e-5 of the largest
        # update plus 2 ulp of the largest parameter
        want, got = v - p0[k], params[k] - p0[k]
        tol = 1e-5 * float(np.abs(want).max()) + 2 * float(np.spacing(np.abs(v).max()))
        assert float(np.abs(got - want).max()) <= tol, k
    moved = max(float(np.abs(params[k] - v).max()) for k, v in plain_run[1].items())
    assert moved > 1e-6  # the gate changed the update


def test_refuses_what_it_cannot_gate(tmp_path, models):
    model, ref = models
    args = dt.DPOTrainingArgs(seq_step_size=8, adapter_file=str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="seq_step_size"):
        gml.train_dpo(model, ref, optim.SGD(learning_rate=0.1), make_rows(), args=args)
    with pytest.raises(ValueError, match="loss_type"):
        gml.train_dpo(model, ref, optim.SGD(learning_rate=0.1), make_rows(), loss_type="kto")
    with pytest.raises(TypeError):
        gml.train_dpo(model, ref, optim.SGD(learning_rate=0.1), make_rows(), gate="sigmoid")
    assert dt.get_token_scores.__module__ == dt.__name__


def test_guard_and_install_remove(models, batch):
    model, ref = models
    original = dt.get_token_scores
    gs = gml.gated_scoring(model, Gate())
    with pytest.raises(RuntimeError, match="never seen"):  # not installed: nothing recorded
        loss_wrapper(model, ref, batch, "sigmoid", gs.loss_fn)
    with gs:
        assert dt.get_token_scores == gs.get_token_scores
        with pytest.raises(ValueError, match="already installed"):
            gml.gated_scoring(model, Gate()).install()
        # a loss whose rejected scores came from another model (the reference) is refused
        with pytest.raises(RuntimeError, match="never seen"):
            loss_wrapper(ref, ref, batch, "sigmoid", gs.loss_fn)
        loss, *_ = loss_wrapper(model, ref, batch, "sigmoid", gs.loss_fn)
    plain, *_ = loss_wrapper(model, ref, batch, "sigmoid", dt.dpo_loss)
    assert loss.item() == plain.item()
    assert dt.get_token_scores is original
