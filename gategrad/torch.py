"""PyTorch module hooks: gate a causal LM's rejected rows without touching the training loop.

[`hook`][] registers a forward hook (with kwargs) on a model. On every forward pass that runs
with gradients enabled it gates the rejected rows of the model's output:

- ``output.log_probs`` when the output has them (TRL >= 1.15 patches the policy with a fused LM
  head that returns per-token log-probs of shape ``(N, T-1)``, zero where the label is ignored);
- otherwise ``output.logits`` ``(N, L, V)``: the per-token log-probs of the rejected rows are
  computed from the logits under ``no_grad`` to get the gate weight, and the rejected rows of the
  logits are scaled in the backward pass. Each position's logits feed only that position's token
  log-prob, so scaling a row of the logits' cotangent equals scaling that row's log-prob cotangent.

The forward values are never changed (bitwise), and the pass of a reference model under
``torch.no_grad()`` is never touched. ``handle.remove()`` restores the model exactly.

Which positions belong to the response (the mask the gate's estimator averages over) is taken,
in this order, from: the ``mask=`` callable; the output's ``label_mask`` (TRL's fused head);
``shift_labels`` or ``labels`` passed to the model (positions not equal to ``ignore_index``).
It is never guessed from ``log_probs != 0``: a log-prob of exactly ``0.0`` is a legitimate value
(a token whose probability rounds to 1), and dropping it would change the ``seq`` estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, NamedTuple

import torch

from ._core import GateStats, broadcast_weight, gate_weights, scale_grad
from ._dispatch import get_backend
from ._gate import Gate
from ._validate import integer, require_gate

__all__ = ["GateHook", "hook"]

#: "second_half" | "first_half" | slice | Sequence[int] | Tensor | Callable[[int], one of those]
RowSpec = Any
MaskFn = Callable[[tuple[Any, ...], dict[str, Any], Any], "torch.Tensor | None"]

_ROW_NAMES = ("second_half", "first_half")


def _resolve_rows(spec: RowSpec, n_rows: int, device: torch.device) -> slice | torch.Tensor:
    """The rejected rows of an ``n_rows`` batch as a slice or an index/boolean tensor."""
    if callable(spec) and not isinstance(spec, torch.Tensor):
        spec = spec(n_rows)
    if isinstance(spec, str):
        if spec not in _ROW_NAMES:
            raise ValueError(
                f"rejected_rows must be one of {_ROW_NAMES}, a slice, indices or a "
                f"callable, got {spec!r}"
            )
        if n_rows % 2:
            raise ValueError(
                f"rejected_rows={spec!r} needs an even number of rows ([chosen; rejected]), but "
                f"the model's output has {n_rows} rows"
            )
        half = n_rows // 2
        return slice(half, n_rows) if spec == "second_half" else slice(0, half)
    if isinstance(spec, slice):
        if n_rows > 0 and len(range(n_rows)[spec]) == 0:
            raise ValueError(
                f"rejected_rows={spec!r} selects no row of the model's {n_rows}-row output; "
                "pass rows that exist (for TRL's [chosen; rejected] rows: 'second_half')"
            )
        return spec
    if isinstance(spec, torch.Tensor):
        if spec.dtype == torch.bool:
            if tuple(spec.shape) != (n_rows,):
                raise ValueError(
                    f"a boolean rejected_rows must have shape ({n_rows},), got {tuple(spec.shape)}"
                )
            if n_rows > 0 and not bool(spec.any()):
                raise ValueError("the boolean rejected_rows selects no row; mark at least one")
            return spec.to(device)
        if spec.is_floating_point() or spec.is_complex() or spec.ndim != 1:
            raise TypeError(
                "rejected_rows as a tensor must be 1-D integer row indices or a boolean (N,) "
                f"mask, got dtype {spec.dtype} and shape {tuple(spec.shape)}"
            )
        return _check_indices(spec.tolist(), n_rows, device)
    if isinstance(spec, (Sequence, range)):
        items = list(spec)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in items):
            raise TypeError(f"rejected_rows indices must be ints, got {items!r}")
        return _check_indices(items, n_rows, device)
    raise TypeError(
        "rejected_rows must be 'second_half', 'first_half', a slice, a sequence or tensor of row "
        "indices, a boolean tensor, or a callable n_rows -> one of those; got "
        f"{type(spec).__name__}"
    )


def _check_indices(items: list[int], n_rows: int, device: torch.device) -> torch.Tensor:
    """Row indices as a tensor; each in ``[-n_rows, n_rows)``, at least one."""
    if n_rows > 0 and not items:
        raise ValueError("rejected_rows selects no row (an empty list of indices)")
    bad = [i for i in items if not -n_rows <= i < n_rows]
    if bad:
        raise ValueError(
            f"rejected_rows holds indices {bad[:8]} outside the model's {n_rows}-row output "
            f"(valid: -{n_rows} to {n_rows - 1})"
        )
    return torch.as_tensor(items, dtype=torch.long, device=device)


def _check_mask(mask: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """A response mask must have exactly ``shape`` (no right-alignment, no broadcasting)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"the response mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"the response mask has shape {tuple(mask.shape)} but {what} has shape "
            f"{tuple(shape)}; they must match (one entry per log-prob position)"
        )
    return mask


