"""The gategrad lab: reproduce the Gate-DPO protocol and see squeezing and the gate's effect.

Command line: ``gategrad lab`` (see ``gategrad lab --help``). From Python::

    from gategrad.lab import LabConfig, run_lab

    result = run_lab(LabConfig())                      # the NumPy toy, seconds
    result = run_lab(LabConfig(model="transformer", backend="torch"))
    print(result.table)

Modules: :mod:`~gategrad.lab.toy` (NumPy softmax toy), :mod:`~gategrad.lab.transformer` (the
paper's protocol on a tiny transformer, with :mod:`~gategrad.lab.grammar` and
:mod:`~gategrad.lab.engines`), :mod:`~gategrad.lab.report` (table and figures),
:mod:`~gategrad.lab.sweep` (the gate-parameter sweep) and :mod:`~gategrad.lab._numpy_grads`
(closed-form loss and softmax gradients). Only NumPy is needed for the toy; the figures need
matplotlib and the progress bar tqdm (``pip install 'gategrad[lab]'``).
"""

from __future__ import annotations

from .config import LabConfig, ToyOptions, TransformerOptions
from .methods import GateParams, Method, build_methods
from .runner import LabResult, run_lab

__all__ = [
    "GateParams",
    "LabConfig",
    "LabResult",
    "Method",
    "ToyOptions",
    "TransformerOptions",
    "build_methods",
    "run_lab",
    "run_sweep",
]


def run_sweep(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See :func:`gategrad.lab.sweep.run_sweep`."""
    from .sweep import run_sweep as _run

    return _run(*args, **kwargs)
