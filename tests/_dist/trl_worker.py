"""TRL worker of tests/test_distributed_engines.py: one gated DPOTrainer step, offline, on CPU.

    accelerate launch --config_file CONFIG --num_processes 2 tests/_dist/trl_worker.py OUT_DIR
    python tests/_dist/trl_worker.py OUT_DIR          # the single-process reference

The global batch is the whole dataset, 4 pairs, in micro-batches of 2: one per process under
accelerate (DDP over gloo), or both in one process with 2 gradient-accumulation steps. (One
process with a batch of 4 pads the batch to another length, which moves plain TRL's gradients
by up to 5e-3 relative on this model, gategrad or not; the micro-batches keep the padding the
ranks see, so the comparison isolates the distribution.) Three trainers run one step each:
plain TRL, TRL gated with ``gategrad.integrations.trl.attach`` and gate 1, and gated with a gate
that engages. The main process saves, per trainer, the logged loss and gate metrics, the
gradients right before the optimizer step (averaged over processes by DDP; SGD, no clipping)
and the parameters after it.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from _backends import tiny_llama  # noqa: E402  (tests/ is on PYTHONPATH)

from gategrad import Gate  # noqa: E402
from gategrad.integrations.trl import attach  # noqa: E402

PAIRS = 4  # the global batch (the whole dataset, one step)
PER_DEVICE = 2
WORDS = "the a cat dog sat ran on mat fast slow red blue big small yes no good bad".split()
GATES = {
    "plain": None,
    "one": Gate(shape=lambda p: p * 0 + 1),
    # p (geometric mean of token probabilities) is about 1/20 here: this gate is in (0, 1)
    "gate": Gate(shape="sigmoid", alpha=40.0, tau=0.06),
}


def make_tokenizer() -> Any:
    import tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def make_dataset() -> Any:
    import datasets

    return datasets.Dataset.from_dict(
        {
            "prompt": ["the cat", "a dog", "the red mat", "big blue"],
            "chosen": [" sat on the mat", " ran fast", " is good", " yes"],
            "rejected": [" ran", " sat slow on a big red mat", " no", " bad dog ran"],
        }
    )


def make_model(vocab_size: int) -> Any:
    model = tiny_llama(
        vocab_size,
        hidden=32,
        layers=2,
        heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    with torch.no_grad():  # a perturbed init (seeded) so that rows' gates differ
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def make_reference(policy: Any) -> Any:
    """The policy, perturbed again (seeded): a reference unlike the policy, so losses != log 2."""
    ref = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ref


class GradCapture(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):  # noqa: ANN001
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def run(name: str, out_dir: str) -> dict[str, Any]:
    tok = make_tokenizer()
    policy = make_model(len(tok))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.DPOConfig(
            output_dir=os.path.join(out_dir, name),
            max_steps=1,
            per_device_train_batch_size=PER_DEVICE,
            # one process accumulates the micro-batches the two ranks hold (see the docstring)
            gradient_accumulation_steps=PAIRS // (PER_DEVICE * world),
            learning_rate=1e-2,
            max_grad_norm=0.0,  # no clipping: compare raw gradients
            optim="sgd",  # params after the step are p - lr * g (Adam would amplify rounding)
            logging_steps=1,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = trl.DPOTrainer(
            model=policy,
            ref_model=make_reference(policy),
            args=args,
            train_dataset=make_dataset(),
            processing_class=tok,
        )
    assert trainer.accelerator.num_processes == world, (trainer.accelerator.num_processes, world)
    capture = GradCapture()
    trainer.add_callback(capture)
    attachment = attach(trainer, GATES[name]) if GATES[name] is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    if attachment is not None:
        attachment.remove()
    (log,) = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "world": trainer.accelerator.num_processes,
        "log": {k: float(v) for k, v in log.items() if isinstance(v, (int, float))},
        "grads": capture.grads,
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
    }


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    results = {name: run(name, out_dir) for name in GATES}
    if int(os.environ.get("RANK", "0")) == 0:
        world = results["plain"]["world"]
        torch.save(results, os.path.join(out_dir, f"trl_world{world}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
