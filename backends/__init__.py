"""Framework adapters, installed as ``gategrad.backends``; the registry of frameworks.

One module per framework: ``numpy`` (the reference), ``torch``, ``jax`` and ``mlx``. Each defines
``backend``, an instance of [`gategrad.Backend`][] that holds what differs between
frameworks: the custom-gradient primitive, array operations where the framework departs from
NumPy's names, its token-log-prob kernel and the tooling the test kit, the lab and the
benchmarks use. Importing this package imports no framework; [`gategrad.get_backend`][]
imports a backend module on first use.

Adding a framework: one module here and one line in ``REGISTRY`` (with its 3-line loader).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


# Loaders are plain import statements, not importlib: torch.compile(fullgraph=True) traces them
# when the first gated call happens inside a compiled region (importlib.import_module and
# __import__ break the graph; tests/test_dispatch.py checks this in a fresh process).
def _torch() -> Any:
    from . import torch as module

    return module


def _jax() -> Any:
    from . import jax as module

    return module


def _mlx() -> Any:
    from . import mlx as module

    return module


def _numpy() -> Any:
    from . import numpy as module

    return module


#: name -> (module that must already be imported for its arrays to exist, name of its array
#: type, pip extra, loader of the backend module). NumPy is checked last.
REGISTRY: dict[str, tuple[str, str, str, Callable[[], Any]]] = {
    "torch": ("torch", "Tensor", "torch", _torch),
    "jax": ("jax", "Array", "jax", _jax),
    "mlx": ("mlx.core", "array", "mlx", _mlx),
    "numpy": ("numpy", "ndarray", "", _numpy),
}
