"""Per-token log-probs straight from the last hidden state and the output head, in tiles: the
checks and the plan, written once; each backend's
:meth:`~gategrad._backend.Backend.fused_linear_logps` kernel does the arithmetic."""

from __future__ import annotations

from . import _validate as check
from ._backend import Array
from ._core import gate_rejected
from ._dispatch import backend_for
from ._gate import Gate

__all__ = ["fused_token_logps"]

#: Positions per tile when ``chunk_size`` is ``None``.
TILE_ROWS = 2048
#: The most logits one tile holds (``rows * cols``): 4 Mi elements, 16 MiB of float32. The
#: vocabulary width of a tile is ``TILE_ELEMENTS // rows`` (a multiple of 128, at most ``V``).
TILE_ELEMENTS = 1 << 22


def tile_plan(positions: int, vocab: int, chunk_size: int | None) -> tuple[int, int]:
    """``(rows, cols)`` of one tile: ``rows`` positions (``chunk_size``, or
    :data:`TILE_ROWS`) by ``cols`` vocabulary entries, so that ``rows * cols`` stays within
    :data:`TILE_ELEMENTS` (``cols`` a multiple of 128 where the vocabulary is wider)."""
    rows = max(1, min(positions, TILE_ROWS if chunk_size is None else chunk_size))
    cols = max(1, TILE_ELEMENTS // rows)
    if cols < vocab:
        cols = max(128, cols // 128 * 128)
    return rows, min(cols, vocab)


def fused_token_logps(
    hidden: Array,
    weight: Array,
    labels: Array,
    mask: Array | None = None,
    *,
    bias: Array | None = None,
    shift: bool = True,
    ignore_index: int = -100,
    gate: Gate | None = None,
    chunk_size: int | None = None,
) -> tuple[Array, Array]:
    """Per-token log-probs ``log_softmax(hidden @ weight.T + bias)[labels]`` without the logits.

    The result equals ``token_logps(hidden @ weight.T + bias, labels, mask, shift=shift,
    ignore_index=ignore_index, gate=gate)``, but no ``(B, T, V)`` array exists in the forward
    or the backward: the logits are computed in tiles of ``rows`` positions by ``cols``
    vocabulary entries (:func:`tile_plan`), with a running log-sum-exp across the vocabulary
    tiles; the backward recomputes each tile and turns it in place into
    ``g * (onehot(label) - softmax)``, from which it accumulates the gradients of ``hidden``,
    ``weight`` and ``bias`` (in place where the framework allows).

    | framework | kernel |
    |---|---|
    | torch | a `torch.autograd.Function` (eager, `torch.compile`, `torch.func`, checkpointing) |
    | JAX | a `jax.custom_vjp` over `lax.fori_loop` tiles (`jit`, `vmap`, `grad`, sharding) |
    | MLX | an `mx.custom_function` (`mx.grad`, `mx.compile`) |
    | NumPy | the reference: the same tiles, forward only |

    Low precision (bfloat16/float16): the matmuls run in the input dtype, the log-sum-exp and
    the softmax in float32, and the gradients are accumulated in float32 across tiles.

    Args:
        hidden: ``(B, T, D)`` floating, the last hidden state (before the output head).
        weight: ``(V, D)`` the output head's weight (``nn.Linear`` layout), dtype of ``hidden``.
        labels: ``(B, T)`` integer token ids in ``[0, V)``; positions equal to ``ignore_index``
            do not count.
        mask: optional ``(B, T)`` mask aligned with ``labels`` (nonzero = counts).
        bias: optional ``(V,)`` bias of the head, dtype of ``hidden``.
        shift: ``True`` (causal LM): ``hidden[:, :-1]`` predict ``labels[:, 1:]`` and the
            outputs are ``(B, T - 1)``; ``False``: already aligned, outputs ``(B, T)``.
        ignore_index: the label value that marks positions to ignore.
        gate: optional token-granularity :class:`gategrad.Gate` for rejected responses, as in
            :func:`gategrad.token_logps`.
        chunk_size: positions per tile. ``None``: :data:`TILE_ROWS`. The vocabulary width of a
            tile follows from :data:`TILE_ELEMENTS`.

    Returns:
        ``(logps, mask)`` as :func:`gategrad.token_logps` returns them: the per-token log-probs
        in ``promote_types(hidden.dtype, float32)``, ``0`` where the position does not count,
        and the boolean mask used.

    Raises:
        ValueError: wrong shapes, a bad ``chunk_size``, an ``'example'`` gate, or (eager) a
            counted label outside ``[0, V)``.
        TypeError: a non-floating ``hidden``, ``weight``/``bias`` of another dtype, float labels.

    Under tracing (``jax.jit``, ``torch.compile``, ``mx.compile``, ``vmap``) labels outside
    ``[0, V)`` cannot be checked: they count as ignored (``0``, excluded from the returned
    mask), never NaN.
    """
    ops = backend_for(hidden=hidden, weight=weight, bias=bias, labels=labels, mask=mask)
    check.check_linear_head(ops, hidden, weight, bias, labels, mask)
    check.check_chunk_size(chunk_size)
    if gate is not None:
        gate = check.require_gate(gate)
        if gate.granularity != "token":
            raise ValueError(
                "fused_token_logps gates per token only (Gate(granularity='token')); an "
                "'example'-granularity gate belongs to the loss: pass it to "
                "gategrad.preference_loss(gate=...)"
            )
    batch, length, dim = (int(n) for n in hidden.shape)
    vocab = int(weight.shape[0])
    if shift:
        if length < 2:
            raise ValueError(f"shift=True needs at least 2 positions (T >= 2), got T = {length}")
        labels = labels[:, 1:]
        mask = None if mask is None else mask[:, 1:]
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & ops.bool_mask(mask)
    outside = valid & ((labels < 0) | (labels >= vocab))
    check.check_label_range(ops, outside, vocab, ignore_index)
    valid = valid & ~outside  # traced: out-of-range labels count as ignored
    safe = ops.as_index(ops.where(valid, labels, 0))
    if shift:  # score every position of hidden (a view, no copy) and drop the last one
        safe = ops.concatenate([safe, safe[:, :1] * 0], axis=1)
    flat = ops.reshape(hidden, (batch * length, dim))
    rows, cols = tile_plan(batch * length, vocab, chunk_size)
    cdtype = ops.compute_dtype(hidden)
    logps = ops.fused_linear_logps(
        flat, weight, bias, ops.reshape(safe, (batch * length,)), cdtype, (rows, cols)
    )
    logps = ops.reshape(logps, (batch, length))
    if shift:
        logps = logps[:, :-1]
    logps = ops.where(valid, logps, 0.0)
    if gate is not None:
        logps = gate_rejected(logps, gate, valid)
    return logps, valid
