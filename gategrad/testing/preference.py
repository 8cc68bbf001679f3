"""End-to-end preference losses of the kit's tiny models, in every framework.

A preference batch goes ``model -> logits -> gategrad.token_logps -> gategrad.preference_loss``,
exactly as in training. Two models, both written once for every framework in
[`gategrad.testing.models`][]:

- the toy softmax: each response token ``t`` of example ``b`` has a context vector
  ``x[b, t]`` and a target class; ``logits = x @ W + b``. Reference log-probs are inputs.
- the tiny transformer: prompt + response token sequences, right padded, for the chosen and the
  rejected response; the policy and the reference model are two parameter dicts.

Inputs are NumPy dicts ([`make_softmax_batch`][], [`make_transformer_batch`][]); the loss
functions take them as keyword arguments, converted to one framework, so they plug straight into
[`gategrad.testing.assert_backends_agree`][].
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from gategrad._dispatch import get_backend
from gategrad._gate import Gate
from gategrad._loss_registry import LOSSES

from . import _closed_form as ng
from ._adapters import from_numpy, to_numpy
from ._agree import _device_scope, run_backend
from .models import (
    SoftmaxConfig,
    TransformerConfig,
    init_softmax_params,
    init_transformer_params,
    make_shared_contexts,
    softmax_logits,
    transformer_logits,
)

__all__ = [
    "GateParts",
    "PreferenceLogps",
    "PreferenceSpec",
    "gate_gradient_parts",
    "make_softmax_batch",
    "make_transformer_batch",
    "model_module",
    "preference_loss_fn",
    "softmax_logps",
    "softmax_reference",
    "transformer_logps",
]


def model_module(backend: str) -> Any:
    """``gategrad.testing.models.<backend>_models``: the models with ``backend`` bound (imports
    that framework; ``ValueError`` for an unknown backend, ``ImportError`` naming the pip extra
    for one not installed)."""
    get_backend(backend)
    return importlib.import_module(f"gategrad.testing.models.{backend}_models")


def _uses_ref(loss_type: str) -> bool:
    """Whether ``loss_type`` reads the reference log-probs (an unknown type is left to
    [`gategrad.preference_loss`][] to reject)."""
    spec = LOSSES.get(loss_type)
    return spec is None or spec.uses_ref


class PreferenceLogps(NamedTuple):
    """Per-token log-probs ``(B, T)`` of a preference batch, with the response masks."""

    policy_chosen: Any
    policy_rejected: Any
    ref_chosen: Any
    ref_rejected: Any
    chosen_mask: Any
    rejected_mask: Any


@dataclasses.dataclass(frozen=True)
class PreferenceSpec:
    """One preference loss: the arguments of [`gategrad.preference_loss`][] besides the arrays.

    ``params`` holds the loss type's own parameters as ``(name, value)`` pairs (hashable).
    Calling the spec on a [`PreferenceLogps`][] gives the scalar loss.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    gate: Gate | None = None
    sft_weight: float = 0.0
    params: tuple[tuple[str, Any], ...] = ()

    def __call__(self, lp: PreferenceLogps) -> Any:
        from gategrad import preference_loss

        no_ref = not _uses_ref(self.loss_type)
        loss, _ = preference_loss(
            self.loss_type,
            lp.policy_chosen,
            lp.policy_rejected,
            None if no_ref else lp.ref_chosen,
            None if no_ref else lp.ref_rejected,
            beta=self.beta,
            gate=self.gate,
            chosen_mask=lp.chosen_mask,
            rejected_mask=lp.rejected_mask,
            sft_weight=self.sft_weight,
            **dict(self.params),
        )
        return loss

    def replace(self, **changes: Any) -> PreferenceSpec:
        return dataclasses.replace(self, **changes)

    def ungated(self) -> PreferenceSpec:
        return dataclasses.replace(self, gate=None)


def preference_loss_fn(
    logps_fn: Callable[..., PreferenceLogps], spec: PreferenceSpec
) -> Callable[..., Any]:
    """``f(**inputs) = spec(logps_fn(**inputs))``: the scalar loss of a model's batch."""

    def loss(**inputs: Any) -> Any:
        return spec(logps_fn(**inputs))

    return loss


