"""The import structure: layers point down, and frameworks are named only in their backend.

core (``gategrad/_*.py``, ``losses.py``, ``metrics.py``) <- ``backends/`` <- ``gategrad.testing``
<- ``gategrad.lab`` and ``benchmarks/``. Read from the source with ``ast`` (static), so a lazy
import inside a function counts as much as a top-level one.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = {"torch", "jax", "jaxlib", "mlx", "optax", "transformers", "trl", "mlx_lm"}
FRAMEWORK_NAMES = {"torch", "jax", "mlx", "numpy"}


def _files(*parts: str) -> list[Path]:
    base = ROOT.joinpath(*parts)
    return sorted(base.rglob("*.py")) if base.is_dir() else [base]


def _core_files() -> list[Path]:
    pkg = ROOT / "gategrad"
    return sorted([*pkg.glob("_*.py"), pkg / "losses.py", pkg / "metrics.py"])


def _is_module(package: str, name: str) -> bool:
    """Whether ``from package import name`` names a submodule (not a function or constant)."""
    if not package.startswith(("gategrad", "benchmarks")):
        return True  # third-party: count the name, so that `from mlx import core` is caught
    try:
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except (ImportError, ValueError):
        return False


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved inside ``gategrad``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = ["gategrad", *rel[1:-1]] if rel[0] == "gategrad" else list(rel[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names if _is_module(module, a.name))
    return found


def _violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in files:
        for module in sorted(_imports(path)):
            if any(
                module.startswith(f)
                if f.endswith(".")
                else module == f or module.startswith(f + ".")
                for f in forbidden
            ):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    return bad


UPPER = (
    "gategrad.testing",
    "gategrad.lab",
    "gategrad.integrations",
    "gategrad.torch",
    "benchmarks",
)


def test_core_imports_no_framework_and_no_layer_above() -> None:
    # the core reads the registry (the gategrad.backends package, which imports no framework)
    # but imports no backend module itself
    forbidden = (*sorted(FRAMEWORKS), "gategrad.backends.", *UPPER)
    assert _violations(_core_files(), forbidden) == []


def test_backends_import_only_the_core() -> None:
    assert _violations(_files("backends"), UPPER) == []


def test_testing_does_not_import_the_lab_or_benchmarks() -> None:
    files = _files("gategrad", "testing")
    assert _violations(files, ("gategrad.lab", "gategrad.integrations", "benchmarks")) == []


def test_lab_does_not_import_benchmarks() -> None:
    assert _violations(_files("gategrad", "lab"), ("benchmarks",)) == []


def _name_comparisons(path: Path) -> list[str]:
    """``x == 'torch'`` and friends: code choosing behaviour by a framework's name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                if isinstance(operand, ast.Constant) and operand.value in FRAMEWORK_NAMES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


@pytest.mark.parametrize("part", ["core", "testing", "lab", "benchmarks"])
def test_no_framework_name_comparisons_outside_backends(part: str) -> None:
    files = {
        "core": _core_files(),
        "testing": _files("gategrad", "testing"),
        "lab": _files("gategrad", "lab"),
        "benchmarks": _files("benchmarks"),
    }[part]
    assert [hit for f in files for hit in _name_comparisons(f)] == []


def test_checker_sees_a_violation() -> None:
    """The checks above can fail: a module with an upward import and a name comparison."""
    fake = ROOT / "gategrad" / "_layers_probe_tmp.py"
    fake.write_text("from .lab import run_lab\nimport torch\nok = name == 'jax'\n")
    try:
        assert _violations([fake], ("gategrad.lab", "torch")) == [
            "gategrad/_layers_probe_tmp.py imports gategrad.lab",
            "gategrad/_layers_probe_tmp.py imports torch",
        ]
        assert _name_comparisons(fake) == ["gategrad/_layers_probe_tmp.py:3"]
    finally:
        fake.unlink()


@pytest.mark.parametrize("code", ["import gategrad.backends", "import gategrad.backends.numpy"])
def test_backends_import_from_the_repository_root(code: str) -> None:
    """From a clone, the source tree shadows the install; backends/ must still be found."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}; import gategrad; print(gategrad.backends.__name__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gategrad.backends"
