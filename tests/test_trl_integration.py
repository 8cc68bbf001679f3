"""``gategrad.integrations.trl.attach``: an existing TRL DPOTrainer, gated in one call.

Offline and on CPU: a random-init tiny Llama and a WordLevel tokenizer built in code. Gradients
are captured right before each optimizer step (clipping off), for two training steps.
"""

from __future__ import annotations

import copy
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

import gategrad  # noqa: E402
from gategrad import Gate  # noqa: E402
from gategrad.integrations.trl import TESTED_TRL, attach  # noqa: E402

pytestmark = pytest.mark.slow

GATE_ONE = Gate(shape=lambda p: p * 0 + 1)
GATE_ZERO = Gate(shape=lambda p: p * 0)
WORDS = "the a cat dog sat ran on mat fast slow red blue big small yes no good bad".split()
FUSED = hasattr(trl.trainer.utils, "add_fused_lm_head")


def make_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def make_dataset(n: int = 4):
    rows = {
        "prompt": ["the cat", "a dog", "the red mat", "big blue"][:n],
        "chosen": [" sat on the mat", " ran fast", " is good", " yes"][:n],
        "rejected": [" ran", " sat slow on a big red mat", " no", " bad dog ran"][:n],
    }
    return datasets.Dataset.from_dict(rows)


