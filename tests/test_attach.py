"""gategrad.attach: one call puts the gate onto an existing loss function.

Each framework gets a hand-written DPO loss, as a user would have it in their own code."""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest

import gategrad
from gategrad import Gate, attach, gate_weights

try:  # float64 in JAX (a global flag: set, never unset)
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # pragma: no cover - jax is optional
    pass

GATE = Gate(shape="log_sigmoid", tau=0.1)  # per example, 'seq' estimator
TOKEN_GATE = Gate(shape="log_sigmoid", tau=0.2, granularity="token")
RNG = np.random.default_rng(0)
B = 4
LENGTHS = np.array([3.0, 5.0, 2.0, 7.0])
PC = -RNG.uniform(0.2, 2.0, B) * LENGTHS  # per-sequence sums
PR = -RNG.uniform(0.2, 2.0, B) * LENGTHS
RC = PC + RNG.normal(0, 1, B)
RR = PR + RNG.normal(0, 1, B)


def expected_g(rejected=PR, lengths=LENGTHS):
    return gate_weights(np.asarray(rejected), GATE, lengths=np.asarray(lengths)).weight


# ---------------------------------------------------------------------------------------------
# PyTorch


def torch_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                   ref_rejected_logps, beta=0.1, rejected_lengths=None):  # fmt: skip
    """My DPO loss."""
    import torch.nn.functional as F

    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * logits).mean()


def _torch_grads(fn, *extra_args, **kw):
    torch = pytest.importorskip("torch")
    xs = [torch.tensor(a, requires_grad=True) for a in (PC, PR, RC, RR)]
    loss = fn(*xs, *extra_args, **kw)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


def test_torch_hand_written_loss():
    torch = pytest.importorskip("torch")
    gated = attach(torch_dpo_loss, GATE, lengths="rejected_lengths")
    lengths = torch.tensor(LENGTHS)
    v0, g0 = _torch_grads(torch_dpo_loss)
    v1, g1 = _torch_grads(gated, rejected_lengths=lengths)  # by keyword
    v2, g2 = _torch_grads(gated, 0.1, lengths)  # by position
    g = torch.tensor(expected_g())
    for v, gr in ((v1, g1), (v2, g2)):
        assert v.item() == v0.item()  # bitwise
        for i in (0, 2, 3):
            assert torch.equal(gr[i], g0[i])
        assert torch.equal(gr[1], g0[1] * g)
    assert (g < 0.99).any()


def test_torch_rejected_passed_by_keyword_and_position():
    torch = pytest.importorskip("torch")
    gated = attach(torch_dpo_loss, GATE, lengths="rejected_lengths")
    xs = [torch.tensor(a, requires_grad=True) for a in (PC, PR, RC, RR)]
    lengths = torch.tensor(LENGTHS)
    gated(xs[0], ref_chosen_logps=xs[2], ref_rejected_logps=xs[3],
          policy_rejected_logps=xs[1], rejected_lengths=lengths).backward()  # fmt: skip
    by_kw = xs[1].grad.clone()
    xs[1].grad = None
    gated(*xs, rejected_lengths=lengths).backward()
    assert torch.equal(xs[1].grad, by_kw)


class TorchDPO:
    """A loss object with a method, as trainers have."""

    def __init__(self, beta):
        self.beta = beta

    def loss(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
             ref_rejected_logps, rejected_lengths=None):  # fmt: skip
        """Method docstring."""
        return torch_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                              ref_rejected_logps, self.beta)  # fmt: skip


def test_bound_method_and_class_function():
    torch = pytest.importorskip("torch")
    obj = TorchDPO(beta=0.3)
    v0, g0 = _torch_grads(obj.loss)
    obj.loss = attach(obj.loss, GATE, lengths="rejected_lengths")  # bound method
    assert list(inspect.signature(obj.loss).parameters)[0] == "policy_chosen_logps"
    v1, g1 = _torch_grads(obj.loss, rejected_lengths=torch.tensor(LENGTHS))
    assert v1.item() == v0.item() and torch.equal(g1[1], g0[1] * torch.tensor(expected_g()))

    class Sub(TorchDPO):
        pass

    Sub.loss = attach(TorchDPO.loss, GATE, lengths="rejected_lengths")  # function from a class
    assert list(inspect.signature(Sub.loss).parameters)[0] == "self"
    v2, g2 = _torch_grads(Sub(beta=0.3).loss, rejected_lengths=torch.tensor(LENGTHS))
    assert v2.item() == v0.item() and torch.equal(g2[1], g1[1])
    assert TorchDPO(beta=0.3).loss.__func__ is TorchDPO.__dict__["loss"]  # original untouched


def test_torch_module_forward():
    torch = pytest.importorskip("torch")

    class DPOModule(torch.nn.Module):
        def forward(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, rejected_lengths=None):  # fmt: skip
            return torch_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                  ref_rejected_logps)  # fmt: skip

    module = DPOModule()
    v0, g0 = _torch_grads(module)
    module.forward = attach(module.forward, GATE, lengths="rejected_lengths")
    v1, g1 = _torch_grads(module, rejected_lengths=torch.tensor(LENGTHS))
    assert v1.item() == v0.item() and torch.equal(g1[1], g0[1] * torch.tensor(expected_g()))


