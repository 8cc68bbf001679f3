"""The lab's configuration: one JSON-serialisable dataclass that reproduces a run.

``config.json`` in the output directory holds :meth:`LabConfig.to_dict` with every default
resolved; ``gategrad lab --config path/to/config.json`` runs it again.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import BASE_LOSSES, GateParams, build_methods, canonical_loss

__all__ = ["MODEL_DEFAULTS", "LabConfig", "Settled", "ToyOptions", "TransformerOptions"]

MODELS: tuple[str, ...] = ("toy", "transformer")
TRANSFORMER_BACKENDS: tuple[str, ...] = ("torch", "jax", "mlx")


@dataclass
class ToyOptions:
    """The shared-feature softmax toy (NumPy, closed-form gradients, full-batch steps).

    ``n_train`` training contexts and ``n_heldout`` held-out ones, unit vectors in ``dim``
    dimensions sharing one common direction with weight ``shared`` (``c_i . c_j ~ shared^2``); a
    random teacher softmax (logit scale ``teacher_scale``) labels them: the chosen class is
    sampled from the teacher, the rejected class uniformly among the others. ``n_probes`` sets
    of uniformly random labels on the held-out contexts are the unrelated probes. SFT: the
    policy is distilled from the teacher for ``sft_steps`` full-batch Adam steps (lr 0.05).
    ``optimizer`` of the preference phase: ``adam`` (default; the same for every loss) or
    ``sgd`` (plain gradient descent, as in Ren & Sutherland's analysis; IPO and Cal-DPO need a
    small ``--lr`` with it).
    """

    vocab: int = 16
    dim: int = 8
    n_train: int = 32
    n_heldout: int = 32
    n_probes: int = 5
    shared: float = 0.8
    teacher_scale: float = 2.0
    sft_steps: int = 300
    optimizer: str = "adam"


@dataclass
class TransformerOptions:
    """The tiny decoder-only transformer on a synthetic topic-Markov language.

    Language: ``n_topics`` topics, each a Markov chain over ``n_content`` content tokens with
    Dirichlet(``concentration``) transition rows (small = low entropy). A sequence is
    ``[BOS, TOPIC, x_1..x_prompt_len, SEP, y_1..y_response_len]``.
    SFT: ``sft_steps`` Adam steps (``sft_lr``) on fresh samples, ``sft_batch`` per step.
    Preference data: ``n_pairs`` training pairs (chosen: a sample of the language; rejected:
    uniformly random content tokens), ``batch_size`` pairs per step; ``n_heldout`` held-out pairs
    and five probe sets of ``n_probe`` sequences each for evaluation.
    """

    n_topics: int = 4
    n_content: int = 17
    concentration: float = 0.1
    prompt_len: int = 2
    response_len: int = 6
    d_model: int = 32
    n_heads: int = 2
    n_layers: int = 2
    d_ff: int = 64
    sft_steps: int = 200
    sft_lr: float = 1e-2
    sft_batch: int = 64
    n_pairs: int = 768
    batch_size: int = 32
    n_heldout: int = 64
    n_probe: int = 32
    dtype: str = "float32"
    threads: int = 1


#: Model-dependent defaults of the shared fields.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "toy": {"backend": "numpy", "steps": 300, "lr": 1e-2, "eval_every": 15},
    "transformer": {"backend": "torch", "steps": 120, "lr": 1e-3, "eval_every": 20},
}


@dataclass(frozen=True)
class Settled:
    """The fields of a resolved :class:`LabConfig` that have model-dependent defaults."""

    backend: str
    steps: int
    lr: float
    eval_every: int
    out_dir: str


@dataclass
class LabConfig:
    """Everything a lab run depends on. ``None`` fields take the model's default.

    ``losses``: base losses (``dpo``/``sigmoid``, ``ipo``, ``cal_dpo``, ``dpo_shift``, ...);
    ``gates``: gate kinds per loss (``none``, ``seq``, ``q10``, ``token``, ``zero``); ``alpha``,
    ``tau``: the paper's sigmoid gate; ``log_tau``, ``temperature``: the per-token log-space gate;
    ``dpo_shift_lam``: DPO-Shift's fixed lambda.
    """

    model: str = "toy"
    backend: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int | None = None
    lr: float | None = None
    beta: float = 0.1
    losses: list[str] = field(default_factory=lambda: list(BASE_LOSSES))
    gates: list[str] = field(default_factory=lambda: ["none", "seq", "q10", "token"])
    alpha: float | None = None
    tau: float | None = None
    log_tau: float | None = None
    temperature: float | None = None
    dpo_shift_lam: float = 0.95
    eval_every: int | None = None
    out_dir: str | None = None
    toy: ToyOptions = field(default_factory=ToyOptions)
    transformer: TransformerOptions = field(default_factory=TransformerOptions)

    def resolved(self) -> LabConfig:
        """A copy with model defaults, canonical loss names and gate defaults filled in."""
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        d = MODEL_DEFAULTS[self.model]
        out = dataclasses.replace(self)
        for name in ("backend", "steps", "lr", "eval_every"):
            if getattr(out, name) is None:
                setattr(out, name, d[name])
        if self.model == "toy" and out.backend != MODEL_DEFAULTS["toy"]["backend"]:
            raise ValueError(
                f"the toy model runs on the {MODEL_DEFAULTS['toy']['backend']} backend only "
                f"(got {out.backend!r}); use --model transformer for {TRANSFORMER_BACKENDS}"
            )
        if self.model == "transformer" and out.backend not in TRANSFORMER_BACKENDS:
            raise ValueError(
                f"--model transformer needs --backend one of {TRANSFORMER_BACKENDS}, "
                f"got {out.backend!r}"
            )
        if out.out_dir is None:
            out.out_dir = f"gategrad-lab/{self.model}-{out.backend}"
        out.losses = [canonical_loss(x) for x in self.losses]
        gp = GateParams(self.alpha, self.tau, self.log_tau, self.temperature).resolved()
        out.alpha, out.tau, out.log_tau, out.temperature = (
            gp.alpha,
            gp.tau,
            gp.log_tau,
            gp.temperature,
        )
        out.seeds = [int(s) for s in self.seeds]
        if not out.seeds:
            raise ValueError("seeds must not be empty")
        r = out.settled()
        if r.steps < 1 or r.eval_every < 1:
            raise ValueError("steps and eval_every must be >= 1")
        if not (r.lr > 0 and out.beta > 0):
            raise ValueError("lr and beta must be > 0")
        self.methods_of(out)  # validates losses and gates
        return out

    def settled(self) -> Settled:
        """The model-dependent fields of a :meth:`resolved` config, typed as set."""
        values = {n: getattr(self, n) for n in ("backend", "steps", "lr", "eval_every", "out_dir")}
        unset = sorted(n for n, v in values.items() if v is None)
        if unset:
            raise ValueError(f"{unset} unset: call LabConfig.resolved() first")
        return Settled(
            backend=str(values["backend"]),
            steps=int(values["steps"]),
            lr=float(values["lr"]),
            eval_every=int(values["eval_every"]),
            out_dir=str(values["out_dir"]),
        )

    @staticmethod
    def methods_of(cfg: LabConfig) -> list:
        gp = GateParams(cfg.alpha, cfg.tau, cfg.log_tau, cfg.temperature)
        return build_methods(
            cfg.losses, cfg.gates, gp, {"dpo_shift": {"lam": float(cfg.dpo_shift_lam)}}
        )

    def methods(self) -> list:
        """The :class:`~gategrad.lab.methods.Method` list of this config."""
        return self.methods_of(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        toy = ToyOptions(**data.pop("toy", {}))
        tr = TransformerOptions(**data.pop("transformer", {}))
        return cls(toy=toy, transformer=tr, **data)

    @classmethod
    def load(cls, path: str | Path) -> LabConfig:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return cls.from_dict(data.get("config", data))
