"""``attach(trainer, gate, fused=True)``: TRL's DPOTrainer with gategrad's fused LM head, gated.

Offline and on CPU, like tests/test_trl_integration.py: a random-init tiny Llama (vocabulary
V = 2048, wider than the WordLevel tokenizer, so that the logits are the largest tensor TRL could
build), a reference model perturbed away from the policy (so the first loss is not log 2), two
SGD steps with clipping off and the gradients captured before each optimizer step.

The independent references are plain TRL 1.16 (its own fused head) and, for a gate of 0, plain
TRL whose rejected log-probs this test detaches itself.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
from _backends import tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch", reason="the TRL integration needs PyTorch")
trl = pytest.importorskip("trl", reason="install the trl extra: pip install 'gategrad[trl]'")
transformers = pytest.importorskip("transformers", reason="TRL needs transformers")
datasets = pytest.importorskip("datasets", reason="TRL needs datasets")
tokenizers = pytest.importorskip("tokenizers", reason="the in-code tokenizer needs tokenizers")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from gategrad import Gate  # noqa: E402
from gategrad.integrations.trl import attach  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not hasattr(trl.trainer.utils, "add_fused_lm_head"),
        reason="attach(fused=True) needs TRL >= 1.15 (the fused-head protocol)",
    ),
]

VOCAB, HIDDEN, PAIRS = 2048, 32, 4
CHUNK = 16  # positions per tile: 16 x 2048 logits, well below the batch's (8, T, 2048)
GATE_ONE = Gate(shape=lambda p: p * 0 + 1)
GATE_ZERO = Gate(shape="hard", tau=1.0)  # g = 1[p >= 1] = 0 for every response with p < 1
# p = exp(mean log-prob) is about 1/V here; temperature 1 keeps dg/dlog p <= 1/4, so the
# rounding of the forward log-probs moves g by less than it moves them
GATE_REAL = Gate(shape="log_sigmoid", tau=5e-4, temperature=1.0)
WORDS = "the a cat dog sat ran on mat fast slow red blue big small yes no good bad".split()

EPS32 = float(torch.finfo(torch.float32).eps)
# The fused head computes the same products as TRL's head and sums them in another order: the
# D-term dot products in other tiles, the V-term log-sum-exp per vocabulary tile then across
# tiles, and the gradients' sums over N positions and V entries chunk by chunk. Torch's
# reductions and BLAS sum blockwise/pairwise, so a reordered sum of n <= V terms moves by at most
# about ceil(log2 V) * eps of the sum of magnitudes; a factor 8 covers the ratio of that sum to
# the largest element (the gradients mix signs) and the two steps. 8 * 11 * 2**-23 = 1.05e-5.
RTOL = 8 * math.ceil(math.log2(VOCAB)) * EPS32


def make_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def make_model():
    return tiny_llama(
        VOCAB,
        hidden=HIDDEN,
        layers=2,
        heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )


def perturbed(state, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


@pytest.fixture(scope="module")
def base():
    tok = make_tokenizer()
    data = datasets.Dataset.from_dict(
        {
            "prompt": ["the cat", "a dog", "the red mat", "big blue"],
            "chosen": [" sat on the mat", " ran fast", " is good", " yes"],
            "rejected": [" ran", " sat slow on a big red mat", " no", " bad dog ran"],
        }
    )
    policy = perturbed(make_model().state_dict(), 0.05, seed=1)
    ref = perturbed(policy, 0.02, seed=2)
    return tok, data, policy, ref


class GradCapture(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )


class LargestTensor(TorchDispatchMode):
    """The largest floating tensor any op returns (forward, backward and the reference pass)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.op, self.shape = 0, "", ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > self.numel:
                self.numel, self.op, self.shape = t.numel(), str(func), tuple(t.shape)
        return out


def make_trainer(base, tmp_path, max_steps=2, **config):
    tok, data, policy_state, ref_state = base
    policy, ref = make_model(), make_model()
    policy.load_state_dict(policy_state)
    ref.load_state_dict(ref_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.DPOConfig(
            output_dir=str(tmp_path),
            max_steps=max_steps,
            per_device_train_batch_size=PAIRS,
            learning_rate=1e-2,
            max_grad_norm=0.0,
            optim="sgd",  # see tests/test_trl_integration.py: Adam would amplify rounding
            logging_steps=1,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            bf16=False,
            seed=0,
            **config,
        )
        trainer = trl.DPOTrainer(
            model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok
        )
    capture = GradCapture()
    trainer.add_callback(capture)
    return trainer, capture


def train(trainer, record=False):
    """Train; the logged steps, and per step ``(largest tensor, logits numel)`` if ``record``."""
    steps = []
    if record:
        step = trainer.training_step

        def recorded(model, inputs, *a, **k):
            with LargestTensor() as seen:
                out = step(model, inputs, *a, **k)
            rows, length = inputs["input_ids"].shape
            steps.append((seen, rows * length * VOCAB))
            return out

        trainer.training_step = recorded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h], steps


