"""``gategrad lab``, ``gategrad lab sweep`` and ``gategrad lab scale``: argparse wiring.

Every numeric flag is parsed by a checking type (:func:`int_at_least`, :func:`finite_float`),
so ``--lr inf`` or ``--batch-size 0`` end as an argparse error naming the flag (exit code 2);
a config file or an output directory that cannot be used ends as one ``gategrad lab: error:``
line, also with exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

from gategrad._gate import SHAPE_DEFAULTS

from .config import MODEL_DEFAULTS, SFT_MODES, TRANSFORMER_BACKENDS, LabConfig
from .methods import GATE_KINDS, LOSS_LABELS

__all__ = ["add_lab_parser", "config_from_args", "finite_float", "int_at_least", "main_lab"]


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def finite_float(
    low: float = 0.0, high: float = math.inf, *, low_open: bool = True
) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in ``(low, high]`` (``[low, high]`` with
    ``low_open=False``)."""
    left = "(" if low_open else "["
    right = "]" if math.isfinite(high) else ")"
    where = f"in {left}{low:g}, {high:g}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low)
        if not ok or value > high:
            raise argparse.ArgumentTypeError(f"must be a finite number {where}, got {text!r}")
        return value

    parse.__name__ = f"number {where}"
    return parse


_POS_INT, _NONNEG_INT, _POS_FLOAT = int_at_least(1), int_at_least(0), finite_float()

_SIG, _LOG = SHAPE_DEFAULTS["sigmoid"], SHAPE_DEFAULTS["log_sigmoid"]

LAB_DESCRIPTION = """\
Reproduce the Gate-DPO protocol and watch squeezing happen.

With no arguments: the embedded toy (a shared-feature softmax classifier over 4-token
responses, NumPy only, closed-form gradients) for DPO, IPO, Cal-DPO and DPO-Shift, each
ungated, gated (paper's seq and q10 gates, our per-token log-space gate) and with the
g=0 baseline, 3 seeds. It takes seconds.

--model transformer --backend torch|jax|mlx runs the paper's protocol on a tiny
decoder-only transformer: a synthetic topic-Markov language, SFT warm-up, preference pairs
(chosen: on-distribution samples; rejected: off-policy uniformly random tokens), then every
loss x gate, with checkpoints on held-out chosen/rejected and five unrelated probe sets.

Outputs in --out: table.txt (the paper's table: Δ Chosen, Δ Rejected, Margin, Δ Others,
final top-1 mass and entropy, mean ± std over seeds), results.json (every checkpoint),
config.json (re-run it with --config), delta_chosen.png and mass_dynamics.png.
"""

LAB_EPILOG = """\
examples:
  gategrad lab                                     # toy, NumPy, seconds
  gategrad lab --model transformer --backend torch # the paper's protocol: ~2 min of CPU
  gategrad lab --model transformer --backend mlx --seeds 0   # one seed: MLX's CPU is slower
  gategrad lab --model transformer --backend jax --losses dpo --gates none seq token zero
  gategrad lab --gates none token --log-tau 1e-3   # try another per-token gate tau
  gategrad lab --config gategrad-lab/toy-numpy/config.json   # re-run a saved config
  gategrad lab --sft extended                      # SFT on chosen and rejected first
  gategrad lab sweep --model transformer           # the sweep behind the gate defaults
                                                   # (sweep options go after `sweep`)
  gategrad lab scale --backend torch               # DPO vs Gate-DPO at 4 model sizes

Reading the table: squeezing shows as Δ Chosen < 0 together with a large negative Δ Others
and a rising top-1 mass / falling entropy; a gate that works keeps Δ Chosen near the g=0
baseline (--gates ... zero) while Δ Rejected stays negative.
"""


