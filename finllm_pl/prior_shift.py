"""Label-shift adaptation: correct calibrated probabilities for a change in class frequencies.

A model tuned on data that is 60% neutral (FPB) learns that prior; labeling a feed that is mostly negative news,
its posteriors lean neutral. If only the class frequencies change (p(x|y) stays the same), Bayes' rule gives

    p_new(y|x) = p(y|x) * pi_new(y) / pi_train(y), renormalised over y,

and the new prior pi_new can be estimated from unlabelled rows alone with the EM of Saerens, Latinne &
Decaestecker (2002), "Adjusting the outputs of a classifier to new a priori probabilities", Neural Computation
14(1). It needs *calibrated* posteriors (apply a Calibration first): EM trusts the probabilities literally.
"""

from __future__ import annotations

import torch

PROB_TOL = 1e-4  # rows and priors must sum to 1 within this (probabilities rounded to 6 decimals in files pass)


def _check_prior(prior, k: int, name: str) -> torch.Tensor:
    prior = torch.as_tensor(prior, dtype=torch.float64)
    if prior.shape != (k,):
        raise ValueError(f"{name} must have one entry per class ({k}), got shape {tuple(prior.shape)}")
    if not torch.isfinite(prior).all() or (prior <= 0).any():
        raise ValueError(f"{name} must be positive for every class, got {prior.tolist()}; a class the data never "
                         "has cannot be reweighted (give it a small share instead of 0)")
    if abs(float(prior.sum()) - 1.0) > PROB_TOL:
        raise ValueError(f"{name} must sum to 1, sums to {float(prior.sum()):.6f}")
    return prior / prior.sum()


def _check_probs(probs) -> torch.Tensor:
    probs = torch.as_tensor(probs, dtype=torch.float64)
    if probs.dim() != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise ValueError(f"probs must be [N, K] with N >= 1 and K >= 2, got shape {tuple(probs.shape)}")
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError("probs must be finite and non-negative (pass probabilities, not log-probabilities)")
    worst = float((probs.sum(-1) - 1).abs().max())
    if worst > PROB_TOL:
        raise ValueError(f"every row of probs must sum to 1 (worst row is off by {worst:.2g}); apply softmax first")
    return probs


def adjust_to_prior(probs: torch.Tensor, train_prior: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """p(y|x) reweighted from the training prior to a given prior and renormalised per row: [N, K], float64."""
    probs = _check_probs(probs)
    k = probs.shape[1]
    ratio = _check_prior(prior, k, "prior") / _check_prior(train_prior, k, "train_prior")
    adjusted = probs * ratio
    return adjusted / adjusted.sum(-1, keepdim=True)


def em_prior(probs: torch.Tensor, train_prior: torch.Tensor, max_iter: int = 100,
             tol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Saerens et al. (2002) EM for the class prior of the rows behind `probs`.

    E-step: adjust the posteriors to the current prior estimate (start: train_prior); M-step: the new prior is
    the mean of the adjusted posteriors. Stops when no class's prior moves more than `tol`, or after max_iter.
    Returns (prior [K], adjusted probs [N, K] under that prior, iterations run). Each step cannot lower the
    likelihood of the unlabelled rows, so it converges; with a matched prior it stays (near) where it started."""
    probs = _check_probs(probs)
    k = probs.shape[1]
    train_prior = _check_prior(train_prior, k, "train_prior")
    if max_iter < 1 or not tol > 0:
        raise ValueError(f"max_iter must be >= 1 and tol > 0, got max_iter={max_iter}, tol={tol}")
    prior = train_prior.clone()
    for it in range(1, max_iter + 1):
        adjusted = probs * (prior / train_prior)
        adjusted = adjusted / adjusted.sum(-1, keepdim=True)
        new = adjusted.mean(0)
        # A class whose posterior is 0 in every row would reach prior 0, then 0/0 below: keep it tiny instead.
        new = new.clamp_min(1e-12)
        new = new / new.sum()
        moved = float((new - prior).abs().max())
        prior = new
        if moved < tol:
            break
    adjusted = probs * (prior / train_prior)
    return prior, adjusted / adjusted.sum(-1, keepdim=True), it
