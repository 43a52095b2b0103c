"""Temperature / vector scaling, ECE / Brier, calibration.json and label-shift EM (calibration.py, prior_shift.py).

Synthetic data only, seeded, CPU, float64; the whole file runs in a few seconds."""

import json
import math

import pytest
import torch

from finllm_pl.calibration import (
    FILENAME,
    T_MAX,
    T_MIN,
    Calibration,
    brier_score,
    calibration_report,
    expected_calibration_error,
    fit_temperature,
    fit_vector_scaling,
    write_reliability_png,
)
from finllm_pl.errors import ModelError
from finllm_pl.prior_shift import adjust_to_prior, em_prior


def draw(logits: torch.Tensor, seed: int) -> torch.Tensor:
    """One label per row drawn from softmax(logits): data that softmax(logits) describes exactly."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)


def synthetic_scores(n: int, k: int = 3, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64) * scale


# --- temperature and vector scaling -------------------------------------------------------------

@pytest.mark.parametrize("t0", [0.5, 2.0])
def test_temperature_recovers_known_temperature(t0):
    z = synthetic_scores(20000, seed=1)
    labels = draw(z / t0, seed=2)  # the truth is softmax(z / t0): the fit must find T = t0
    t = fit_temperature(z, labels)
    assert abs(t - t0) < 0.05 * t0, t


def test_temperature_is_robust_at_the_edges():
    z = torch.tensor([[4.0, 0.0, -1.0]])
    # One row, right with a margin: the NLL keeps falling as T -> 0 (it stops where the loss is ~0, or at T_MIN).
    assert T_MIN <= fit_temperature(z, torch.tensor([0])) < 0.5
    # One row, wrong: the NLL falls as T -> inf (towards uniform), and the clamp decides.
    assert fit_temperature(z, torch.tensor([2])) == pytest.approx(T_MAX)
    # A million rows fit in reasonable time and give a finite, in-range temperature.
    z = synthetic_scores(1_000_000, seed=3)
    t = fit_temperature(z, draw(z, seed=4))
    assert abs(t - 1.0) < 0.02
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_temperature(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_vector_scaling_recovers_known_scales_and_biases():
    z = synthetic_scores(30000, seed=5, scale=2.0)
    w0 = torch.tensor([1.5, 0.7, 1.0], dtype=torch.float64)
    b0 = torch.tensor([0.8, -1.0, 0.2], dtype=torch.float64)  # zero mean: the representative the fit picks
    labels = draw(z * w0 + b0, seed=6)
    w, b = fit_vector_scaling(z, labels)
    assert torch.allclose(w, w0, atol=0.06), w
    assert torch.allclose(b, b0, atol=0.06), b
    # And it beats plain softmax on those rows, which temperature scaling alone cannot fix (a class bias).
    cal = Calibration("vector", w=w.tolist(), b=b.tolist())
    report = calibration_report(z, labels, cal)
    assert report["after"]["nll"] < report["before"]["nll"] - 0.05


def test_temperature_calibration_lowers_ece_and_keeps_accuracy():
    z = synthetic_scores(5000, seed=7)
    labels = draw(z / 2.5, seed=8)  # softmax(z) is over-confident
    cal = Calibration.fit(z, labels, "temperature", source="synthetic")
    assert cal.after["ece"] < cal.before["ece"] / 3
    assert cal.after["nll"] < cal.before["nll"]
    assert cal.after["accuracy"] == cal.before["accuracy"]  # T > 0 never changes the argmax
    assert cal.fitted_on == {"rows": 5000, "source": "synthetic"}
    assert torch.allclose(cal.apply(z).exp().sum(-1), torch.ones(5000, dtype=torch.float64))


# --- ECE and Brier by hand ----------------------------------------------------------------------

# Six rows, K = 3. Top-label confidence / right?: .70 y, .55 n, .47 y, .85 y, .38 n, .90 y.
PROBS = torch.tensor([
    [0.70, 0.20, 0.10],
    [0.55, 0.30, 0.15],
    [0.20, 0.47, 0.33],
    [0.05, 0.10, 0.85],
    [0.25, 0.37, 0.38],
    [0.05, 0.90, 0.05],
], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 1, 2, 0, 1])


def test_ece_by_hand():
    # 5 bins (.2 wide): (.2,.4] {.38 wrong}: |0-.38|; (.4,.6] {.55 wrong, .47 right}: |.5-.51|;
    # (.6,.8] {.70 right}: |1-.7|; (.8,1] {.85, .90 right}: |1-.875|.  ECE = (.38 + 2*.01 + .3 + 2*.125) / 6
    assert expected_calibration_error(PROBS, LABELS, n_bins=5) == pytest.approx(0.95 / 6, abs=1e-12)
    # 15 bins: every row alone in its bin, so ECE = mean |right - conf| = (.38+.53+.55+.30+.15+.10) / 6
    assert expected_calibration_error(PROBS, LABELS) == pytest.approx(2.01 / 6, abs=1e-12)
    # Bins are (lo, hi]: with 4 bins, confidence .75 exactly shares (.5, .75] with .6 -> |.5 - .675|
    # (with [lo, hi) bins it would be alone in [.75, 1) and the ECE .425).
    p = torch.tensor([[0.75, 0.25], [0.6, 0.4]], dtype=torch.float64)
    assert expected_calibration_error(p, torch.tensor([0, 1]), n_bins=4) == pytest.approx(0.175, abs=1e-12)
    # Perfectly calibrated toy: 10 rows at confidence .8, 8 of them right.
    p = torch.tensor([[0.8, 0.2]] * 10, dtype=torch.float64)
    assert expected_calibration_error(p, torch.tensor([0] * 8 + [1] * 2)) == pytest.approx(0.0, abs=1e-12)


def test_brier_by_hand():
    per_row = [0.09 + 0.04 + 0.01, 0.3025 + 0.49 + 0.0225, 0.04 + 0.2809 + 0.1089,
               0.0025 + 0.01 + 0.0225, 0.5625 + 0.1369 + 0.1444, 0.0025 + 0.01 + 0.0025]
    assert brier_score(PROBS, LABELS) == pytest.approx(sum(per_row) / 6, abs=1e-12)
    assert brier_score(torch.eye(3, dtype=torch.float64), torch.tensor([0, 1, 2])) == 0.0
    assert brier_score(torch.eye(3, dtype=torch.float64), torch.tensor([1, 2, 0])) == pytest.approx(2.0)


def test_reliability_png(tmp_path):
    path = write_reliability_png(tmp_path / "rel.png", PROBS, LABELS, title="six rows")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rel.png"]  # no temp file left behind


# --- calibration.json ---------------------------------------------------------------------------

def test_calibration_json_round_trip(tmp_path):
    z = synthetic_scores(300, seed=9)
    cal = Calibration.fit(z, draw(z / 1.7, seed=10), "vector", source="val.jsonl",
                          label_names=["negative", "neutral", "positive"])
    assert Calibration.load(tmp_path) is None  # no file: no calibration, not an error
    path = cal.save(tmp_path)
    assert path == tmp_path / FILENAME
    back = Calibration.load(tmp_path)
    assert back == cal
    assert torch.equal(back.apply(z), cal.apply(z))
    t = Calibration("temperature", temperature=1.7)
    t.save(tmp_path)
    assert Calibration.load(tmp_path) == t  # overwritten in place
    assert torch.allclose(t.apply(z), torch.log_softmax(z / 1.7, -1))


@pytest.mark.parametrize("content, reason", [
    ('{"kind": "temperature", "temperature": 1.5', "Expecting"),        # truncated JSON
    ('{"kind": "platt", "temperature": 1.0}', "kind must be"),           # unknown kind
    ('{"kind": "temperature", "temperature": -2}', "positive number"),   # impossible value
    ('{"kind": "vector", "w": [1, 1], "b": [0]}', "same length"),
    ('{"kind": "temperature", "temprature": 2}', "unknown field"),       # typo
    ('[1, 2]', "not an object"),
    ('{"kind": "temperature", "temperature": 1.0, "before": 3}', "before must be an object"),
    ('{"kind": "temperature", "temperature": true}', "positive number"),
])
def test_corrupt_calibration_json(tmp_path, content, reason):
    (tmp_path / FILENAME).write_text(content)
    with pytest.raises(ModelError) as e:
        Calibration.load(tmp_path)
    msg = str(e.value)
    assert FILENAME in msg and reason in msg and "\n" not in msg


# --- label shift (EM) ---------------------------------------------------------------------------

MEANS = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)  # x | y ~ N(MEANS[y], 1)
TRAIN_PRIOR = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)


def posteriors_under_train_prior(prior: torch.Tensor, n: int, seed: int):
    """Rows drawn with class prior `prior`; the exact posteriors a model trained under TRAIN_PRIOR would give."""
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(prior, n, replacement=True, generator=g)
    x = MEANS[y] + torch.randn(n, generator=g, dtype=torch.float64)
    log_joint = -0.5 * (x[:, None] - MEANS[None]) ** 2 + TRAIN_PRIOR.log()
    return torch.softmax(log_joint, -1), y


def test_em_recovers_a_shifted_prior():
    true_prior = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    probs, y = posteriors_under_train_prior(true_prior, 20000, seed=11)
    naive = probs.mean(0)
    assert (naive - true_prior).abs().max() > 0.08  # what EM has to correct is not small
    prior, adjusted, iters = em_prior(probs, TRAIN_PRIOR)
    assert (prior - true_prior).abs().max() < 0.02, prior
    assert 1 < iters < 100
    assert torch.allclose(adjusted.sum(-1), torch.ones(len(y), dtype=torch.float64))
    assert torch.allclose(adjusted.mean(0), prior, atol=1e-5)  # a fixed point: prior = mean adjusted posterior
    # Adjusting to the true prior helps accuracy on the shifted data.
    acc = lambda p: float((p.argmax(-1) == y).double().mean())  # noqa: E731
    assert acc(adjusted) > acc(probs) + 0.02
    assert torch.allclose(adjust_to_prior(probs, TRAIN_PRIOR, prior), adjusted)


def test_em_leaves_a_matched_prior_alone():
    probs, _ = posteriors_under_train_prior(TRAIN_PRIOR, 20000, seed=12)
    prior, adjusted, _ = em_prior(probs, TRAIN_PRIOR)
    assert (prior - TRAIN_PRIOR).abs().max() < 0.02, prior
    assert (adjusted - probs).abs().max() < 0.05


def test_em_starts_from_the_prior_the_calibrated_model_holds_not_the_label_counts():
    """A model whose scores lean to one class (a bias a temperature cannot remove): its calibrated probabilities
    average to a mix unlike the label counts. EM from the label counts then runs to a corner even on rows with the
    training mix (every label changed); from the mean calibrated probability, what `Calibration.fit` stores, it
    stays where it started and keeps the labels."""
    probs, y = posteriors_under_train_prior(TRAIN_PRIOR, 4000, seed=13)
    scores = probs.log() + torch.tensor([0.0, 1.5, 0.0], dtype=torch.float64)  # leans to the middle class
    cal = Calibration.fit(scores, y, "temperature")
    counts = torch.bincount(y, minlength=3).double() / len(y)
    fresh, _ = posteriors_under_train_prior(TRAIN_PRIOR, 4000, seed=14)
    p = cal.apply(fresh.log() + torch.tensor([0.0, 1.5, 0.0], dtype=torch.float64)).exp()
    stored = torch.tensor(cal.prior, dtype=torch.float64)
    assert (stored - counts).abs().max() > 0.1  # the model's own mix is not the label counts
    assert torch.allclose(stored, cal.apply(scores).exp().mean(0), atol=1e-6)
    from_counts, moved, _ = em_prior(p, counts)
    assert float((moved.argmax(-1) != p.argmax(-1)).double().mean()) > 0.2  # (what the counts would have done)
    prior, adjusted, _ = em_prior(p, stored)
    assert (prior - stored).abs().max() < 0.03, prior
    assert float((adjusted.argmax(-1) != p.argmax(-1)).double().mean()) < 0.03


def test_prior_shift_validation():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    with pytest.raises(ValueError, match="sum to 1"):
        em_prior(p, torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="positive"):
        adjust_to_prior(p, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="one entry per class"):
        em_prior(p, torch.tensor([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match="every row of probs"):
        em_prior(torch.tensor([[0.5, 0.6]]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="non-negative"):
        em_prior(torch.tensor([[-1.0, 2.0]]), torch.tensor([0.5, 0.5]))
    same = adjust_to_prior(p, torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]))
    assert math.isclose(float(same[1, 0]), 0.9, rel_tol=1e-6)  # same prior: nothing changes
