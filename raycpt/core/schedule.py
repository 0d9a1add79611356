"""The learning-rate schedule as a pure function of the step: `lr_at(step, ...)`. No torch here; the loop's
scheduler (`raycpt.core.train.loop.build_scheduler`) is a LambdaLR over it.

Every schedule re-warms linearly from 0 to `peak_lr` over `warmup_steps`, then:
- cosine: decays to `peak_lr * min_lr_ratio` at `total_steps` along a half cosine (transformers'
  `get_cosine_with_min_lr_schedule_with_warmup`, to the last bit: the loop keeps using that one for cosine).
- wsd (warmup-stable-decay; Hägele et al. 2024, MiniCPM): holds `peak_lr` until the last `decay_steps(total_steps,
  decay_fraction)` steps, then cools down to `peak_lr * min_lr_ratio` along `decay_shape` (linear | cosine |
  1-sqrt). The decay depends on `total_steps` alone, so a run of T steps and a run extended to T steps from an
  earlier run's last stable step cool down the same way; their stable phases agree step for step.
- constant: holds `peak_lr` to the end (nothing decays, so `min_lr_ratio` has nothing to floor).

The convention is LambdaLR's: `lr_at(k)` is the lr of optimizer step k (0-based); `lr_at(total_steps)` is the floor,
set after the last step.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("1-sqrt", "linear", "cosine")


def decay_steps(total_steps: int, decay_fraction: float) -> int:
    """Steps a wsd run of `total_steps` spends cooling down: round(decay_fraction x total_steps), at least 1 and at
    most the whole run."""
    return min(total_steps, max(1, round(decay_fraction * total_steps)))


def stable_end(total_steps: int, decay_fraction: float) -> int:
    """A wsd run's last stable step, counted in optimizer steps done: the decay starts right after it. The loop
    checkpoints there (the pre-decay checkpoint `raycpt extend` continues from)."""
    return total_steps - decay_steps(total_steps, decay_fraction)


def _shape(progress: float, decay_shape: str) -> float:
    """1 at the start of the cool-down (progress 0), 0 at its end (progress 1)."""
    if decay_shape == "linear":
        return 1.0 - progress
    if decay_shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay_shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    raise ValueError(f"decay_shape {decay_shape!r}: expected one of {DECAY_SHAPES}")


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str = "cosine",
              decay_fraction: float = 0.2, decay_shape: str = "1-sqrt", min_lr_ratio: float = 0.0) -> float:
    """`lr_at` / peak_lr: the multiplier LambdaLR applies to the optimizer's lr."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":  # transformers' expression, term for term, so the floats agree exactly
        progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        factor = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
        return max(0.0, factor * (1 - min_lr_ratio) + min_lr_ratio)
    if schedule == "wsd":
        cool = decay_steps(total_steps, decay_fraction)
        start = total_steps - cool
        if step < start:
            return 1.0
        progress = min(1.0, float(step - start) / float(cool))
        return min_lr_ratio + (1.0 - min_lr_ratio) * _shape(progress, decay_shape)
    raise ValueError(f"schedule {schedule!r}: expected one of {SCHEDULES}")


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine",
          decay_fraction: float = 0.2, decay_shape: str = "1-sqrt", min_lr_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step `step` (0-based) in a run of `total_steps` (see the module docstring)."""
    return peak_lr * lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, schedule=schedule,
                               decay_fraction=decay_fraction, decay_shape=decay_shape, min_lr_ratio=min_lr_ratio)
