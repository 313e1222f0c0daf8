"""The feedback schedule (SPEC §7): epochs and learning rate shrink per loop; within a stage the
learning rate warms up linearly and then follows a cosine."""

from __future__ import annotations

import math

import torch


def loop_epochs(per_loop: int, decay: float, loop: int) -> int:
    """Epochs of a stage in loop ``loop`` (1-based): ``per_loop * decay**(loop-1)``, rounded, >= 1."""
    return max(1, round(per_loop * decay ** (loop - 1)))


def loop_lr(base_lr: float, decay: float, loop: int) -> float:
    return base_lr * decay ** (loop - 1)


def warmup_cosine_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the stage's learning rate at optimiser step ``step`` (0-based) of ``total``.

    Warm-up is linear from (step + 1) / warmup, so the first step is never taken at zero; the
    cosine then runs from 1 towards 0 without reaching it on the last step.
    """
    if step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / span))


class WarmupCosine:
    """Sets the learning rate of every group before each optimiser step. Unlike LambdaLR it keeps
    no memory of earlier stages, so one optimiser can be driven through many loops."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, total_steps: int, warmup_steps: int) -> None:
        self.optimizer = optimizer
        self.lr = lr
        self.total = max(total_steps, 1)
        # A warm-up longer than half the stage would leave no room for the decay (late loops are short).
        self.warmup = min(warmup_steps, self.total // 2)
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        factor = warmup_cosine_factor(self.step_count, self.total, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * factor

    def step(self) -> None:
        self.step_count += 1
        self._apply()
