"""``moe-train``'s optimizer step for each ``optimizer_impl`` (fused, foreach, compiled), timed alone over the
parameters of configs A/B/C, against a copy of the same bytes.

    PYTHONPATH=. python experiments/bench/optimizer_impl.py --config A C --dtype bf16 fp32

The optimizer is the one ``moe-train`` builds (``throughput.moe_train_optimizer``: ``LitMoE``'s decay and no-decay
groups, the warmup + cosine ``LambdaLR`` stepped after every step) over our model's parameters (top-k router) in
``--dtype`` (fp32: the Lightning path's master weights under bf16-mixed), with random gradients. Prints ms per step
(optimizer + scheduler; median of 20 after 5 warm-up steps, the compiled update compiles in the first) and bytes
moved per second (AdamW reads weight, gradient and both moments and writes weight and moments: 7 tensors' bytes per
parameter), and the dynamo graphs compiled after the first step (0: the changing LR recompiled nothing).
"""

from __future__ import annotations

import argparse
import gc
import sys
from functools import partial
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).parent))
from optimizer_step import copy_ms, timed  # noqa: E402
from throughput import CONFIGS, args_for, moe_train_optimizer  # noqa: E402

from moe_variants import Transformer  # noqa: E402
from moe_variants.routers.topk import TopKRouter  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def step_ms(model: Transformer, impl: str) -> tuple[float, int]:
    """ms per optimizer + scheduler step of ``impl`` on random gradients, and the dynamo graphs compiled after the
    first step."""
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    torch._dynamo.reset()
    counters.clear()
    opt, sched = moe_train_optimizer(model, impl, steps=1000)

    def step():
        opt.step()
        sched.step()

    step()  # the compiled update compiles here
    graphs = counters["stats"]["unique_graphs"]
    t = timed(step, n=20, warmup=5)
    return t, counters["stats"]["unique_graphs"] - graphs


def bench(c, dtype: torch.dtype, impls: list[str]) -> None:
    with torch.device("cuda"):
        model = Transformer(args_for(c), router=partial(TopKRouter), experts="grouped").to(dtype)
    n = sum(p.numel() for p in model.parameters())
    gb = 7 * n * next(model.parameters()).element_size() / 1e9
    t_copy = copy_ms(int(gb * 1e9 / 2))  # it reads and writes: gb moved
    torch.cuda.empty_cache()  # (config C in fp32: the copy's buffers and AdamW's state would not fit together)
    print(f"config {c.name}, {str(dtype).removeprefix('torch.')}: {n / 1e9:.2f}B params, AdamW moves {gb:.1f} GB; "
          f"copy of the same bytes {t_copy:.2f} ms ({gb / t_copy:.2f} TB/s)", flush=True)
    for impl in impls:
        t, recompiled = step_ms(model, impl)
        gc.collect()  # the compiled step's optimizer is in a reference cycle (training.optim.compile_step)
        torch.cuda.empty_cache()
        print(f"  {impl:9s} {t:7.2f} ms  {gb / t:.2f} TB/s  {t / t_copy:.2f}x copy  (graphs compiled after the first "
              f"step: {recompiled})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", nargs="+", default=["A", "C"], choices=sorted(set(CONFIGS) - {"smoke"}))
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    p.add_argument("--impl", nargs="+", default=["fused", "foreach", "compiled"],
                   choices=["fused", "foreach", "compiled"])
    a = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    for name in a.config:
        for dtype in a.dtype:
            bench(CONFIGS[name], DTYPES[dtype], a.impl)


if __name__ == "__main__":
    main()
