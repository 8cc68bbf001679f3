"""Code quality and packaging, as tests (so that the README's one test command covers them):
ruff (lint and format), mypy, ``python -m build`` + ``twine check``, a single-sourced version
and the standard project files.

The tools come with the ``dev`` extra. A missing tool fails (never skips) with a message that
names it: CI must not pass because a checker was absent.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import gategrad

ROOT = Path(__file__).resolve().parents[1]
LINT_PATHS = [
    p
    for p in ("gategrad", "backends", "tests", "examples", "benchmarks", "docs/hooks.py")
    if (ROOT / p).exists()
]


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not installed: the quality checks need the dev tools, "
            "pip install '.[dev]'"
        )


def _run(args: list[str], *, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------------------------
# lint, format, types


def test_ruff_lint() -> None:
    _require("ruff")
    out = _run(["ruff", "check", "--output-format", "concise", *LINT_PATHS])
    assert out.returncode == 0, (
        f"ruff check found problems (fix them, or `ruff check --fix`):\n{out.stdout}{out.stderr}"
    )


def test_ruff_format() -> None:
    _require("ruff")
    out = _run(["ruff", "format", "--check", *LINT_PATHS])
    assert out.returncode == 0, (
        f"files are not formatted; run `ruff format {' '.join(LINT_PATHS)}`:\n"
        f"{out.stdout}{out.stderr}"
    )


@pytest.mark.slow
def test_mypy() -> None:
    _require("mypy")
    # the configuration (files, overrides) is in pyproject.toml; the cache makes reruns quick
    out = _run(["mypy", "--cache-dir", str(ROOT / ".mypy_cache"), "gategrad", "backends"])
    assert out.returncode == 0, f"mypy found type errors:\n{out.stdout}{out.stderr}"


# --------------------------------------------------------------------------------------------
# the distribution


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require("build", "twine", "setuptools")
    out_dir = tmp_path_factory.mktemp("dist")
    # --no-isolation: build with this environment's setuptools (the dev extra), so the check
    # needs no network; -x: setuptools builds wheels itself (the `wheel` package is optional
    # since setuptools 70.1). The wheel is built from the sdist, which checks the sdist too.
    out = _run(["build", "--no-isolation", "-x", "--outdir", str(out_dir), str(ROOT)])
    assert out.returncode == 0, f"python -m build failed:\n{out.stdout[-4000:]}{out.stderr}"
    return out_dir


@pytest.mark.slow
def test_build_makes_an_sdist_and_a_wheel_that_twine_accepts(dist: Path) -> None:
    version = gategrad.__version__
    sdists = list(dist.glob(f"gategrad-{version}.tar.gz"))
    wheels = list(dist.glob(f"gategrad-{version}-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in dist.iterdir())
    out = _run(["twine", "check", "--strict", *map(str, sdists + wheels)])
    assert out.returncode == 0, f"twine check failed:\n{out.stdout}{out.stderr}"


@pytest.mark.slow
def test_distribution_contents(dist: Path) -> None:
    version = gategrad.__version__
    (sdist,) = dist.glob("gategrad-*.tar.gz")
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for required in (
        "pyproject.toml",
        "README.md",
        "LICENSE",
        "gategrad/py.typed",
        "gategrad/_version.py",
        "backends/__init__.py",
        "backends/numpy.py",
    ):
        assert required in names, f"the sdist lacks {required}"
    (wheel,) = dist.glob("gategrad-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        files = set(zf.namelist())
        meta = zf.read(f"gategrad-{version}.dist-info/METADATA").decode()
    assert "gategrad/py.typed" in files and "gategrad/backends/torch.py" in files
    assert any(f.endswith("licenses/LICENSE") for f in files), "the wheel lacks LICENSE"
    assert f"Version: {version}\n" in meta
    assert "Requires-Python: >=3.10" in meta
    assert "License-Expression: Apache-2.0" in meta
    for minor in range(10, 14):
        assert f"Programming Language :: Python :: 3.{minor}" in meta
    assert "Project-URL: Documentation" in meta
    for extra in ("torch", "jax", "mlx", "docs", "dev"):
        assert f"Provides-Extra: {extra}" in meta
    assert "Description-Content-Type: text/markdown" in meta


# --------------------------------------------------------------------------------------------
# version and standard files


def test_version_is_single_sourced() -> None:
    version = gategrad.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.dev\d+)?", version), version
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'dynamic = ["version"]' in pyproject
    assert 'version = { attr = "gategrad._version.__version__" }' in pyproject
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"(?m)^version\s*=", project), "pyproject.toml must not pin a version"
    hits = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "gategrad").rglob("*.py")
        if re.search(r"(?m)^__version__\s*=", p.read_text(encoding="utf-8"))
    ]
    assert hits == ["gategrad/_version.py"], f"__version__ is assigned in {hits}"


def test_citation_cff() -> None:
    _require("yaml")
    import yaml

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    assert cff["type"] == "software" and cff["license"] == "Apache-2.0"
    assert str(cff["version"]) == gategrad.__version__, (
        "CITATION.cff's version must match gategrad/_version.py"
    )
    for key in ("title", "message", "authors", "repository-code"):
        assert cff.get(key), f"CITATION.cff lacks {key}"
    (paper,) = [r for r in cff["references"] if "2605.02626" in str(r)]
    assert paper["type"] == "article" and paper["year"] == 2026
    assert {"family-names": "Mouiche", "given-names": "Inoussa"} in paper["authors"]


def test_standard_files() -> None:
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0" in license_text
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in changelog
    assert f"## [{gategrad.__version__}]" in changelog, (
        "CHANGELOG.md needs a section for the current version"
    )
    contributing = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    for topic in (
        "pytest",
        "HYPOTHESIS_PROFILE",
        "GATEGRAD_STRICT_SKIPS",
        "benchmarks/",
        "ruff",
        "mypy",
        "mkdocs",
        "--quick",
        ".ci/run",
    ):
        assert topic in contributing, f"CONTRIBUTING.md does not mention {topic}"
    assert (ROOT / "gategrad" / "py.typed").is_file()