def _float_list(text: str) -> list[float]:
    return [float(x) for x in text.replace(",", " ").split()]


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment")
    g.add_argument(
        "--model",
        choices=("toy", "transformer"),
        default=None,
        help="toy: shared-feature softmax (NumPy, default); transformer: tiny decoder-only "
        "transformer with SFT warm-up (needs --backend torch, jax or mlx)",
    )
    g.add_argument(
        "--backend",
        choices=("numpy", "torch", "jax", "mlx"),
        default=None,
        help="numpy for the toy; torch (default), jax or mlx for the transformer (any of these "
        "three alone selects --model transformer)",
    )
    g.add_argument(
        "--seeds",
        type=_NONNEG_INT,
        nargs="+",
        default=None,
        metavar="N",
        help="seeds, integers >= 0 (default: 0 1 2)",
    )
    g.add_argument(
        "--steps",
        type=_POS_INT,
        default=None,
        help=f"preference-optimisation steps per run (toy {MODEL_DEFAULTS['toy']['steps']}, "
        f"transformer {MODEL_DEFAULTS['transformer']['steps']})",
    )
    g.add_argument(
        "--lr",
        type=_POS_FLOAT,
        default=None,
        help=f"Adam learning rate of the preference phase (toy {MODEL_DEFAULTS['toy']['lr']:g},"
        f" transformer {MODEL_DEFAULTS['transformer']['lr']:g})",
    )
    g.add_argument("--beta", type=_POS_FLOAT, default=None, help="loss beta (default 0.1)")
    g.add_argument(
        "--eval-every",
        type=_POS_INT,
        default=None,
        help="steps between checkpoints (toy 15, transformer 20)",
    )
    g.add_argument(
        "--sft-steps",
        type=_NONNEG_INT,
        default=None,
        help="SFT warm-up steps (toy: teacher distillation, 300; transformer: 200)",
    )
    g.add_argument(
        "--sft",
        choices=SFT_MODES,
        default=None,
        help="standard (default): SFT on the language (transformer) or the teacher (toy); "
        "extended: the same steps, also on the training pairs' chosen AND rejected responses "
        "(Ren & Sutherland's extended SFT), before preference training",
    )
    g.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output directory (default gategrad-lab/<model>-<backend>)",
    )
    g.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="start from a saved config.json (flags given here override it)",
    )
    g.add_argument("--no-plots", action="store_true", help="do not write PNG figures")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--quiet", action="store_true", help="do not print the table")

    t = p.add_argument_group("transformer")
    t.add_argument("--pairs", type=_POS_INT, default=None, help="training pairs (default 768)")
    t.add_argument("--batch-size", type=_POS_INT, default=None, help="pairs per step (default 32)")
    t.add_argument("--d-model", type=_POS_INT, default=None, help="model width, even (default 32)")
    t.add_argument("--layers", type=_POS_INT, default=None, help="transformer blocks (default 2)")
    t.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="parameter dtype (default float32)",
    )
    t.add_argument(
        "--threads",
        type=_POS_INT,
        default=None,
        help="torch CPU threads (default 1; tiny models run fastest on one)",
    )


def _methods_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("methods and gates")
    g.add_argument(
        "--losses",
        nargs="+",
        default=None,
        metavar="LOSS",
        help="base losses (default: dpo ipo cal_dpo dpo_shift; any of dpo "
        + " ".join(k for k in LOSS_LABELS if k != "sigmoid")
        + ")",
    )
    g.add_argument(
        "--gates",
        nargs="+",
        default=None,
        choices=GATE_KINDS,
        metavar="KIND",
        help="gate variants per loss (default: none seq q10 token zero). none: ungated; seq / q10: "
        "the paper's sigmoid(alpha (p - tau)) with p the geometric-mean / 10th-percentile "
        "token probability of the rejected response; token: our per-token log-space gate "
        "sigmoid((log p - log tau)/T); zero: drop the rejected gradient (baseline)",
    )
    for flag, what in (
        ("--alpha", f"alpha of the seq/q10 gate (default {_SIG['alpha']:g})"),
        ("--tau", f"tau of the seq/q10 gate, a probability (default {_SIG['tau']:g})"),
        (
            "--log-tau",
            f"tau of the per-token log-space gate, a probability (default {_LOG['tau']:g})",
        ),
        (
            "--temperature",
            f"temperature T of the per-token log-space gate (default {_LOG['temperature']:g})",
        ),
    ):
        g.add_argument(flag, type=_POS_FLOAT, default=None, help=what)
    g.add_argument(
        "--dpo-shift-lam",
        type=finite_float(0.0, 1.0),
        default=None,
        help="DPO-Shift's fixed lambda in (0, 1] (default 0.95)",
    )


