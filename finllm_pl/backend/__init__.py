"""Execution backends: how a training micro-batch's loss and gradients, a validation loss and label scores are
computed. The LightningModule and the DataModule use them through one small interface (plain.PlainBackend's):

    decision = plan("fast", shape, ...)     # before the model loads: which fast components this run may use
    backend = make("fast", model, ...)      # after: the backend for that model
    backend.train_step(batch, backward, sync) / backend.loss(batch) / backend.score(batch)
    with backend.labeling(): ...            # around validation and predict
    backend.weights_changed()               # after an optimizer step, a load, a merge
    backend.train_collate(pad_id, rows)     # the training DataLoader's collate

plain: Hugging Face + peft as they are; the reference. fast: the speed components (fast.py), each proven against
plain on a stand-in of the run's architecture (selfcheck.py) or switched off for the run with one line saying why.
"""

from __future__ import annotations

from typing import Callable, Iterable, Literal, Optional

import torch
from .fast import COMPONENTS, FastBackend
from .plain import PlainBackend
from .selfcheck import Decision, RunShape, check

BackendName = Literal["plain", "fast"]

__all__ = ["COMPONENTS", "BackendName", "Decision", "FastBackend", "PlainBackend", "RunShape", "make", "plan"]


def plan(name: BackendName, shape: RunShape, skip: Iterable[str] = (), world_size: int = 1,
         precision: str = "32-true", gradient_checkpointing: bool = False,
         agree: Optional[Callable[[bool], bool]] = None) -> Decision:
    """The fast components this run may use: all but those `skip` names, those the run's setup rules out, and those
    the self-check switches off; `Decision.lines()` says which run and why each other one does not. `agree`
    (several processes): True on every rank only if True on all of them, so that every rank runs the same
    components (a rank that dequantized and one that did not would not even have the same parameters)."""
    if name == "plain":
        return Decision()
    unknown = sorted(set(skip) - set(COMPONENTS))
    if unknown:
        from ..errors import ConfigError

        raise ConfigError(f"model.fast_skip: unknown component(s) {unknown}; the components are {list(COMPONENTS)}")
    ruled_out: dict[str, str] = {c: "model.fast_skip names it" for c in skip}
    why = None
    if not shape.training:
        why = "it trains, and this run does not"
    elif world_size > 1:
        why = "the run has several processes (DDP syncs gradients in hooks the static step does not run)"
    elif str(precision).startswith("16"):
        why = "fp16 loss scaling is on (use bf16-mixed)"
    elif gradient_checkpointing:
        why = "gradient checkpointing is on"
    if why:
        ruled_out.update({c: why for c in ("static_step", "cuda_graphs") if c not in ruled_out})
    decision = check(shape, [c for c in COMPONENTS if c not in ruled_out])
    decision.off = {**ruled_out, **decision.off}
    if agree is not None:
        for c in COMPONENTS:  # (every rank asks about every component, in the same order)
            if not agree(c in decision.on) and c in decision.on:
                decision.on.remove(c)
                decision.off[c] = "it differed from the plain path on another rank"
    return decision


def make(name: BackendName, model: torch.nn.Module, compute_dtype: torch.dtype, decision: Optional[Decision] = None,
         chunk_tokens: Optional[int] = None, shared_prefix: int = 8) -> PlainBackend:
    """The backend for the loaded model, with the components `decision` kept (fast)."""
    if name == "plain":
        return PlainBackend(model, compute_dtype, chunk_tokens)
    return FastBackend(model, compute_dtype, decision.on if decision else (), chunk_tokens, shared_prefix)
