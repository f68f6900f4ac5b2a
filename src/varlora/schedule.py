"""Stateless training schedules: the learning-rate factor and the data order of every step.

Both are pure functions of the step (and the seed), so a run resumed at step t sees exactly the learning
rate and the examples the uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["linear_schedule", "batch_indices"]


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from 0 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def batch_indices(step: int, batch_size: int, n_examples: int, seed: int) -> list[int]:
    """Example indices of ``step``: a fresh seeded permutation every epoch, stateless so resume is exact."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_examples)
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        indices.append(int(order[offset]))
    return indices
