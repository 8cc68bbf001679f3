"""The lab's configuration: one JSON-serialisable dataclass that reproduces a run.

``config.json`` in the output directory holds :meth:`LabConfig.to_dict` with every default
resolved; ``gategrad lab --config path/to/config.json`` runs it again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import BASE_LOSSES, GateParams, build_methods, canonical_loss

__all__ = ["MODEL_DEFAULTS", "LabConfig", "Settled", "ToyOptions", "TransformerOptions"]

MODELS: tuple[str, ...] = ("toy", "transformer")
TRANSFORMER_BACKENDS: tuple[str, ...] = ("torch", "jax", "mlx")
#: ``standard``: SFT on the language (transformer) / the teacher (toy); ``extended``: the same
#: steps, plus the training pairs' chosen and rejected responses (Ren & Sutherland's fix).
SFT_MODES: tuple[str, ...] = ("standard", "extended")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_int(name: str, value: Any, low: int) -> None:
    """``ValueError`` unless ``value`` is an int ``>= low`` (``name``: the option's name)."""
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_float(
    name: str, value: Any, low: float = 0.0, high: float = math.inf, *, low_open: bool = True
) -> None:
    """``ValueError`` unless ``value`` is a finite number in ``(low, high]`` (``[low, high]``
    with ``low_open=False``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        left = "(" if low_open else "["
        right = "]" if math.isfinite(high) else ")"
        raise ValueError(
            f"{name} must be a finite number in {left}{low:g}, {high:g}{right}, got {value!r}"
        )


def _options(sub: Any, key: str, kind: type) -> dict[str, Any]:
    """The ``key`` object of a config file, checked against the fields of ``kind``."""
    if not isinstance(sub, dict):
        raise ValueError(f"config key {key!r} must be an object, got {sub!r}")
    bad = sorted(set(sub) - {f.name for f in dataclasses.fields(kind)})
    if bad:
        raise ValueError(f"unknown config keys {[f'{key}.{b}' for b in bad]}")
    return sub


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
    small ``--lr`` with it). ``response_len``: tokens per response; every response position
    has its own context vector, so the ``seq`` (geometric mean), ``q10`` and per-token gates
    see different probabilities.
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
    response_len: int = 4

    def check(self) -> None:
        for name in ("vocab", "dim", "n_train", "n_heldout", "n_probes", "response_len"):
            check_int(f"toy.{name}", getattr(self, name), 2 if name == "vocab" else 1)
        check_int("toy.sft_steps (--sft-steps)", self.sft_steps, 0)
        check_float("toy.shared", self.shared, 0.0, 1.0, low_open=False)
        check_float("toy.teacher_scale", self.teacher_scale, 0.0, low_open=False)
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"toy.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")


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

    def check(self) -> None:
        flags = {"n_pairs": "--pairs", "batch_size": "--batch-size", "d_model": "--d-model",
                 "n_layers": "--layers", "threads": "--threads"}  # fmt: skip
        for name in ("n_topics", "n_content", "prompt_len", "response_len", "d_model",
                     "n_heads", "n_layers", "d_ff", "sft_batch", "n_pairs", "batch_size",
                     "n_heldout", "n_probe", "threads"):  # fmt: skip
            flag = f" ({flags[name]})" if name in flags else ""
            check_int(f"transformer.{name}{flag}", getattr(self, name), 1)
        check_int("transformer.sft_steps (--sft-steps)", self.sft_steps, 0)
        check_float("transformer.concentration", self.concentration)
        check_float("transformer.sft_lr", self.sft_lr)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"transformer.d_model (--d-model) must be a multiple of n_heads={self.n_heads}, "
                f"got {self.d_model}"
            )
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"transformer.dtype must be float32 or float64, got {self.dtype!r}")


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
    ``dpo_shift_lam``: DPO-Shift's fixed lambda; ``sft``: one of :data:`SFT_MODES`.
    """

    model: str = "toy"
    backend: str | None = None
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int | None = None
    lr: float | None = None
    beta: float = 0.1
    losses: list[str] = field(default_factory=lambda: list(BASE_LOSSES))
    gates: list[str] = field(default_factory=lambda: ["none", "seq", "q10", "token", "zero"])
    alpha: float | None = None
    tau: float | None = None
    log_tau: float | None = None
    temperature: float | None = None
    dpo_shift_lam: float = 0.95
    sft: str = "standard"
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
        if not isinstance(self.seeds, (list, tuple)) or not self.seeds:
            raise ValueError(f"seeds (--seeds) must be a non-empty list, got {self.seeds!r}")
        for seed in self.seeds:
            check_int("every seed (--seeds)", seed, 0)
        out.seeds = [int(s) for s in self.seeds]
        check_int("steps (--steps)", out.steps, 1)
        check_int("eval_every (--eval-every)", out.eval_every, 1)
        check_float("lr (--lr)", out.lr)
        check_float("beta (--beta)", out.beta)
        check_float("dpo_shift_lam (--dpo-shift-lam)", out.dpo_shift_lam, 0.0, 1.0)
        if out.sft not in SFT_MODES:
            raise ValueError(f"sft (--sft) must be one of {SFT_MODES}, got {out.sft!r}")
        for name in ("alpha", "tau", "log_tau", "temperature"):
            check_float(f"{name} (--{name.replace('_', '-')})", getattr(out, name))
        out.toy.check()
        out.transformer.check()
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
        toy = ToyOptions(**_options(data.pop("toy", {}), "toy", ToyOptions))
        tr = TransformerOptions(
            **_options(data.pop("transformer", {}), "transformer", TransformerOptions)
        )
        return cls(toy=toy, transformer=tr, **data)

    @classmethod
    def load(cls, path: str | Path) -> LabConfig:
        """Read a ``config.json`` (or a ``results.json``, whose ``config`` it takes).

        Raises:
            ValueError: the file is not JSON, or not a lab configuration (the message names
                the file); OSError: it cannot be read.
        """
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except ValueError as err:  # json.JSONDecodeError, UnicodeDecodeError
                raise ValueError(f"{path} is not a JSON file: {err}") from None
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            data = data["config"]
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object (a lab config.json)")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
