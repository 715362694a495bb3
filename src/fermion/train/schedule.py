"""Learning-rate schedules: a pure function of the step, so resuming needs nothing but the step."""

from __future__ import annotations

import math

from fermion.config import TrainConfig


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate for optimizer step `step` (0-based)."""
    peak, floor, warmup = cfg.lr, cfg.lr * cfg.min_lr_ratio, cfg.warmup
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(1, cfg.steps - warmup)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    # Warmup-stable-decay (MiniCPM): hold the peak, then decay linearly to the floor over the last steps.
    decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
    decay_start = cfg.steps - decay_steps
    if step < decay_start:
        return peak
    return peak + (floor - peak) * min(1.0, (step - decay_start + 1) / decay_steps)
