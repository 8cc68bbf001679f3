"""``gategrad.torch.hook``: forward hooks that gate the rejected rows of a causal LM's output."""

from __future__ import annotations

import dataclasses

import pytest
from _backends import tiny_llama

torch = pytest.importorskip("torch", reason="gategrad.torch needs PyTorch")

import gategrad  # noqa: E402
import gategrad.torch as gtorch  # noqa: E402
from gategrad import Gate  # noqa: E402

V, T, B = 11, 7, 3  # vocab, sequence length, pairs (2B rows)
GATE_ONE = Gate(shape=lambda p: p * 0 + 1)
GATE_ZERO = Gate(shape=lambda p: p * 0)
# p is about 1/V here, so this gate is strictly between 0 and 1 and different per row.
GATE_MID = Gate(shape="sigmoid", alpha=40.0, tau=0.06)
GATE_TOKEN = Gate(shape="sigmoid", alpha=40.0, tau=0.06, granularity="token")


@dataclasses.dataclass
class Out:
    logits: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None


class TinyLM(torch.nn.Module):
    """Embedding -> tanh MLP -> logits; mixes positions so rows share parameters."""

    def __init__(self, fused: bool = False, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(V, 8, generator=g, dtype=torch.float64))
        self.mix = torch.nn.Parameter(torch.randn(8, 8, generator=g, dtype=torch.float64) * 0.5)
        self.head = torch.nn.Parameter(torch.randn(8, V, generator=g, dtype=torch.float64))
        self.fused = fused

    def forward(self, input_ids, labels=None, attention_mask=None):
        h = self.emb[input_ids]
        h = torch.tanh(h + torch.cumsum(h, dim=1) @ self.mix)
        logits = h @ self.head
        if not self.fused:
            return Out(logits=logits)
        shifted = labels[:, 1:]
        mask = shifted != -100
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, shifted.clamp(min=0)[..., None])
        return Out(log_probs=lp.squeeze(-1).masked_fill(~mask, 0.0), label_mask=mask)


def make_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    # prompt of 2 tokens, responses of varying length, right padding
    resp_len = torch.tensor([4, 3, 5, 2, 5, 3])
    mask = torch.zeros(2 * B, T, dtype=torch.bool)
    for i, n in enumerate(resp_len.tolist()):
        mask[i, 2 : 2 + n] = True
    labels = ids.masked_fill(~mask, -100)
    return ids, labels


def token_logps(logits, labels):
    shifted = labels[:, 1:]
    mask = shifted != -100
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, shifted.clamp(min=0)[..., None])
    return lp.squeeze(-1).masked_fill(~mask, 0.0), mask


def dpo_like_loss(lp, mask):
    seq = lp.sum(-1)
    chosen, rejected = seq[:B], seq[B:]
    return -torch.nn.functional.logsigmoid(0.3 * (chosen - rejected)).mean() + 0.01 * (lp**2).sum()


def grads(model, loss):
    params = [p for p in model.parameters()]
    return [g.clone() for g in torch.autograd.grad(loss, params)]


def run(model, ids, labels):
    out = model(ids, labels=labels)
    if out.log_probs is not None:
        return out.log_probs, out.label_mask
    return token_logps(out.logits, labels)


def reference_grads(model, ids, labels, gate):
    """Gate applied by hand at the log-prob level with gategrad.gate_rejected."""
    lp, mask = run(model, ids, labels)
    gated = torch.cat([lp[:B], gategrad.gate_rejected(lp[B:], gate, mask[B:])])
    loss = dpo_like_loss(gated, mask)
    return loss, grads(model, loss)


