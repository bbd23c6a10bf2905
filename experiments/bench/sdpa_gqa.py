"""Which is faster for grouped-query attention on this GPU: SDPA's enable_gqa, or K/V expanded to all heads?"""

import torch
import torch.nn.functional as F


def bench(fn, *args, reps=20):
    for _ in range(3):
        fn(*args)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn(*args)
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / reps


def fwd_bwd(q, k, v, expand):
    if expand:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(torch.ones_like(out))


for B, H, Hkv, S, hd in [(8, 16, 4, 2048, 64), (4, 16, 8, 4096, 128)]:
    q = torch.randn(B, H, S, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, S, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, S, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t_gqa, t_exp = bench(fwd_bwd, q, k, v, False), bench(fwd_bwd, q, k, v, True)
    print(f"B{B} H{H}/{Hkv} S{S} hd{hd}: enable_gqa {t_gqa:.2f} ms, expanded {t_exp:.2f} ms per fwd+bwd")