# ------------------------------------------------------------------------------------------
# the toy softmax


def softmax_logps(backend: str) -> Callable[..., PreferenceLogps]:
    """The softmax model's per-token log-probs in ``backend``, as a function of the inputs of
    [`make_softmax_batch`][]."""
    from gategrad import token_logps

    get_backend(backend)  # ValueError or ImportError now, not at the first call

    def side(params: Any, contexts: Any, targets: Any, mask: Any) -> tuple[Any, Any]:
        b, t, d = contexts.shape
        logits = softmax_logits(params, contexts.reshape(b * t, d))
        return token_logps(logits.reshape(b, t, -1), targets, mask, shift=False)

    def logps(
        params: Any,
        chosen_contexts: Any,
        rejected_contexts: Any,
        chosen_targets: Any,
        rejected_targets: Any,
        chosen_mask: Any,
        rejected_mask: Any,
        ref_chosen_logps: Any,
        ref_rejected_logps: Any,
    ) -> PreferenceLogps:
        pc, mc = side(params, chosen_contexts, chosen_targets, chosen_mask)
        pr, mr = side(params, rejected_contexts, rejected_targets, rejected_mask)
        return PreferenceLogps(pc, pr, ref_chosen_logps, ref_rejected_logps, mc, mr)

    return logps


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def make_softmax_batch(
    cfg: SoftmaxConfig,
    batch: int = 2,
    length: int = 4,
    seed: int = 0,
    *,
    shared: float = 0.8,
    weight_scale: float = 1.0,
) -> dict[str, Any]:
    """NumPy inputs of the softmax model's preference loss (float64; masks boolean).

    ``params`` (``W`` scaled by ``weight_scale``; larger scales give peakier, more extreme
    probabilities), unit-norm contexts that share a common direction (``shared``), random targets,
    right-padded response masks with 1 to ``length`` tokens per row, and reference log-probs
    from a second parameter draw (padding positions hold finite junk, which the loss ignores).
    """
    rng = np.random.default_rng(seed)
    params = init_softmax_params(cfg, seed)
    params["W"] = params["W"] * weight_scale
    ref = init_softmax_params(cfg, seed + 1_000_003)
    ref["W"] = 0.5 * (ref["W"] * weight_scale + params["W"])
    ctx = make_shared_contexts(2 * batch * length, cfg.dim, shared, seed).reshape(
        2, batch, length, cfg.dim
    )
    targets = rng.integers(0, cfg.vocab, size=(2, batch, length))
    lengths = rng.integers(1, length + 1, size=(2, batch))
    masks = np.arange(length)[None, None, :] < lengths[:, :, None]
    ref_lp = _np_log_softmax(ctx @ ref["W"] + ref["b"])
    ref_logps = np.take_along_axis(ref_lp, targets[..., None], axis=-1)[..., 0]
    ref_logps = np.where(masks, ref_logps, rng.normal(size=ref_logps.shape))
    return {
        "params": params,
        "chosen_contexts": ctx[0],
        "rejected_contexts": ctx[1],
        "chosen_targets": targets[0],
        "rejected_targets": targets[1],
        "chosen_mask": masks[0],
        "rejected_mask": masks[1],
        "ref_chosen_logps": ref_logps[0],
        "ref_rejected_logps": ref_logps[1],
    }