@pytest.mark.parametrize("fused", [True, False], ids=["log_probs", "logits"])
@pytest.mark.parametrize(
    "gate", [GATE_ONE, GATE_ZERO, GATE_MID, GATE_TOKEN], ids=["one", "zero", "mid", "token"]
)
def test_hook_matches_gate_at_logprob_level(fused, gate):
    model = TinyLM(fused=fused)
    ids, labels = make_batch()
    ref_loss, ref = reference_grads(model, ids, labels, gate)
    with gtorch.hook(model, gate, rejected_rows="second_half") as h:
        lp, mask = run(model, ids, labels)
        loss = dpo_like_loss(lp, mask)
        got = grads(model, loss)
    assert h.calls == 1
    assert torch.equal(loss, ref_loss)  # the forward value is untouched
    exact = fused or gate in (GATE_ONE,)
    for a, b in zip(got, ref, strict=True):
        if exact:
            assert torch.equal(a, b)
        else:  # logits route: the same products in another order
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fused", [True, False], ids=["log_probs", "logits"])
def test_gate_zero_equals_detached_rejected(fused):
    model = TinyLM(fused=fused)
    ids, labels = make_batch()
    lp, mask = run(model, ids, labels)
    ref = grads(model, dpo_like_loss(torch.cat([lp[:B], lp[B:].detach()]), mask))
    with gtorch.hook(model, GATE_ZERO, rejected_rows="second_half"):
        lp, mask = run(model, ids, labels)
        got = grads(model, dpo_like_loss(lp, mask))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_stats_use_the_label_mask_not_zeros():
    """A valid token whose log-prob is exactly 0.0 still counts; padding never does."""

    class Fixed(torch.nn.Module):
        def __init__(self, lp, mask):
            super().__init__()
            self.lp = torch.nn.Parameter(lp)
            self.mask = mask

        def forward(self, x):
            return Out(log_probs=self.lp.masked_fill(~self.mask, 0.0), label_mask=self.mask)

    lp = torch.full((2, 4), -2.0, dtype=torch.float64)
    lp[1, 1] = 0.0  # rejected row: a certain token inside the response
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    model = Fixed(lp, mask)
    gate = Gate(shape="sigmoid", alpha=10.0, tau=0.2)
    with gtorch.hook(model, gate, rejected_rows="second_half") as h:
        out = model(torch.zeros(1))
        out.log_probs.sum().backward()
    expected = gategrad.gate_weights(lp[1:], gate, mask[1:])
    torch.testing.assert_close(h.last_stats.weight, expected.weight)
    # mean log-prob over the 3 response tokens: (-2 + 0 - 2) / 3, not (-2 - 2) / 2
    torch.testing.assert_close(
        h.last_stats.p, torch.exp(torch.tensor([-4.0 / 3.0], dtype=torch.float64))
    )
    g = float(expected.weight[0])
    assert torch.equal(model.lp.grad[0], mask[0].double())
    assert torch.equal(model.lp.grad[1], mask[1].double() * g)


def test_logits_route_ignores_prompt_and_padding_positions():
    """Changing logits outside the response changes no gate weight."""
    model = TinyLM(fused=False)
    ids, labels = make_batch()
    with gtorch.hook(model, GATE_MID, rejected_rows="second_half") as h:
        model(ids, labels=labels)
        w1 = h.last_stats.weight.clone()
        ids2 = ids.clone()
        ids2[:, -1] = (ids2[:, -1] + 1) % V  # last position: padding for every row but none
        labels2 = ids2.masked_fill(labels == -100, -100)
        model(ids2, labels=labels2)
        w2 = h.last_stats.weight
    resp_reaches_end = labels[B:, -1] != -100
    assert torch.equal(w1[~resp_reaches_end], w2[~resp_reaches_end])
    assert h.calls == 2


def test_no_grad_pass_is_untouched_and_remove_restores_exactly():
    model = TinyLM(fused=True)
    ids, labels = make_batch()
    before = (dict(model._forward_hooks), dict(model._forward_hooks_with_kwargs))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = grads(model, dpo_like_loss(*run(model, ids, labels)))
    h = gtorch.hook(model, GATE_ZERO, rejected_rows="second_half")
    with torch.no_grad():
        out = model(ids, labels=labels)
    assert h.calls == 0 and not out.log_probs.requires_grad
    h.remove()
    h.remove()  # idempotent
    assert (dict(model._forward_hooks), dict(model._forward_hooks_with_kwargs)) == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    after = grads(model, dpo_like_loss(*run(model, ids, labels)))
    assert all(torch.equal(a, b) for a, b in zip(after, plain, strict=True))


