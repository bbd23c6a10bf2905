"""The LR schedule is torch's linear warmup + cosine annealing curve, held at the floor after the horizon."""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from moe_variants.training.schedule import warmup_cosine


def lrs(make, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched, out = make(opt), []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize(("warmup", "total", "floor"), [(30, 150, 0.1), (2, 6, 0.1), (1, 5, 0.5), (100, 2000, 0.0)])
def test_warmup_cosine_is_torchs_linear_then_cosine_curve(warmup, total, floor):
    def torch_schedule(opt):
        linear = LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
        cosine = CosineAnnealingLR(opt, T_max=total - warmup, eta_min=floor * 3e-4)
        return SequentialLR(opt, [linear, cosine], milestones=[warmup])

    ours = lrs(lambda opt: warmup_cosine(opt, warmup, total, floor), total + 20)
    torch.testing.assert_close(ours[: total + 1], lrs(torch_schedule, total + 1), rtol=1e-12, atol=0)
    assert ours[total:] == [pytest.approx(floor * 3e-4, rel=1e-12)] * 20  # held at the floor after the horizon
