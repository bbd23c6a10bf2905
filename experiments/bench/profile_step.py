"""Where does our training step spend GPU time? torch.profiler over a few compiled steps (config A by default).

    PYTHONPATH=. python experiments/bench/profile_step.py --config A
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as T  # noqa: E402

from moe_variants.routers.topk import TopKRouter  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="A")
    p.add_argument("--rows", type=int, default=30)
    a = p.parse_args()
    c = T.CONFIGS[a.config]
    torch.manual_seed(0)
    model, loss_fn = T.our_model(c, partial(TopKRouter))
    model = model.cuda().to(torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model)
    ids = torch.randint(0, c.vocab_size, (c.batch, c.seq_len), device="cuda")

    def step():
        loss_fn(step_model, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
