"""Ungated gategrad losses equal TRL's DPOTrainer on the same inputs (optional: needs trl).

A tiny random Llama and a word-level tokenizer are built in code (offline). For each loss type,
``DPOTrainer.compute_loss`` runs once; forward hooks capture the per-token log-probs that TRL
computed for the policy and the reference, and gategrad's loss on those log-probs must give the
same loss value and the same logged metrics. The same log-probs also come out of
``gategrad.token_logps`` on the model's logits."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

trl = pytest.importorskip("trl", reason="install the trl extra: pip install 'gategrad[trl]'")
torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("datasets", reason="datasets is not installed (comes with trl)")
pytest.importorskip("tokenizers", reason="tokenizers is not installed (comes with trl)")

import gategrad  # noqa: E402

pytestmark = pytest.mark.slow  # builds a TRL trainer (imports transformers, datasets)

# trl's loss_type -> (gategrad loss, extra parameters on both sides)
CASES = {
    "sigmoid": (gategrad.dpo_loss, {}),
    "ipo": (gategrad.ipo_loss, {}),
    "hinge": (gategrad.hinge_loss, {}),
    "robust": (gategrad.robust_dpo_loss, {"label_smoothing": 0.2}),
}
BETA = 0.5


@pytest.fixture(scope="module")
def trainer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "the a cat dog sat ran on mat fast slow red blue is was very not".split()
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "<bos>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        bos_token="<bos>",
    )  # fmt: skip
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ref_model = copy.deepcopy(model)
    with torch.no_grad():  # the policy differs from the reference: nonzero rewards
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    data = Dataset.from_dict(
        {
            "prompt": ["the cat", "a dog", "the mat is", "red cat", "a blue dog"],
            "chosen": [" sat on the mat", " ran fast", " red", " is very slow not fast", " sat"],
            "rejected": [" ran", " sat on a blue mat", " not blue is", " was", " is red"],
        }
    )
    args = trl.DPOConfig(
        output_dir="/tmp/gategrad-trl-parity", max_steps=1, use_cpu=True, report_to="none",
        save_strategy="no", bf16=False, per_device_train_batch_size=5, beta=BETA,
        loss_type=["sigmoid"],
    )  # fmt: skip
    return trl.DPOTrainer(
        model=model, ref_model=ref_model, args=args, train_dataset=data,
        processing_class=tokenizer,
    )  # fmt: skip


def _run_trl(trainer, loss_type, params):
    """TRL's loss and logged metrics, and the per-token log-probs it computed."""
    trainer.loss_types = [loss_type]
    trainer.loss_weights = [1.0]
    trainer.label_smoothing = params.get("label_smoothing", 0.0)
    trainer._metrics["train"].clear()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    caught = {}

    def hook(name):
        def fn(module, args, kwargs, output):
            caught[name] = output

        return fn

    handles = [
        trainer.model.register_forward_hook(hook("policy"), with_kwargs=True),
        trainer.ref_model.register_forward_hook(hook("ref"), with_kwargs=True),
    ]
    try:
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
    finally:
        for h in handles:
            h.remove()
    if getattr(caught["policy"], "log_probs", None) is None:
        pytest.skip("this trl version does not return per-token log_probs (needs trl >= 1.15)")
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics, caught, batch


@pytest.mark.parametrize("loss_type", list(CASES))
def test_loss_and_metrics_match_trl(trainer, loss_type):
    fn, params = CASES[loss_type]
    trl_loss, trl_metrics, caught, batch = _run_trl(trainer, loss_type, params)
    mask = batch["completion_mask"][:, 1:].bool()
    seq_len = mask.shape[1]
    lp = caught["policy"].log_probs[:, -seq_len:]
    ref_lp = caught["ref"].log_probs[:, -seq_len:].detach()
    b = lp.shape[0] // 2  # rows are [chosen; rejected]
    loss, metrics = fn(
        lp[:b], lp[b:], ref_lp[:b], ref_lp[b:], beta=BETA, chosen_mask=mask[:b],
        rejected_mask=mask[b:], **params,
    )  # fmt: skip
    assert abs(loss.item() - trl_loss.item()) <= 1e-6 * max(1.0, abs(trl_loss.item()))
    for key, value in metrics.items():
        assert value.item() == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
    # the gradients agree too (through the captured policy log-probs)
    g_ours = torch.autograd.grad(loss, lp, retain_graph=True)[0]
    trl_loss2, _, caught2, _ = _run_trl(trainer, loss_type, params)
    lp2 = caught2["policy"].log_probs
    g_trl = torch.autograd.grad(trl_loss2, lp2)[0][:, -seq_len:]
    # float32 d loss / d log-prob: beta * sigmoid(.) / B, O(0.1), computed by the same
    # formula in another order (two forwards of the model): 80 ulps relative (1e-5) covers
    # the rounding of the summed log-probs (T <= 16 terms) feeding sigmoid's argument
    torch.testing.assert_close(g_ours * mask, g_trl * mask, rtol=1e-5, atol=1e-7)


def test_token_logps_matches_trl_log_probs(trainer):
    """gategrad.token_logps on the model's full logits equals TRL's fused per-token log-probs."""
    _, _, caught, batch = _run_trl(trainer, "sigmoid", {})
    mask = batch["completion_mask"][:, 1:].bool()
    trl_lp = caught["policy"].log_probs[:, -mask.shape[1] :].detach()
    with torch.no_grad():
        logits = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    ours, used = gategrad.token_logps(logits, batch["input_ids"], batch["completion_mask"])
    assert torch.equal(used, mask)
    # float32 log-probs of size <= ~log(V) + |logit| ~ 10: TRL's selective_log_softmax
    # (logsumexp, then a gather) and ours (chunked) reduce over V in another order, a few
    # ulps of 10 each (~1e-6); 2e-5 leaves a factor 20 for the logsumexp's exp/log roundings
    np.testing.assert_allclose((ours * used).numpy(), (trl_lp * mask).numpy(), atol=2e-5)


def test_gated_loss_value_equals_trl(trainer):
    """With a gate the loss value still equals TRL's ungated one (only gradients change)."""
    trl_loss, _, caught, batch = _run_trl(trainer, "sigmoid", {})
    mask = batch["completion_mask"][:, 1:].bool()
    lp = caught["policy"].log_probs[:, -mask.shape[1] :]
    ref_lp = caught["ref"].log_probs[:, -mask.shape[1] :].detach()
    b = lp.shape[0] // 2
    gate = gategrad.Gate(shape="log_sigmoid", tau=0.05, estimator="q10")
    loss, m = gategrad.dpo_loss(lp[:b], lp[b:], ref_lp[:b], ref_lp[b:], beta=BETA, gate=gate,
                                chosen_mask=mask[:b], rejected_mask=mask[b:])  # fmt: skip
    assert abs(loss.item() - trl_loss.item()) <= 1e-6 * max(1.0, abs(trl_loss.item()))
    assert 0.0 <= m["gate/mean"].item() <= 1.0
