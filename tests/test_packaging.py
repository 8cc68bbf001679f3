"""The wheel: backends/ installs as gategrad.backends, every package directory is shipped, and
it imports from a fresh virtual environment outside the repository (an editable install would
hide a package-dir mapping mistake)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# pip builds a wheel and installs it into a fresh venv: subprocesses with 300 s limits each
pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (whl,) = out.glob("gategrad-*.whl")
    return whl


def _source_packages() -> set[str]:
    found = set()
    for init in (ROOT / "gategrad").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        found.add(".".join(rel.parts))
    for init in (ROOT / "backends").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT / "backends")
        found.add(".".join(("gategrad", "backends", *rel.parts)).rstrip("."))
    return found


def test_wheel_ships_every_package_and_the_backends_mapping(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {".".join(Path(n).parent.parts) for n in names if n.endswith("/__init__.py")}
    missing = _source_packages() - shipped
    assert not missing, f"packages missing from the wheel (add them to pyproject): {missing}"
    for module in ("numpy", "torch", "jax", "mlx"):
        assert f"gategrad/backends/{module}.py" in names
    assert "gategrad/py.typed" in names
    assert not any(n.startswith("backends/") for n in names), "backends/ must not be top level"


def test_wheel_imports_from_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=300,
    )
    # numpy and torch come from this environment, appended after the fresh site-packages,
    # so the wheel's gategrad (not this checkout's) is the one imported.
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "host-frameworks.pth").write_text(sysconfig.get_path("purelib") + "\n")
    code = (
        "import gategrad, gategrad.backends.torch as bt, gategrad.backends.numpy\n"
        "import numpy as np, torch\n"
        f"assert gategrad.__file__.startswith({str(env_dir)!r}), gategrad.__file__\n"
        f"assert bt.__file__.startswith({str(env_dir)!r}), bt.__file__\n"
        "x = torch.full((2, 3), -1.0, requires_grad=True)\n"
        "gategrad.gate_rejected(x, gategrad.Gate()).sum().backward()\n"
        "assert torch.isfinite(x.grad).all()\n"
        "print('ok', gategrad.__version__)\n"
    )
    out = subprocess.run(
        [str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")