def test_torch_per_token_with_mask():
    torch = pytest.importorskip("torch")

    def token_dpo(chosen_tok, rejected_tok, ref_chosen, ref_rejected, chosen_mask, rejected_mask):
        c = (chosen_tok * chosen_mask).sum(-1)
        r = (rejected_tok * rejected_mask).sum(-1)
        return -torch.nn.functional.logsigmoid(0.1 * ((c - ref_chosen) - (r - ref_rejected))).sum()

    ct = torch.tensor(-RNG.exponential(1.0, (B, 6)), requires_grad=True)
    rt = torch.tensor(-RNG.exponential(1.0, (B, 5)), requires_grad=True)
    cm = torch.ones(B, 6)
    rm = torch.tensor(RNG.random((B, 5)) < 0.7, dtype=torch.float64)
    rm[:, 0] = 1
    args = (ct, rt, torch.tensor(RC), torch.tensor(RR), cm, rm)
    gated = attach(token_dpo, TOKEN_GATE, rejected="rejected_tok", mask="rejected_mask")
    (g0,) = torch.autograd.grad(token_dpo(*args), rt)
    (g1,) = torch.autograd.grad(gated(*args), rt)
    w = gate_weights(rt.detach(), TOKEN_GATE, rm).weight  # the same backend's g, per token
    assert torch.equal(g1, g0 * torch.where(rm > 0, w, torch.ones_like(w)))


# ---------------------------------------------------------------------------------------------
# JAX


def test_jax_hand_written_loss_and_jit():
    pytest.importorskip("jax")
    import jax
    import jax.numpy as jnp

    def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                 ref_rejected_logps, rejected_lengths, beta=0.1):  # fmt: skip
        logits = (policy_chosen_logps - ref_chosen_logps) - (
            policy_rejected_logps - ref_rejected_logps
        )
        return -jnp.mean(jax.nn.log_sigmoid(beta * logits))

    gated = attach(dpo_loss, GATE, lengths="rejected_lengths")
    xs = [jnp.asarray(a) for a in (PC, PR, RC, RR, LENGTHS)]
    v0, g0 = jax.value_and_grad(dpo_loss, argnums=(0, 1, 2, 3))(*xs)
    v1, g1 = jax.value_and_grad(gated, argnums=(0, 1, 2, 3))(*xs)
    assert float(v0) == float(v1)
    for i in (0, 2, 3):
        np.testing.assert_array_equal(g1[i], g0[i])
    np.testing.assert_array_equal(g1[1], np.asarray(g0[1]) * expected_g())
    v2, g2 = jax.jit(jax.value_and_grad(gated, argnums=(0, 1, 2, 3)))(*xs)
    np.testing.assert_allclose(np.asarray(g2[1]), np.asarray(g1[1]), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# MLX


def test_mlx_hand_written_loss():
    mx = pytest.importorskip("mlx.core")
    import mlx.nn as nn

    def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                 ref_rejected_logps, rejected_lengths=None, beta=0.1):  # fmt: skip
        logits = (policy_chosen_logps - ref_chosen_logps) - (
            policy_rejected_logps - ref_rejected_logps
        )
        return -mx.mean(nn.log_sigmoid(beta * logits))

    gated = attach(dpo_loss, GATE, lengths="rejected_lengths")
    xs = [mx.array(a.astype(np.float32)) for a in (PC, PR, RC, RR, LENGTHS)]
    v0, g0 = mx.value_and_grad(dpo_loss, argnums=[0, 1, 2, 3])(*xs)
    v1, g1 = mx.value_and_grad(gated, argnums=[0, 1, 2, 3])(*xs)
    assert v0.item() == v1.item()
    for i in (0, 2, 3):
        np.testing.assert_array_equal(np.array(g1[i]), np.array(g0[i]))
    g = np.array(gate_weights(xs[1], GATE, lengths=xs[4]).weight)
    np.testing.assert_array_equal(np.array(g1[1]), np.array(g0[1]) * g)
    v3, g3 = mx.compile(mx.value_and_grad(gated, argnums=[0, 1, 2, 3]))(*xs)
    # float32: mx.compile fuses the same few operations (log_sigmoid's derivative, the mean's
    # 1/B, the gate product), possibly with a fused multiply-add: each entry is at most ~4
    # roundings from the eager one, so within 8 ulps (rtol 1e-6 = 8 * 2^-23)
    np.testing.assert_allclose(np.array(g3[1]), np.array(g1[1]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# NumPy: no autograd; the wrapper is transparent (the value is unchanged)


def test_numpy_hand_written_loss():
    def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                 ref_rejected_logps, beta=0.1, *, rejected_lengths=None):  # fmt: skip
        z = beta * ((policy_chosen_logps - ref_chosen_logps)
                    - (policy_rejected_logps - ref_rejected_logps))  # fmt: skip
        return float(np.mean(np.logaddexp(0.0, -z)))

    gated = attach(dpo_loss, GATE, lengths="rejected_lengths")
    assert gated(PC, PR, RC, RR, rejected_lengths=LENGTHS) == dpo_loss(PC, PR, RC, RR)


# ---------------------------------------------------------------------------------------------
# wrapper behaviour


def test_signature_docstring_and_attributes():
    gated = attach(torch_dpo_loss, GATE)
    assert inspect.signature(gated) == inspect.signature(torch_dpo_loss)
    assert gated.__doc__ == "My DPO loss." and gated.__name__ == "torch_dpo_loss"
    assert gated.__wrapped__ is torch_dpo_loss and gated.gate is GATE


def test_missing_argument_raises_type_error_at_attach_time():
    with pytest.raises(TypeError, match="no argument 'rejected_logps'"):
        attach(torch_dpo_loss, GATE, rejected="rejected_logps")
    with pytest.raises(TypeError, match="given as mask="):
        attach(torch_dpo_loss, GATE, mask="rejected_mask")
    with pytest.raises(TypeError, match="given as lengths="):
        attach(torch_dpo_loss, GATE, lengths="lens")
    with pytest.raises(TypeError, match="not both"):
        attach(TorchDPO(0.1).loss, GATE, mask="rejected_lengths", lengths="rejected_lengths")
    with pytest.raises(TypeError, match="gategrad.Gate"):
        attach(torch_dpo_loss, "seq")
    with pytest.raises(TypeError, match="callable"):
        attach(3, GATE)

    def star_args(*args):
        return args

    with pytest.raises(TypeError, match="no argument"):
        attach(star_args, GATE, rejected="args")


def test_kwargs_functions_accept_the_name_by_keyword():
    torch = pytest.importorskip("torch")

    def loss(**batch):
        return torch_dpo_loss(batch["policy_chosen_logps"], batch["policy_rejected_logps"],
                              batch["ref_chosen_logps"], batch["ref_rejected_logps"])  # fmt: skip

    gated = attach(loss, GATE, lengths="rejected_lengths")
    names = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps",
             "ref_rejected_logps")  # fmt: skip
    xs = {n: torch.tensor(a, requires_grad=True) for n, a in zip(names, (PC, PR, RC, RR),
                                                               strict=True)}  # fmt: skip
    (g0,) = torch.autograd.grad(loss(**xs), xs["policy_rejected_logps"])
    (g1,) = torch.autograd.grad(gated(**xs, rejected_lengths=torch.tensor(LENGTHS)),
                                xs["policy_rejected_logps"])  # fmt: skip
    assert torch.equal(g1, g0 * torch.tensor(expected_g()))