def test_frozen_model_under_enable_grad_is_untouched():
    model = TinyLM(fused=True).requires_grad_(False)
    ids, labels = make_batch()
    with gtorch.hook(model, GATE_ZERO, rejected_rows="second_half") as h:
        model(ids, labels=labels)
    assert h.calls == 0


@pytest.mark.parametrize(
    "rows",
    [
        "first_half",
        slice(0, B),
        list(range(B)),
        torch.arange(B),
        torch.arange(2 * B) < B,
        lambda n: slice(0, n // 2),
    ],
    ids=["name", "slice", "list", "index", "bool", "callable"],
)
def test_rejected_rows_specs(rows):
    """[rejected; chosen] order: every spec of the first half gates the same rows."""
    model = TinyLM(fused=True)
    ids, labels = make_batch()
    lp, mask = run(model, ids, labels)
    gated = torch.cat([gategrad.gate_rejected(lp[:B], GATE_MID, mask[:B]), lp[B:]])
    ref = grads(model, dpo_like_loss(gated, mask))
    with gtorch.hook(model, GATE_MID, rejected_rows=rows):
        got = grads(model, dpo_like_loss(*run(model, ids, labels)))
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)


def test_empty_rejected_row_keeps_weight_one():
    model = TinyLM(fused=True)
    ids, labels = make_batch()
    labels[2 * B - 1] = -100  # the last rejected response lost all its tokens (truncation)
    labels[B - 1, 2] = ids[B - 1, 2]
    with gtorch.hook(model, GATE_ZERO, rejected_rows="second_half") as h:
        lp, mask = run(model, ids, labels)
        lp.sum().backward()
    assert h.last_stats.weight.shape == (B - 1,)

    labels[B:] = -100  # no rejected response has a token left: nothing to gate, no error
    with gtorch.hook(model, GATE_ZERO, rejected_rows="second_half") as h:
        lp, mask = run(model, ids, labels)
        lp.sum().backward()
    assert h.calls == 1 and h.last_stats is None


def test_errors_are_clear():
    model = TinyLM(fused=True)
    ids, labels = make_batch()
    with pytest.raises(ValueError, match="even number of rows"):
        with gtorch.hook(model, GATE_MID, rejected_rows="second_half"):
            model(ids[:5], labels=labels[:5])
    with pytest.raises(ValueError, match="rejected_rows must be one of"):
        gtorch.hook(model, GATE_MID, rejected_rows="rejected")
    with pytest.raises(TypeError, match="gategrad.Gate"):
        gtorch.hook(model, "sigmoid", rejected_rows="second_half")
    assert not model._forward_hooks  # failed constructions leave nothing behind

    plain = TinyLM(fused=False)
    with gtorch.hook(plain, GATE_MID, rejected_rows="second_half"):
        with pytest.raises(ValueError, match="no labels="):
            plain(ids)

    class LossOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x):
            return {"loss": self.w * 2}

    m = LossOnly()
    with gtorch.hook(m, GATE_MID, rejected_rows="second_half"):
        with pytest.raises(RuntimeError, match="never materialises"):
            m(ids)