def softmax_reference(spec: PreferenceSpec) -> Callable[..., tuple[float, dict]]:
    """The closed-form NumPy (float64) value and parameter gradients of the softmax model's
    preference loss, gate included: ``f(**inputs) -> (loss, {'params': {'W', 'b'}})``.

    The loss derivatives with respect to the summed log-probs come from
    ``gategrad.testing._closed_form``; the gate multiplies the rejected tokens' cotangents by
    ``g`` (per example, or per token), computed by the NumPy backend; then
    ``dz = d (onehot(target) - softmax(z))``, ``dW = X^T dz`` and ``db = sum dz``.
    """

    def reference(
        params: Mapping[str, np.ndarray],
        chosen_contexts: np.ndarray,
        rejected_contexts: np.ndarray,
        chosen_targets: np.ndarray,
        rejected_targets: np.ndarray,
        chosen_mask: np.ndarray,
        rejected_mask: np.ndarray,
        ref_chosen_logps: np.ndarray,
        ref_rejected_logps: np.ndarray,
    ) -> tuple[float, dict[str, Any]]:
        w = np.asarray(params["W"], dtype=np.float64)
        bias = np.asarray(params["b"], dtype=np.float64)
        b, t, d = chosen_contexts.shape
        ctx = np.concatenate([chosen_contexts, rejected_contexts]).astype(np.float64)
        ctx = ctx.reshape(2 * b * t, d)
        targets = np.concatenate([chosen_targets, rejected_targets]).reshape(-1)
        masks = np.concatenate([chosen_mask, rejected_mask]).astype(bool)
        logits = ctx @ w + bias
        tok = ng.pick(ng.log_softmax(logits), targets).reshape(2 * b, t)
        tok = np.where(masks, tok, 0.0)
        counts = masks.sum(-1).astype(np.float64)
        ref = np.concatenate([ref_chosen_logps, ref_rejected_logps]).astype(np.float64)
        ref = np.where(masks, ref, 0.0).sum(-1)
        pi = tok.sum(-1)
        no_ref = not _uses_ref(spec.loss_type)
        lg = ng.loss_grads(
            spec.loss_type,
            pi[:b],
            pi[b:],
            None if no_ref else ref[:b],
            None if no_ref else ref[b:],
            beta=spec.beta,
            chosen_lengths=counts[:b],
            rejected_lengths=counts[b:],
            sft_weight=spec.sft_weight,
            **dict(spec.params),
        )
        d_chosen = lg.d_chosen[:, None] * chosen_mask
        d_rejected = lg.d_rejected[:, None] * rejected_mask
        if spec.gate is not None:
            d_rejected, _ = ng.gate_grad(d_rejected, tok[b:], spec.gate, mask=rejected_mask)
        cot = np.concatenate([d_chosen, d_rejected]).reshape(-1)
        grads = ng.softmax_grads(ctx, logits, targets, cot)
        return lg.loss, {"params": grads}

    return reference


# ------------------------------------------------------------------------------------------
# the tiny transformer


def transformer_logps(backend: str, cfg: TransformerConfig) -> Callable[..., PreferenceLogps]:
    """The transformer's per-token response log-probs in ``backend``, as a function of the
    inputs of [`make_transformer_batch`][]: four forward passes (policy and reference, chosen
    and rejected), ``token_logps(logits, tokens, response_mask, shift=True)`` each."""
    from gategrad import token_logps

    get_backend(backend)  # ValueError or ImportError now, not at the first call

    def side(params: Any, tokens: Any, attention: Any, response: Any) -> tuple[Any, Any]:
        logits = transformer_logits(params, tokens, cfg, attention)
        return token_logps(logits, tokens, response, shift=True)

    def logps(
        params: Any,
        ref_params: Any,
        chosen_tokens: Any,
        rejected_tokens: Any,
        chosen_attention_mask: Any,
        rejected_attention_mask: Any,
        chosen_response_mask: Any,
        rejected_response_mask: Any,
    ) -> PreferenceLogps:
        pc, mc = side(params, chosen_tokens, chosen_attention_mask, chosen_response_mask)
        pr, mr = side(params, rejected_tokens, rejected_attention_mask, rejected_response_mask)
        rc, _ = side(ref_params, chosen_tokens, chosen_attention_mask, chosen_response_mask)
        rr, _ = side(ref_params, rejected_tokens, rejected_attention_mask, rejected_response_mask)
        return PreferenceLogps(pc, pr, rc, rr, mc, mr)

    return logps