def test_attaching_twice_is_refused():
    gated = attach(torch_dpo_loss, GATE)
    with pytest.raises(ValueError, match="already gated"):
        attach(gated, GATE)
    with pytest.raises(ValueError, match="already gated"):
        attach(gated, TOKEN_GATE)

    @functools.wraps(gated)
    def logged(*args, **kwargs):  # another decorator on top
        return gated(*args, **kwargs)

    with pytest.raises(ValueError, match="already gated"):
        attach(logged, GATE)
    with pytest.raises(ValueError, match="already gated"):
        attach(functools.partial(gated, beta=0.2), GATE)

    class Holder:
        loss = attach(TorchDPO.loss, GATE)

    with pytest.raises(ValueError, match="already gated"):
        attach(Holder().loss, GATE)  # a bound method of an attached function
    # attaching to the original again is fine (a new, independent wrapper)
    assert attach(gated.__wrapped__, TOKEN_GATE).gate is TOKEN_GATE


def test_missing_or_none_rejected_passes_through():
    calls = []

    def loss(policy_rejected_logps=None, other=1):
        calls.append(policy_rejected_logps)
        return other

    gated = attach(loss, GATE)
    assert gated(other=2) == 2 and gated(None) == 1 and calls == [None, None]


def test_bad_call_raises_like_the_function():
    gated = attach(torch_dpo_loss, GATE)
    with pytest.raises(TypeError):
        gated(PC, PR)  # missing arguments: TypeError from binding, as the function would


def test_attach_with_library_loss():
    """attach also works on gategrad's own losses (gating policy_rejected_logps)."""
    torch = pytest.importorskip("torch")
    gated = attach(gategrad.dpo_loss, GATE, lengths="rejected_lengths")
    xs = [torch.tensor(a, requires_grad=True) for a in (PC, PR, RC, RR)]
    loss, _ = gated(*xs, rejected_lengths=torch.tensor(LENGTHS))
    loss.backward()
    ys = [torch.tensor(a, requires_grad=True) for a in (PC, PR, RC, RR)]
    loss2, _ = gategrad.dpo_loss(*ys, gate=GATE, rejected_lengths=torch.tensor(LENGTHS))
    loss2.backward()
    assert loss.item() == loss2.item() and torch.equal(xs[1].grad, ys[1].grad)