def detach_rejected(trainer):
    """The test's own gate of 0: the rejected rows of TRL's ``log_probs``, detached."""

    def hook(module, args, kwargs, out):
        if torch.is_grad_enabled():
            lp = out.log_probs
            n = lp.shape[0] // 2
            out["log_probs"] = torch.cat([lp[:n], lp[n:].detach()])
        return out

    return trainer.model.register_forward_hook(hook, with_kwargs=True)


def assert_close_grads(got, ref, rtol=RTOL, steps=2):
    assert len(got) == len(ref) == steps
    for step_got, step_ref in zip(got, ref, strict=True):
        assert step_got.keys() == step_ref.keys()
        for name, a in step_got.items():
            b = step_ref[name]
            scale = float(b.abs().max()) or 1.0
            assert float((a - b).abs().max()) <= rtol * scale, (name, float((a - b).abs().max()))


def max_rel_diff(got, ref):
    return max(
        float((a - ref[0][n]).abs().max()) / float(ref[0][n].abs().max()) for n, a in got[0].items()
    )


@pytest.fixture(scope="module")
def plain(base, tmp_path_factory):
    trainer, capture = make_trainer(base, tmp_path_factory.mktemp("plain"))
    logs, steps = train(trainer, record=True)
    return logs, capture.grads, steps


@pytest.fixture(scope="module")
def fused_one(base, tmp_path_factory):
    trainer, capture = make_trainer(base, tmp_path_factory.mktemp("fused_one"))
    attachment = attach(trainer, GATE_ONE, fused=True, chunk_size=CHUNK)
    logs, steps = train(trainer, record=True)
    assert attachment.hook.calls == 2
    return logs, capture.grads, steps


@pytest.fixture(scope="module")
def fused_real(base, tmp_path_factory):
    trainer, capture = make_trainer(base, tmp_path_factory.mktemp("fused_real"))
    attach(trainer, GATE_REAL, fused=True, chunk_size=CHUNK)
    logs, _ = train(trainer)
    return logs, capture.grads


def test_gate_one_fused_is_plain_trl(plain, fused_one):
    (logs, grads, _), (plain_logs, plain_grads, _) = fused_one, plain
    assert_close_grads(grads, plain_grads)
    for h, p in zip(logs, plain_logs, strict=True):
        # the loss is a smooth function of the log-prob sums (slope <= beta per sum), which are
        # within RTOL of TRL's; so are the metrics from the same hidden states
        for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
            assert math.isclose(h[key], p[key], rel_tol=RTOL, abs_tol=RTOL), key
        for key in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
            assert math.isclose(h[key], p[key], rel_tol=RTOL, abs_tol=RTOL), key
        assert h["gate/mean"] == 1.0
    assert not math.isclose(plain_logs[0]["loss"], math.log(2), rel_tol=1e-4)  # a real loss


def test_real_gate_fused_equals_unfused_gated(base, tmp_path, plain, fused_one, fused_real):
    logs, grads = fused_real
    trainer, capture = make_trainer(base, tmp_path)
    attach(trainer, GATE_REAL)  # TRL's own head, gated by the same hook
    ref_logs, _ = train(trainer)
    assert_close_grads(grads, capture.grads)
    for h, r in zip(logs, ref_logs, strict=True):
        assert math.isclose(h["loss"], r["loss"], rel_tol=RTOL)
        # g = sigmoid(log p - log tau): |dg| <= |d log p| / 4, and log p within RTOL
        assert math.isclose(h["gate/mean"], r["gate/mean"], rel_tol=RTOL)
        assert math.isclose(h["gate/min"], r["gate/min"], rel_tol=RTOL)
    assert 0.05 < logs[0]["gate/min"] <= logs[0]["gate/mean"] < 0.95  # a real mixture
    # the gate changed the gradient by far more than the tolerance
    assert max_rel_diff(grads, plain[1]) > 100 * RTOL
    # loss values unchanged: at the same parameters (step 1) the gate moves only the backward
    assert logs[0]["loss"] == fused_one[0][0]["loss"]