def make_transformer_batch(
    cfg: TransformerConfig,
    batch: int = 2,
    length: int = 8,
    seed: int = 0,
    *,
    ref_noise: float = 0.05,
) -> dict[str, Any]:
    """NumPy inputs of the transformer's preference loss.

    Each row: a prompt of ``P >= 1`` tokens shared by both responses, then a chosen and a
    rejected response of 1 or more tokens each, right padded with token 0 to ``length``
    (``2 <= length <= cfg.max_len``). ``*_attention_mask`` marks real tokens and
    ``*_response_mask`` the response tokens (both int 0/1). The reference parameters are the
    policy's plus ``N(0, ref_noise^2)`` noise.
    """
    if not 3 <= length <= cfg.max_len:
        raise ValueError(f"length must lie in [3, cfg.max_len={cfg.max_len}], got {length}")
    rng = np.random.default_rng(seed)
    params = init_transformer_params(cfg, seed)
    ref = {k: v + ref_noise * rng.normal(size=v.shape) for k, v in params.items()}
    out: dict[str, Any] = {"params": params, "ref_params": ref}
    prompt = rng.integers(1, length - 1, size=batch)  # leaves room for >= 1 response token
    for side in ("chosen", "rejected"):
        resp = np.array([rng.integers(1, length - p + 1) for p in prompt])
        total = prompt + resp
        pos = np.arange(length)[None, :]
        tokens = rng.integers(1, cfg.vocab, size=(batch, length))
        tokens = np.where(pos < total[:, None], tokens, 0)
        out[f"{side}_tokens"] = tokens.astype(np.int64)
        out[f"{side}_attention_mask"] = (pos < total[:, None]).astype(np.int64)
        out[f"{side}_response_mask"] = ((pos >= prompt[:, None]) & (pos < total[:, None])).astype(
            np.int64
        )
    # one prompt for both responses
    shared = np.arange(length)[None, :] < prompt[:, None]
    out["rejected_tokens"] = np.where(shared, out["chosen_tokens"], out["rejected_tokens"])
    return out


# ------------------------------------------------------------------------------------------
# the gate, within one framework


@dataclasses.dataclass
class GateParts:
    """Gradients of one model's preference loss split by path, within one framework.

    ``gated`` / ``ungated``: ``(value, {path: grad})`` of the loss with and without the gate.
    ``chosen``: gradients of ``sum(dL/dc * c(params))`` (the chosen path, ``c`` the policy's
    chosen log-probs and ``dL/dc`` the ungated loss' cotangent held fixed); ``rejected``:
    likewise for the rejected path; ``rejected_gated``: with the cotangent ``g * dL/dr``,
    ``g`` the framework's own gate weights. By linearity, ``ungated = chosen + rejected`` and
    the gate's promise is ``gated = chosen + rejected_gated``.
    """

    gated: tuple[float, dict[str, np.ndarray]]
    ungated: tuple[float, dict[str, np.ndarray]]
    chosen: dict[str, np.ndarray]
    rejected: dict[str, np.ndarray]
    rejected_gated: dict[str, np.ndarray]
    weights: np.ndarray

    def check(self, tol: float = 1e-12, reference: Sequence[str] = ()) -> None:
        """Assert the gate's promise, raising ``AssertionError`` with the worst tensor:

        - the loss value is bitwise that of the ungated loss;
        - tensors under a ``reference`` prefix (e.g. ``'ref_params'``) get bitwise the ungated
          gradients;
        - every other tensor: ``ungated = chosen + rejected`` and ``gated = chosen +
          rejected_gated`` within ``tol * max(|chosen|, |rejected|)`` (the sums run in another
          order than autograd's, so they are exact only up to rounding).
        """
        value_g, grads_g = self.gated
        value_u, grads_u = self.ungated
        if value_g != value_u:
            raise AssertionError(f"the gate changed the loss value: {value_g!r} != {value_u!r}")
        for name, g in grads_g.items():
            u = grads_u[name]
            if any(name == r or name.startswith(r + "/") for r in reference):
                if not np.array_equal(g, u):
                    raise AssertionError(
                        f"the gate changed the reference path's gradient {name!r}: "
                        f"max|gated - ungated| = {np.abs(g - u).max():.3g}"
                    )
                continue
            c, r, rg = self.chosen[name], self.rejected[name], self.rejected_gated[name]
            scale = max(
                np.abs(c).max(initial=0.0), np.abs(r).max(initial=0.0), np.abs(rg).max(initial=0.0)
            )
            for label, got, want in (("ungated", u, c + r), ("gated", g, c + rg)):
                err = np.abs(got - want).max(initial=0.0)
                if not err <= tol * scale:
                    kind = "chosen + g * rejected" if label == "gated" else "chosen + rejected"
                    raise AssertionError(
                        f"{label} gradient {name!r} != {kind}: max diff {err:.3g}, "
                        f"scale {scale:.3g}, relative {err / scale if scale else np.inf:.3g} "
                        f"> tol {tol:.3g}"
                    )


