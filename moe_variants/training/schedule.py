"""The learning-rate schedule: linear warmup, then cosine decay (a ``LambdaLR``, stepped every optimizer step).

The curve is the one torch's ``SequentialLR(LinearLR(1/W -> 1 over W-1 steps), CosineAnnealingLR(T_max=T-W,
eta_min=min_lr_ratio * lr))`` gives up to the horizon (``tests/test_schedule.py`` checks the two LR sequences agree
to 1e-12). It stays a ``LambdaLR`` of one factor function because the torch composition (a) keeps the horizon in
its state dict, so a resumed run would not take ``scheduler.total_steps`` from its config, (b) rises again after
``T_max`` (cosine is periodic) unless a third ``ConstantLR`` is chained for the steps beyond the horizon, and
(c) would not load the scheduler state of checkpoints written with this ``LambdaLR``."""

from __future__ import annotations

import functools
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler


def _warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1
) -> LRScheduler:
    """Linear warmup to the base lr over ``warmup_steps``, then cosine to ``min_lr_ratio * lr`` at ``total_steps``.

    A ``functools.partial`` (not a lambda or an object with state) so that a resumed run takes the horizon from
    its config, and the scheduler state dict stays picklable.
    """
    if not 0.0 <= min_lr_ratio <= 1.0 or warmup_steps < 0 or total_steps <= 0:
        raise ValueError(
            f"warmup_cosine needs 0 <= min_lr_ratio <= 1, warmup_steps >= 0, total_steps > 0; got "
            f"{min_lr_ratio}, {warmup_steps}, {total_steps}"
        )
    fn = functools.partial(
        _warmup_cosine_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
    )
    return LambdaLR(optimizer, fn)