def test_gate_zero_fused_drops_the_rejected_gradient(base, tmp_path):
    trainer, capture = make_trainer(base, tmp_path / "gated")
    attach(trainer, GATE_ZERO, fused=True)  # the default tile plan
    logs, _ = train(trainer)
    ref_trainer, ref_capture = make_trainer(base, tmp_path / "detached")
    handle = detach_rejected(ref_trainer)  # plain TRL, rejected log-probs detached by the test
    ref_logs, _ = train(ref_trainer)
    handle.remove()
    assert_close_grads(capture.grads, ref_capture.grads)
    for h, r in zip(logs, ref_logs, strict=True):
        assert math.isclose(h["loss"], r["loss"], rel_tol=RTOL)
        assert h["gate/mean"] == 0.0 and h["gate/frac_below_half"] == 1.0


def test_no_logits_sized_tensor_in_the_fused_step(plain, fused_one):
    """No op of a fused training step (policy forward, reference forward, backward) returns a
    float tensor as large as the (2B, T, V) logits; plain TRL's head does (its buffer is
    (2B (T - 1), 32768), so the detector can fail)."""
    for seen, logits in plain[2]:
        assert seen.numel >= logits, (seen.numel, seen.op, seen.shape, logits)
    for seen, logits in fused_one[2]:
        # the largest is a (V, D) parameter-sized tensor or a CHUNK x V tile
        assert seen.numel <= max(VOCAB * HIDDEN, CHUNK * VOCAB), (seen.op, seen.shape)
        assert seen.numel < logits / 2, (seen.numel, seen.op, seen.shape, logits)


def test_wpo_weights_fused_equal_plain(base, tmp_path):
    """``use_weighting=True`` reads ``log_sum_sq_probs``, which the fused head gets from TRL's
    kernel in tiles: one step, same loss and gradients as plain TRL."""
    trainer, capture = make_trainer(base, tmp_path / "fused", max_steps=1, use_weighting=True)
    attach(trainer, GATE_ONE, fused=True, chunk_size=CHUNK)
    logs, _ = train(trainer)
    ref_trainer, ref_capture = make_trainer(
        base, tmp_path / "plain", max_steps=1, use_weighting=True
    )
    ref_logs, _ = train(ref_trainer)
    assert_close_grads(capture.grads, ref_capture.grads, steps=1)
    assert math.isclose(logs[0]["loss"], ref_logs[0]["loss"], rel_tol=RTOL)


def test_fused_refusals_and_remove(base, tmp_path, monkeypatch):
    trainer, _ = make_trainer(base, tmp_path)
    modules = [trainer.model, trainer.ref_model]
    forwards = [m.__dict__["forward"] for m in modules]
    with attach(trainer, Gate(), fused=True):
        assert all(m.__dict__["forward"] is not f for m, f in zip(modules, forwards, strict=True))
    assert all(m.__dict__["forward"] is f for m, f in zip(modules, forwards, strict=True))

    with pytest.raises(ValueError, match="chunk_size applies to the fused head only"):
        attach(trainer, Gate(), chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        attach(trainer, Gate(), fused=True, chunk_size=0)
    trainer.model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale=0.5"):
        attach(trainer, Gate(), fused=True)
    trainer.model.config.logit_scale = None
    trainer.aux_loss_enabled = True
    with pytest.raises(ValueError, match="load-balancing"):
        attach(trainer, Gate(), fused=True)
    trainer.aux_loss_enabled = False
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True, raising=False)
    with pytest.raises(ValueError, match="FSDP"):
        attach(trainer, Gate(), fused=True)
    monkeypatch.setattr(trainer, "is_fsdp_enabled", False, raising=False)
    del trainer.ref_model.forward  # as if TRL's fused-head patch had been replaced
    with pytest.raises(ValueError, match="expects TRL's fused LM head"):
        attach(trainer, Gate(), fused=True)
    monkeypatch.setattr(trl, "__version__", "1.14.0")
    with pytest.raises(ValueError, match=r"needs TRL >= 1\.15"):
        attach(trainer, Gate(), fused=True)
    assert getattr(trainer, "_gategrad_attachment", None) is None  # nothing left attached
