"""Gate mlx-lm-lora's DPO training in one call: [`train_dpo`][].

```python
from mlx_lm_lora.trainer.dpo_trainer import DPOTrainingArgs
from gategrad import Gate
from gategrad.integrations import mlx_lm_lora as gml

args = DPOTrainingArgs(batch_size=4, iters=100, beta=0.1)
gml.train_dpo(model, ref_model, optimizer, train_set, valid_set,
              args=args, loss_type="sigmoid", gate=Gate())
```

[`train_dpo`][gategrad.integrations.mlx_lm_lora.train_dpo] takes the arguments of
`mlx_lm_lora.trainer.dpo_trainer.train_dpo`, plus `gate=`, and runs that trainer unchanged:
its batch iterator, its `mx.compile`-d step, its loss (`loss_fn=`, by default mlx-lm-lora's
`dpo_loss`, with every loss type: `sigmoid`, `hinge`, `ipo`, `dpop`), gradient accumulation,
distributed gradient averaging, evaluation, reports and checkpoints.

What it changes, while the call runs:

- `dpo_trainer.get_token_scores`, which scores each response per token (`(B, T-1)` log-probs,
  zero outside the response), is wrapped so that the policy's scores of the rejected
  responses are kept;
- the loss receives the rejected score recomputed by mlx-lm-lora's own `compute_score` from
  [`gate_rejected`][gategrad.gate_rejected] of those per-token scores. Its value is bitwise the
  same; its gradient is multiplied by the gate `g`, per response or per token, with every
  estimator (`seq`, `mean`, `min`, `qNN`) and both granularities.

The rejected responses are the ones whose mask array is the `rejected_masks` the trainer
passes to its loss (the trainer scores chosen and rejected responses in separate calls). The
reference model's scores are never touched (they are under `stop_gradient` in the trainer).

It refuses, with `ValueError`, what it cannot gate correctly: `args.seq_step_size` (the
chunked long-sequence step scores chunks of a response and takes the gradient through its own
per-row weights) and an unknown `loss_type` for mlx-lm-lora's `dpo_loss`. As a last line of
defence, a loss evaluation for which the policy's rejected scores were never seen raises
`RuntimeError` instead of training ungated.

Not logged: mlx-lm-lora's training loop accumulates a fixed set of metric names, so the gate's
statistics cannot be added to its reports; compute them with
[`gate_weights`][gategrad.gate_weights] on a batch when needed.

On Linux (MLX's CPU build), mlx-lm-lora 5.10's `train_dpo` raises `KeyError` before training:
it reads `mx.device_info()["max_recommended_working_set_size"]`, which only Metal reports.
The tests supply that key and run `train_dpo` itself on the CPU; on Apple Silicon nothing is
needed. Tested with mlx-lm-lora 5.10; see `TESTED_MLX_LM_LORA`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from .._gate import Gate
from .._validate import require_gate

__all__ = ["LOSS_TYPES", "TESTED_MLX_LM_LORA", "GatedScoring", "gated_scoring", "train_dpo"]

#: The mlx-lm-lora versions the integration tests run against (inclusive, exclusive).
TESTED_MLX_LM_LORA = ("5.10", "5.11")
#: The loss types of mlx-lm-lora's ``dpo_loss``.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "dpop")


def _dpo_trainer() -> Any:
    """``mlx_lm_lora.trainer.dpo_trainer``; ``ImportError`` naming the extra when missing."""
    try:
        import mlx_lm_lora
        from mlx_lm_lora.trainer import dpo_trainer
    except ImportError as err:
        raise ImportError(
            "gategrad.integrations.mlx_lm_lora needs mlx-lm-lora: "
            "pip install 'gategrad[mlx-lm-lora]'"
        ) from err
    from packaging.version import Version

    version = Version(str(mlx_lm_lora.__version__).split("+")[0])
    lo, hi = (Version(v) for v in TESTED_MLX_LM_LORA)
    if not lo <= version < hi:
        warnings.warn(
            f"gategrad.integrations.mlx_lm_lora is tested with mlx-lm-lora "
            f">={TESTED_MLX_LM_LORA[0]},<{TESTED_MLX_LM_LORA[1]}; found {version}. A "
            "training step whose rejected scores are not seen still raises RuntimeError.",
            stacklevel=3,
        )
    return dpo_trainer


class GatedScoring:
    """The gated scoring of one policy: a wrapped ``get_token_scores`` and a wrapped loss.

    Made by [`gated_scoring`][]; while installed (``install()``, or as a context manager)
    ``mlx_lm_lora.trainer.dpo_trainer.get_token_scores`` is [`get_token_scores`][].
    Pass [`loss_fn`][] as the trainer's ``loss_fn=``.

    Attributes:
        model: the policy (only its scores are gated).
        gate: the [`Gate`][gategrad.Gate].
        inner_loss_fn: the loss that receives the gated rejected score (default: mlx-lm-lora's
            `dpo_loss`).
    """

    def __init__(self, model: Any, gate: Gate, inner_loss_fn: Callable[..., Any]) -> None:
        self._dt = _dpo_trainer()
        self.model = model
        self.gate = gate
        self.inner_loss_fn = inner_loss_fn
        self._original: Callable[..., Any] | None = None
        # id(mask) -> (mask, the policy's per-token scores), since the last loss evaluation
        self._scores: dict[int, tuple[Any, Any]] = {}

    # -- the two wrappers -------------------------------------------------------------------

    def get_token_scores(self, model: Any, x: Any, mask: Any, cache: Any = None) -> Any:
        """mlx-lm-lora's ``get_token_scores``; keeps the policy's ``(B, T-1)`` scores per mask.

        The first scores seen for a mask array are kept (the trainer scores the policy before
        the reference, which may be the same model object).
        """
        original = self._original or self._dt.get_token_scores
        scores = original(model, x, mask, cache=cache)
        if model is self.model and id(mask) not in self._scores:
            self._scores[id(mask)] = (mask, scores)
        return scores

    def loss_fn(
        self,
        policy_chosen_score: Any,
        policy_rejected_score: Any,
        reference_chosen_score: Any,
        reference_rejected_score: Any,
        chosen_masks: Any,
        rejected_masks: Any,
        beta: float,
        delta: float,
        loss_type: str = "sigmoid",
    ) -> Any:
        """The trainer's loss with the rejected score replaced by its gated recomputation.

        Args and returns as mlx-lm-lora's ``dpo_loss`` (the inner loss's return value).

        Raises:
            RuntimeError: if the policy's per-token scores of ``rejected_masks``'s responses
                were not seen (the scoring wrapper is not installed, or the trainer scored
                them some other way).
        """
        import mlx.core as mx

        from .._core import gate_rejected

        entry = self._scores.get(id(rejected_masks))
        self._scores.clear()
        if entry is None or entry[0] is not rejected_masks:
            raise RuntimeError(
                "gategrad: the policy's per-token scores of the rejected responses were never "
                "seen, so nothing would be gated. Run the trainer through "
                "gategrad.integrations.mlx_lm_lora.train_dpo (or inside gated_scoring(...)), "
                "and check that the installed mlx-lm-lora scores responses with "
                "dpo_trainer.get_token_scores"
            )
        scores = entry[1]
        response = rejected_masks[:, 1:].astype(mx.bool_)
        gated = gate_rejected(scores, self.gate, response)
        gated_score = self._dt.compute_score(gated, rejected_masks, loss_type)
        return self.inner_loss_fn(
            policy_chosen_score=policy_chosen_score,
            policy_rejected_score=gated_score,
            reference_chosen_score=reference_chosen_score,
            reference_rejected_score=reference_rejected_score,
            chosen_masks=chosen_masks,
            rejected_masks=rejected_masks,
            beta=beta,
            delta=delta,
            loss_type=loss_type,
        )

    # -- installation -----------------------------------------------------------------------

    def install(self) -> GatedScoring:
        """Replace ``dpo_trainer.get_token_scores`` by [`get_token_scores`][]."""
        current = self._dt.get_token_scores
        if isinstance(getattr(current, "__self__", None), GatedScoring):
            raise ValueError(
                "a gated scoring is already installed in mlx_lm_lora's dpo_trainer; "
                "call .remove() on it first"
            )
        self._original = current
        self._dt.get_token_scores = self.get_token_scores
        return self

    def remove(self) -> None:
        """Restore ``dpo_trainer.get_token_scores``."""
        if self._original is not None:
            self._dt.get_token_scores = self._original
            self._original = None
        self._scores.clear()

    def __enter__(self) -> GatedScoring:
        return self.install() if self._original is None else self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def gated_scoring(
    model: Any, gate: Gate | None = None, *, loss_fn: Callable[..., Any] | None = None
) -> GatedScoring:
    """The gated scoring of ``model``, for loops that call mlx-lm-lora's functions themselves.

    ```python
    with gated_scoring(model, Gate()) as gs:
        train_dpo(model, ref, opt, data, args=args, loss_fn=gs.loss_fn)  # mlx-lm-lora's
    ```

    Args:
        model: the policy being trained.
        gate: the [`Gate`][gategrad.Gate]; default `Gate()` (the paper's sigmoid gate).
        loss_fn: the loss to gate, with the signature of mlx-lm-lora's `dpo_loss`
            (default: `dpo_loss`).

    Returns:
        A [`GatedScoring`][gategrad.integrations.mlx_lm_lora.GatedScoring], not yet
        installed: use it as a context manager, or call `install()` and `remove()`.

    Raises:
        TypeError: if `gate` is not a `Gate`.
        ImportError: if mlx-lm-lora is not installed.
    """
    gate = require_gate(Gate() if gate is None else gate)
    dt = _dpo_trainer()
    return GatedScoring(model, gate, dt.dpo_loss if loss_fn is None else loss_fn)


def train_dpo(
    model: Any,
    ref_model: Any,
    optimizer: Any,
    train_dataset: Any,
    val_dataset: Any | None = None,
    args: Any | None = None,
    loss_fn: Callable[..., Any] | None = None,
    training_callback: Any | None = None,
    loss_type: str = "sigmoid",
    *,
    gate: Gate | None = None,
) -> Any:
    """mlx-lm-lora's ``train_dpo`` with the rejected responses' gradient gated.

    Args:
        model: the policy (an mlx-lm model, with or without LoRA adapters).
        ref_model: the frozen reference model, or `None` (reference scores of 0).
        optimizer: an `mlx.optimizers` optimizer.
        train_dataset: mlx-lm-lora's DPO dataset (rows with `chosen`, `rejected` token ids
            and `chosen_prompt_length`, `rejected_prompt_length`).
        val_dataset: optional validation set, as `train_dataset`.
        args: `DPOTrainingArgs` (default: mlx-lm-lora's defaults).
        loss_fn: the loss, with the signature of mlx-lm-lora's `dpo_loss` (default).
        training_callback: mlx-lm's `TrainingCallback`, passed on.
        loss_type: `'sigmoid'`, `'hinge'`, `'ipo'` or `'dpop'` (mlx-lm-lora's `dpo_loss`).
        gate: the [`Gate`][gategrad.Gate]; default `Gate()`.

    Returns:
        What mlx-lm-lora's `train_dpo` returns (`None` in 5.10); `model` is trained in place.

    Raises:
        ValueError: for `args.seq_step_size` (the chunked step cannot be gated) or an
            unknown `loss_type` with the default loss.
        TypeError: if `gate` is not a `Gate`.
    """
    gate = require_gate(Gate() if gate is None else gate)
    dt = _dpo_trainer()
    args = dt.DPOTrainingArgs() if args is None else args
    if getattr(args, "seq_step_size", None) is not None:
        raise ValueError(
            "gategrad cannot gate mlx-lm-lora's chunked long-sequence step: with "
            f"seq_step_size={args.seq_step_size} the trainer scores chunks of each response "
            "and takes the gradient through its own per-row weights. Set seq_step_size=None"
        )
    if loss_fn is None and loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES} for dpo_loss, got {loss_type!r}")
    with GatedScoring(model, gate, dt.dpo_loss if loss_fn is None else loss_fn) as gs:
        return dt.train_dpo(
            model,
            ref_model,
            optimizer,
            train_dataset,
            val_dataset,
            args=args,
            loss_fn=gs.loss_fn,
            training_callback=training_callback,
            loss_type=loss_type,
        )
