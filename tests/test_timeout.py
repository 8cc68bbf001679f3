"""The per-test timeout: a hanging test fails the run instead of stalling it.

pyproject.toml sets ``timeout`` (pytest-timeout, a required plugin); this runs pytest with the
repository's configuration on a test that never returns, with the limit lowered to 2 s so the
proof is quick, and checks that the run fails through the timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HANGS = """
import time


def test_passes():
    pass


def test_hangs():
    while True:
        time.sleep(0.05)
"""


def test_the_timeout_is_configured(pytestconfig: pytest.Config) -> None:
    assert float(pytestconfig.getini("timeout")) > 0
    assert pytestconfig.getini("timeout_method") == "thread"  # stops hangs in native code too
    assert "pytest-timeout" in pytestconfig.getini("required_plugins")


def test_a_hanging_test_fails_the_run(tmp_path: Path) -> None:
    (tmp_path / "test_hang.py").write_text(HANGS)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    out = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
            "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
            "-o", "timeout=2", str(tmp_path / "test_hang.py"),
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "Timeout" in text and "test_hangs" in text, text
