"""Per-token log-probs from logits: the checks and the plan, written once; each backend's
[`token_logps`][gategrad._backend.Backend.token_logps] kernel does the arithmetic."""

from __future__ import annotations

from . import _validate as check
from ._backend import Array
from ._core import gate_rejected
from ._dispatch import backend_for
from ._gate import Gate

__all__ = ["token_logps"]

#: Auto-chunking budget: the most logits elements one chunk holds (16 MiB of float32). Each
#: chunk's float32 temporaries are bounded by it, not by ``B * T * V``. Used by torch, NumPy and
#: eager (concrete) JAX; see ``token_logps`` for why traced JAX and MLX need no chunks.
CHUNK_ELEMENTS = 1 << 22


def _plan(batch: int, length: int, vocab: int, chunk_size: int | None) -> tuple[int, int]:
    """``(rows, cols)`` of one chunk over the ``(B, T)`` positions."""
    if chunk_size is not None:
        return chunk_size, length
    if batch * length * vocab <= CHUNK_ELEMENTS:
        return batch, length
    per_row = length * vocab
    if per_row <= CHUNK_ELEMENTS:
        return max(1, CHUNK_ELEMENTS // per_row), length
    return 1, max(1, CHUNK_ELEMENTS // vocab)


def token_logps(
    logits: Array,
    labels: Array,
    mask: Array | None = None,
    *,
    shift: bool = True,
    ignore_index: int = -100,
    gate: Gate | None = None,
    chunk_size: int | None = None,
) -> tuple[Array, Array]:
    """Per-token log-probs ``log softmax(logits)[label]`` of a causal LM, in any framework.

    Args:
        logits: ``(B, T, V)``, any float dtype (bf16/fp16 are accumulated in float32).
        labels: ``(B, T)`` integer token ids; positions equal to ``ignore_index`` do not count.
        mask: optional ``(B, T)`` mask aligned with ``labels`` (nonzero = counts), e.g. the
            completion mask; combined with ``labels != ignore_index``.
        shift: ``True`` (causal LM, as ``input_ids`` and model logits come): ``logits[:, :-1]``
            predict ``labels[:, 1:]`` (and ``mask[:, 1:]``); the outputs have shape
            ``(B, T - 1)``. ``False``: the inputs are already aligned, ``logits[:, t]`` predicts
            ``labels[:, t]``, and the outputs have shape ``(B, T)``.
        ignore_index: the label value that marks positions to ignore (TRL/HF use -100).
        gate: optional [`gategrad.Gate`][] with ``granularity='token'``: the result is passed
            through [`gategrad.gate_rejected`][] with the returned mask, so each rejected
            token's gradient is scaled by its own gate. Pass it only when ``logits``/``labels``
            hold the *rejected* responses, and do not pass the gate to the loss as well. An
            ``'example'``-granularity gate is the loss' job ([`gategrad.preference_loss`][]
            or [`gategrad.gate_rejected`][] on the rejected rows): it raises ``ValueError``.
        chunk_size: rows of the batch per chunk. ``None``: automatic, chunks of at most
            ``CHUNK_ELEMENTS`` logits (over rows, and over time when one row is larger).

    Returns:
        The pair ``(logps, mask)``. ``logps`` holds the per-token log-probs in
        ``promote_types(logits.dtype, float32)``, ``0`` at positions that do not count;
        ``mask`` is the boolean mask actually used
        (``labels != ignore_index``, and ``mask`` if given), both ``(B, T - 1)`` with
        ``shift=True``. ``B = 0`` gives empty arrays; ``T = 0`` or ``V = 0`` raise ``ValueError``.
        Sum ``logps`` over the last axis for per-sequence log-probs, or pass
        both to [`gategrad.preference_loss`][] (``*_logps`` and ``*_mask``).

    Memory and speed: no second ``(B, T, V)`` buffer besides the logits (and, under autograd,
    their gradient), and nothing of that size held between forward and backward (low
    precision: the float32 cast is recomputed in the backward). Per framework:

    - torch: chunks of at most ``CHUNK_ELEMENTS`` logits (``split``), each a fused
      ``log_softmax`` + gather with a one-pass backward; the peak holds one chunk's
      log-softmax;
    - JAX under ``jit``/``grad`` and MLX (automatic ``chunk_size``): one ``logsumexp`` and one
      gather over all the logits, which XLA and MLX compute without a ``(B, T, V)`` temporary;
    - NumPy and eager JAX arrays: ``logsumexp`` chunk by chunk.

    Labels outside ``[0, V)`` other than ``ignore_index`` raise ``ValueError`` in eager mode;
    under tracing (where they cannot be inspected) they are masked: logp 0 and ``False`` in the
    returned mask, so ``(labels != ignore_index).sum() - mask.sum()`` (over the scored
    positions) counts them.

    ``benchmarks/overhead.py`` compares it with ``log_softmax`` + gather and with TRL's
    ``selective_log_softmax`` (docs/benchmarks.md).
    """
    ops = backend_for(logits=logits, labels=labels, mask=mask)
    check.check_logits_labels(ops, logits, labels, mask)
    check.check_chunk_size(chunk_size)
    ignore_index = check.integer("ignore_index", ignore_index)
    if gate is not None:
        gate = check.require_gate(gate)
        if gate.granularity != "token":
            raise ValueError(
                "token_logps gates per token only (Gate(granularity='token')); an "
                "'example'-granularity gate belongs to the loss: pass it to "
                "gategrad.preference_loss(gate=...) or gate the rejected rows with "
                "gategrad.gate_rejected"
            )
    if shift:
        if logits.shape[1] < 2:
            raise ValueError(
                f"shift=True needs at least 2 positions (T >= 2), got T = {logits.shape[1]}"
            )
        logits = logits[:, :-1]
        labels = labels[:, 1:]
        mask = None if mask is None else mask[:, 1:]
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & ops.bool_mask(mask)
    batch, length, vocab = (int(n) for n in logits.shape)
    valid = check.valid_labels(ops, labels, valid, vocab, ignore_index)
    cdtype = ops.compute_dtype(logits)
    if batch == 0:  # an empty batch (T = 0 is refused above): empty (0, T), still connected
        return ops.sum(ops.astype(logits, cdtype), axis=-1) * 0.0, valid
    safe = ops.as_index(ops.where(valid, labels, 0))
    plan = _plan(batch, length, vocab, chunk_size)
    logps = ops.token_logps(logits, safe, cdtype, plan, chunk_size is not None)
    logps = ops.where(valid, logps, 0.0)
    if gate is not None:
        logps = gate_rejected(logps, gate, valid)
    return logps, valid
