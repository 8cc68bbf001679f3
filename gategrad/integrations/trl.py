"""Gate an existing TRL ``DPOTrainer`` in one call: [`attach`][].

```python
from gategrad import Gate
from gategrad.integrations.trl import attach

trainer = DPOTrainer(model=policy, ref_model=ref, args=config, ...)
attach(trainer, Gate())          # the paper's gate
trainer.train()                  # logs gate/mean, gate/p_mean, ... with TRL's metrics
```

What it does:

- installs [`gategrad.torch.hook`][] on the policy (``trainer.model``) with
  ``rejected_rows='second_half'``: TRL lays every batch out as ``[chosen rows; rejected rows]``;
- TRL >= 1.15 patches the policy with a fused LM head whose output carries ``log_probs``
  ``(2B, T-1)`` (zero where masked) plus a ``label_mask``: the hook gates ``log_probs`` and takes
  the response mask from ``label_mask``;
- TRL 0.29 to 1.14 call the policy with ``input_ids`` only and compute the log-probs from the
  ``logits``: the hook gates the rejected rows of the logits, with the response mask taken from
  the batch's ``completion_mask`` (captured by a thin wrapper around ``trainer.compute_loss``);
- the reference pass runs under ``torch.no_grad()`` and is never touched (also with PEFT, where the
  reference is the policy with its adapter disabled);
- adds ``gate/mean``, ``gate/min``, ``gate/p_mean`` and ``gate/frac_below_half``
  (fraction of rejected responses, or tokens, with ``g < 0.5``) to TRL's logged metrics,
  gathered over processes.

It refuses, with ``ValueError``, what it cannot gate correctly instead of gating the wrong rows:
padding-free (packed) batches, TRL < 0.29 (``concatenated_forward`` builds the model inputs
internally), the liger chunked-loss path of TRL < 1.15 (the model's forward is bypassed and no
logits or log-probs are ever materialised), encoder-decoder models, and example-level gates under
context or sequence parallelism (each rank would see only part of every response). As a last line
of defence, a training step in which the hook never ran raises ``RuntimeError``.

Tested with TRL 1.14 (logits) and 1.16 (fused ``log_probs``); see ``TESTED_TRL``.

``attach(trainer, gate, fused=True)`` also replaces TRL's LM head on the policy (and on the
reference model) by `gategrad.fused_token_logps`. TRL 1.16's own fused head projects into one
buffer of ``min(N, 4096)`` positions by 32768 vocabulary entries (``N`` the scored positions:
the counted ones with Triton, all ``2B (T - 1)`` elsewhere), as large as the full logits or
larger whenever ``N <= 4096`` and ``V <= 32768``; its CPU fallback adds several temporaries of
that size. gategrad's head keeps tiles of at most 4 Mi logits (16 MiB in float32) in the
forward and the backward. TRL's loss code is unchanged, and the gate acts on the rejected rows
of the ``log_probs`` exactly as without ``fused``. See [`attach`][] for the configurations it
supports.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import defaultdict
from typing import Any

from .._gate import Gate
from .._validate import require_gate

__all__ = ["TESTED_TRL", "FusedHead", "GateAttachment", "attach"]

#: The TRL versions the integration tests run against (inclusive lower, exclusive upper bound).
TESTED_TRL = ("1.14", "1.17")
_MIN_TRL = "0.29"
_FUSED_TRL = "1.15"

_ATTR = "_gategrad_attachment"


def _version(v: str) -> Any:
    from packaging.version import Version

    return Version(v)


def _trl_version() -> Any:
    import trl

    return _version(trl.__version__.split("+")[0])


class GateAttachment:
    """What [`attach`][] installed on a trainer. ``remove()`` undoes all of it.

    Attributes:
        trainer: the ``DPOTrainer``.
        hook: the [`gategrad.torch.GateHook`][] on the policy.
        metrics: per mode (``'train'``/``'eval'``), lists of the gate metrics since the last log.
    """

    def __init__(self, trainer: Any, gate: Gate, *, log_metrics: bool) -> None:
        import torch

        from ..torch import hook

        self.trainer = trainer
        self.gate = gate
        self.metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._completion_mask: torch.Tensor | None = None
        self._step_stats: list[Any] = []
        self._log_metrics = log_metrics
        self.fused_head: FusedHead | None = None  # attach(..., fused=True) sets it
        self.hook = hook(
            trainer.model,
            gate,
            rejected_rows="second_half",
            mask=self._mask,
            on_stats=self._step_stats.append,
        )
        self._orig_compute_loss = trainer.__dict__.get("compute_loss")
        self._orig_log = trainer.__dict__.get("log")
        trainer.compute_loss = self._wrap_compute_loss(trainer.compute_loss)
        if log_metrics:
            trainer.log = self._wrap_log(trainer.log)
        setattr(trainer, _ATTR, self)

    # -- the response mask ------------------------------------------------------------------

    def _mask(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """``label_mask`` of TRL's fused head when present, else the batch's completion mask."""
        label_mask = getattr(output, "label_mask", None)
        if label_mask is not None:
            return label_mask
        if self._completion_mask is None:
            return None  # the hook falls back to labels= / shift_labels= passed to the model
        return self._completion_mask[..., 1:]

    # -- wrappers ---------------------------------------------------------------------------

    def _wrap_compute_loss(self, compute_loss: Any) -> Any:
        import torch

        @functools.wraps(compute_loss)
        def wrapped(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            get = getattr(inputs, "get", None)
            self._completion_mask = get("completion_mask") if get is not None else None
            self._step_stats.clear()
            calls = self.hook.calls
            try:
                result = compute_loss(model, inputs, *args, **kwargs)
            finally:
                self._completion_mask = None
            if torch.is_grad_enabled() and self.trainer.model.training:
                if self.hook.calls == calls:
                    raise RuntimeError(
                        "gategrad: the gate hook on the policy never ran during this training "
                        "step, so nothing was gated. This trainer's loss bypasses the policy's "
                        "forward (a chunked or fused-loss kernel?) or uses another module as the "
                        "policy. Disable the kernel, or open an issue with your TRL version."
                    )
                self._record()
            return result

        return wrapped

    def _record(self) -> None:
        """Reduce this step's gate statistics (summed over processes) into the metric lists.

        Every process takes part in the gather, also one whose rejected rows had no tokens.
        """
        import torch

        ws, ps = [], []
        for st in self._step_stats:
            w, p = st.weight, st.p
            if st.mask is not None:
                w, p = w[st.mask], p[st.mask]
            ws.append(w.detach().double().reshape(-1))
            ps.append(p.detach().double().reshape(-1))
        self._step_stats.clear()
        device = ws[0].device if ws else torch.device("cpu")
        w = torch.cat(ws) if ws else torch.zeros(0, dtype=torch.float64, device=device)
        p = torch.cat(ps) if ps else torch.zeros(0, dtype=torch.float64, device=device)
        neg_min = -w.min() if w.numel() else torch.tensor(-math.inf, dtype=torch.float64)
        local = torch.stack(
            [
                w.sum(),
                torch.tensor(float(w.numel()), dtype=torch.float64, device=device),
                p.sum(),
                (w < 0.5).double().sum(),
                neg_min.to(device),
            ]
        )
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
            gathered = accelerator.gather(local[None].to(accelerator.device)).reshape(-1, 5)
            totals, neg_min = gathered[:, :4].sum(0), gathered[:, 4].max()
        else:
            totals, neg_min = local[:4], local[4]
        w_sum, w_n, p_sum, closed = (float(t) for t in totals)
        if w_n == 0:
            return
        m = self.metrics["train" if self.trainer.model.training else "eval"]
        m["gate/mean"].append(w_sum / w_n)
        m["gate/min"].append(-float(neg_min))
        m["gate/p_mean"].append(p_sum / w_n)
        m["gate/frac_below_half"].append(closed / w_n)

    def _wrap_log(self, log: Any) -> Any:
        @functools.wraps(log)
        def wrapped(logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
            mode = "train" if self.trainer.model.training else "eval"
            stored = self.metrics[mode]
            extra = {}
            for key, values in stored.items():
                if not values:
                    continue
                if key == "gate/min":
                    extra[key] = min(values)
                else:
                    extra[key] = sum(values) / len(values)
            if mode == "eval":
                extra = {f"eval_{k}": v for k, v in extra.items()}
            logs.update(extra)
            stored.clear()
            return log(logs, *args, **kwargs)

        return wrapped

    # -- removal ----------------------------------------------------------------------------

    def remove(self) -> None:
        """Remove the hook and the wrappers; the trainer is as before [`attach`][]."""
        self.hook.remove()
        fused_head = getattr(self, "fused_head", None)
        if fused_head is not None:
            fused_head.remove()
            self.fused_head = None
        trainer = self.trainer
        for name, orig in (("compute_loss", self._orig_compute_loss), ("log", self._orig_log)):
            if orig is None:
                trainer.__dict__.pop(name, None)
            else:
                setattr(trainer, name, orig)
        if trainer.__dict__.get(_ATTR) is self:
            delattr(trainer, _ATTR)

    def __enter__(self) -> GateAttachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _check_supported(trainer: Any, gate: Gate) -> None:
    version = _trl_version()
    if version < _version(_MIN_TRL):
        raise ValueError(
            f"gategrad.integrations.trl needs TRL >= {_MIN_TRL} (found {version}): older "
            "DPOTrainers build the model inputs inside concatenated_forward, where the response "
            "mask cannot be reached. Upgrade TRL, or compute the loss with "
            "gategrad.preference_loss(..., gate=...)"
        )
    lo, hi = (_version(v) for v in TESTED_TRL)
    if not lo <= version < hi:
        warnings.warn(
            f"gategrad.integrations.trl is tested with TRL >={TESTED_TRL[0]},<{TESTED_TRL[1]}; "
            f"found {version}. The hook checks what it can at run time.",
            stacklevel=3,
        )
    args = getattr(trainer, "args", None)
    padding_free = getattr(trainer, "padding_free", None)
    if padding_free is None:
        padding_free = getattr(args, "padding_free", False)
    if padding_free:
        raise ValueError(
            "gategrad cannot gate padding-free DPO batches: the chosen and rejected responses are "
            "packed into one row, so there are no rejected rows to gate. Set padding_free=False"
        )
    if getattr(args, "use_liger_loss", False):
        raise ValueError(
            "gategrad cannot gate use_liger_loss=True: the liger DPO loss never materialises the "
            "policy's logits or log-probs. Set use_liger_loss=False"
        )
    if getattr(trainer, "use_liger_kernel", False) and version < _version(_FUSED_TRL):
        raise ValueError(
            f"gategrad cannot gate use_liger_kernel=True on TRL {version}: its chunked loss runs "
            "the policy's backbone directly and never materialises logits or log-probs. Set "
            f"use_liger_kernel=False, or upgrade to TRL >= {_FUSED_TRL}"
        )
    config = getattr(getattr(trainer, "model", None), "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            "gategrad.integrations.trl supports decoder-only (causal) LMs; encoder-decoder "
            "models are not verified. Use gategrad.preference_loss(..., gate=...) instead"
        )
    pc = getattr(getattr(trainer, "accelerator", None), "parallelism_config", None)
    split = max(int(getattr(pc, "cp_size", 1) or 1), int(getattr(pc, "sp_size", 1) or 1))
    if split > 1 and gate.granularity == "example":
        raise ValueError(
            "gategrad cannot gate per example under context or sequence parallelism: each rank "
            "holds only part of every response, so the per-example estimate would be wrong. "
            "Use Gate(granularity='token') (elementwise) or disable context parallelism"
        )


# -- fused=True: gategrad's fused head in place of TRL's -----------------------------------------

#: TRL's ``add_fused_lm_head`` scales the logits by the first of these config attributes that is
#: set (``logits_scaling`` divides, except on HyperCLOVA X) and soft-caps them by
#: ``final_logit_softcapping``; gategrad's head computes plain ``hidden @ weight.T + bias``.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def _fused_modules(trainer: Any) -> list[Any]:
    """The modules TRL patched with ``add_fused_lm_head``: the policy (its base model under
    PEFT) and the reference model when there is one."""
    model = trainer.model
    get_base = getattr(model, "get_base_model", None)
    policy = get_base() if callable(get_base) and hasattr(model, "peft_config") else model
    ref = getattr(trainer, "ref_model", None)
    return [policy] if ref is None else [policy, ref]


def _check_fused(trainer: Any, chunk_size: Any) -> None:
    """``ValueError`` for what ``attach(..., fused=True)`` does not support (see [`attach`][])."""
    from .._validate import check_chunk_size

    check_chunk_size(chunk_size)
    version = _trl_version()
    if version < _version(_FUSED_TRL):
        raise ValueError(
            f"attach(fused=True) needs TRL >= {_FUSED_TRL} (found {version}): older DPOTrainers "
            "compute the log-probs from the (2B, T, V) logits themselves, so the policy's forward "
            "cannot hand them the log-probs instead. Upgrade TRL, or use fused=False"
        )
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError(
            "attach(fused=True) does not compute the MoE load-balancing loss that TRL's fused head "
            "adds (router_aux_loss_coef != 0). Set router_aux_loss_coef=0, or use fused=False"
        )
    if getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(
            "attach(fused=True) does not support FSDP: the LM head's weight is sharded and "
            "gategrad's fused backward does not gather it again. Use fused=False"
        )
    plugin = getattr(
        getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None
    )
    if getattr(trainer, "is_deepspeed_enabled", False) and getattr(plugin, "zero_stage", 0) == 3:
        raise ValueError(
            "attach(fused=True) does not support DeepSpeed ZeRO-3: the LM head's weight is "
            "partitioned and gategrad's fused backward does not gather it again. Use ZeRO-1/2, "
            "or fused=False"
        )
    for module in _fused_modules(trainer):
        forward = module.__dict__.get("forward")
        code = getattr(getattr(forward, "__func__", None), "__code__", None)
        if getattr(code, "co_name", None) != "_fused_forward":
            raise ValueError(
                f"attach(fused=True) expects TRL's fused LM head (add_fused_lm_head) on "
                f"{type(module).__name__}, which the DPOTrainer installs; this one has none "
                "(was it replaced after the trainer was built?). Use fused=False"
            )
        head = module.get_output_embeddings()
        weight = getattr(head, "weight", None)
        if weight is None or weight.ndim != 2:
            raise ValueError(
                f"attach(fused=True) needs an output head with a (V, D) weight on "
                f"{type(module).__name__}, found {type(head).__name__}. Use fused=False"
            )
        config = module.config.get_text_config()
        for name in _LOGIT_TRANSFORMS:
            value = getattr(config, name, None)
            if value is not None and (name == "final_logit_softcapping" or value != 1):
                raise ValueError(
                    f"attach(fused=True) computes plain hidden @ weight.T + bias logits, but "
                    f"{type(module).__name__} sets {name}={value!r}, which TRL's head applies. "
                    "Use fused=False (TRL's fused head, gated the same way)"
                )


class FusedHead:
    """gategrad's fused LM head in place of TRL's, installed by ``attach(..., fused=True)``.

    TRL >= 1.15 patches each model's ``forward`` so that ``model(..., labels=labels,
    fused_lm_head=True)`` runs the backbone and returns a ``FusedCausalLMOutput``. This class
    wraps that patch: with ``fused_lm_head=True`` it runs the same backbone, then

    - ``log_probs`` and ``label_mask``: `gategrad.fused_token_logps` on the last hidden state
      and ``lm_head.weight``/``bias`` (``shift=True``, or ``shift=False`` with TRL's pre-shifted
      ``shift_labels``), differentiable to the hidden state, the weight and the bias; its tiles
      hold at most ``TILE_ELEMENTS`` logits (``chunk_size`` positions by the vocabulary width
      that fits), in the forward and the backward;
    - ``entropy``, ``mean_logits``, ``is_top1`` and ``log_sum_sq_probs`` (the fields the trainer
      asked TRL's head for, which DPO uses for metrics and WPO weights, all without gradient):
      TRL's own kernel (``trl.kernels.ChunkedLogProbFunction``) under ``no_grad``, on the
      counted positions only, in tiles of the same size. This costs one extra projection pass
      in the forward; the reference model asks for none of them;
    - ``loss``: ``-sum(log_probs) / num_items_in_batch`` (the count of labels when not passed),
      as TRL's head.

    The head runs in the parameters' dtype with autocast disabled (the hidden state is cast to
    ``lm_head.weight.dtype``), like TRL's ``cast_lm_head_to_fp32`` where the weights are float32.
    Without ``fused_lm_head=True`` (generation, ``return_outputs``) TRL's forward runs unchanged.
    ``remove()`` puts TRL's forward back.

    Attributes:
        modules: the patched modules (the policy, or its base model under PEFT, and the
            reference model when the trainer has one).
        chunk_size: positions per tile (``None``: the default plan of
            `gategrad.fused_token_logps`).
    """

    def __init__(self, trainer: Any, chunk_size: int | None = None) -> None:
        import types

        self.chunk_size = chunk_size
        self.modules = _fused_modules(trainer)
        policy_extra: tuple[str, ...] = ("entropy", "mean_logits", "is_top1")
        if getattr(trainer, "use_weighting", False):
            policy_extra += ("log_sum_sq_probs",)
        self._saved: list[tuple[Any, Any]] = []
        for i, module in enumerate(self.modules):
            previous = module.__dict__["forward"]
            extra = policy_extra if i == 0 else ()
            forward = self._make_forward(previous, extra)
            module.forward = types.MethodType(forward, module)
            self._saved.append((module, previous))

    def remove(self) -> None:
        """Put TRL's fused-head ``forward`` back on every patched module."""
        for module, previous in self._saved:
            module.forward = previous
        self._saved.clear()

    def _make_forward(self, previous: Any, extra: tuple[str, ...]) -> Any:
        head = self

        @functools.wraps(previous)
        def forward(
            module: Any,
            *args: Any,
            fused_lm_head: bool = False,
            labels: Any = None,
            shift_labels: Any = None,
            num_items_in_batch: Any = None,
            **kwargs: Any,
        ) -> Any:
            if not fused_lm_head:
                return previous(
                    *args,
                    labels=labels,
                    shift_labels=shift_labels,
                    num_items_in_batch=num_items_in_batch,
                    **kwargs,
                )
            return head._fused_forward(
                module, args, kwargs, labels, shift_labels, num_items_in_batch, extra
            )

        return forward

    def _fused_forward(
        self,
        module: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        labels: Any,
        shift_labels: Any,
        num_items_in_batch: Any,
        extra: tuple[str, ...],
    ) -> Any:
        import contextlib

        import torch
        import transformers
        from trl.trainer.utils import FusedCausalLMOutput

        from .. import fused_token_logps

        config = module.config
        text_config = config.get_text_config()
        backbone_attr = "base_model"  # as TRL's add_fused_lm_head
        if text_config is not config and _version(transformers.__version__) < _version("5.0.0"):
            backbone_attr = "model"
        kwargs["use_cache"] = False
        backbone = getattr(module, backbone_attr)(*args, **kwargs)
        hidden = backbone.last_hidden_state
        shift = shift_labels is None
        targets = labels if shift else shift_labels
        lm_head = module.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        hidden = hidden.to(device=weight.device, dtype=weight.dtype)
        targets = targets.to(weight.device)
        device_type = hidden.device.type
        no_autocast: Any = contextlib.nullcontext()
        if torch.is_autocast_enabled(device_type):
            no_autocast = torch.autocast(device_type, enabled=False)
        with no_autocast:
            logps, mask = fused_token_logps(
                hidden, weight, targets, bias=bias, shift=shift, chunk_size=self.chunk_size
            )
            fields = self._no_grad_fields(hidden, weight, bias, targets, mask, shift, extra)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-logps.sum() / count, log_probs=logps, label_mask=mask, **fields
        )

    def _no_grad_fields(
        self,
        hidden: Any,
        weight: Any,
        bias: Any,
        targets: Any,
        mask: Any,
        shift: bool,
        extra: tuple[str, ...],
    ) -> dict[str, Any]:
        """TRL's optional per-token fields (``extra``) on the counted positions, without
        gradient, zero (``False``) elsewhere; tiles as in the log-prob pass."""
        if not extra:
            return {}
        import torch
        from trl.kernels import ChunkedLogProbFunction

        from .._fused import tile_plan

        batch, length, dim = hidden.shape
        if shift:  # position t of the hidden state predicts targets[:, t + 1]
            targets = targets[:, 1:]
            pad = torch.zeros((batch, 1), dtype=torch.bool, device=mask.device)
            where = torch.cat([mask, pad], 1)
            targets = torch.cat([targets, targets[:, :1]], 1)
        else:
            where = mask
        index = where.reshape(-1).nonzero().squeeze(1)
        flat = hidden.detach().reshape(batch * length, dim)
        flat_targets = targets.reshape(-1)
        rows, cols = tile_plan(max(1, int(index.numel())), int(weight.shape[0]), self.chunk_size)
        names = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
        parts: dict[str, list[Any]] = {name: [] for name in extra}
        with torch.no_grad():
            w = weight.detach()
            b = None if bias is None else bias.detach()
            for start in range(0, int(index.numel()), rows):
                i = index[start : start + rows]
                _, *out = ChunkedLogProbFunction.apply(
                    flat[i], w, b, flat_targets[i], 1.0, cols, None, 1.0, extra
                )
                for name, value in zip(names, out, strict=True):
                    if name in parts:
                        parts[name].append(value)
        fields = {}
        for name, values in parts.items():
            dtype = torch.bool if name == "is_top1" else torch.float32
            full = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            if values:
                full[mask] = torch.cat(values).to(dtype)
            fields[name] = full
        return fields


