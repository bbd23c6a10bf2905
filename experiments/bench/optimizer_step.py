"""Micro-benchmark: the AdamW step and the SwiGLU backward at configs A/B/C's shapes, against a copy's bandwidth.

    PYTHONPATH=. python experiments/bench/optimizer_step.py --config A C

Prints ms per call (median of 10 after warm-up) and the bytes moved per second; the baseline is a plain tensor
copy of the same bytes (memory bandwidth ceiling measured in the same run).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from throughput import CONFIGS  # noqa: E402

from moe_variants.model.experts import swiglu  # noqa: E402


def timed(fn, n: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_ms(nbytes: int) -> float:
    """Time of one device-to-device copy of ``nbytes`` (it reads and writes them: 2 x nbytes moved)."""
    src = torch.empty(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return timed(lambda: dst.copy_(src))


def param_shapes(c) -> list[tuple[int, ...]]:
    hd = c.dim // c.n_heads
    layer = [(c.num_experts, 2 * c.hidden_dim, c.dim), (c.num_experts, c.dim, c.hidden_dim),
             (c.n_heads * hd, c.dim), (c.n_kv_heads * hd, c.dim), (c.n_kv_heads * hd, c.dim), (c.dim, c.n_heads * hd),
             (c.num_experts, c.dim), (c.dim,), (c.dim,)]
    return [(c.vocab_size, c.dim), (c.vocab_size, c.dim), (c.dim,)] + layer * c.n_layers


def bench_adamw(c) -> None:
    shapes = param_shapes(c)
    n = sum(torch.Size(s).numel() for s in shapes)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    gb = 14 * n / 1e9  # read p, g, m, v; write p, m, v (bf16)
    t_copy = copy_ms(int(gb * 1e9 / 2))  # read + write = the AdamW step's bytes
    print(f"config {c.name}: {n / 1e9:.2f}B params, AdamW moves {gb:.1f} GB; copy of the same bytes {t_copy:.2f} ms "
          f"({gb / t_copy:.2f} TB/s)")
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    t = timed(fused.step)
    print(f"  adamw fused                 {t:7.2f} ms  {gb / t:.2f} TB/s  {t / t_copy:.2f}x copy")
    del fused
    torch.cuda.empty_cache()
    foreach = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    t = timed(foreach.step)
    print(f"  adamw foreach (eager)       {t:7.2f} ms  {gb / t:.2f} TB/s  {t / t_copy:.2f}x copy")

    @torch.compile(fullgraph=False)
    def compiled_step():
        foreach.step()

    t = timed(compiled_step, warmup=3)
    print(f"  adamw foreach compiled      {t:7.2f} ms  {gb / t:.2f} TB/s  {t / t_copy:.2f}x copy")


def swiglu_slices(h):
    f = h.shape[-1] // 2
    return F.silu(h[:, :f]) * h[:, f:]


def swiglu_interleaved(h):
    hv = h.view(h.shape[0], -1, 2)
    return F.silu(hv[..., 0]) * hv[..., 1]


def bench_swiglu(c) -> None:
    rows = c.seq_len * c.batch * c.top_k
    h0 = torch.randn(rows, 2 * c.hidden_dim, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(rows, c.hidden_dim, device="cuda", dtype=torch.bfloat16)
    gb = (2 * h0.numel() + g.numel()) * 2 / 1e9  # read h, g; write dh
    dst = torch.empty_like(h0)
    t_copy = timed(lambda: dst.copy_(h0))
    print(f"config {c.name}: SwiGLU backward on ({rows}, {2 * c.hidden_dim}) moves >= {gb:.2f} GB; "
          f"copy of h {t_copy:.3f} ms ({h0.numel() * 4 / 1e9 / t_copy:.2f} TB/s)")
    for name, fn in [("slices (autograd)", swiglu_slices), ("_SwiGLU (the model)", swiglu),
                     ("interleaved gate/up", swiglu_interleaved)]:
        cf = torch.compile(fn)
        h = h0.clone().requires_grad_(True)

        def fwd():
            with torch.no_grad():
                cf(h)

        def fwd_bwd():
            out = cf(h)
            torch.autograd.grad(out, h, g)

        tf, tfb = timed(fwd), timed(fwd_bwd)
        print(f"  {name:26s} fwd {tf:.3f} ms  fwd+bwd {tfb:.3f} ms  bwd ~{tfb - tf:.3f} ms "
              f"({gb / (tfb - tf):.2f} TB/s at the minimum bytes)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", nargs="+", default=["A", "C"])
    p.add_argument("--skip-swiglu", action="store_true")
    a = p.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    for name in [] if a.skip_swiglu else a.config:
        bench_swiglu(CONFIGS[name])
    for name in a.config:
        bench_adamw(CONFIGS[name])


if __name__ == "__main__":
    main()
