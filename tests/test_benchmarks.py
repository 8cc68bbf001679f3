"""``benchmarks/overhead.py --smoke`` runs end to end and writes its report.

The smoke run uses tiny sizes and one repetition: its numbers mean nothing, and nothing here
asserts on timings. It keeps the script working: every section is present, every installed
backend ran without error, every ratio it reports is finite, and the memory subprocesses
answered.
"""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _backends import run_outside_repo

import gategrad

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
MODES = {"torch-eager": "torch", "torch-compile": "torch", "jax-jit": "jax", "mlx-compile": "mlx"}


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (path, value) leaf pair of a JSON tree."""
    if isinstance(node, dict):
        return [kv for k, v in node.items() for kv in _walk(v, f"{path}/{k}")]
    if isinstance(node, list):
        return [kv for i, v in enumerate(node) for kv in _walk(v, f"{path}/{i}")]
    return [(path, node)]


def _benchmarks(name: str) -> Any:
    """``benchmarks.<name>`` from the repository: ``benchmarks/`` is not installed (a clean
    ``pip install .`` has no such package), so the repository root goes on the path only
    while it is imported; ``gategrad`` itself stays the installed one (already imported)."""
    root = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, root)
    try:
        return importlib.import_module(f"benchmarks.{name}")
    finally:
        sys.path.remove(root)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("overhead")
    out = tmp / "results"
    # cwd outside the repository: the repository's gategrad/ (without backends/) must not
    # shadow the installed package in the subprocesses.
    proc = run_outside_repo([str(SCRIPT), "--smoke", "--out", str(out)], tmp)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    report = json.loads((out / "overhead.json").read_text())
    report["_markdown"] = (out / "overhead.md").read_text()
    report["_stdout"] = proc.stdout
    return report


def test_help_lists_every_flag() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in (
        "--smoke",
        "--device",
        "--out",
        "--sections",
        "--modes",
        "--layers",
        "--seq",
        "--vocab",
        "--deadline",
        "--step-budget",
        "--logps-budget",
        "--min-reps",
        "--max-reps",
        "--rss",
        "--torch-backend",
        "--drift-limit",
    ):
        assert flag in proc.stdout, flag


@pytest.mark.slow
def test_smoke_writes_every_section(smoke: dict[str, Any]) -> None:
    assert {"meta", "step", "mechanism", "gate_cost", "logps"} <= set(smoke)
    assert smoke["meta"]["smoke"] is True
    md = smoke["_markdown"]
    for title in (
        "## 1. DPO training step",
        "## 1b. The gate's own cost",
        "## 2. Per-token log-probs",
        "## 3. Gate mechanism",
    ):
        assert title in md
    assert md.strip() in smoke["_stdout"]


@pytest.mark.slow
def test_smoke_every_installed_backend_ran(smoke: dict[str, Any]) -> None:
    for mode, fw in MODES.items():
        res = smoke["step"][mode]
        if not gategrad.is_available(fw):
            assert "skipped" in res
            continue
        assert "error" not in res, res
        variants = res["variants"]
        assert "ungated" in variants and "example/q10" in variants
        for name, row in variants.items():
            assert math.isfinite(row["median_ms"]) and row["median_ms"] > 0, (mode, name)
            if name != "ungated" and row.get("baseline"):
                assert row["time_ratio"]["n"] >= 1, (mode, name)
    if gategrad.is_available("torch"):
        eager = smoke["step"]["torch-eager"]["variants"]
        assert {"example/seq", "token/log_sigmoid", "example/seq [checks off]"} <= set(eager)
        for name in ("ungated", "example/seq"):
            rss = eager[name]["rss"]
            assert "error" not in rss, rss
            assert rss["maxrss_mib"] > 0
        assert "rss.maxrss_mib" in eager["example/seq"]["memory_ratio"]
        assert "framework_memory.increment_mib" in eager["example/seq"]["memory_ratio"]
        assert {"primitive", "detach-mix", "detach_over_primitive"} <= set(
            smoke["mechanism"]["torch-eager"]
        )
    for mode, res in smoke["gate_cost"].items():
        if "skipped" in res:
            continue
        assert "error" not in res, (mode, res)
        assert "example/q10" in res["variants"], mode
        assert math.isfinite(res["variants"]["example/q10"]["added_us"])
    for key, res in smoke["logps"].items():
        assert "error" not in res, (key, res)
        if "impls" in res:
            assert "token_logps" in res["impls"]
            for impl, row in res["impls"].items():
                if impl != "token_logps":
                    assert row["token_logps_time_ratio"]["n"] == 1, (key, impl)
    if gategrad.is_available("torch"):
        torch_rows = [r for k, r in smoke["logps"].items() if k.startswith("torch/")]
        assert torch_rows
        try:
            import trl  # noqa: F401
        except ImportError:
            pass
        else:
            assert all("trl.selective_log_softmax" in r["impls"] for r in torch_rows)


@pytest.mark.slow
def test_smoke_ratios_are_finite(smoke: dict[str, Any]) -> None:
    ratios = [
        (path, value)
        for path, value in _walk({k: smoke[k] for k in ("step", "mechanism", "gate_cost", "logps")})
        if path.rsplit("/", 1)[-1]
        in ("median", "p25", "p75", "min", "max", "ratio", "implied_step_ratio")
    ]
    assert len(ratios) > 50
    # None: a memory ratio against a zero baseline (undefined; the MiB difference is kept)
    bad = [
        (p, v)
        for p, v in ratios
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v))
    ]
    assert not bad, bad[:10]


# ---------------------------------------------------------------------------------------------
# the measurement design: the drift self-check, the state restore, the subnormal policy


def test_drift_check_fails_on_a_drifting_series() -> None:
    """The self-check raises on the drift it exists for: the ungated torch step times measured
    before the state restore (0.4 s climbing to 21 s as the weights went subnormal)."""
    state = _benchmarks("_state")
    DriftError, check_drift, drift = state.DriftError, state.check_drift, state.drift

    drifting = [0.41, 0.44, 0.40, 1.8, 14.5, 20.3, 21.3, 21.0, 20.8]
    # first third [0.41, 0.44, 0.40] (median 0.41), last third [21.3, 21.0, 20.8] (median 21.0)
    assert drift(drifting) == pytest.approx(21.0 / 0.41 - 1.0)
    with pytest.raises(DriftError, match=r"drifted by more than 50%.*torch-eager/ungated"):
        check_drift({"torch-eager/ungated": drifting, "jax-jit/ungated": [1.0] * 9}, 0.5)
    speeding_up = [2.0, 2.1, 1.9, 1.0, 1.0, 1.0]  # a drift either way fails: -50% < -40%
    with pytest.raises(DriftError):
        check_drift({"x": speeding_up}, 0.4)
    steady = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.1, 0.9, 1.0]  # load noise, no trend
    result = check_drift({"x": steady}, 0.5)
    assert result["drift"]["x"] == pytest.approx(1.0 / 1.0 - 1.0)
    assert result["limit"] == 0.5 and result["points"] == {"x": 9}


def test_state_restore_makes_every_step_start_from_the_same_state() -> None:
    """Two steps each after ``reset`` give the same parameters; two steps in a row do not
    (the restore is what makes them equal)."""
    pytest.importorskip("torch")
    config, runners = _benchmarks("_config"), _benchmarks("_runners")
    STEP_MODES, STEP_SMOKE, UNGATED = config.STEP_MODES, config.STEP_SMOKE, config.UNGATED
    StepRunner = runners.StepRunner

    runner = StepRunner(STEP_MODES["torch-eager"], UNGATED, STEP_SMOKE, "cpu", "eager")
    b = runner.backend

    def snapshot() -> dict[str, Any]:
        return {k: b.to_numpy(v).copy() for k, v in runner.params.items()}

    runner.fresh_step()
    first = snapshot()
    runner.fresh_step()
    again = snapshot()
    runner.step()  # no restore: a second AdamW step moves the parameters further
    second = snapshot()
    assert all((first[k] == again[k]).all() for k in first)
    assert any((first[k] != second[k]).any() for k in first)


@pytest.mark.slow
def test_smoke_ran_the_drift_check_and_the_subnormal_policy(smoke: dict[str, Any]) -> None:
    check = smoke["drift_check"]
    assert "failed" not in check, check
    ran = {f"{mode}/ungated" for mode, fw in MODES.items() if gategrad.is_available(fw)}
    assert ran <= set(check["drift"]), (ran, check)
    assert all(math.isfinite(d) for d in check["drift"].values())
    assert "## Drift self-check" in smoke["_markdown"]
    policy = smoke["meta"]["subnormals"]
    if gategrad.is_available("torch"):
        assert policy["torch"]["flushed"] is True, policy
    if gategrad.is_available("jax"):
        assert policy["jax"]["flushed"] is True, policy
