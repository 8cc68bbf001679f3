"""The ``gategrad`` command line.

- ``gategrad lab [options]``: the lab (see ``gategrad lab --help``);
- ``gategrad lab sweep [options]``: the gate-parameter sweep;
- ``gategrad demo``: the default gates' values ``g(p)``, to see what a gate does at a glance.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _demo(args: argparse.Namespace) -> int:
    import numpy as np

    from gategrad import SHAPE_DEFAULTS, Gate, gate_value

    gates = {
        "paper sigmoid": Gate("sigmoid"),
        "log-space sigmoid": Gate("log_sigmoid"),
        "hard": Gate("hard"),
        "power": Gate("power"),
    }
    ps = np.array([1.0, 0.1, 0.02, 1e-2, 1e-3, 1e-4, 1e-6, 1e-8, 0.0])
    print("Gate-DPO multiplies the gradient of the rejected log-probs by g(p), where p is the")
    print("rejected response's (or token's) probability; the loss value never changes.\n")
    print("defaults (gategrad.SHAPE_DEFAULTS):")
    for shape, params in SHAPE_DEFAULTS.items():
        print(f"  {shape:12s} " + ", ".join(f"{k}={v:g}" for k, v in params.items()))
    print()
    print(f"{'p':>10s} " + " ".join(f"{name:>18s}" for name in gates))
    for p in ps:
        vals = [float(gate_value(g, np.array([p]))[0]) for g in gates.values()]
        print(f"{p:10.0e} " + " ".join(f"{v:18.4f}" for v in vals))
    print("\nNext: `gategrad lab` shows squeezing and the gate's effect on a toy model.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with the ``lab`` and ``demo`` sub-commands."""
    from gategrad import __version__
    from gategrad.lab.cli import add_lab_parser

    parser = argparse.ArgumentParser(
        prog="gategrad",
        description="Gate-DPO: gradient-gated preference optimisation. Run `gategrad lab` to "
        "reproduce the paper's protocol and see the squeezing effect.",
    )
    parser.add_argument("--version", action="version", version=f"gategrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{lab,demo}")
    add_lab_parser(sub)
    demo = sub.add_parser("demo", help="print the default gates' values g(p)")
    demo.set_defaults(_handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``gategrad``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "_handler", None)
    if handler is None:
        parser.print_help()
        return 0
    return int(handler(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
