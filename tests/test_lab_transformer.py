"""The transformer lab on a tiny configuration: it runs on torch, jax and mlx, the frameworks
agree, it is deterministic, and ungated DPO squeezes."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from gategrad.lab import LabConfig
from gategrad.lab.grammar import PROBE_SETS, make_lab_data, make_language
from gategrad.lab.transformer import run_transformer


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        return False


def tiny(backend: str, gates=("none", "q10", "token"), seeds=(0,), steps=20) -> LabConfig:
    cfg = LabConfig(
        model="transformer",
        backend=backend,
        seeds=list(seeds),
        steps=steps,
        eval_every=10,
        losses=["dpo"],
        gates=list(gates),
        lr=3e-3,
    )
    t = cfg.transformer
    t.d_model, t.d_ff, t.n_layers, t.n_content = 16, 32, 1, 9
    t.sft_steps, t.sft_lr, t.n_pairs, t.batch_size = 60, 3e-2, 64, 16
    t.n_heldout, t.n_probe = 16, 8
    return cfg


def _by(recs):
    return {(r["method"], r["seed"]): r["checkpoints"] for r in recs}


def test_language_and_data():
    lang = make_language(0, n_topics=3, n_content=9, prompt_len=2, response_len=5)
    assert lang.vocab == 3 + 3 + 9 and lang.seq_len == 10
    np.testing.assert_allclose(lang.trans.sum(-1), 1.0)
    data = make_lab_data(lang, 0, n_pairs=12, n_heldout=4, n_probe=3)
    assert data.train_chosen.shape == (12, 10)
    # chosen and rejected share the prompt, differ in the response
    rs = lang.response_start
    np.testing.assert_array_equal(data.train_chosen[:, :rs], data.train_rejected[:, :rs])
    assert set(data.probes) == set(PROBE_SETS)
    for toks in (data.train_chosen, data.train_rejected, *data.probes.values()):
        assert toks.min() >= 0 and toks.max() < lang.vocab
        assert (toks[:, rs:] >= 3 + lang.n_topics).all()  # responses are content tokens
    again = make_lab_data(lang, 0, n_pairs=12, n_heldout=4, n_probe=3)
    np.testing.assert_array_equal(again.train_rejected, data.train_rejected)


@pytest.fixture(scope="module")
def torch_runs():
    pytest.importorskip("torch")
    return run_transformer(
        tiny("torch", gates=("none", "q10", "token", "zero"), seeds=(0, 1), steps=40)
    )


def test_torch_dpo_squeezes_and_the_gate_helps(torch_runs):
    by = _by(torch_runs)
    for seed in (0, 1):
        ck = by[("sigmoid", seed)]
        assert ck[-1]["top1"] > ck[0]["top1"]
        assert ck[-1]["argmax"] > ck[0]["argmax"]
        assert ck[-1]["entropy"] < ck[0]["entropy"]
        assert ck[-1]["chosen"] < by[("sigmoid+q10", seed)][-1]["chosen"]


@pytest.fixture(scope="module")
def torch_small():
    pytest.importorskip("torch")
    return run_transformer(small("torch"))


def small(backend: str) -> LabConfig:
    cfg = tiny(backend, gates=("none", "q10"), steps=10)
    # one batch shape everywhere (SFT, reference log-probs, steps): JAX compiles each shape
    cfg.transformer.sft_steps, cfg.transformer.sft_batch, cfg.transformer.n_pairs = 20, 32, 32
    return cfg


def test_torch_is_deterministic(torch_small):
    again = run_transformer(small("torch"))
    assert json.dumps(_strip(again)) == json.dumps(_strip(torch_small))


def _strip(recs):
    """Records without their wall-clock timings."""
    return [
        {**{k: v for k, v in r.items() if k not in ("seconds", "sft")}, "sft": r["sft"]["loss"]}
        for r in recs
    ]


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("jax", marks=pytest.mark.skipif(not _has("jax"), reason="jax missing")),
        pytest.param("mlx", marks=pytest.mark.skipif(not _has("mlx.core"), reason="no mlx")),
    ],
)
def test_jax_and_mlx_agree_with_torch(backend, torch_small):
    ref = _by(torch_small)
    got = _by(run_transformer(small(backend)))
    assert set(got) == set(ref)
    for key, ck in got.items():
        for a, b in zip(ck, ref[key], strict=True):
            for q in ("chosen", "rejected", "argmax", "top1", "entropy", "others"):
                assert a[q] == pytest.approx(b[q], rel=2e-3, abs=2e-3), (backend, key, q)


@pytest.mark.skipif(not _has("torch"), reason="torch is not installed")
def test_scale_runs_every_size_and_writes_its_outputs(tmp_path):
    """``gategrad lab scale`` on two tiny sizes: one row per (size, method), parameter counts
    that equal the number of initial weights, and its three files."""
    from gategrad.lab.scale import param_count, run_scale, sized
    from gategrad.lab.transformer import model_config
    from gategrad.testing.models import init_transformer_params

    cfg = tiny("torch", gates=("none", "seq"), steps=10)
    cfg.transformer.sft_steps = 10
    cfg.out_dir = str(tmp_path)
    res = run_scale(cfg, [(1, 8), (2, 16)], progress=False, echo=None)
    assert [(r["size"], r["name"]) for r in res["rows"]] == [
        ("1x8", "DPO"), ("1x8", "Gate-DPO (seq)"), ("2x16", "DPO"), ("2x16", "Gate-DPO (seq)")
    ]  # fmt: skip
    for (layers, width), row in zip([(1, 8), (2, 16)], res["rows"][::2], strict=True):
        c = sized(cfg.resolved(), layers, width)
        weights = init_transformer_params(model_config(c), 0)
        assert row["params"] == param_count(c) == sum(w.size for w in weights.values())
    for name in ("scale.txt", "scale.json", "scale.png"):
        assert (tmp_path / name).is_file(), name
    data = json.loads((tmp_path / "scale.json").read_text())
    assert len(data["runs"]) == 4 and data["rows"][1]["mean"]["d_chosen"] == pytest.approx(
        res["rows"][1]["mean"]["d_chosen"]
    )
    with pytest.raises(ValueError, match="transformer"):
        run_scale(LabConfig(), [(1, 8)], write=False, echo=None)


@pytest.mark.skipif(not _has("torch"), reason="torch is not installed")
def test_extended_sft_fits_the_rejected_responses(tmp_path):
    """With ``sft="extended"`` the SFT model has seen the rejected sequences, so they start
    more probable than after the standard SFT."""
    std = tiny("torch", gates=("none",), steps=1)
    ext = tiny("torch", gates=("none",), steps=1)
    ext.sft = "extended"
    a = run_transformer(std)[0]["checkpoints"][0]
    b = run_transformer(ext)[0]["checkpoints"][0]
    assert b["train_rejected"] > a["train_rejected"] + 1.0, (a, b)
