"""Calibrating label scores: temperature / vector scaling, their metrics (ECE, Brier, NLL) and a reliability plot.

Label scoring gives every row K numbers s_k = log P(label_k + EOS | prompt); softmax(s) over the label set is a
probability, but a tuned LM is usually over-confident. Post-hoc scaling fixes that without touching accuracy:

    temperature:  p = softmax(s / T)          one number; argmax unchanged (Guo et al. 2017)
    vector:       p = softmax(w * s + b)      per-class scale and bias; can move the argmax (it also corrects a
                                              class bias, e.g. a model that says "neutral" too rarely)

Fit on labelled held-out rows (a validation split, never the test set), save `calibration.json` next to the
adapter, and apply it to new scores. torch only (no Lightning): fitting runs in float64 on the CPU, since N x K is
small and LBFGS in float32 stops early on flat losses.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import ModelError
from .files import write_atomic

FILENAME = "calibration.json"
KINDS = ("temperature", "vector")
# A temperature outside this range means the fit saw degenerate data (one row, all rows right with huge margins):
# T -> 0 or T -> inf lowers the NLL without limit there. Clamping keeps such a fit usable instead of inf/NaN.
T_MIN, T_MAX = 0.05, 20.0
VECTOR_L2 = 1e-3  # weight of sum(b^2) added to the mean NLL (see fit_vector_scaling)


def _check(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 [N, K] logits and int64 [N] labels, or a ValueError that says what is wrong."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [N, K] with N >= 1 and K >= 2, got shape {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be [N] = [{logits.shape[0]}], got shape {tuple(labels.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or inf; drop those rows before fitting")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {logits.shape[1] - 1}]")
    return logits.detach().double().cpu().clone(), labels.cpu().clone()  # (clone: not an inference tensor)


def _lbfgs(params: list[torch.Tensor], loss_fn, max_iter: int = 200) -> None:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature T minimising the mean NLL of softmax(logits / T), clamped to [T_MIN, T_MAX].

    Optimised over log T (T stays positive, and the loss is far better conditioned in log T than in T), with
    LBFGS in float64. Works for any N >= 1: where the optimum is at T -> 0 or inf (e.g. one row), the clamp
    bounds it; a fit that goes non-finite falls back to T = 1 (no scaling)."""
    logits, labels = _check(logits, labels)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    # Bound log T inside the loss too: otherwise a degenerate set runs the line search off to exp(700).
    lo, hi = math.log(T_MIN) - 1.0, math.log(T_MAX) + 1.0
    _lbfgs([log_t], lambda: F.cross_entropy(logits / log_t.clamp(lo, hi).exp(), labels))
    t = float(log_t.detach().exp())
    return min(max(t, T_MIN), T_MAX) if math.isfinite(t) else 1.0


