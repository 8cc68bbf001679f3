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


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--lr", "inf"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--beta", "inf"], "--beta"),
        (["--beta", "-0.1"], "--beta"),
        (["--dpo-shift-lam", "-3"], "--dpo-shift-lam"),
        (["--dpo-shift-lam", "1.5"], "--dpo-shift-lam"),
        (["--batch-size", "0"], "--batch-size"),
        (["--pairs", "0"], "--pairs"),
        (["--sft-steps", "-5"], "--sft-steps"),
        (["--seeds", "-1"], "--seeds"),
        (["--seeds", "0", "x"], "--seeds"),
        (["--d-model", "0"], "--d-model"),
        (["--steps", "0"], "--steps"),
        (["--eval-every", "-1"], "--eval-every"),
        (["--alpha", "inf"], "--alpha"),
        (["--sft", "longer"], "--sft"),
    ],
)
def test_cli_refuses_bad_numbers_naming_the_flag(argv, flag, capsys):
    """An argparse error (exit code 2) that names the flag, before anything runs: these used
    to print a table of NaN, be ignored, or end in a traceback."""
    with pytest.raises(SystemExit) as exc:
        main(["lab", *argv, "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err, err


def test_cli_refuses_an_odd_width_and_scale_sizes(capsys):
    assert main(["lab", "--model", "transformer", "--d-model", "3", "--no-progress"]) == 2
    assert "d_model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["lab", "scale", "--sizes", "2by32"])
    assert exc.value.code == 2 and "--sizes" in capsys.readouterr().err
    assert main(["lab", "scale", "--d-model", "64", "--no-progress"]) == 2
    assert "--sizes" in capsys.readouterr().err


def test_cli_unwritable_out_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc = main(["lab", *TINY, "--losses", "dpo", "--gates", "none", "--out", str(blocker / "x")])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gategrad lab: error:") and "--out" in err


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not a JSON file"),
        ("[1, 2]", "JSON object"),
        ('{"toy": {"bogus": 1}}', "toy.bogus"),
        ('{"toy": 3}', "toy"),
        ('{"seeds": [-1]}', "seed"),
        ('{"lr": "fast"}', "lr"),
        ('{"transformer": {"d_model": 0}}', "d_model"),
        ('{"unknown": 1}', "unknown"),
    ],
)
def test_cli_bad_config_file_is_one_line_exit_2(tmp_path, capsys, text, match):
    path = tmp_path / "config.json"
    path.write_text(text)
    rc = main(["lab", "--config", str(path), "--no-progress", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_cli_missing_config_file(tmp_path, capsys):
    assert main(["lab", "--config", str(tmp_path / "none.json"), "--no-progress"]) == 2
    assert "none.json" in capsys.readouterr().err


def test_cli_extended_sft_is_recorded(tmp_path, capsys):
    argv = ["lab", *TINY, "--losses", "dpo", "--gates", "none", "--sft", "extended"]
    assert main([*argv, "--out", str(tmp_path), "--no-plots", "--quiet"]) == 0
    assert json.loads((tmp_path / "config.json").read_text())["sft"] == "extended"
