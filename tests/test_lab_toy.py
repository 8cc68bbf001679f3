"""The NumPy toy lab: squeezing occurs, the gate counters it, and the gate is inert at first.

These assert what holds robustly in the toy's default configuration, on five fixed seeds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from gategrad.lab import LabConfig
from gategrad.lab.methods import build_methods
from gategrad.lab.toy import run_toy

SEEDS = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def dpo_runs():
    cfg = LabConfig(seeds=SEEDS, losses=["dpo"], gates=["none", "seq", "q10", "token"])
    recs = run_toy(cfg)
    out: dict[str, dict[int, list]] = {}
    for r in recs:
        out.setdefault(r["method"], {})[r["seed"]] = r["checkpoints"]
    return out


def test_ungated_dpo_squeezes(dpo_runs):
    """Ungated DPO: the argmax (top competitor) gains mass and held-out entropy falls."""
    for seed, ck in dpo_runs["sigmoid"].items():
        first, last = ck[0], ck[-1]
        assert last["top1"] > first["top1"] + 0.1, seed
        assert last["argmax"] > first["argmax"], seed
        assert last["except_argmax"] < first["except_argmax"], seed
        assert last["entropy"] < first["entropy"] - 0.3, seed
        assert last["others"] < first["others"], seed


@pytest.mark.parametrize("gate", ["seq", "q10", "token"])
def test_gate_ends_with_higher_chosen_logprob(dpo_runs, gate):
    """In at least 4 of 5 seeds the gated run ends with a higher chosen log-prob."""
    wins = sum(
        dpo_runs[f"sigmoid+{gate}"][s][-1]["chosen"] > dpo_runs["sigmoid"][s][-1]["chosen"]
        for s in SEEDS
    )
    assert wins >= 4, wins


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "cal_dpo", "dpo_shift"])
def test_gated_and_ungated_identical_at_first_step(loss):
    """Before any rejected response is improbable (a uniform policy over 4 classes: every
    p = 1/4), the first gated step equals the ungated one. The paper's gates are exactly 1
    there (to 1e-12); the log-space gate is 0.986 at p = 1/4 with its defaults (tau=0.03,
    T=0.5), so its step differs by at most 1.4% in the rejected branch."""
    from gategrad.lab import _numpy_grads as ng
    from gategrad.lab.toy import make_toy_data, toy_step

    cfg = LabConfig(seeds=[0]).resolved()
    cfg.toy.vocab = 4
    data = make_toy_data(cfg, 0)
    params = {"W": np.zeros_like(data.params0["W"]), "b": np.zeros(4)}
    logp = ng.log_softmax(data.x_train @ params["W"] + params["b"])  # (N, L, 4), all log(1/4)
    n = data.x_train.shape[0] * data.x_train.shape[1]
    assert np.allclose(logp, np.log(0.25))
    ref = (np.full(data.x_train.shape[0], n // data.x_train.shape[0] * np.log(0.25)),) * 2
    methods = {m.gate_kind: m for m in build_methods([loss], ["none", "seq", "q10", "token"])}
    plain, info = toy_step(params, data, methods["none"], ref, 0.1)
    for kind, tol in (("seq", 1e-12), ("q10", 1e-12), ("token", 0.015)):
        grads, ginfo = toy_step(params, data, methods[kind], ref, 0.1)
        assert ginfo["loss"] == info["loss"]
        assert ginfo["gate"] >= (1 - 1e-12 if tol < 1e-6 else 0.985), (kind, ginfo["gate"])
        for k in ("W", "b"):
            scale = np.abs(plain[k]).max()
            assert scale > 0
            assert np.abs(grads[k] - plain[k]).max() <= tol * scale, (kind, k)


@pytest.fixture(scope="module")
def default_rows():
    """The default ``gategrad lab`` (every loss x gate, seeds 0 1 2): a few seconds."""
    from gategrad.lab.report import summarize

    cfg = LabConfig()
    return summarize(run_toy(cfg), cfg.resolved().methods())


def test_default_table_has_no_two_equal_rows(default_rows):
    """With multi-token responses the seq, q10 and per-token gates see different
    probabilities: no two rows of the default table agree (they did, by construction, with
    one-token responses)."""
    assert len(default_rows) == 20
    cells = [tuple(round(r["mean"][k], 2) for k in ("d_chosen", "d_rejected", "d_others"))
             for r in default_rows]  # fmt: skip
    assert len(set(cells)) == len(cells), cells
    by = {r["method"]: r["mean"]["d_rejected"] for r in default_rows}
    for loss in ("sigmoid", "ipo", "cal_dpo", "dpo_shift"):
        gated = [by[f"{loss}+{k}"] for k in ("seq", "q10", "token")]
        assert min(abs(a - b) for i, a in enumerate(gated) for b in gated[i + 1 :]) > 0.05


def test_default_table_keeps_the_papers_sign_pattern(default_rows):
    """Ungated DPO loses chosen log-prob in every seed; every gated loss gains it on
    average, and so does the g=0 baseline."""
    for r in default_rows:
        if r["method"] == "sigmoid":
            assert max(r["values"]["d_chosen"]) < 0, r["values"]["d_chosen"]
        elif "+" in r["method"]:
            assert r["mean"]["d_chosen"] > 0, (r["name"], r["mean"]["d_chosen"])


def test_extended_sft_makes_the_rejected_responses_probable_first():
    """``sft="extended"`` also fits the rejected responses during SFT, so the reference model
    starts with a higher rejected log-prob, and ungated DPO loses less chosen log-prob."""
    std = LabConfig(seeds=[0], losses=["dpo"], gates=["none"], steps=100)
    ext = LabConfig(seeds=[0], losses=["dpo"], gates=["none"], steps=100, sft="extended")
    a, b = run_toy(std)[0]["checkpoints"], run_toy(ext)[0]["checkpoints"]
    assert b[0]["rejected"] > a[0]["rejected"] + 2.0
    assert b[-1]["chosen"] - b[0]["chosen"] > a[-1]["chosen"] - a[0]["chosen"]
    with pytest.raises(ValueError, match="sft"):
        LabConfig(sft="longer").resolved()


def test_toy_is_deterministic():
    cfg = LabConfig(seeds=[3], losses=["cal_dpo"], gates=["none", "token"], steps=30)
    a, b = run_toy(cfg), run_toy(cfg)
    assert json.dumps(a) == json.dumps(b)  # (NaN != NaN, so compare the serialisation)


def test_zero_gate_baseline_drops_the_rejected_gradient():
    cfg = LabConfig(seeds=[0], losses=["dpo"], gates=["zero"], steps=30)
    ck = run_toy(cfg)[0]["checkpoints"]
    assert all(c["gate"] == 0.0 for c in ck[1:])
    assert ck[-1]["chosen"] > ck[0]["chosen"]


def test_methods_and_names():
    methods = build_methods(["dpo", "cal-dpo"], ["none", "seq", "token", "zero"])
    assert [m.name for m in methods] == [
        "DPO",
        "Gate-DPO (seq)",
        "Gate-DPO (tok-log)",
        "DPO (g=0)",
        "Cal-DPO",
        "Gate-Cal-DPO (seq)",
        "Gate-Cal-DPO (tok-log)",
        "Cal-DPO (g=0)",
    ]
    assert methods[2].gate.granularity == "token"
    with pytest.raises(ValueError, match="unknown loss"):
        build_methods(["dpoo"], ["none"])
    with pytest.raises(ValueError, match="gate kind"):
        build_methods(["dpo"], ["tok"])


def test_config_validation():
    with pytest.raises(ValueError, match="numpy backend only"):
        LabConfig(backend="torch").resolved()
    with pytest.raises(ValueError, match="--backend"):
        LabConfig(model="transformer", backend="numpy").resolved()
    with pytest.raises(ValueError, match="model"):
        LabConfig(model="rnn").resolved()
    cfg = LabConfig().resolved()
    assert cfg.backend == "numpy" and cfg.steps > 0 and cfg.losses[0] == "sigmoid"
    again = LabConfig.from_dict(cfg.to_dict()).resolved()
    assert again == cfg
    assert np.isfinite(cfg.alpha) and np.isfinite(cfg.log_tau)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"lr": float("inf")}, "lr"),
        ({"beta": float("inf")}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"lr": 0.0}, "lr"),
        ({"dpo_shift_lam": -3.0}, "dpo_shift_lam"),
        ({"dpo_shift_lam": 1.5}, "dpo_shift_lam"),
        ({"seeds": [-1]}, "seed"),
        ({"seeds": []}, "seeds"),
        ({"steps": 0}, "steps"),
        ({"alpha": float("inf")}, "alpha"),
    ],
)
def test_config_refuses_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        LabConfig(**changes).resolved()


@pytest.mark.parametrize(
    ("part", "name", "value"),
    [
        ("toy", "sft_steps", -5),
        ("toy", "response_len", 0),
        ("transformer", "batch_size", 0),
        ("transformer", "n_pairs", 0),
        ("transformer", "d_model", 0),
        ("transformer", "d_model", 33),  # not a multiple of the 2 heads
        ("transformer", "sft_steps", -5),
    ],
)
def test_config_refuses_bad_model_options(part, name, value):
    cfg = LabConfig(model="transformer" if part == "transformer" else "toy")
    setattr(getattr(cfg, part), name, value)
    with pytest.raises(ValueError, match=name):
        cfg.resolved()


def test_dpo_shift_lambda_is_checked_where_the_methods_are_built():
    """The toy used to pass any lambda to the closed-form gradients unchecked."""
    with pytest.raises(ValueError, match="lam"):
        build_methods(["dpo_shift"], ["none"], loss_params={"dpo_shift": {"lam": -3.0}})
