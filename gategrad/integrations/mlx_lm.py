"""Gated DPO training steps for ``mlx_lm`` models (Apple Silicon, and MLX's CPU build on Linux).

```python
import mlx.optimizers as optim
from mlx_lm.models import llama
from gategrad import Gate
from gategrad.integrations import mlx_lm as gm

model = llama.Model(llama.ModelArgs(...))          # or mlx_lm.load(...)[0]
ref = llama.Model(...); ref.update(model.parameters()); ref.freeze()
batch = gm.make_batch(prompts, chosen, rejected, pad_id=0)   # token-id lists
step = gm.make_train_step(model, optim.Adam(1e-3), gate=Gate(), ref_model=ref)
loss, metrics = step(batch)                       # compiled with mx.compile
```

Batches hold ``2B`` rows, ``[chosen; rejected]``, right-padded (mlx-lm models apply a causal mask
only, so right padding never changes the log-probs of real tokens):

- ``input_ids`` ``(2B, T)`` int32: prompt + response + padding;
- ``response_mask`` ``(2B, T)`` bool: the response tokens (the log-probs that count).

The per-token log-probs of the responses come from [`gategrad.token_logps`][], the loss from
[`gategrad.preference_loss`][] (any ``loss_type``), which gates the rejected side only.
MLX has no float64 on the GPU (Metal): train in float32 or bfloat16; the gate is computed in
float32 either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from .._gate import Gate

__all__ = [
    "make_batch",
    "make_loss_fn",
    "make_train_step",
    "reference_logps",
    "sequence_token_logps",
]


def _mx() -> Any:
    """``mlx.core``; ``ImportError`` naming the pip extra when MLX is missing."""
    from .._dispatch import get_backend

    return get_backend("mlx").framework


def make_batch(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Token-id lists -> a right-padded ``[chosen; rejected]`` batch of MLX arrays.

    Every response needs at least one token. ``max_length`` truncates from the right (the
    response's end) and raises if a response would lose all of its tokens.
    """
    import numpy as np

    mx = _mx()
    if not len(prompts) == len(chosen) == len(rejected) > 0:
        raise ValueError(
            f"prompts, chosen and rejected must have the same nonzero length, got "
            f"{len(prompts)}, {len(chosen)}, {len(rejected)}"
        )
    rows = [(list(p), list(c)) for p, c in zip(prompts, chosen, strict=True)]
    rows += [(list(p), list(r)) for p, r in zip(prompts, rejected, strict=True)]
    seqs, masks = [], []
    for i, (p, r) in enumerate(rows):
        if not r:
            side = "chosen" if i < len(prompts) else "rejected"
            raise ValueError(f"{side} response {i % len(prompts)} is empty")
        ids, m = p + r, [False] * len(p) + [True] * len(r)
        if max_length is not None:
            ids, m = ids[:max_length], m[:max_length]
            if not any(m):
                raise ValueError(f"max_length={max_length} truncates away row {i}'s response")
        seqs.append(ids)
        masks.append(m)
    length = max(len(s) for s in seqs)
    if length < 2:
        raise ValueError("sequences need at least 2 tokens (a prompt token and a response)")
    ids_arr = np.full((len(seqs), length), pad_id, dtype=np.int32)
    mask_arr = np.zeros((len(seqs), length), dtype=bool)
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        ids_arr[i, : len(s)] = s
        mask_arr[i, : len(m)] = m
    return {"input_ids": mx.array(ids_arr), "response_mask": mx.array(mask_arr)}


def sequence_token_logps(model: Callable[[Any], Any], batch: dict[str, Any]) -> tuple[Any, Any]:
    """Per-token log-probs ``(2B, T-1)`` of the response tokens and their mask.

    ``logps[:, t]`` is ``log p(input_ids[:, t+1] | input_ids[:, :t+1])``, 0 outside the mask.
    """
    from .._logps import token_logps

    ids = batch["input_ids"]
    return token_logps(model(ids), ids, batch["response_mask"])


