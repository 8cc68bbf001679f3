"""``.github/workflows/ci.yml`` is valid and mirrors ``.ci/run``: Linux on every supported
Python, and a macOS arm64 job that runs the MLX tests on Metal. actionlint checks it too when
it is installed (it is a Go binary, not a Python package, so it may be absent)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    if importlib.util.find_spec("yaml") is None:
        pytest.fail("PyYAML is not installed: pip install '.[dev]'")
    import yaml

    data = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "ci.yml is not a YAML mapping"
    return data


def _supported_pythons() -> list[str]:
    """The Python versions that pyproject.toml's classifiers declare."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return re.findall(r'"Programming Language :: Python :: (3\.\d+)"', text)


def _run_lines(job: dict[str, Any]) -> list[str]:
    return [step.get("run", "") for step in job.get("steps", [])]


def test_triggers_and_jobs(workflow: dict[str, Any]) -> None:
    # YAML 1.1 reads the key `on` as the boolean True
    triggers = workflow.get("on", workflow.get(True))
    assert isinstance(triggers, dict), "ci.yml needs `on:` triggers"
    assert "push" in triggers and "pull_request" in triggers
    jobs = workflow["jobs"]
    assert isinstance(jobs, dict) and jobs
    for name, job in jobs.items():
        assert job.get("runs-on"), f"job {name} has no runs-on"
        assert job.get("steps"), f"job {name} has no steps"
        assert job.get("timeout-minutes"), f"job {name} has no timeout-minutes"
        for step in job["steps"]:
            assert ("uses" in step) != ("run" in step), f"job {name}: a step needs uses or run"
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@v\d+(\.\d+)*", step["uses"]), (
                    f"job {name}: pin actions to a version tag: {step['uses']}"
                )


def test_linux_matrix_runs_ci_run_on_every_supported_python(workflow: dict[str, Any]) -> None:
    linux = [j for j in workflow["jobs"].values() if str(j["runs-on"]).startswith("ubuntu")]
    runners = [j for j in linux if any("bash .ci/run" in r for r in _run_lines(j))]
    assert len(runners) == 1, "one Linux job must run `bash .ci/run` (the source of truth)"
    (job,) = runners
    versions = job["strategy"]["matrix"]["python-version"]
    assert all(isinstance(v, str) for v in versions), (
        "quote the Python versions in the matrix: YAML reads 3.10 as the number 3.1"
    )
    assert versions == ["3.10", "3.11", "3.12", "3.13"]
    assert versions == _supported_pythons(), "the matrix must match pyproject's classifiers"
    setup = [s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/setup-python")]
    assert setup and setup[0]["with"]["python-version"] == "${{ matrix.python-version }}"


def test_macos_arm64_job_runs_the_mlx_tests_on_metal(workflow: dict[str, Any]) -> None:
    macos = [j for j in workflow["jobs"].values() if j["runs-on"] in ("macos-14", "macos-15")]
    assert len(macos) == 1, "one macOS arm64 job (macos-14 or macos-15: Apple Silicon)"
    runs = "\n".join(_run_lines(macos[0]))
    assert "mx.metal.is_available()" in runs and "mx.gpu" in runs, (
        "the macOS job must check that MLX really runs on Metal"
    )
    assert re.search(r"pytest\b.*-k\s+\"?mlx", runs), "the macOS job must run the MLX tests"
    assert 'pip install ".[dev]"' in runs


def test_ci_run_and_readme_agree() -> None:
    """.ci/run reads README's test command; the workflow mirrors it instead of copying it."""
    ci_run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "<!-- test-command -->" in readme and "<!-- test-command -->" in ci_run
    assert "GATEGRAD_STRICT_SKIPS=1" in ci_run


def _actionlint() -> str | None:
    found = shutil.which("actionlint")
    if found:
        return found
    candidate = Path(sys.executable).parent / "actionlint"
    return str(candidate) if candidate.is_file() else None


def test_actionlint() -> None:
    exe = _actionlint()
    if exe is None:
        pytest.skip(
            "[allowed-skip] actionlint is not installed (a Go binary: `go install "
            "github.com/rhysd/actionlint/cmd/actionlint@latest`); the workflow-lint job of "
            "ci.yml runs it on GitHub"
        )
    out = subprocess.run(
        [exe, "-no-color", str(WORKFLOW)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"actionlint:\n{out.stdout}{out.stderr}"
