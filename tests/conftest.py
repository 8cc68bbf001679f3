"""Shared test configuration: Hypothesis profiles and the no-skip rule for CI.

- ``HYPOTHESIS_PROFILE=dev`` (default) is quick; ``ci`` is thorough (see ``.ci/run``).
- ``GATEGRAD_STRICT_SKIPS=1`` (set by ``.ci/run``) turns every skip into a failure, except skips
  whose reason contains ``[allowed-skip]`` (for example CUDA- or Metal-only checks), so a
  missing framework can never hide a conformance test in CI.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

try:  # float64 comparisons need x64; set once for the whole session
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:
    pass

STRICT_SKIPS = os.environ.get("GATEGRAD_STRICT_SKIPS") == "1"
ALLOWED = "[allowed-skip]"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not STRICT_SKIPS:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = [r for r in reporter.stats.get("skipped", []) if ALLOWED not in str(r.longrepr)]
    if skipped:
        reporter.write_line(
            f"GATEGRAD_STRICT_SKIPS=1: {len(skipped)} test(s) skipped; every framework must be "
            "installed in CI:",
            red=True,
        )
        for r in skipped[:20]:
            reporter.write_line(f"  {r.nodeid}: {r.longrepr}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_report_header() -> list[str]:
    from hypothesis import settings as current

    return [
        f"hypothesis profile: {os.environ.get('HYPOTHESIS_PROFILE', 'dev')} "
        f"(max_examples={current.default.max_examples}); strict skips: {STRICT_SKIPS}"
    ]


#: Per-test timeout of tests marked ``slow`` (the default, ``timeout`` in pyproject.toml, is
#: 300 s): docs builds, wheel builds and TRL trainers run subprocesses with 600 s limits of their
#: own. An explicit ``@pytest.mark.timeout`` wins.
SLOW_TIMEOUT_S = 1800


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
