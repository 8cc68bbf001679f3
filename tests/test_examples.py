"""Every script in ``examples/`` runs, in its quick mode (``--quick``), from a fresh process.

The scripts run with the working directory outside the repository, so that they import the
installed gategrad (the checkout's ``gategrad/`` lacks ``backends/``, which installs as
``gategrad.backends``), exactly as a user who copied an example would.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from _backends import run_outside_repo

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# a script that needs what no gategrad extra installs says so on a line of its own:
# "# requires: deepspeed transformers"; without those modules it is skipped (allowed in CI)
_REQUIRES = re.compile(r"^# requires: (?P<modules>[\w. ]+)", re.M)


def missing_requirements(source: str) -> list[str]:
    found = _REQUIRES.search(source)
    modules = found["modules"].split() if found else []
    return [m for m in modules if importlib.util.find_spec(m) is None]


def test_there_are_examples() -> None:
    assert EXAMPLES, "examples/ holds no scripts"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_has_a_quick_mode_and_a_docstring(script: Path) -> None:
    source = script.read_text(encoding="utf-8")
    assert "--quick" in source, (
        f"examples/{script.name} has no --quick flag: every example must run in seconds with "
        "--quick (tests/test_examples.py runs it that way)"
    )
    assert source.lstrip().startswith(('"""', "'''", "#!")), (
        f"examples/{script.name} should open with a docstring that says what it shows and how "
        "to run it"
    )
    assert 'if __name__ == "__main__":' in source, (
        f'examples/{script.name} should run from `if __name__ == "__main__":`'
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_quick(script: Path, tmp_path: Path) -> None:
    source = script.read_text(encoding="utf-8")
    if "--quick" not in source:
        pytest.fail(f"examples/{script.name} has no --quick mode")
    missing = missing_requirements(source)
    if missing:
        pytest.skip(f"examples/{script.name} needs {missing}, not installed [allowed-skip]")
    out = run_outside_repo([str(script), "--quick"], tmp_path)
    assert out.returncode == 0, (
        f"examples/{script.name} --quick exited with {out.returncode}:\n"
        f"{out.stdout[-4000:]}\n{out.stderr[-8000:]}"
    )


def test_requires_line_is_read() -> None:
    assert missing_requirements('"""x"""\n# requires: os json\n') == []
    assert missing_requirements("# requires: os no_such_module_xyz\n") == ["no_such_module_xyz"]
    assert missing_requirements("import os  # requires: nothing\n") == []