def add_lab_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``lab`` (with its ``sweep`` sub-command) to a top-level subparsers object."""
    lab = subparsers.add_parser(
        "lab",
        help="run the lab: squeezing and the gate's effect (default: NumPy toy)",
        description=LAB_DESCRIPTION,
        epilog=LAB_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(lab)
    _methods_args(lab)
    sub = lab.add_subparsers(dest="lab_command", metavar="{sweep,scale}")
    sweep = sub.add_parser(
        "sweep",
        help="sweep the gate parameters (how the defaults were chosen)",
        description=(
            "Sweep the gate parameters for one base loss on seeds the lab's table does not "
            "use (default 100 101 102), next to the ungated loss and g=0. Selection rule: "
            "among settings that recover at least --recover of the chosen log-prob lost to "
            "squeezing (ΔC(g=0) - ΔC(ungated)), pick the largest mean margin. Writes "
            "sweep.txt, sweep.json and sweep.png."
        ),
        epilog=(
            "examples:\n  gategrad lab sweep                      # toy\n"
            "  gategrad lab sweep --model transformer  # torch, several minutes\n"
            "  gategrad lab sweep --kinds token --log-taus 1e-6 1e-4 1e-2"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(sweep)
    g = sweep.add_argument_group("grid")
    g.add_argument("--loss", default="dpo", help="the base loss to sweep (default dpo)")
    g.add_argument(
        "--kinds",
        nargs="+",
        default=None,
        choices=("seq", "q10", "token"),
        help="gate kinds to sweep (default: seq token)",
    )
    g.add_argument(
        "--alphas",
        type=_POS_FLOAT,
        nargs="+",
        default=None,
        help="alphas of the seq/q10 grid (default 50 200 1000 5000)",
    )
    g.add_argument(
        "--taus",
        type=_POS_FLOAT,
        nargs="+",
        default=None,
        help="taus of the seq/q10 grid (default 1e-3 3e-3 1e-2 2e-2 5e-2)",
    )
    g.add_argument(
        "--log-taus",
        type=_POS_FLOAT,
        nargs="+",
        default=None,
        help="taus of the token grid (default 1e-8 1e-6 1e-4 1e-3 1e-2 1e-1)",
    )
    g.add_argument(
        "--temperatures",
        type=_POS_FLOAT,
        nargs="+",
        default=None,
        help="temperatures of the token grid (default 1)",
    )
    g.add_argument(
        "--recover",
        type=finite_float(0.0, 1.0),
        default=0.9,
        help="share of the squeezing loss a setting must recover (default 0.9)",
    )
    _add_scale_parser(sub)
    lab.set_defaults(_handler=main_lab)
    return lab


def _size(text: str) -> tuple[int, int]:
    """``LAYERSxWIDTH`` (e.g. ``2x32``) -> ``(2, 32)``."""
    parts = text.lower().split("x")
    try:
        layers, width = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be LAYERSxWIDTH such as 2x32, got {text!r}"
        ) from None
    if layers < 1 or width < 2 or width % 2:
        raise argparse.ArgumentTypeError(
            f"needs >= 1 layer and an even width >= 2 (2 heads), got {text!r}"
        )
    return layers, width


def _add_scale_parser(sub: Any) -> None:
    from .scale import DEFAULT_SIZES

    scale = sub.add_parser(
        "scale",
        help="the paper's scale claim in miniature: DPO vs Gate-DPO at several model sizes",
        description=(
            "Train the transformer of `gategrad lab --model transformer` at several sizes with "
            "DPO, Gate-DPO (seq) and the g=0 baseline and report Δ Chosen against the "
            "parameter count, mean ± std over seeds. Writes scale.txt, scale.json and "
            "scale.png. The paper's claim to test: smaller gated models gain more chosen "
            "log-prob than larger ungated ones."
        ),
        epilog=(
            "examples:\n  gategrad lab scale                  # torch, ~4 min of CPU\n"
            "  gategrad lab scale --sizes 1x16 2x32 --seeds 0\n"
            "  gategrad lab scale --backend jax --gates none seq zero"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(scale)
    g = scale.add_argument_group("sizes and methods")
    g.add_argument(
        "--sizes",
        type=_size,
        nargs="+",
        default=None,
        metavar="LxW",
        help="model sizes as LAYERSxWIDTH (default: "
        + " ".join(f"{n}x{d}" for n, d in DEFAULT_SIZES)
        + "); d_ff is twice the width, 2 heads",
    )
    g.add_argument("--losses", nargs="+", default=None, metavar="LOSS", help="default: dpo")
    g.add_argument(
        "--gates",
        nargs="+",
        default=None,
        choices=GATE_KINDS,
        metavar="KIND",
        help="gate kinds per loss (default: none seq zero)",
    )


def _copy(args: argparse.Namespace, target: Any, names: dict[str, str]) -> None:
    """``target.<attr> = args.<arg>`` for each ``arg: attr`` given on the command line."""
    for arg, attr in names.items():
        value = getattr(args, arg, None)
        if value is not None:
            setattr(target, attr, value)


def config_from_args(args: argparse.Namespace, *, sweep: bool = False) -> LabConfig:
    """A :class:`LabConfig` from parsed arguments (``--config`` first, then flags)."""
    cfg = LabConfig.load(args.config) if args.config else LabConfig()
    if args.config is None and sweep:
        from .sweep import DEFAULT_SWEEP_SEEDS

        cfg.seeds = list(DEFAULT_SWEEP_SEEDS)
    if args.model is not None and args.model != cfg.model:
        cfg.model = args.model
        if args.config:  # a model switch invalidates the saved model-specific defaults
            cfg.backend = cfg.steps = cfg.lr = cfg.eval_every = cfg.out_dir = None
    if args.model is None and args.config is None and args.backend in TRANSFORMER_BACKENDS:
        cfg.model = "transformer"  # a deep-learning backend implies the transformer
    toy_backend = MODEL_DEFAULTS["toy"]["backend"]
    if args.model == "transformer" and args.backend is None and cfg.backend == toy_backend:
        cfg.backend = None  # the toy's backend does not carry over to the transformer
    _copy(args, cfg, {"backend": "backend", "seeds": "seeds", "steps": "steps", "lr": "lr"})
    _copy(args, cfg, {"beta": "beta", "eval_every": "eval_every", "out": "out_dir"})
    _copy(args, cfg, {"sft": "sft"})
    if args.sft_steps is not None:
        cfg.toy.sft_steps = args.sft_steps
        cfg.transformer.sft_steps = args.sft_steps
    _copy(args, cfg.transformer, {"pairs": "n_pairs", "batch_size": "batch_size"})
    _copy(args, cfg.transformer, {"d_model": "d_model", "layers": "n_layers", "dtype": "dtype"})
    _copy(args, cfg.transformer, {"threads": "threads"})
    if args.d_model is not None:
        cfg.transformer.d_ff = 2 * args.d_model
    if not sweep:
        for arg in ("losses", "gates", "alpha", "tau", "log_tau", "temperature", "dpo_shift_lam"):
            value = getattr(args, arg, None)
            if value is not None:
                setattr(cfg, arg, value)
    if sweep and args.out is None and args.config is None:
        cfg.out_dir = None
    return cfg


def _scale_config(args: argparse.Namespace) -> LabConfig:
    """The scale command's base config: the transformer, seeds 0 1 2, DPO with and without the
    ``seq`` gate (flags override)."""
    if args.model == "toy":
        raise ValueError("gategrad lab scale trains the transformer; drop --model toy")
    if args.d_model is not None or args.layers is not None:
        raise ValueError(
            "gategrad lab scale sets the sizes with --sizes LxW, not --d-model/--layers"
        )
    args.model = "transformer"
    cfg = config_from_args(args)
    if args.config is None:
        cfg.losses = ["sigmoid"] if args.losses is None else args.losses
        from .scale import DEFAULT_GATES

        cfg.gates = list(DEFAULT_GATES) if args.gates is None else args.gates
        if args.out is None:
            cfg.out_dir = None  # set after resolving (it names the backend)
    return cfg


def main_lab(args: argparse.Namespace) -> int:
    """Entry point of ``gategrad lab [sweep|scale]``."""
    command = getattr(args, "lab_command", None)
    sweep = command == "sweep"
    try:
        if command == "scale":
            cfg = _scale_config(args)
            unset_out = cfg.out_dir is None
            cfg = cfg.resolved()
            if unset_out:
                cfg.out_dir = f"gategrad-lab/scale-{cfg.backend}"
        else:
            cfg = config_from_args(args, sweep=sweep)
            cfg = cfg.resolved()
    except (ValueError, OSError) as err:
        print(f"gategrad lab: error: {err}", file=sys.stderr)
        return 2
    echo = None if args.quiet else print
    try:
        if command == "scale":
            from .scale import DEFAULT_SIZES, run_scale

            sizes = list(DEFAULT_SIZES) if args.sizes is None else args.sizes
            run_scale(cfg, sizes, plots=not args.no_plots, progress=not args.no_progress, echo=echo)
        elif sweep:
            from .sweep import SweepSpec, run_sweep

            if args.out is None and args.config is None:
                cfg.out_dir = f"gategrad-lab/sweep-{cfg.model}-{cfg.backend}"
            spec = SweepSpec(loss=args.loss, recover=args.recover)
            for name in ("kinds", "alphas", "taus", "log_taus", "temperatures"):
                value = getattr(args, name)
                if value is not None:
                    setattr(spec, name, value)
            run_sweep(cfg, spec, plots=not args.no_plots, progress=not args.no_progress, echo=echo)
        else:
            from .runner import run_lab

            run_lab(cfg, plots=not args.no_plots, progress=not args.no_progress, echo=echo)
    except ImportError as err:
        print(f"gategrad lab: error: {err}", file=sys.stderr)
        return 3
    except OSError as err:  # an output directory that cannot be created or written
        where = f" (--out {cfg.out_dir})" if cfg.out_dir else ""
        print(f"gategrad lab: error: cannot write the outputs{where}: {err}", file=sys.stderr)
        return 2
    return 0
