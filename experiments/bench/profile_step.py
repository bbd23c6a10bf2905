"""Where does our compiled training step spend GPU time? torch.profiler over a few steps, per config.

Prints, per config, the top kernels and the GPU time grouped into categories (GEMM, grouped GEMM, attention,
optimizer, cross-entropy/softmax, copies/gathers, reductions, other elementwise), as ms per step and share.

    PYTHONPATH=. python experiments/bench/profile_step.py --config A B C [--router topk]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as T  # noqa: E402

from moe_variants.routers.topk import TopKRouter  # noqa: E402

# first matching pattern wins; names are CUDA kernel names as the profiler reports them
CATEGORIES = [
    ("attention (flash/sdpa)", r"flash|fmha|attention|sdpa"),
    ("grouped GEMM (experts)", r"grouped|group_gemm|GroupedGemm|_grouped_mm|cutlass.*Group"),
    ("optimizer (AdamW)", r"adam|Adam|triton_for_fused"),  # fused kernel; compiled foreach: combo kernels
    ("GEMM", r"gemm|sm90_xmma|cutlass|nvjet|ampere_|sm80_|cublas|matmul"),
    ("gather/scatter/index", r"gather|scatter|index|sort|radix|cub::|take_along"),
    ("copies", r"copy|Memcpy|Memset|cat|fill"),
    ("reductions", r"reduce|sum|norm|mean|max|argmax|topk"),
    ("inductor fused (triton)", r"triton"),
]


def categorise(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return cat
    return "other"


def profile_config(name: str, router, steps: int, rows: int) -> None:
    c = T.CONFIGS[name]
    torch.manual_seed(0)
    model, loss_fn = T.our_model(c, router)
    model = model.cuda().to(torch.bfloat16).train()
    # the benchmark's ours_topk step: moe-train's optimizer (auto: the compiled update) and schedule
    opt, sched = T.moe_train_optimizer(model, T.resolve_optimizer_impl("auto", compiled_model=True), 100)
    step_model = torch.compile(model)
    batches = torch.randint(0, c.vocab_size, (3 + 2 * steps, c.batch, c.seq_len), device="cuda").unbind(0)

    def step(ids: torch.Tensor) -> None:
        loss_fn(step_model, ids).backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    for ids in batches[:3]:
        step(ids)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for ids in batches[3 + steps:]:  # back to back, no profiler: the step's wall time on the GPU
        step(ids)
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for ids in batches[3 : 3 + steps]:
            step(ids)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / steps / 1e3  # ms per step
    by_cat: dict[str, float] = defaultdict(float)
    for e in events:
        by_cat[categorise(e.key)] += e.self_device_time_total / steps / 1e3
    print(f"\n=== config {name} ({c}): GPU kernel time {total:.1f} ms/step, wall {wall:.1f} ms/step "
          f"(GPU idle {1 - total / wall:.1%}) ===")
    for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:28s} {ms:8.2f} ms  {ms / total:6.1%}")
    print(f"  top {rows} kernels (self GPU time per step):")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        ms = e.self_device_time_total / steps / 1e3
        print(f"    {ms:8.3f} ms {e.count // steps:5d}x  {categorise(e.key)[:12]:12s} {e.key[:110]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", nargs="+", default=["A"], choices=sorted(T.CONFIGS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=40)
    a = p.parse_args()
    for name in a.config:
        profile_config(name, partial(TopKRouter), a.steps, a.rows)
        torch.cuda.empty_cache()  # the config's model and optimizer are gone with profile_config's frame


if __name__ == "__main__":
    main()
