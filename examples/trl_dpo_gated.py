"""Gate TRL's DPOTrainer in one call: a tiny Llama, offline, on a CPU, in seconds.

    python examples/trl_dpo_gated.py            # 20 steps
    python examples/trl_dpo_gated.py --quick    # 2 steps (what tests/test_examples.py runs)

Everything is built in code, so nothing is downloaded: a word-level tokenizer, a random-init
``LlamaForCausalLM`` from a ``LlamaConfig`` and a small preference dataset (prompt, chosen,
rejected). ``attach(trainer, Gate())`` installs the paper's gate on the policy; training is
TRL's own, and TRL's logs gain ``gate/mean``, ``gate/min``, ``gate/p_mean`` and
``gate/frac_below_half``. Needs the ``trl`` extra (``pip install ".[trl]"`` from a clone).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach the Hub

import datasets
import tokenizers
import torch
import transformers
from trl import DPOConfig, DPOTrainer

from gategrad import Gate
from gategrad.integrations.trl import attach

WORDS = "the a cat dog sat ran on mat fast slow red blue big small yes no good bad".split()
PAIRS = [  # (prompt, chosen, rejected)
    ("the cat", " sat on the mat", " ran"),
    ("a dog", " ran fast", " sat slow on a big red mat"),
    ("the red mat", " is good", " no"),
    ("big blue", " yes", " bad dog ran"),
    ("a small cat", " sat on a mat", " ran fast"),
    ("the dog", " is good", " is bad"),
    ("red", " mat", " cat sat slow"),
    ("blue", " cat", " a big dog"),
]


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over ``WORDS``, built in code."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def make_model(vocab_size: int, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A random-init two-layer Llama (hidden size 32) from a config."""
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def main(steps: int) -> None:
    datasets.disable_progress_bars()
    tokenizer = make_tokenizer()
    pairs = datasets.Dataset.from_dict(
        {
            "prompt": [p for p, _, _ in PAIRS],
            "chosen": [c for _, c, _ in PAIRS],
            "rejected": [r for _, _, r in PAIRS],
        }
    )
    policy = make_model(len(tokenizer))
    ref_model = copy.deepcopy(policy)  # the frozen reference: the policy at the start
    with tempfile.TemporaryDirectory() as out_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's and transformers' notices about the toy setup
        config = DPOConfig(
            output_dir=out_dir,
            max_steps=steps,
            per_device_train_batch_size=4,
            learning_rate=5e-3,
            beta=0.1,
            logging_steps=1,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = DPOTrainer(
            model=policy,
            ref_model=ref_model,
            args=config,
            train_dataset=pairs,
            processing_class=tokenizer,
        )
        attachment = attach(trainer, Gate())  # the paper's gate; .remove() undoes it
        trainer.train()
    attachment.remove()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == steps and all("gate/mean" in h for h in logs), "no gate metrics logged"
    for h in logs:
        print(
            f"step {h['step']:3d}  loss {h['loss']:.4f}  "
            f"margin {h['rewards/margins']:+.4f}  gate/mean {h['gate/mean']:.3f}  "
            f"gate/p_mean {h['gate/p_mean']:.3g}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps (the tests' run)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    main(2 if args.quick else args.steps)