def test_user_mask_callable_for_input_ids_only_models():
    model = TinyLM(fused=False)
    ids, labels = make_batch()
    mask = labels[:, 1:] != -100
    _, ref = reference_grads(model, ids, labels, GATE_MID)
    with gtorch.hook(model, GATE_MID, rejected_rows="second_half", mask=lambda a, k, o: mask):
        out = model(ids)  # no labels reach the model
        lp, _ = token_logps(out.logits, labels)
        got = grads(model, dpo_like_loss(lp, mask))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_bfloat16_logits_route_runs():
    model = TinyLM(fused=False).to(torch.bfloat16)
    ids, labels = make_batch()
    with gtorch.hook(model, GATE_MID, rejected_rows="second_half") as h:
        lp, mask = run(model, ids, labels)
        lp.float().sum().backward()
    assert h.last_stats.weight.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_tiny_llama_logits_and_no_grad_reference():
    pytest.importorskip("transformers", reason="tiny Llama needs transformers")
    policy = tiny_llama(V, hidden=16, layers=1, heads=2, max_position_embeddings=16).double()
    ids, labels = make_batch()
    attn = torch.ones_like(ids)

    def loss_of(model):
        lp, mask = token_logps(model(input_ids=ids, attention_mask=attn).logits, labels)
        return dpo_like_loss(lp, mask)

    def loss_and_grads(gate):
        with gtorch.hook(policy, gate, rejected_rows="second_half") as h:
            out = policy(input_ids=ids, attention_mask=attn, labels=labels)
            lp, mask = token_logps(out.logits, labels)
            loss = dpo_like_loss(lp, mask)
            return loss, grads(policy, loss), h

    plain_loss = loss_of(policy)
    plain = grads(policy, plain_loss)
    loss1, g1, _ = loss_and_grads(GATE_ONE)
    assert torch.equal(loss1, plain_loss)
    assert all(torch.equal(a, b) for a, b in zip(g1, plain, strict=True))

    lp, mask = token_logps(policy(input_ids=ids, attention_mask=attn).logits, labels)
    detached = grads(policy, dpo_like_loss(torch.cat([lp[:B], lp[B:].detach()]), mask))
    loss0, g0, h0 = loss_and_grads(GATE_ZERO)
    assert h0.calls == 1
    assert torch.equal(loss0, plain_loss)
    for a, b in zip(g0, detached, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)
    with gtorch.hook(policy, GATE_ZERO, rejected_rows="second_half") as h, torch.no_grad():
        policy(input_ids=ids, labels=labels)
    assert h.calls == 0


def test_gated_output_is_not_a_view_and_in_place_ops_differentiate_correctly():
    """FSDP2 warns when a module returns a view, and autograd refuses in-place ops on the
    output of a custom Function that returns one. The gated output aliases the input's storage
    (no copy) without being a view: in-place ops on it work, with the right gradient."""
    model = TinyLM()
    ids, labels = make_batch()
    # gate 0 on the logits route: the rejected rows of the (in-place halved) logits get no
    # gradient at all, whatever the weights; the reference detaches them by hand
    logits = model(ids, labels=labels).logits / 2
    lp, mask = token_logps(torch.cat([logits[:B], logits[B:].detach()]), labels)
    ref = grads(model, dpo_like_loss(lp, mask))
    with gtorch.hook(model, GATE_ZERO, rejected_rows="second_half"):
        out = model(ids, labels=labels).logits
        assert out._base is None  # not a view: FSDP2 has nothing to warn about
        out.div_(2)  # an in-place temperature, as some trainers apply it
        lp, mask = token_logps(out, labels)
        got = grads(model, dpo_like_loss(lp, mask))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)  # float64; the same products

    # the primitive: in-place on the output equals the same op out of place, bit for bit
    w = torch.tensor([[0.25], [1.0], [0.0]], dtype=torch.float64)
    x_leaf = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out_of_place = gategrad.scale_grad(x_leaf * 2.0, w) * 3.0  # (x * 2 saves no tensor)
    (expected,) = torch.autograd.grad((out_of_place**2).sum(), x_leaf)
    y = gategrad.scale_grad(x_leaf * 2.0, w)
    y.mul_(3.0)
    (got_x,) = torch.autograd.grad((y**2).sum(), x_leaf)
    assert torch.equal(got_x, expected)
    assert float(got_x[2].abs().max()) == 0.0 < float(got_x[0].abs().max())  # w is applied
    # the output aliases its input: when the op that made the input saved it for its backward
    # (tanh saves its output), autograd's version counter refuses the backward
    y = gategrad.scale_grad(torch.tanh(x_leaf), w)
    y.mul_(3.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.sum(), x_leaf)
    # a leaf parameter keeps autograd's view checks: an in-place op cannot silently rewrite it
    with pytest.raises(RuntimeError, match="view"):
        gategrad.scale_grad(x_leaf, w).mul_(3.0)
