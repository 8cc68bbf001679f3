"""Each loss against an independent transcription of its source's code (float64, PyTorch).

The expressions below are copied from the sources named in ``SOURCES`` (repository, file,
lines), with their variable names, and are evaluated with their own reductions (for Cal-DPO
the official ``F.mse_loss`` batch means). gategrad's loss and its gradients with respect to all
four log-prob inputs must equal them. ``docs/losses.md`` ("Audit against the sources") lists
the same sources and the maximum differences this file measures (``python
tests/test_loss_sources.py`` prints them).

Tolerance: everything is float64; the two sides evaluate the same formula in a different order
(a batch mean of a sum against a sum of batch means, ``log sigmoid`` of a product against a
product inside it), so they differ by a few ulps of the largest term. With terms up to about
``1e3`` (Cal-DPO's squared calibration error at ``|h| ~ 20``) that is ``~1e3 * 2.2e-16 * 10``;
``RTOL = 1e-12`` relative to the largest magnitude leaves a margin of about 50.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")
F = torch.nn.functional

import gategrad  # noqa: E402

RTOL = 1e-12
# the official Cal-DPO code broadcasts a scalar target in F.mse_loss (intended: a batch mean)
pytestmark = pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")

# loss -> (source, what its transcription below copies)
SOURCES = {
    "cal_dpo": "tengxiao1/Cal-DPO scripts/dpo_trainer.py L1203-1216 (commit 7d16b46)",
    "dpo_shift": "Meaquadddd/DPO-Shift scripts/dposhift_trainer.py L1118-1145 (commit 52eebac)",
    "sigmoid_cdpo": "Meaquadddd/DPO-Shift scripts/dposhift_trainer.py L1141-1145 (TRL 0.x sigmoid)",
    "sigmoid": "trl 1.16 trl/trainer/dpo_trainer.py L1387-1388",
    "hinge": "trl 1.16 trl/trainer/dpo_trainer.py L1390-1391",
    "ipo": "trl 1.16 trl/trainer/dpo_trainer.py L1393-1404",
    "robust": "trl 1.16 trl/trainer/dpo_trainer.py L1428-1431",
    "simpo": "trl 1.16 trl/experimental/cpo/cpo_trainer.py L715-722 (average_log_prob=True)",
    "dpop": "Pal et al. 2024 (arXiv 2402.13228) Eq. 3; no official code is published",
}


# ---------------------------------------------------------------------------------------------
# the transcriptions (per-sequence inputs; ``n_*`` are token counts)


def official_cal_dpo(pc, pr, rc, rr, beta):
    chosen_rewards = pc - rc
    rejected_rewards = pr - rr
    DPO_loss = -F.logsigmoid(chosen_rewards - rejected_rewards)  # noqa: N806 (the source's)
    Cal_loss = F.mse_loss(  # noqa: N806
        chosen_rewards, torch.tensor(1.0 / (2.0 * beta)).to(chosen_rewards)
    ) + F.mse_loss(rejected_rewards, torch.tensor(-1.0 / (2.0 * beta)).to(rejected_rewards))
    losses = DPO_loss + 0.5 * Cal_loss
    return losses.mean()


def official_dpo_shift(pc, pr, rc, rr, beta, dpo_lambda, label_smoothing=0.0):
    pi_logratios = pc - dpo_lambda * pr
    ref_logratios = rc - dpo_lambda * rr
    logits = pi_logratios - ref_logratios
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )
    return losses.mean()


def trl_dpo(loss_type, pc, pr, rc, rr, beta, n_c, n_r, label_smoothing=0.0):
    chosen_scores = pc - rc  # f_divergence_type == "reverse_kl"
    rejected_scores = pr - rr
    delta_score = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        per_sequence_loss = -F.logsigmoid(beta * delta_score)
    elif loss_type == "hinge":
        per_sequence_loss = torch.relu(1 - beta * delta_score)
    elif loss_type == "ipo":
        chosen_avg_score = chosen_scores / n_c.clamp(min=1.0)
        rejected_avg_score = rejected_scores / n_r.clamp(min=1.0)
        ipo_delta = chosen_avg_score - rejected_avg_score
        per_sequence_loss = (ipo_delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        clean_loss_term = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
        flipped_loss_term = -label_smoothing * F.logsigmoid(-beta * delta_score)
        per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * label_smoothing)
    else:
        raise AssertionError(loss_type)
    return per_sequence_loss.mean()


def trl_cpo_simpo(pc, pr, beta, simpo_gamma, n_c, n_r, label_smoothing=0.0):
    policy_chosen_logps, policy_rejected_logps = pc / n_c, pr / n_r  # average_log_prob
    logits = policy_chosen_logps - policy_rejected_logps
    gamma_logratios = simpo_gamma / beta
    logits = logits - gamma_logratios
    losses = (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing)
        - F.logsigmoid(-beta * logits) * label_smoothing
    )
    return losses.mean()


def paper_dpop(pc, pr, rc, rr, beta, lam):
    """Pal et al. 2024, Eq. 3: ``-log sigma(beta (log(pi_w/ref_w) - log(pi_l/ref_l)
    - lambda max(0, log(ref_w/pi_w))))``."""
    penalty = torch.clamp(rc - pc, min=0.0)
    return (-F.logsigmoid(beta * ((pc - rc) - (pr - rr) - lam * penalty))).mean()


# ---------------------------------------------------------------------------------------------


def _inputs(seed: int, batch: int = 64, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    n_c = torch.randint(1, 30, (batch,), generator=g).double()
    n_r = torch.randint(1, 30, (batch,), generator=g).double()
    pc = -n_c * torch.rand(batch, generator=g, dtype=torch.float64) * 3 * scale
    pr = -n_r * torch.rand(batch, generator=g, dtype=torch.float64) * 3 * scale
    rc = pc + torch.randn(batch, generator=g, dtype=torch.float64) * scale
    rr = pr + torch.randn(batch, generator=g, dtype=torch.float64) * scale
    return [t.clone().requires_grad_() for t in (pc, pr, rc, rr)], n_c, n_r


# loss name -> (gategrad call, source call), both f(pc, pr, rc, rr, n_c, n_r, beta) -> scalar
def _cases():
    def gg(loss_type, **params):
        def f(pc, pr, rc, rr, n_c, n_r, beta):
            refs = () if loss_type == "simpo" else (rc, rr)
            loss, _ = gategrad.preference_loss(
                loss_type, pc, pr, *refs, beta=beta, chosen_lengths=n_c, rejected_lengths=n_r,
                **params,
            )  # fmt: skip
            return loss

        return f

    return {
        "cal_dpo": (gg("cal_dpo"), lambda pc, pr, rc, rr, nc, nr, b: official_cal_dpo(
            pc, pr, rc, rr, b)),
        "dpo_shift": (gg("dpo_shift", lam=0.8), lambda pc, pr, rc, rr, nc, nr, b:
                      official_dpo_shift(pc, pr, rc, rr, b, 0.8)),
        "sigmoid_cdpo": (gg("sigmoid", label_smoothing=0.2), lambda pc, pr, rc, rr, nc, nr, b:
                         official_dpo_shift(pc, pr, rc, rr, b, 1.0, 0.2)),
        "sigmoid": (gg("sigmoid"), lambda pc, pr, rc, rr, nc, nr, b: trl_dpo(
            "sigmoid", pc, pr, rc, rr, b, nc, nr)),
        "hinge": (gg("hinge"), lambda pc, pr, rc, rr, nc, nr, b: trl_dpo(
            "hinge", pc, pr, rc, rr, b, nc, nr)),
        "ipo": (gg("ipo"), lambda pc, pr, rc, rr, nc, nr, b: trl_dpo(
            "ipo", pc, pr, rc, rr, b, nc, nr)),
        "robust": (gg("robust", label_smoothing=0.2), lambda pc, pr, rc, rr, nc, nr, b: trl_dpo(
            "robust", pc, pr, rc, rr, b, nc, nr, 0.2)),
        "simpo": (gg("simpo", gamma=0.3), lambda pc, pr, rc, rr, nc, nr, b: trl_cpo_simpo(
            pc, pr, b, 0.3, nc, nr)),
        "dpop": (gg("dpop", dpop_lambda=5.0), lambda pc, pr, rc, rr, nc, nr, b: paper_dpop(
            pc, pr, rc, rr, b, 5.0)),
    }  # fmt: skip


CASES = _cases()
BETAS = (0.1, 0.5, 2.0)


def measure(name: str, seeds=range(4), scales=(0.1, 1.0, 5.0)) -> dict[str, float]:
    """Max |difference| of the loss and of its four gradients over seeds, scales and betas,
    and the largest magnitude seen (for the relative tolerance)."""
    ours, theirs = CASES[name]
    d_value = d_grad = top = 0.0
    for seed in seeds:
        for scale in scales:
            for beta in BETAS:
                xs, n_c, n_r = _inputs(seed, scale=scale)
                a = ours(*xs, n_c, n_r, beta)
                ga = torch.autograd.grad(a, xs, allow_unused=True)
                b = theirs(*xs, n_c, n_r, beta)
                gb = torch.autograd.grad(b, xs, allow_unused=True)
                d_value = max(d_value, abs(float((a - b).detach())))
                top = max(top, abs(float(a.detach())), abs(float(b.detach())))
                for u, v in zip(ga, gb, strict=True):
                    if u is None and v is None:
                        continue
                    u = torch.zeros_like(xs[0]) if u is None else u
                    v = torch.zeros_like(xs[0]) if v is None else v
                    d_grad = max(d_grad, float((u - v).abs().max()))
                    top = max(top, float(u.abs().max()), float(v.abs().max()))
    return {"value": d_value, "grad": d_grad, "scale": top}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_equals_its_source(name):
    m = measure(name)
    assert m["value"] <= RTOL * m["scale"], (name, m)
    assert m["grad"] <= RTOL * m["scale"], (name, m)


def test_cal_dpo_weight_is_the_official_half_and_the_papers_one_is_a_parameter():
    """The default follows the code (0.5); ``calibration_weight=1`` is the paper's printed
    equation, a different loss (it differs from the official one by half the calibration
    terms, which the default must not)."""
    xs, n_c, n_r = _inputs(7)
    official = float(official_cal_dpo(*xs, 0.1))
    half, _ = gategrad.cal_dpo_loss(*xs, beta=0.1)
    one, _ = gategrad.cal_dpo_loss(*xs, beta=0.1, calibration_weight=1.0)
    cal = 0.5 * float(
        ((xs[0] - xs[2] - 5.0) ** 2).mean() + ((xs[1] - xs[3] + 5.0) ** 2).mean()
    )  # half the calibration terms: what weight 1 adds on top of the official loss
    assert float(half) == pytest.approx(official, rel=RTOL)
    assert float(one) == pytest.approx(official + cal, rel=1e-10)
    assert gategrad.losses.LOSS_PARAMS["cal_dpo"] == {"calibration_weight": 0.5}
    with pytest.raises(ValueError, match="calibration_weight"):
        gategrad.cal_dpo_loss(*xs, calibration_weight=-1.0)


def test_per_example_and_batch_mean_forms_agree():
    """The official ``mse_loss`` reduces over the batch before it is added to every example's
    DPO term; the registry adds the per-example squares. Their batch means are equal, and the
    per-example official losses differ from ours only by a constant shift (zero mean)."""
    xs, _, _ = _inputs(3)
    pc, pr, rc, rr = (x.detach() for x in xs)
    hw, hl = pc - rc, pr - rr
    ours = -F.logsigmoid(hw - hl) + 0.5 * ((hw - 5.0) ** 2 + (hl + 5.0) ** 2)
    theirs = -F.logsigmoid(hw - hl) + 0.5 * (
        F.mse_loss(hw, torch.tensor(5.0).double()) + F.mse_loss(hl, torch.tensor(-5.0).double())
    )
    assert float(ours.mean()) == pytest.approx(float(theirs.mean()), rel=RTOL)
    shift = ours - theirs
    assert float(shift.mean()) == pytest.approx(0.0, abs=RTOL * float(theirs.abs().max()))


TRL_LINES = {
    "trainer/dpo_trainer.py": (
        "per_sequence_loss = -F.logsigmoid(self.beta * delta_score)",
        "per_sequence_loss = torch.relu(1 - self.beta * delta_score)",
        "chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)",
        "per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2",
        "clean_loss_term = -(1 - self.label_smoothing) * F.logsigmoid(self.beta * delta_score)",
        "flipped_loss_term = -self.label_smoothing * F.logsigmoid(-self.beta * delta_score)",
        "per_sequence_loss = (clean_loss_term - flipped_loss_term) / "
        "(1 - 2 * self.label_smoothing)",
    ),
    "experimental/cpo/cpo_trainer.py": (
        "gamma_logratios = self.simpo_gamma / self.beta",
        "logits = logits - gamma_logratios",
        'average_log_prob=self.loss_type in ["ipo", "simpo"]',
    ),
}


@pytest.mark.parametrize("path", list(TRL_LINES))
def test_transcribed_trl_lines_are_in_the_installed_trl(path):
    """The TRL transcriptions above are checked against the installed TRL's source text (read
    as a file: importing TRL's trainers takes seconds), so a TRL that changes these lines fails
    here instead of silently disagreeing."""
    spec = importlib.util.find_spec("trl")
    if spec is None or spec.origin is None:
        pytest.skip("install the trl extra: pip install 'gategrad[trl]'")
    file = Path(spec.origin).parent / path
    if not file.is_file():  # a TRL with another layout (the tested one is 1.16)
        pytest.skip(f"{file} not found")
    source = file.read_text(encoding="utf-8")
    for line in TRL_LINES[path]:
        assert line in source, (path, line)


if __name__ == "__main__":  # the numbers of docs/losses.md's audit table
    import warnings

    warnings.simplefilter("ignore", UserWarning)
    print(f"gategrad from {gategrad.__file__}; float64 eps {np.finfo(np.float64).eps:.1e}")
    for name in SOURCES:
        m = measure(name)
        print(f"{name:13s} value {m['value']:.1e}  grad {m['grad']:.1e}  (scale {m['scale']:.1e})")
