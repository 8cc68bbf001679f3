"""Mass-dynamics metrics of a causal LM's responses, for any framework's logits.

The squeezing effect (Ren & Sutherland, "Learning Dynamics of LLM Finetuning", ICLR 2025) shows
up in where the model puts its probability mass. For each response, under teacher forcing
(position ``t`` sees the true prefix ``y_<t``), with ``p_t = softmax(logits_t)``:

| metric | definition |
|---|---|
| ``logp`` | ``sum_t log p_t(y_t)``: the response's log-probability |
| ``argmax_logp`` | ``sum_t max_v log p_t(v)``: log-prob of the per-position argmax response |
| ``except_argmax`` | ``sum_t log(1 - max_v p_t(v))``: log-mass left for everything but the argmax |
| ``top1`` | ``mean_t max_v p_t(v)``: mean top-1 mass |
| ``entropy`` | ``mean_t H(p_t)`` in nats: mean per-position entropy |

Squeezing: ``argmax_logp`` and ``top1`` rise while ``entropy``, ``except_argmax`` and the
log-probs of most other responses fall.

Every function is written once against the backend ([`gategrad.Backend`][]), so it
runs on NumPy, PyTorch, JAX and MLX arrays; results carry no gradient and are computed in
``promote_types(dtype, float32)``.
"""

from __future__ import annotations

from typing import Any

from . import _validate as check
from ._backend import Array
from ._dispatch import backend_for

__all__ = ["METRIC_NAMES", "sequence_metrics", "to_numpy"]

#: The per-sequence metrics ``sequence_metrics`` returns, in order.
METRIC_NAMES: tuple[str, ...] = ("logp", "argmax_logp", "except_argmax", "top1", "entropy")


def sequence_metrics(
    logits: Array,
    labels: Array,
    mask: Array | None = None,
    *,
    shift: bool = True,
    ignore_index: int = -100,
) -> dict[str, Array]:
    """Per-sequence mass metrics (see the module docstring), each of shape ``(B,)``.

    Args:
        logits: ``(B, T, V)`` logits of any float dtype, any framework.
        labels: ``(B, T)`` integer token ids (the response being scored, teacher-forced).
        mask: optional ``(B, T)`` mask aligned with ``labels`` (nonzero = the position counts),
            e.g. the response mask; combined with ``labels != ignore_index``.
        shift: ``True`` for causal-LM inputs (``logits[:, :-1]`` predict ``labels[:, 1:]``);
            ``False`` when ``logits[:, t]`` already predicts ``labels[:, t]`` (for example a
            softmax classifier seen as one-token responses, ``(N, 1, V)``).
        ignore_index: label value of positions that do not count.

    Returns:
        ``{"logp", "argmax_logp", "except_argmax", "top1", "entropy"}``, arrays ``(B,)`` of the
        input's framework without gradient. Rows with no counted position give 0 for every
        metric (sums of nothing; means with a safe denominator, never NaN).

    Raises:
        ValueError: bad shapes (as [`gategrad.token_logps`][]); in eager mode, a counted label
            outside ``[0, V)``. Under tracing such labels are masked (left out of every metric).
        TypeError: float or bool labels, integer logits.

    ``except_argmax`` is computed as ``logsumexp`` over the non-argmax classes, which stays
    accurate when the top-1 mass is close to 1 (``log(1 - p)`` would round to ``-inf``); tied
    maxima are all treated as the argmax.
    """
    ops = backend_for(logits=logits, labels=labels, mask=mask)
    check.check_logits_labels(ops, logits, labels, mask)
    ignore_index = check.integer("ignore_index", ignore_index)
    x = ops.stop_gradient(logits)
    x = ops.astype(x, ops.compute_dtype(x))
    if shift:
        if x.shape[1] < 2:
            raise ValueError(f"shift=True needs T >= 2, got T = {x.shape[1]}")
        x, labels = x[:, :-1], labels[:, 1:]
        mask = None if mask is None else mask[:, 1:]
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & ops.bool_mask(mask)
    valid = check.valid_labels(ops, labels, valid, int(x.shape[-1]), ignore_index)

    logp_all = x - ops.logsumexp(x, axis=-1)[..., None]  # (B, T, V) log-softmax
    top = ops.max(logp_all, axis=-1)  # (B, T) max_v log p(v)
    safe = ops.as_index(ops.where(valid, labels, 0))
    picked = ops.take_along_axis(logp_all, safe[..., None], axis=-1)[..., 0]
    is_top = logp_all >= top[..., None]
    rest = ops.logsumexp(ops.where(is_top, float("-inf"), logp_all))
    probs = ops.exp(logp_all)
    entropy = -ops.sum(probs * logp_all, axis=-1)

    count = ops.sum(ops.astype(valid, x.dtype), axis=-1)
    count = ops.where(count > 0, count, 1.0)  # rows with no counted position: means of 0

    def total(v: Array) -> Array:
        return ops.sum(ops.where(valid, v, 0.0), axis=-1)

    return {
        "logp": total(picked),
        "argmax_logp": total(top),
        "except_argmax": total(rest),
        "top1": total(ops.exp(top)) / count,
        "entropy": total(entropy) / count,
    }


def to_numpy(metrics: dict[str, Any]) -> dict[str, Any]:
    """The same dict with every array converted to ``numpy.ndarray``."""
    import numpy as np

    out = {}
    for key, value in metrics.items():
        out[key] = np.asarray(backend_for(value=value).to_numpy(value))
    return out
