"""Per-call, lazy framework dispatch (in the manner of einops' ``_backends``).

The framework of an array is found without importing any framework: a framework can only have
made the array if its module is already in ``sys.modules``. The answer is cached per type.
"""

from __future__ import annotations

import sys
from typing import Any

from ._xp import ArrayOps

#: name -> (module that must already be imported, name of its array type)
_FRAMEWORKS: dict[str, tuple[str, str]] = {
    "torch": ("torch", "Tensor"),
    "jax": ("jax", "Array"),
    "mlx": ("mlx.core", "array"),
    "numpy": ("numpy", "ndarray"),  # checked last
}
BACKENDS: tuple[str, ...] = tuple(_FRAMEWORKS)

_type_cache: dict[type, str | None] = {}
_ops_cache: dict[str, ArrayOps] = {}


def _detect(x: Any) -> str | None:
    for name, (module, attr) in _FRAMEWORKS.items():
        mod = sys.modules.get(module)
        if mod is None:
            continue
        # isinstance, not issubclass: JAX tracers are jax.Array only through __instancecheck__.
        if isinstance(x, getattr(mod, attr)):
            return name
    if isinstance(x, (float, int)) and not isinstance(x, bool):
        return None  # Python scalars belong to no framework
    tp = type(x)
    raise TypeError(
        f"gategrad cannot handle {tp.__module__}.{tp.__qualname__}: pass a torch.Tensor, "
        "jax.Array, mlx.core.array or numpy.ndarray"
    )


def framework_of(x: Any) -> str | None:
    """``'torch' | 'jax' | 'mlx' | 'numpy'`` for an array, ``None`` for a Python scalar.

    Raises ``TypeError`` for anything else. The answer is cached per type.
    """
    tp = type(x)
    try:
        return _type_cache[tp]
    except KeyError:
        pass
    name = _detect(x)
    _type_cache[tp] = name
    return name


def common_framework(**arrays: Any) -> str:
    """The one framework shared by the named arrays (``None`` entries are ignored).

    Raises ``TypeError`` naming both frameworks when they are mixed, e.g. a torch tensor of
    log-probs with a NumPy mask.
    """
    found: tuple[str, str] | None = None
    for arg, x in arrays.items():
        if x is None:
            continue
        name = framework_of(x)
        if name is None:
            continue
        if found is None:
            found = (name, arg)
        elif found[0] != name:
            raise TypeError(
                f"mixed frameworks: {found[1]} is a {found[0]} array but {arg} is a {name} "
                f"array; convert {arg} to {found[0]} first"
            )
    if found is None:
        raise TypeError(
            f"no array among {sorted(arrays)}: pass a torch.Tensor, jax.Array, "
            "mlx.core.array or numpy.ndarray"
        )
    return found[0]


def get_ops(name: str) -> ArrayOps:
    """The ops of backend ``name``, importing ``gategrad.backends.<name>`` on first use.

    Raises ``ValueError`` for an unknown name and ``ImportError`` (naming the pip extra to
    install) when the framework is not installed.
    """
    try:
        return _ops_cache[name]
    except KeyError:
        pass
    if name not in _FRAMEWORKS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    module = _import_backend(name)  # backends raise ImportError naming the pip extra
    ops: ArrayOps = module.ops
    _ops_cache[name] = ops
    return ops


def _import_backend(name: str) -> Any:
    # Plain import statements (not importlib): torch.compile can trace them when the first
    # gated call happens inside a compiled region.
    if name == "torch":
        from gategrad.backends import torch as torch_backend

        return torch_backend
    if name == "jax":
        from gategrad.backends import jax as jax_backend

        return jax_backend
    if name == "mlx":
        from gategrad.backends import mlx as mlx_backend

        return mlx_backend
    from gategrad.backends import numpy as numpy_backend

    return numpy_backend


def ops_for(**arrays: Any) -> ArrayOps:
    """The backend ops for the framework that the named arrays share."""
    return get_ops(common_framework(**arrays))


def is_available(name: str) -> bool:
    """Whether backend ``name`` can be imported here."""
    try:
        get_ops(name)
    except ImportError:
        return False
    return True
