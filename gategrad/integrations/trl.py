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
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import defaultdict
from typing import Any

from .._gate import Gate
from .._validate import require_gate

__all__ = ["TESTED_TRL", "GateAttachment", "attach"]

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


def attach(trainer: Any, gate: Gate | None = None, *, log_metrics: bool = True) -> GateAttachment:
    """Gate the rejected responses of a TRL ``DPOTrainer`` (one call, before ``train()``).

    Args:
        trainer: an existing ``trl.DPOTrainer`` (or subclass).
        gate: the [`Gate`][gategrad.Gate]; default ``Gate()`` (the paper's sigmoid gate).
        log_metrics: add ``gate/*`` metrics to the trainer's logs.

    Returns:
        A [`GateAttachment`][]; ``.remove()`` restores the trainer. Also a context manager.

    Raises:
        ValueError: for a configuration that cannot be gated correctly (see the module docs).
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
    return GateAttachment(trainer, gate, log_metrics=log_metrics)
