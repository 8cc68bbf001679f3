"""Make ``backends/`` importable as ``gategrad.backends`` from a source checkout.

The repository keeps the adapters in a top-level ``backends/`` folder, which the wheel installs
as ``gategrad.backends`` (``package-dir`` in ``pyproject.toml``). Run from the repository root
(``python -m pytest``, ``python -c "import gategrad.backends"``), the source folder
``gategrad/`` shadows the installed package and has no ``backends`` subfolder: this registers
the sibling folder under that name. An installed package (a wheel, where ``gategrad/backends``
exists) is left alone.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def register() -> None:
    """Register ``<repo>/backends`` as ``gategrad.backends`` when it is not a subfolder."""
    here = Path(__file__).resolve().parent
    package = __name__.rpartition(".")[0]
    name = f"{package}.backends"
    if name in sys.modules or (here / "backends" / "__init__.py").is_file():
        return
    init = here.parent / "backends" / "__init__.py"
    if not (init.is_file() and (here.parent / "pyproject.toml").is_file()):
        return
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None:  # pragma: no cover - a broken checkout
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[package], "backends", module)  # noqa: B010 - not declared there