def make_model(vocab_size: int):
    model = tiny_llama(
        vocab_size,
        hidden=32,
        layers=2,
        heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    with torch.no_grad():  # a perturbed init so that rows' gates differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


class GradCapture(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )


@pytest.fixture(scope="module")
def base():
    tok = make_tokenizer()
    return tok, make_dataset(), make_model(len(tok)).state_dict()


def make_trainer(base, tmp_path, **config):
    tok, data, state = base
    policy = make_model(len(tok))
    policy.load_state_dict(state)
    ref = copy.deepcopy(policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.DPOConfig(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            max_grad_norm=0.0,  # no clipping: compare raw gradients
            # SGD, not AdamW: Adam's first update lr * g / (|g| + 1e-8) turns a rounding-level
            # difference in a near-zero gradient element into a 1e-2-sized parameter change,
            # so the second step's gradients would differ by machine-dependent amounts
            optim="sgd",
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


def train(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses


class RejectedLogProbHook:
    """The test's own reference: rewrite the rejected rows as ``g*x + (1-g)*x.detach()``.

    ``g`` is computed here, independently of gategrad, per rejected row (``weight_fn`` of the
    rejected token log-probs and response mask). On TRL >= 1.15 ``x`` is the fused ``log_probs``;
    on older TRL it is the rows of the ``logits`` (whose log-probs get the same factor ``g``),
    with the response mask taken from the batch's ``completion_mask``.
    """

    def __init__(self, trainer, weight_fn):
        self.weight_fn = weight_fn
        self.completion_mask = None
        self.handle = trainer.model.register_forward_hook(self, with_kwargs=True)
        compute_loss = trainer.compute_loss

        def wrapped(model, inputs, *a, **k):
            self.completion_mask = inputs["completion_mask"]
            return compute_loss(model, inputs, *a, **k)

        trainer.compute_loss = wrapped

    @staticmethod
    def mix(x, g):
        g = g.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return g * x + (1 - g) * x.detach()

    def __call__(self, module, args, kwargs, out):
        if not torch.is_grad_enabled():
            return None
        if getattr(out, "log_probs", None) is not None:
            lp, mask = out.log_probs, out.label_mask
            n = lp.shape[0] // 2
            g = self.weight_fn(lp[n:].detach(), mask[n:])
            out["log_probs"] = torch.cat([lp[:n], self.mix(lp[n:], g)])
            return out
        logits = out.logits
        n = logits.shape[0] // 2
        labels = kwargs["input_ids"][n:, 1:]
        mask = self.completion_mask[n:, 1:].bool()
        with torch.no_grad():
            lp = torch.log_softmax(logits[n:, :-1].double(), -1)
            lp = lp.gather(-1, labels[..., None]).squeeze(-1) * mask
        g = self.weight_fn(lp, mask)
        out["logits"] = torch.cat([logits[:n], self.mix(logits[n:], g)])
        return out


def paper_gate(alpha=200.0, tau=0.02):
    def weight(lp, mask):
        mean = (lp.double() * mask).sum(-1) / mask.sum(-1)
        return torch.sigmoid(alpha * (torch.exp(mean) - tau))

    return weight


EPS32 = float(torch.finfo(torch.float32).eps)


def paper_gate_float32_error(lp, mask, alpha=200.0, tau=0.02):
    """Bound on ``|g - paper_gate(lp)|`` per row for ``g`` computed in float32 from float32
    ``lp`` (what gategrad does for float32 inputs), with a factor 2 of margin: the mean of ``n``
    log-probs errs by ``(n + 2) eps max|l|`` (sum and division), ``exp`` by 2 ulp, ``p - tau`` and
    the product by ``alpha`` round once each, and ``sigmoid`` multiplies by its slope
    ``g (1 - g)`` and rounds (2 ulp). The steep paper gate (``alpha = 200``) amplifies the
    error of ``p`` by up to 50: this is why float32 weights differ from float64 ones by ~1e-5."""
    m = mask.bool()
    lp64 = lp.double() * m
    n = m.sum(-1).double()
    p = torch.exp(lp64.sum(-1) / n)
    g = torch.sigmoid(alpha * (p - tau))
    dm = (n + 2) * EPS32 * lp64.abs().amax(-1)
    dp = p * (dm + 2 * EPS32)
    dz = alpha * (dp + EPS32 * (p + tau))
    return 2 * (g * (1 - g) * dz + 2 * EPS32)


def assert_grads(got, ref, exact: bool, rtol: float = 0.0):
    assert len(got) == len(ref) == 2
    for step_got, step_ref in zip(got, ref, strict=True):
        assert step_got.keys() == step_ref.keys()
        for name, a in step_got.items():
            b = step_ref[name]
            if exact:
                assert torch.equal(a, b), name
            else:
                scale = float(b.abs().max()) or 1.0
                assert float((a - b).abs().max()) <= rtol * scale, name


@pytest.fixture(scope="module")
def plain_run(base, tmp_path_factory):
    trainer, capture = make_trainer(base, tmp_path_factory.mktemp("plain"))
    losses = train(trainer)
    return losses, capture.grads


def test_tested_range_covers_installed_trl():
    from packaging.version import Version

    v = Version(trl.__version__.split("+")[0])
    assert Version(TESTED_TRL[0]) <= v < Version(TESTED_TRL[1])


def test_gate_one_is_plain_trl(base, tmp_path, plain_run):
    trainer, capture = make_trainer(base, tmp_path)
    attachment = attach(trainer, GATE_ONE)
    losses = train(trainer)
    assert losses == plain_run[0]  # bit-identical losses, both steps
    assert_grads(capture.grads, plain_run[1], exact=True)
    assert attachment.hook.calls == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["gate/mean"] == 1.0 for h in logs)


def test_gate_zero_is_detached_rejected(base, tmp_path):
    trainer, capture = make_trainer(base, tmp_path / "gated")
    attach(trainer, GATE_ZERO)
    losses = train(trainer)

    ref_trainer, ref_capture = make_trainer(base, tmp_path / "detached")
    hook = RejectedLogProbHook(ref_trainer, lambda lp, m: torch.zeros(lp.shape[0]))
    ref_losses = train(ref_trainer)
    hook.handle.remove()
    assert losses == ref_losses
    # g = 0: both forwards give exactly x and both backwards send exactly 0 into the rejected
    # log-probs, so the arithmetic is the same; 1e-6 (8 ulps) leaves room only for a different
    # reduction order inside the framework
    assert_grads(capture.grads, ref_capture.grads, exact=False, rtol=1e-6)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["gate/mean"] == 0.0 and h["gate/frac_below_half"] == 1.0 for h in logs)


def test_default_gate_loss_unchanged_gradient_mixture(base, tmp_path, plain_run):
    trainer, capture = make_trainer(base, tmp_path / "gated")
    attach(trainer)  # Gate(): sigmoid, alpha=200, tau=0.02, seq estimator
    losses = train(trainer)
    assert losses[0] == plain_run[0][0]  # same parameters: the loss value is untouched

    ref_trainer, ref_capture = make_trainer(base, tmp_path / "mixture")
    weights = []

    def weight(lp, mask):
        # The mixture uses the gate's own float32 weights, so that both runs multiply the same
        # float32 g into the same gradients; the weights themselves are checked against the
        # paper's formula in float64, within the float32 error bound derived above.
        w = gategrad.gate_weights(lp.float(), Gate(), mask.bool()).weight
        w64 = paper_gate()(lp, mask)
        bound = paper_gate_float32_error(lp, mask)
        assert bool(((w.double() - w64).abs() <= bound).all()), (w, w64, bound)
        weights.append(w)
        return w

    hook = RejectedLogProbHook(ref_trainer, weight)
    ref_losses = train(ref_trainer)
    hook.handle.remove()
    w = torch.cat(weights)
    assert float(w.min()) > 0.05 and float(w.max()) < 0.999, w  # a real mixture
    assert float(w.max() - w.min()) > 1e-3, w  # different weights per row
    # The two runs differ only in the forward rounding of the mixture g*x + (1-g)*x (1 ulp of
    # each rejected log-prob, 6e-8 relative), which moves the loss and, through the backward,
    # each gradient by a few float32 ulps of the largest contribution; SGD keeps the second
    # step as well conditioned as the first. 1e-6 and 1e-5 are ~8 and ~80 ulps.
    assert math.isclose(losses[1], ref_losses[1], rel_tol=1e-6)
    assert_grads(capture.grads, ref_capture.grads, exact=False, rtol=1e-5)
    # and the gradient is not the plain one
    diff = max(float((a - plain_run[1][0][n]).abs().max()) for n, a in capture.grads[0].items())
    assert diff > 1e-6
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h, step_w in zip(logs, w.reshape(2, -1), strict=True):
        # the logged statistics are float32 reductions of 2 float32 weights: within 2 ulps
        assert math.isclose(h["gate/mean"], float(step_w.mean()), rel_tol=1e-5)
        assert math.isclose(h["gate/min"], float(step_w.min()), rel_tol=1e-5)
        assert 0.0 < h["gate/p_mean"] < 1.0


def test_reference_model_gets_no_gradient(base, tmp_path):
    trainer, _ = make_trainer(base, tmp_path)
    calls = []
    attachment = attach(trainer, GATE_ZERO)
    ref_handle = trainer.ref_model.register_forward_hook(
        lambda m, a, o: calls.append(torch.is_grad_enabled())
    )
    train(trainer)
    ref_handle.remove()
    assert calls and not any(calls)  # the reference pass runs under no_grad
    assert all(p.grad is None for p in trainer.ref_model.parameters())
    assert attachment.hook.calls == 2  # the policy's two training forwards only


def test_remove_restores_trainer(base, tmp_path):
    trainer, _ = make_trainer(base, tmp_path)
    hooks = dict(trainer.model._forward_hooks)
    with attach(trainer, GATE_ZERO):
        assert "compute_loss" in trainer.__dict__ and "log" in trainer.__dict__
        with pytest.raises(ValueError, match="already attached"):
            attach(trainer, GATE_ZERO)
    assert "compute_loss" not in trainer.__dict__ and "log" not in trainer.__dict__
    assert dict(trainer.model._forward_hooks) == hooks
    assert not trainer.model._forward_hooks_with_kwargs


def test_refuses_what_it_cannot_gate(base, tmp_path):
    trainer, _ = make_trainer(base, tmp_path)
    trainer.padding_free = True  # as if the installed TRL packed the batch
    with pytest.raises(ValueError, match="padding-free"):
        attach(trainer, Gate())
    trainer.padding_free = False
    trainer.use_liger_kernel = True
    if FUSED:  # TRL >= 1.15 keeps the fused log-prob head with liger's layer kernels
        attach(trainer, Gate()).remove()
    else:
        with pytest.raises(ValueError, match="use_liger_kernel"):
            attach(trainer, Gate())
    trainer.use_liger_kernel = False
    trainer.model.config.is_encoder_decoder = True
    with pytest.raises(ValueError, match="encoder-decoder"):
        attach(trainer, Gate())
    trainer.model.config.is_encoder_decoder = False
    with pytest.raises(TypeError, match="DPOTrainer"):
        attach(object(), Gate())


def test_runtime_guard_when_the_forward_is_bypassed(base, tmp_path):
    """A loss that never calls the hooked policy raises instead of silently not gating."""
    trainer, _ = make_trainer(base, tmp_path)
    attach(trainer, Gate())
    inner = trainer.model

    def bypass(model, inputs, *a, **k):  # e.g. a kernel calling the backbone directly
        return inner.model(input_ids=inputs["input_ids"]).last_hidden_state.sum() * 0

    attachment = trainer._gategrad_attachment
    trainer.compute_loss = attachment._wrap_compute_loss(bypass)
    with pytest.raises(RuntimeError, match="never ran"):
        train(trainer)


def test_metrics_are_reduced_over_processes():
    """Two processes: sums and counts are gathered; a process without tokens still joins."""
    from collections import defaultdict
    from types import SimpleNamespace

    from gategrad import GateStats
    from gategrad.integrations.trl import GateAttachment

    gathered = []

    class FakeAccelerator:
        num_processes = 2
        device = torch.device("cpu")

        def gather(self, t):
            gathered.append(t)
            other = torch.tensor([[0.0, 0.0, 0.0, 0.0, -math.inf]], dtype=t.dtype)  # no tokens
            if len(gathered) == 2:  # second step: the other rank has weights 0.2 and 0.4
                other = torch.tensor([[0.6, 2.0, 0.3, 2.0, -0.2]], dtype=t.dtype)
            return torch.cat([t, other])

    att = GateAttachment.__new__(GateAttachment)
    att.trainer = SimpleNamespace(
        accelerator=FakeAccelerator(), model=SimpleNamespace(training=True)
    )
    att.metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    w = torch.tensor([0.9, 0.7])
    for _ in range(2):
        att._step_stats = [GateStats(weight=w, p=torch.tensor([0.1, 0.05]), mask=None)]
        att._record()
    m = att.metrics["train"]
    assert m["gate/mean"] == pytest.approx([0.8, (1.6 + 0.6) / 4])
    assert m["gate/min"] == pytest.approx([0.7, 0.2])
    assert m["gate/p_mean"] == pytest.approx([0.075, (0.15 + 0.3) / 4])
    assert m["gate/frac_below_half"] == pytest.approx([0.0, 0.5])
    att._step_stats = []  # this rank has no rejected token: it still joins the gather
    att._record()
    assert len(gathered) == 3 and len(m["gate/mean"]) == 2  # no process had a token
