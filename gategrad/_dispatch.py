"""Per-call, lazy framework dispatch (in the manner of einops' ``_backends``).

The framework of an array is found without importing any framework: a framework can only have
made the array if its module is already in ``sys.modules``. The answer is cached per type. The
registry of frameworks is ``gategrad.backends.REGISTRY`` (one line per framework, no framework
imported); each backend module is imported on first use.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from . import _source_tree
from ._backend import Backend

__all__ = [
    "BACKENDS",
    "OPTIONAL_BACKENDS",
    "backend_for",
    "common_framework",
    "framework_of",
    "get_backend",
    "is_available",
    "load_imported",
]

# The registry (one line per framework) lives in the backends package, which imports no
# framework: ``gategrad.backends.REGISTRY``. From a source checkout, backends/ is registered as
# gategrad.backends first (see _source_tree).
_source_tree.register()
from gategrad.backends import REGISTRY as _FRAMEWORKS  # noqa: E402

BACKENDS: tuple[str, ...] = tuple(_FRAMEWORKS)
#: The optional frameworks (each installed by its pip extra; NumPy, the reference, has none).
OPTIONAL_BACKENDS: tuple[str, ...] = tuple(name for name, entry in _FRAMEWORKS.items() if entry[2])

_type_cache: dict[type, str | None] = {}
_backends: dict[str, Backend] = {}


def _detect(x: Any) -> str | None:
    for name, (module, attr, _, _) in _FRAMEWORKS.items():
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
    """The one framework shared by the named arrays (``None`` and Python numbers are ignored).

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


def get_backend(name: str) -> Backend:
    """The backend object of framework ``name``, importing ``gategrad.backends.<name>`` on first
    use.

    Raises ``ValueError`` for an unknown name and ``ImportError`` naming the pip extra when the
    framework is not installed.
    """
    try:
        return _backends[name]
    except (KeyError, TypeError):
        pass
    if name not in _FRAMEWORKS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    backend: Backend = _FRAMEWORKS[name][3]().backend
    _backends[name] = backend
    return backend


def backend_for(**arrays: Any) -> Backend:
    """The backend of the framework that the named arrays share (see [`common_framework`][])."""
    return get_backend(common_framework(**arrays))


def load_imported() -> None:
    """Load the backend of every framework that is already imported (so that, for example,
    [`gategrad.Gate`][] is a JAX pytree as soon as JAX is loaded). Never imports a
    framework."""
    for name, (module, _, _, _) in _FRAMEWORKS.items():
        if name not in _backends and module in sys.modules:
            with contextlib.suppress(ImportError):
                get_backend(name)


def is_available(name: str) -> bool:
    """Whether backend ``name`` can be imported here."""
    try:
        get_backend(name)
    except ImportError:
        return False
    return True