def _align_right(x: torch.Tensor, length: int, fill: Any) -> torch.Tensor:
    """Crop (keep the last ``length`` columns) or left-pad ``x`` (N, S) to ``(N, length)``."""
    s = x.shape[1]
    if s == length:
        return x
    if s > length:
        return x[:, s - length :]
    pad = torch.full((x.shape[0], length - s), fill, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x], dim=1)


def _get(output: Any, key: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(key)
    return getattr(output, key, None)


def _set(output: Any, key: str, value: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return value
    if isinstance(output, MutableMapping):
        output[key] = value  # transformers' ModelOutput keeps the item and the attribute in sync
        if hasattr(output, key):
            object.__setattr__(output, key, value)
        return output
    setattr(output, key, value)
    return output


def _token_logps_nograd(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` row by row, float32 or wider, without gradient."""
    out = []
    with torch.no_grad():
        dtype = torch.promote_types(logits.dtype, torch.float32)
        for row, tgt in zip(
            logits, targets, strict=True
        ):  # one row at a time bounds the (T, V) temporaries
            row = row.to(dtype)
            picked = torch.gather(row, -1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out.append(picked - torch.logsumexp(row, dim=-1))
    return torch.stack(out) if out else logits.new_zeros((0, logits.shape[1]), dtype=torch.float32)


class _Call(NamedTuple):
    """One forward call of the hooked module: its positional and keyword inputs and output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any


class GateHook:
    """A registered gate hook. ``remove()`` (or leaving the ``with`` block) unregisters it.

    Attributes:
        last_stats: the [`GateStats`][gategrad.GateStats] of the latest gated forward (its rejected
            rows with at least one response token), or ``None`` (no such row, or no pass yet).
        calls: how many gradient-enabled forward passes the hook gated.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        gate: Gate,
        *,
        rejected_rows: RowSpec,
        mask: MaskFn | None,
        output: str | None,
        ignore_index: int,
        on_stats: Callable[[GateStats], None] | None,
    ) -> None:
        gate = require_gate(gate)
        ignore_index = integer("ignore_index", ignore_index)
        if mask is not None and not callable(mask):
            raise TypeError(
                "mask= must be a callable (args, kwargs, output) -> bool tensor, got "
                f"{type(mask).__name__}"
            )
        if output not in (None, "log_probs", "logits"):
            raise ValueError(f"output must be None, 'log_probs' or 'logits', got {output!r}")
        if rejected_rows is None:
            raise ValueError(
                "rejected_rows is required (for TRL's [chosen; rejected] rows: 'second_half')"
            )
        if isinstance(rejected_rows, str):
            _resolve_rows(rejected_rows, 2, torch.device("cpu"))  # validate the name early
        self.model = model
        self.gate = gate
        self.rejected_rows = rejected_rows
        self.mask_fn = mask
        self.output = output
        self.ignore_index = ignore_index
        self.on_stats = on_stats
        self.last_stats: GateStats | None = None
        self.calls = 0
        get_backend("torch")
        self._handle = model.register_forward_hook(self._hook, with_kwargs=True)

    # -- public -----------------------------------------------------------------------------

    def remove(self) -> None:
        """Unregister the hook; the model is exactly as before [`hook`][] (idempotent)."""
        self._handle.remove()

    def __enter__(self) -> GateHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- the hook ---------------------------------------------------------------------------

    def _hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if not torch.is_grad_enabled():
            return None  # reference passes and evaluation run under no_grad: never touched
        key, x = self._pick_output(output)
        if not x.requires_grad:
            return None
        rows = _resolve_rows(self.rejected_rows, x.shape[0], x.device)
        self.calls += 1
        self.last_stats = None
        call = _Call(args, kwargs, output)
        if key == "log_probs":
            gated = self._gate_log_probs(x, rows, call)
        else:
            gated = self._gate_logits(x, rows, call)
        return _set(output, key, gated)

    def _pick_output(self, output: Any) -> tuple[str, torch.Tensor]:
        if isinstance(output, torch.Tensor):
            if self.output == "log_probs":
                return "log_probs", output
            return "logits", output
        if isinstance(output, tuple) and not isinstance(output, Mapping):
            raise TypeError(
                "gategrad.torch.hook cannot tell which element of a tuple output holds the "
                "logits; call the model with return_dict=True"
            )
        keys = (self.output,) if self.output else ("log_probs", "logits")
        for key in keys:
            value = _get(output, key)
            if isinstance(value, torch.Tensor):
                return key, value
        raise RuntimeError(
            f"the model's output ({type(output).__name__}) has no {' or '.join(keys)} to gate: "
            "the forward pass never materialises per-token log-probs or logits (for example a "
            "fused linear cross-entropy kernel that returns only the loss). Disable that kernel "
            "or compute the loss with gategrad.preference_loss(..., gate=...)"
        )

    def _user_mask(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> torch.Tensor | None:
        if self.mask_fn is None:
            return None
        mask = self.mask_fn(args, kwargs, output)
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise TypeError(
                f"mask= must return a bool torch.Tensor (or None), got {type(mask).__name__}"
            )
        return None if mask is None else mask.to(torch.bool)

    def _labels(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, bool]:
        """The targets aligned with log-prob positions, and whether they mark ignored tokens."""
        shift_labels = kwargs.get("shift_labels")
        if isinstance(shift_labels, torch.Tensor):
            return shift_labels, True
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor):
            return labels[:, 1:], True
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            return ids[:, 1:], False
        return None, False

    def _gate_log_probs(self, lp: torch.Tensor, rows: Any, call: _Call) -> torch.Tensor:
        args, kwargs, output = call
        if lp.ndim != 2:
            raise ValueError(f"log_probs must have shape (N, T), got {tuple(lp.shape)}")
        mask = self._user_mask(args, kwargs, output)
        if mask is None:
            label_mask = _get(output, "label_mask")
            if isinstance(label_mask, torch.Tensor):
                mask = label_mask.to(torch.bool)
        if mask is None:
            targets, has_ignore = self._labels(args, kwargs)
            if targets is not None and has_ignore:
                mask = targets != self.ignore_index
        if mask is None:
            raise ValueError(
                "gategrad.torch.hook cannot tell which log_probs positions belong to the "
                "response: the output has no label_mask and the model got no labels= or "
                "shift_labels=. Pass mask=lambda args, kwargs, output: <bool (N, T) tensor>"
            )
        mask = _check_mask(mask, tuple(lp.shape), "log_probs").to(lp.device)
        weight = self._row_weights(lp.detach(), mask, rows)
        return lp if weight is None else scale_grad(lp, weight)

    def _gate_logits(self, logits: torch.Tensor, rows: Any, call: _Call) -> torch.Tensor:
        args, kwargs, output = call
        if logits.ndim != 3:
            raise ValueError(f"logits must have shape (N, L, V), got {tuple(logits.shape)}")
        shift_labels = kwargs.get("shift_labels")
        pre_shifted = isinstance(shift_labels, torch.Tensor)
        targets, has_ignore = self._labels(args, kwargs)
        if targets is None:
            raise ValueError(
                "gategrad.torch.hook gates logits from per-token log-probs and needs the target "
                "tokens: pass input_ids=, labels= or shift_labels= to the model"
            )
        mask = self._user_mask(args, kwargs, output)
        if mask is None:
            if not has_ignore:
                raise ValueError(
                    "gategrad.torch.hook cannot tell which positions belong to the response: "
                    "the model got input_ids but no labels= (with -100 outside the response). "
                    "Pass labels= or mask=lambda args, kwargs, output: <bool (N, T-1) tensor>"
                )
            mask = targets != self.ignore_index
        mask = _check_mask(mask, tuple(targets.shape), "the shifted labels")
        mask = mask.to(device=logits.device, dtype=torch.bool)
        targets = targets.to(logits.device)
        if targets.shape[0] != logits.shape[0]:
            raise ValueError(
                f"the labels have {targets.shape[0]} rows but the logits {logits.shape[0]}; "
                "pass the labels of this batch"
            )
        vocab = logits.shape[-1]
        out_of_range = mask & ((targets < 0) | (targets >= vocab))
        if bool(out_of_range.any()):
            bad = torch.nonzero(out_of_range.any(-1)).reshape(-1).tolist()
            raise ValueError(
                f"the target tokens hold ids outside [0, {vocab}) in rows {bad[:8]} (other than "
                f"ignore_index={self.ignore_index}); check the tokenizer / vocabulary size"
            )
        targets = torch.where(mask, targets, 0)
        # logits position t predicts targets[t]; without pre-shifted labels the last position
        # predicts nothing. Align from the right (prompt-tuning prepends virtual positions,
        # logits_to_keep drops leading ones).
        n_pos = logits.shape[1] if pre_shifted else logits.shape[1] - 1
        if targets.shape[1] > n_pos:
            dropped = mask[:, : targets.shape[1] - n_pos]
            if bool(dropped.any()):
                raise ValueError(
                    "the model returned logits for fewer positions than the response needs "
                    "(logits_to_keep too small?); cannot gate positions without logits"
                )
        targets = _align_right(targets, n_pos, 0)
        mask = _align_right(mask, n_pos, False)
        rej_logits = logits.detach()[rows][:, :n_pos]
        rej_logps = _token_logps_nograd(rej_logits, targets[rows])
        full = torch.ones(logits.shape[0], n_pos, dtype=rej_logps.dtype, device=logits.device)
        full[rows] = rej_logps  # only the rejected rows are read below
        weight = self._row_weights(full, mask, rows)
        if weight is None:
            return logits
        if weight.shape[1] == 1:  # per example: (N, 1) -> (N, 1, 1)
            return scale_grad(logits, weight[:, :, None])
        if not pre_shifted:  # per token: the last position predicts nothing, weight 1
            weight = torch.cat([weight, weight.new_ones(weight.shape[0], 1)], dim=1)
        return scale_grad(logits, weight[:, :, None])

    def _row_weights(self, lp: torch.Tensor, mask: torch.Tensor, rows: Any) -> torch.Tensor | None:
        """The cotangent weight for all ``N`` rows: 1 on chosen rows, ``g`` on rejected rows.

        ``(N, 1)`` for example granularity, ``(N, T)`` for token granularity. Rejected rows with
        no response token keep weight 1 (they have no rejected log-prob to gate) and are left out
        of the statistics.
        """
        rej_lp = lp[rows]
        rej_mask = mask[rows]
        if rej_lp.shape[0] == 0:
            return None
        nonempty = rej_mask.any(dim=-1)
        all_nonempty = bool(nonempty.all())
        if not all_nonempty:
            if not bool(nonempty.any()):
                return None
            rej_lp, rej_mask = rej_lp[nonempty], rej_mask[nonempty]
        stats = gate_weights(rej_lp, self.gate, rej_mask)
        wdtype = stats.weight.dtype
        ops = get_backend("torch")
        rej_weight = broadcast_weight(ops, rej_lp, stats)  # (R', 1) or (R', T)
        if not all_nonempty:
            filled = torch.ones(
                nonempty.shape[0], rej_weight.shape[1], dtype=wdtype, device=lp.device
            )
            filled[nonempty] = rej_weight
            rej_weight = filled
        width = rej_weight.shape[1]
        weight = torch.ones(lp.shape[0], width, dtype=wdtype, device=lp.device)
        weight[rows] = rej_weight
        self.last_stats = stats
        if self.on_stats is not None:
            self.on_stats(stats)
        return weight


def hook(
    model: torch.nn.Module,
    gate: Gate,
    *,
    rejected_rows: RowSpec,
    mask: MaskFn | None = None,
    output: str | None = None,
    ignore_index: int = -100,
    on_stats: Callable[[GateStats], None] | None = None,
) -> GateHook:
    """Gate the rejected rows of a causal LM's output in every gradient-enabled forward pass.

    Args:
        model: the policy (any ``nn.Module`` whose output is a tensor of logits or an object
            with ``log_probs`` or ``logits``, such as a transformers ``ModelOutput``).
        gate: the [`Gate`][gategrad.Gate].
        rejected_rows: which rows of the output are rejected responses: ``'second_half'``
            (TRL's ``[chosen; rejected]``), ``'first_half'``, a slice, row indices, a boolean
            ``(N,)`` tensor, or a callable ``n_rows -> one of those``.
        mask: optional ``(args, kwargs, output) -> bool (N, T-1)`` response mask aligned with
            the shifted labels; by default the output's ``label_mask`` or the ``labels`` /
            ``shift_labels`` passed to the model (``!= ignore_index``).
        output: ``'log_probs'`` or ``'logits'`` to force which output is gated; by default
            ``log_probs`` when present, else ``logits``.
        ignore_index: the label value outside the response.
        on_stats: called with the [`GateStats`][gategrad.GateStats] of each gated forward.

    Returns:
        A [`GateHook`][]; ``.remove()`` restores the model exactly. Also a context manager.
    """
    return GateHook(
        model,
        gate,
        rejected_rows=rejected_rows,
        mask=mask,
        output=output,
        ignore_index=ignore_index,
        on_stats=on_stats,
    )
