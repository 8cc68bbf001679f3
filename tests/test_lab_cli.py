"""``gategrad lab`` end to end on tiny configurations: outputs, reproducibility, the CLI."""

from __future__ import annotations

import builtins
import json

import pytest

from gategrad.cli import main
from gategrad.lab import LabConfig, run_lab

TINY = [
    "--seeds",
    "0",
    "1",
    "--steps",
    "20",
    "--eval-every",
    "10",
    "--sft-steps",
    "20",
    "--no-progress",
]


def test_run_lab_writes_everything_and_reproduces(tmp_path):
    cfg = LabConfig(
        seeds=[0, 1],
        steps=20,
        eval_every=10,
        losses=["dpo", "ipo"],
        gates=["none", "seq", "token"],
        out_dir=str(tmp_path / "a"),
    )
    cfg.toy.sft_steps = 20
    res = run_lab(cfg, progress=False, echo=None)
    out = tmp_path / "a"
    for name in (
        "config.json",
        "results.json",
        "table.txt",
        "delta_chosen.png",
        "mass_dynamics.png",
    ):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 2 * 6
    assert [c["step"] for c in results["runs"][0]["checkpoints"]] == [0, 10, 20]
    assert [r["name"] for r in results["table"]] == [
        "DPO",
        "Gate-DPO (seq)",
        "Gate-DPO (tok-log)",
        "IPO",
        "Gate-IPO (seq)",
        "Gate-IPO (tok-log)",
    ]
    table = (out / "table.txt").read_text()
    for header in ("Δ Chosen", "Δ Rejected", "Margin", "Δ Others", "Top-1", "Entropy"):
        assert header in table
    row = res.row("Gate-DPO (seq)")
    assert row["mean"]["margin"] == pytest.approx(
        row["mean"]["d_chosen"] - row["mean"]["d_rejected"]
    )
    # config.json alone reproduces the run
    cfg2 = LabConfig.load(out / "config.json")
    cfg2.out_dir = str(tmp_path / "b")
    run_lab(cfg2, progress=False, echo=None, plots=False)
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["runs"] == results["runs"]


def test_cli_prints_the_table(tmp_path, capsys):
    rc = main(
        [
            "lab",
            *TINY,
            "--losses",
            "dpo",
            "--gates",
            "none",
            "seq",
            "zero",
            "--out",
            str(tmp_path),
            "--no-plots",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "| DPO |" in text and "| Gate-DPO (seq) |" in text and "| DPO (g=0) |" in text
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["seeds"] == [0, 1] and cfg["steps"] == 20 and cfg["gates"] == ["none", "seq", "zero"]
    assert not (tmp_path / "delta_chosen.png").exists()


def test_cli_config_flag_and_overrides(tmp_path, capsys):
    assert (
        main(
            [
                "lab",
                *TINY,
                "--losses",
                "dpo",
                "--gates",
                "none",
                "--out",
                str(tmp_path / "a"),
                "--no-plots",
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "lab",
                "--config",
                str(tmp_path / "a" / "config.json"),
                "--steps",
                "10",
                "--out",
                str(tmp_path / "b"),
                "--no-plots",
                "--no-progress",
                "--quiet",
            ]
        )
        == 0
    )
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["steps"] == 10 and cfg["seeds"] == [0, 1] and cfg["losses"] == ["sigmoid"]


def test_cli_errors_are_one_line(capsys):
    assert main(["lab", "--model", "toy", "--backend", "torch", "--no-progress"]) == 2
    assert "numpy backend only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["lab", "--gates", "sometimes"])


def test_help_and_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["lab", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--backend",
        "--seeds",
        "--steps",
        "--lr",
        "--beta",
        "--losses",
        "--gates",
        "--alpha",
        "--tau",
        "--log-tau",
        "--out",
        "--config",
    ):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["lab", "sweep", "--help"])
    assert "Selection rule" in capsys.readouterr().out
    assert main(["demo"]) == 0
    assert "g(p)" in capsys.readouterr().out
    assert main([]) == 0


def test_without_matplotlib_and_tqdm_the_table_still_prints(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] in ("matplotlib", "tqdm"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    rc = main(
        [
            "lab",
            "--seeds",
            "0",
            "--steps",
            "10",
            "--sft-steps",
            "5",
            "--losses",
            "dpo",
            "--gates",
            "none",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert "| DPO |" in captured.out
    notes = [line for line in captured.out.splitlines() if "matplotlib is not installed" in line]
    assert len(notes) == 1
    assert not (tmp_path / "delta_chosen.png").exists()


def test_sweep_selects_by_the_documented_rule(tmp_path, capsys):
    rc = main(
        [
            "lab",
            "sweep",
            "--seeds",
            "0",
            "--steps",
            "60",
            "--sft-steps",
            "60",
            "--kinds",
            "seq",
            "token",
            "--alphas",
            "200",
            "--taus",
            "0.02",
            "0.5",
            "--log-taus",
            "1e-8",
            "0.5",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--no-plots",
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "sweep.json").read_text())
    sel = result["selection"]
    rows = {r["method"]: r for r in result["summary"]}
    lost = sel["squeezing_loss"]
    c_none = rows["sigmoid"]["mean"]["d_chosen"]
    for kind, v in sel["kinds"].items():
        cands = [r for k, r in rows.items() if k.startswith(f"sigmoid+{kind}@")]
        ok = [r for r in cands if (r["mean"]["d_chosen"] - c_none) / lost >= 0.9]
        if ok and v["choice"] is not None:
            best = max(ok, key=lambda r: r["mean"]["margin"])
            assert v["choice"]["key"] == best["method"]
    assert "Selected seq" in capsys.readouterr().out