def gate_gradient_parts(
    backend: str,
    logps_fn: Callable[..., PreferenceLogps],
    spec: PreferenceSpec,
    inputs: Mapping[str, Any],
    *,
    wrt: Sequence[str] | None = None,
    dtype: str = "float64",
) -> GateParts:
    """Split the gradient of ``spec(logps_fn(**inputs))`` into its chosen and (gated) rejected
    paths in framework ``backend`` (eager). ``spec.gate`` must be set. See [`GateParts`][]."""
    import gategrad
    from gategrad._core import broadcast_weight

    if spec.gate is None:
        raise ValueError("spec.gate is None: there is nothing to split")
    gated = run_backend(backend, preference_loss_fn(logps_fn, spec), inputs, wrt=wrt, dtype=dtype)
    ungated = run_backend(
        backend, preference_loss_fn(logps_fn, spec.ungated()), inputs, wrt=wrt, dtype=dtype
    )
    ops = gategrad.get_backend(backend)
    with _device_scope(backend, dtype):
        conv = {
            k: (
                {s: from_numpy(backend, a, dtype) for s, a in v.items()}
                if isinstance(v, Mapping)
                else from_numpy(backend, v, dtype)
            )
            for k, v in inputs.items()
        }
        lp = logps_fn(**conv)
        names = PreferenceLogps._fields
        lp_np = {n: to_numpy(x) for n, x in zip(names, lp, strict=True)}
        mask_r = lp.rejected_mask
        rej = ops.where(mask_r, lp.policy_rejected, ops.full_like(lp.policy_rejected, 0.0))
        stats = gategrad.gate_weights(rej, spec.gate, mask_r)
        weights = to_numpy(broadcast_weight(ops, rej, stats))
    # the ungated loss' cotangents on the policy's log-probs (other log-probs held fixed)
    by_logps = run_backend(
        backend,
        lambda **kw: spec.ungated()(PreferenceLogps(**kw)),
        lp_np,
        wrt=["policy_chosen", "policy_rejected"],
        dtype=dtype,
    )[1]
    cot_c = by_logps["policy_chosen"].astype(lp_np["policy_chosen"].dtype)
    cot_r = by_logps["policy_rejected"].astype(lp_np["policy_rejected"].dtype)
    cot_rg = (by_logps["policy_rejected"] * weights).astype(cot_r.dtype)

    def path(field: str, cot: np.ndarray) -> dict[str, np.ndarray]:
        def fn(_cot: Any, **kw: Any) -> Any:
            x = getattr(logps_fn(**kw), field)
            return (x * _cot).sum()

        wanted = list(wrt) if wrt is not None else None
        if wanted is None:
            wanted = [
                k
                for k, v in inputs.items()
                if isinstance(v, Mapping) or np.issubdtype(np.asarray(v).dtype, np.floating)
            ]
        return run_backend(backend, fn, {**inputs, "_cot": cot}, wrt=wanted, dtype=dtype)[1]

    return GateParts(
        gated=gated,
        ungated=ungated,
        chosen=path("policy_chosen", cot_c),
        rejected=path("policy_rejected", cot_r),
        rejected_gated=path("policy_rejected", cot_rg),
        weights=weights,
    )
