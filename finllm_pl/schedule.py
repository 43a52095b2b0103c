"""Learning-rate schedule: linear warmup, then linear (or cosine) decay, as a pure function of the optimizer step.

Everything here counts *optimizer* steps, never micro-batches: with gradient accumulation a run of 4,800
micro-batches at accumulation 8 is 600 steps, and that is what warmup and decay are measured in.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

WarmupOverflow = Literal["clamp", "keep", "error"]


@dataclass(frozen=True)
class Schedule:
    """The resolved schedule of one run (after the warmup-overflow policy was applied)."""

    total_steps: int
    warmup_steps: int
    min_lr_ratio: float = 0.0
    decay: Literal["linear", "cosine", "constant"] = "linear"

    def factor(self, step: int) -> float:
        """LR multiplier for optimizer step `step` (0-based: the first update uses step 0).

        Warmup is (step + 1) / warmup, so the first update already moves the weights (never LR 0) and the
        last warmup step reaches exactly the peak; decay then runs to `min_lr_ratio` at the final step.
        """
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps + 1) / span)
        if self.decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            shape = 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


def resolve_schedule(
    total_steps: int,
    warmup_steps: int,
    lr: float,
    policy: WarmupOverflow = "clamp",
    clamp_fraction: float = 0.1,
    min_lr_ratio: float = 0.0,
    decay: Literal["linear", "cosine", "constant"] = "linear",
) -> Schedule:
    """Apply the documented policy for a warmup at least as long as the whole run.

    The seed's recipe (and FinGPT's own QLoRA run) asks for 10,000 warmup steps over ~600-4,800 steps: the LR
    would still be climbing when training ends and never reach the configured peak. Policies:
      - clamp (default): warmup becomes `clamp_fraction` of the run, so the configured LR is actually used;
      - keep: do what the config says (LR ends far below its peak), but say so;
      - error: refuse to start.
    Every policy warns loudly with the peak LR the config as written would reach.
    """
    total_steps = max(1, int(total_steps))
    if warmup_steps < 0:
        raise ValueError(f"model.warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps < total_steps:
        return Schedule(total_steps, warmup_steps, min_lr_ratio, decay)
    peak = lr * total_steps / max(1, warmup_steps)
    msg = (
        f"model.warmup_steps={warmup_steps} is not shorter than the whole run ({total_steps} optimizer steps): "
        f"as written the LR would only reach {peak:.3g} ({100 * total_steps / max(1, warmup_steps):.1f}% of "
        f"model.learning_rate={lr:g}) and never decay."
    )
    if policy == "error":
        raise ValueError(msg + " Set model.warmup_steps lower or model.warmup_overflow to clamp/keep.")
    if policy == "keep":
        warnings.warn(msg + " Policy 'keep': following the config as written.", stacklevel=2)
        return Schedule(total_steps, warmup_steps, min_lr_ratio, decay)
    clamped = max(1, int(round(clamp_fraction * total_steps)))
    warnings.warn(
        msg + f" Policy 'clamp': warmup cut to {clamped} steps ({clamp_fraction:.0%} of the run) so the configured "
        "LR is reached. Set model.warmup_overflow=keep to follow the config as written.",
        stacklevel=2,
    )
    return Schedule(total_steps, clamped, min_lr_ratio, decay)