def attach(
    trainer: Any,
    gate: Gate | None = None,
    *,
    fused: bool = False,
    chunk_size: int | None = None,
    log_metrics: bool = True,
) -> GateAttachment:
    """Gate the rejected responses of a TRL ``DPOTrainer`` (one call, before ``train()``).

    With ``fused=True`` the policy's (and the reference model's) per-token log-probs come from
    `gategrad.fused_token_logps` on the last hidden state and ``lm_head.weight``/``bias``:
    no ``(2B, T, V)`` logits, nor a tile as large, exist in the forward or the backward (see
    [`FusedHead`][]). TRL's loss, metrics and the gate are otherwise unchanged.

    | ``fused=True`` | |
    |---|---|
    | TRL | ``>= 1.15`` (``model(..., fused_lm_head=True)``); tested on 1.16 |
    | losses | TRL's own loss code, so every ``loss_type``; tested: sigmoid, WPO weights |
    | models | causal LMs with logits ``hidden @ lm_head.weight.T + bias``; PEFT (untested) |
    | processes | one (tested); DDP, DeepSpeed ZeRO-1/2 (untested) |
    | refused | TRL < 1.15, logit soft-capping/scaling, MoE aux loss, FSDP, ZeRO-3 |

    ``fused=True`` routes around Liger rather than through it: Liger's fused linear DPO loss
    (``use_liger_loss``, and ``use_liger_kernel`` on TRL < 1.15) computes the loss inside its
    kernel from the hidden states and never surfaces per-token log-probs, so there is nothing
    for the gate to multiply; those stay refused. On TRL >= 1.15 ``use_liger_kernel`` applies
    only Liger's layer kernels, which leave the forward to TRL's patch (allowed; untested here,
    Liger is not installed).

    Args:
        trainer: an existing ``trl.DPOTrainer`` (or subclass).
        gate: the [`Gate`][gategrad.Gate]; default ``Gate()`` (the paper's sigmoid gate).
        fused: compute the log-probs with gategrad's fused head (the memory saving of a fused
            LM head together with the gate).
        chunk_size: with ``fused=True``, positions per tile, as in
            `gategrad.fused_token_logps`; ``None``: its default plan (tiles of at most 4 Mi
            logits).
        log_metrics: add ``gate/*`` metrics to the trainer's logs.

    Returns:
        A [`GateAttachment`][]; ``.remove()`` restores the trainer. Also a context manager.

    Raises:
        ValueError: for a configuration that cannot be gated correctly (see the module docs),
            or, with ``fused=True``, one that the fused head does not support (table above).
        TypeError: if ``trainer`` is not a ``DPOTrainer`` or ``gate`` not a ``Gate``.
    """
    try:
        from trl import DPOTrainer
    except ImportError as err:
        raise ImportError(
            "gategrad.integrations.trl needs TRL: pip install 'gategrad[trl]'"
        ) from err
    gate = Gate() if gate is None else gate
    gate = require_gate(gate)
    if not isinstance(trainer, DPOTrainer):
        raise TypeError(f"attach() expects a trl.DPOTrainer, got {type(trainer).__name__}")
    if getattr(trainer, _ATTR, None) is not None:
        raise ValueError("a gate is already attached to this trainer; call .remove() first")
    _check_supported(trainer, gate)
    if fused:
        _check_fused(trainer, chunk_size)
    elif chunk_size is not None:
        raise ValueError("chunk_size applies to the fused head only: pass fused=True, or drop it")
    attachment = GateAttachment(trainer, gate, log_metrics=log_metrics)
    if fused:
        attachment.fused_head = FusedHead(trainer, chunk_size)
    return attachment