def _half(n_rows: int) -> int:
    """``B`` of a ``[chosen; rejected]`` batch of ``2B`` rows; an odd count is refused (its
    halves would pair a chosen row with the wrong rejected one)."""
    if n_rows % 2:
        raise ValueError(
            f"the batch has {n_rows} rows; it must hold [chosen; rejected] rows, an even number "
            "(build it with gategrad.integrations.mlx_lm.make_batch)"
        )
    return n_rows // 2


def reference_logps(ref_model: Callable[[Any], Any], batch: dict[str, Any]) -> dict[str, Any]:
    """The reference model's per-token log-probs ``{'ref_chosen_logps', 'ref_rejected_logps'}``.

    Add them to the batch (``batch.update(reference_logps(ref, batch))``) for a train step built
    without ``ref_model``, e.g. to precompute them once per dataset.
    """
    mx = _mx()
    logps, _ = sequence_token_logps(ref_model, batch)
    logps = mx.stop_gradient(logps)
    n = _half(int(logps.shape[0]))
    return {"ref_chosen_logps": logps[:n], "ref_rejected_logps": logps[n:]}


def make_loss_fn(
    *,
    gate: Gate | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    ref_model: Callable[[Any], Any] | None = None,
    sft_weight: float = 0.0,
    **loss_params: Any,
) -> Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]:
    """``loss_fn(model, batch) -> (loss, metrics)`` for ``nn.value_and_grad``.

    The reference log-probs come from ``ref_model`` (under ``stop_gradient``) or from the
    batch's ``ref_chosen_logps`` / ``ref_rejected_logps``; ``loss_type='simpo'`` uses none.
    """
    from ..losses import preference_loss

    mx = _mx()

    def loss_fn(model: Any, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        logps, mask = sequence_token_logps(model, batch)
        n = _half(int(logps.shape[0]))
        refs: tuple[Any, Any] | tuple[()] = ()
        if loss_type != "simpo":
            if ref_model is not None:
                r = reference_logps(ref_model, batch)
            elif "ref_chosen_logps" in batch:
                r = batch
            else:
                raise ValueError(
                    f"loss_type={loss_type!r} needs the reference log-probs: pass ref_model= or "
                    "add reference_logps(ref_model, batch) to the batch"
                )
            refs = (
                mx.stop_gradient(r["ref_chosen_logps"]),
                mx.stop_gradient(r["ref_rejected_logps"]),
            )
        return preference_loss(
            loss_type,
            logps[:n],
            logps[n:],
            *refs,
            beta=beta,
            gate=gate,
            chosen_mask=mask[:n],
            rejected_mask=mask[n:],
            sft_weight=sft_weight,
            **loss_params,
        )

    return loss_fn


def make_train_step(
    model: Any,
    optimizer: Any,
    *,
    gate: Gate | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    ref_model: Any | None = None,
    compile: bool = True,
    sft_weight: float = 0.0,
    **loss_params: Any,
) -> Callable[[dict[str, Any]], tuple[Any, dict[str, Any]]]:
    """A gated DPO training step ``step(batch) -> (loss, metrics)`` that updates ``model``.

    ``nn.value_and_grad`` over [`make_loss_fn`][], then ``optimizer.update``. With
    ``compile=True`` the whole step is ``mx.compile``-d, closing over the model and optimizer
    state (``inputs=outputs=[model.state, optimizer.state]``; ``ref_model.state`` is an input).
    The returned arrays are evaluated (``mx.eval``) before returning.
    """
    import mlx.nn as nn

    mx = _mx()
    loss_fn = make_loss_fn(
        gate=gate,
        loss_type=loss_type,
        beta=beta,
        ref_model=ref_model,
        sft_weight=sft_weight,
        **loss_params,
    )
    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step(batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        (loss, metrics), grads = loss_and_grad(model, batch)
        optimizer.update(model, grads)
        return loss, metrics

    if compile:
        state: list[Any] = [model.state, optimizer.state]
        inputs = state + ([ref_model.state] if ref_model is not None else [])
        step = partial(mx.compile, inputs=inputs, outputs=state)(step)

    def run(batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        loss, metrics = step(batch)
        mx.eval(loss, metrics, model.parameters(), optimizer.state)
        return loss, metrics

    return run