def fit_vector_scaling(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class scale w [K] and bias b [K] minimising mean NLL of softmax(w * logits + b) + VECTOR_L2 * sum(b^2).

    Why the L2 on b: softmax ignores adding one constant to every b, so without it b is not unique; the small
    penalty picks the zero-mean b (which is what we report and test) and keeps a class with no rows in the fit
    set from getting an unbounded bias. w starts at 1 and b at 0 (the uncalibrated model); float64 LBFGS."""
    logits, labels = _check(logits, labels)
    k = logits.shape[1]
    w = torch.ones(k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    _lbfgs([w, b], lambda: F.cross_entropy(logits * w + b, labels) + VECTOR_L2 * (b * b).sum())
    w, b = w.detach(), b.detach()
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        return torch.ones(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    return w, b


# --- metrics -------------------------------------------------------------------------------------

def _probs(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs, labels = torch.as_tensor(probs).double(), torch.as_tensor(labels).long()
    if probs.dim() != 2 or labels.shape != (probs.shape[0],) or probs.shape[0] == 0:
        raise ValueError(f"probs must be [N, K] and labels [N], got {tuple(probs.shape)} and {tuple(labels.shape)}")
    return probs, labels


def _bins(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin index of each confidence for equal-width bins (lo, hi] over [0, 1]; exactly 0 goes to the first bin."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    return (torch.bucketize(conf, edges[1:-1], right=False)).clamp(0, n_bins - 1)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): sum over bins b of |B_b| / N * |acc(B_b) - conf(B_b)|, where conf is the
    top probability of a row, acc whether its argmax is the label, and the bins split [0, 1] into n_bins
    equal-width intervals (lo, hi]. 0 = calibrated; empty bins count nothing."""
    probs, labels = _probs(probs, labels)
    conf, pred = probs.max(-1)
    correct = (pred == labels).double()
    idx = _bins(conf, n_bins)
    n = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    cnf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    return float((acc - cnf).abs().sum() / len(conf))  # sum_b n_b/N * |acc_b/n_b - conf_b/n_b|


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score (Brier 1950): mean over rows of sum_k (p_k - y_k)^2, y one-hot. Range [0, 2]; note
    that sklearn's brier_score_loss is the binary form (one class), which is not this number."""
    probs, labels = _probs(probs, labels)
    onehot = F.one_hot(labels, probs.shape[1]).double()
    return float(((probs - onehot) ** 2).sum(-1).mean())


def nll(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the gold label, from log-probabilities."""
    log_probs, labels = _probs(log_probs, labels)
    return float(-log_probs.gather(1, labels[:, None]).mean())


def reliability_figure(probs: torch.Tensor, labels: torch.Tensor, title: str = "Reliability", n_bins: int = 15):
    """Accuracy per confidence bin (bars) against the diagonal (perfect calibration), with the number of rows of
    each bin over its bar: a bar below the diagonal is over-confidence. Returns a matplotlib Figure (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs, labels = _probs(probs, labels)
    conf, pred = probs.max(-1)
    idx = _bins(conf, n_bins)
    width = 1.0 / n_bins
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    for b in range(n_bins):
        sel = idx == b
        if not sel.any():
            continue
        acc = float((pred[sel] == labels[sel]).double().mean())
        ax.bar(b * width, acc, width=width, align="edge", color="tab:blue", edgecolor="black", alpha=0.8)
        ax.text((b + 0.5) * width, min(acc, 0.93) + 0.02, str(int(sel.sum())), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ece = expected_calibration_error(probs, labels, n_bins)
    ax.set_title(f"{title}\nECE {ece:.3f} | N {len(labels)}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def write_reliability_png(path, probs: torch.Tensor, labels: torch.Tensor, title: str = "Reliability",
                          n_bins: int = 15) -> Path:
    """reliability_figure saved as a PNG at `path`, atomically (files.write_atomic)."""
    import matplotlib.pyplot as plt

    fig = reliability_figure(probs, labels, title, n_bins)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return Path(path)


def _summary(log_probs: torch.Tensor, labels: torch.Tensor) -> dict:
    probs = log_probs.exp()
    return {"ece": expected_calibration_error(probs, labels), "brier": brier_score(probs, labels),
            "nll": nll(log_probs, labels), "accuracy": float((probs.argmax(-1) == labels).double().mean())}


# --- the saved calibration -----------------------------------------------------------------------

@dataclass
class Calibration:
    """A fitted calibration: kind "temperature" (uses `temperature`) or "vector" (uses w and b, one per label).
    `fitted_on`: {"rows": N, "source": where the labelled rows came from}; `before`/`after`: the metrics of
    calibration_report on those rows, kept so a later reader knows what the fit bought."""

    kind: str = "temperature"
    temperature: float = 1.0
    w: Optional[list[float]] = None
    b: Optional[list[float]] = None
    labels: Optional[list[str]] = None
    prior: Optional[list[float]] = None  # the mean calibrated probability over the rows fitted on: the prior
    #                                      the calibrated probabilities hold (label-shift adaptation starts from it)
    fitted_on: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        t = self.temperature
        if isinstance(t, bool) or not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a positive number, got {t!r}")
        for name in ("fitted_on", "before", "after"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be an object, got {getattr(self, name)!r}")
        prior = self.prior
        if prior is not None and not (isinstance(prior, list) and prior and all(
                isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in prior)):
            raise ValueError(f"prior must be a list of positive numbers, got {prior!r}")
        names = self.labels
        if names is not None and not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
            raise ValueError(f"labels must be a list of label names, got {names!r}")
        if self.kind == "vector":
            ok = all(isinstance(v, list) and v and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
                     for v in (self.w, self.b))
            if not ok or len(self.w) != len(self.b):
                raise ValueError("vector scaling needs w and b: two lists of finite numbers of the same length")

    @classmethod
    def fit(cls, scores: torch.Tensor, labels: torch.Tensor, kind: str = "temperature", source: str = "",
            label_names: Optional[list[str]] = None) -> "Calibration":
        """Fit `kind` on labelled scores and record the rows, source and before/after metrics."""
        if kind == "temperature":
            cal = cls(kind, temperature=fit_temperature(scores, labels))
        elif kind == "vector":
            w, b = fit_vector_scaling(scores, labels)
            cal = cls(kind, w=w.tolist(), b=b.tolist())
        else:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        cal.labels = list(label_names) if label_names is not None else None
        # The prior the calibrated probabilities hold is their own mean over the rows, not the label counts: a
        # temperature cannot remove a model's lean towards one class, and EM (prior_shift) measured from the label
        # counts would read that lean as a label shift and run to a corner even on rows of the training mix.
        # (A class no row gives any weight gets a small share, not 0: EM could not reweight it otherwise.)
        mean = cal.apply(torch.as_tensor(scores)).exp().mean(0).clamp_min(1e-6)
        cal.prior = (mean / mean.sum()).tolist()
        cal.fitted_on = {"rows": int(torch.as_tensor(labels).shape[0]), "source": source}
        report = calibration_report(scores, labels, cal)
        cal.before, cal.after = report["before"], report["after"]
        return cal

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """Calibrated log-probabilities [N, K] (float64) from label scores [N, K] (or [K])."""
        s = torch.as_tensor(scores).double()
        if self.kind == "temperature":
            return torch.log_softmax(s / self.temperature, -1)
        if s.shape[-1] != len(self.w):
            raise ValueError(f"scores have {s.shape[-1]} labels, this calibration was fitted on {len(self.w)}")
        w = torch.tensor(self.w, dtype=torch.float64, device=s.device)
        b = torch.tensor(self.b, dtype=torch.float64, device=s.device)
        return torch.log_softmax(s * w + b, -1)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Calibration":
        """Raises ValueError (bad JSON, unknown or missing fields, bad values)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"top level is a JSON {type(data).__name__}, not an object")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}")
        if "kind" not in data:
            raise ValueError("no 'kind' field")
        return cls(**data)

    def save(self, folder) -> Path:
        """Write `folder/calibration.json` atomically (a reader sees the old file or the new one, never half)."""
        path = Path(folder) / FILENAME
        write_atomic(path, self.to_json())
        return path

    @classmethod
    def beside(cls, folder, labels) -> Optional["Calibration"]:
        """The calibration saved beside an adapter (or merged model) for these labels, None if there is none; one
        fitted for other labels is a ModelError (one line)."""
        calibration = cls.load(folder)
        if calibration is not None and calibration.labels and list(calibration.labels) != list(labels):
            raise ModelError(f"{Path(folder) / FILENAME} was fitted for the labels {calibration.labels}, this run labels "
                             f"{list(labels)}; set data.labels to match, or model.use_calibration false")
        return calibration

    @classmethod
    def load(cls, folder) -> Optional["Calibration"]:
        """The calibration saved in `folder`, None if there is none; a corrupt file raises ModelError (one line)."""
        path = Path(folder) / FILENAME
        if not path.is_file():
            return None
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (ValueError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelError(f"{path}: not a valid calibration file ({reason}); delete it or fit the calibration "
                             "again") from None


def calibration_report(scores: torch.Tensor, labels: torch.Tensor, calibration: Calibration) -> dict:
    """ECE, Brier, NLL and accuracy of softmax(scores) ("before") and of calibration.apply(scores) ("after")."""
    scores, labels = _check(scores, labels)
    return {"rows": int(labels.shape[0]), "kind": calibration.kind,
            "before": _summary(torch.log_softmax(scores, -1), labels),
            "after": _summary(calibration.apply(scores), labels)}
