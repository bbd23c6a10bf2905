"""Training-step throughput: ours vs HF transformers' MixtralForCausalLM, side by side on one GPU.

One run times, on the same device and the same shapes (bf16 weights, AdamW, forward + backward + step; HF with
torch's fused AdamW, HF Trainer's default; ours with the optimizer ``moe-train`` builds: ``LitMoE``'s parameter
groups and LR schedule, the update of ``optimizer_impl``, by default ``auto``: compiled with the compiled model): HF
eager experts, HF grouped_mm experts, HF grouped_mm + torch.compile, and our model (grouped experts, chunked
cross-entropy, torch.compile) with each router (topk, hash, span), plus topk under forced-balanced routing, topk in
bf16-mixed precision (fp32 weights and optimizer state, bf16 autocast: the recipe of ``moe-train``'s GPU trainer, so
its step time has a reference; once more with its gradient clipping), and the causal variants of the router zoo:
aux_free (DeepSeek-V3 sigmoid + selection bias), top-k with capacity dropping (capacity factor 1.0 and 1.25), and at
the same active expert width fine-grained experts (4x as many, 4x narrower, top-4K) with and without 2 shared
experts. It prints tokens/s, model FLOP utilisation against a bf16 matmul ceiling measured in the same run, peak
memory, and ratios against the best HF variant; it writes JSON + a markdown table.

    python experiments/bench/throughput.py --config A            # on the GPU (results/bench/)
    python experiments/bench/throughput.py --smoke                # CPU-sized smoke run (no timing claims)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_variants import ModelArgs, Transformer
from moe_variants.model import experts as experts_module
from moe_variants.model.routing import LayerSpec, Router, RouterOutput, RoutingContext
from moe_variants.routers.aux_free import AuxFreeRouter
from moe_variants.routers.hash import HashRouter
from moe_variants.routers.resources import bind_resources, synthetic_resources
from moe_variants.routers.span import SpanHeadRouter
from moe_variants.routers.topk import TopKRouter
from moe_variants.training.lit import LitMoE
from moe_variants.training.optim import IMPLEMENTATIONS, resolve_optimizer_impl
from moe_variants.training.schedule import warmup_cosine


@dataclass
class BenchConfig:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    seq_len: int
    batch: int
    vocab_size: int = 32000
    num_experts: int = 8
    top_k: int = 2


CONFIGS = {
    "A": BenchConfig("A", dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, hidden_dim=3584, seq_len=2048, batch=8),
    "B": BenchConfig("B", dim=2048, n_layers=8, n_heads=16, n_kv_heads=8, hidden_dim=7168, seq_len=4096, batch=4),
    # Mixtral 8x7B's layer (dim 4096, 32/8 heads, hidden 14336), two of them
    "C": BenchConfig("C", dim=4096, n_layers=2, n_heads=32, n_kv_heads=8, hidden_dim=14336, seq_len=4096, batch=4),
    "smoke": BenchConfig("smoke", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, seq_len=64, batch=2,
                         vocab_size=1000),
}


class BalancedRouter(Router):
    """Bench-only: forces perfectly balanced routing (token i -> experts i, i+1, ... mod E), uniform weights."""

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec)
        self.gate = torch.nn.Linear(spec.dim, spec.num_experts, bias=False)  # same cost as the learned gate

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        B, S, _ = x.shape
        logits = self.gate(x).float()
        tok = torch.arange(B * S, device=x.device).view(B, S, 1)
        ids = (tok + torch.arange(self.top_k, device=x.device)) % self.num_experts
        weights = torch.softmax(logits.gather(-1, ids), -1)
        return RouterOutput(expert_ids=ids, weights=weights, logits=logits)


def args_for(c: BenchConfig, **kw) -> ModelArgs:
    base = dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, hidden_dim=c.hidden_dim,
                vocab_size=c.vocab_size, num_experts=c.num_experts, num_experts_per_tok=c.top_k, max_seq_len=c.seq_len)
    return ModelArgs(**{**base, **kw})


def capacity(factor: float) -> dict:
    """Capacity dropping (it looks ahead across the batch, so it builds only when allowed)."""
    return dict(capacity_factor=factor, allow_lookahead=True)


def fine_grained(c: BenchConfig, shared: int = 0) -> dict:
    """4x the experts, each 4x narrower, top-4K (DeepSeekMoE segmentation): the same active expert width per
    token, ``shared`` of it in always-active shared experts."""
    return dict(num_experts=4 * c.num_experts, hidden_dim=c.hidden_dim // 4, num_experts_per_tok=4 * c.top_k - shared,
                num_shared_experts=shared, shared_hidden_dim=c.hidden_dim // 4 if shared else None)


def model_flops_per_token(c: BenchConfig) -> float:
    """6 x active matmul params + causal attention (fwd+bwd), per token."""
    hd = c.dim // c.n_heads
    attn = c.dim * hd * (2 * c.n_heads + 2 * c.n_kv_heads)
    experts = c.top_k * 3 * c.dim * c.hidden_dim
    router = c.dim * c.num_experts
    per_layer = attn + experts + router
    matmul_params = c.n_layers * per_layer + c.dim * c.vocab_size  # LM head; the embedding is a lookup
    attention = c.n_layers * 6 * c.seq_len * c.n_heads * hd  # causal: half of 2 GEMMs, x3 for fwd+bwd
    return 6 * matmul_params + attention


def matmul_ceiling(device: str) -> float:
    """Measured bf16 matmul FLOP/s on random data (8192^3)."""
    if device != "cuda":
        return float("nan")
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * 20 / (start.elapsed_time(end) / 1e3)


def hf_model(c: BenchConfig, experts_impl: str):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                        num_local_experts=c.num_experts, num_experts_per_tok=c.top_k, max_position_embeddings=c.seq_len,
                        tie_word_embeddings=False, sliding_window=None, attn_implementation="sdpa",
                        experts_implementation=experts_impl)
    model = MixtralForCausalLM(cfg)

    def loss_fn(m, ids):
        return m(input_ids=ids, labels=ids).loss

    return model, loss_fn


def our_model(c: BenchConfig, router, **args) -> tuple[torch.nn.Module, callable]:
    router = bind_resources(router, synthetic_resources(c.vocab_size))  # random word spans, for span routers
    model = Transformer(args_for(c, **args), router=router, experts="grouped" if torch.cuda.is_available() else "loop")

    def loss_fn(m, ids):
        labels = ids.roll(-1, 1)
        out = m(ids, labels=labels)
        aux = sum(r.aux_losses.get("load_balance", 0.0) for r in out.routing)
        return out.lm_loss + 0.01 * aux

    return model, loss_fn


def moe_train_optimizer(model: Transformer, impl: str, steps: int):
    """The optimizer and LR schedule ``moe-train`` builds for ``model`` (``LitMoE.configure_optimizers``: decay and
    no-decay groups, warmup + cosine stepped every step) with the update ``impl``: what the Lightning path runs."""
    lit = LitMoE(model, optimizer=partial(torch.optim.AdamW, lr=1e-4), loss_coefficients={}, optimizer_impl=impl,
                 scheduler=partial(warmup_cosine, warmup_steps=1, total_steps=steps))
    conf = lit.configure_optimizers()
    return conf["optimizer"], conf["lr_scheduler"]["scheduler"]


def time_variant(name: str, build, c: BenchConfig, device: str, compile_: bool, steps: int, warmup: int,
                 mixed: bool = False, optimizer_impl: str = "auto", clip: float | None = None) -> dict:
    """Median step time of ``build()``'s model. ``mixed``: fp32 weights and AdamW state, the step under bf16
    autocast (``moe-train``'s ``bf16-mixed``); otherwise bf16 weights and state (how HF and ours are compared).
    HF's models step torch's fused AdamW, ours ``moe-train``'s optimizer with ``optimizer_impl`` (``training.optim``;
    auto: compiled when ``compile_``, else fused). ``clip``: the gradients clipped to this total 2-norm before the
    step (``torch.nn.utils.clip_grad_norm_``, as Lightning's ``gradient_clip_val`` does)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model, loss_fn = build()
    model = model.to(device=device, dtype=torch.float32 if mixed else torch.bfloat16)
    model.train()
    if isinstance(model, Transformer):
        impl = resolve_optimizer_impl(optimizer_impl, compiled_model=compile_)
        opt, sched = moe_train_optimizer(model, impl, warmup + steps)
    else:
        impl, sched = "fused" if device == "cuda" else "torch default", None
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    step_model = torch.compile(model) if compile_ else model
    # a fresh batch every step: a repeated batch lets fixed routing memorise it, and its loss would mean nothing
    # (random ids: no loss is reported; only time and memory)
    batches = torch.randint(0, c.vocab_size, (warmup + steps, c.batch, c.seq_len), device=device).unbind(0)
    next_batch = iter(batches)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=mixed):
            loss = loss_fn(step_model, next(next_batch))
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    # steps back to back, as in a training loop: no sync between them (a sync per step would add the host's
    # launch latency to every step); an event between consecutive steps times each one on the GPU
    if device == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for event in events[1:]:
            step()
            event.record()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]
    else:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    result = {"variant": name, "tokens_per_s": c.batch * c.seq_len / median, "step_s": median,
              "peak_mem_gib": peak, "warmup_s": warm_s, "optimizer_impl": impl}
    print(f"  {name:28s} {result['tokens_per_s']:>10.0f} tok/s  step {median * 1e3:7.1f} ms  "
          f"peak {peak:6.1f} GiB  (warm-up {warm_s:.0f} s, AdamW {impl})", flush=True)
    return result


@contextlib.contextmanager
def slice_swiglu():
    """Our experts with ``silu(h[:, :F]) * h[:, F:]`` differentiated by autograd (the form before ``_SwiGLU``)."""
    saved = experts_module.swiglu
    experts_module.swiglu = lambda h: F.silu(h[:, : h.shape[-1] // 2]) * h[:, h.shape[-1] // 2:]
    try:
        yield
    finally:
        experts_module.swiglu = saved


def run(c: BenchConfig, device: str, steps: int, warmup: int, skip_hf: bool, variants: list[str] | None,
        optimizer_impl: str = "auto") -> dict:
    ceiling = matmul_ceiling(device)
    flops_tok = model_flops_per_token(c)
    print(f"config {c.name}: {c}\n  matmul ceiling {ceiling / 1e12:.0f} TFLOP/s; model FLOPs/token "
          f"{flops_tok / 1e9:.2f} G", flush=True)
    compile_ = device == "cuda"
    plan = []
    if not skip_hf:
        plan += [
            ("hf_eager", lambda: hf_model(c, "eager"), False),
            ("hf_grouped_mm", lambda: hf_model(c, "grouped_mm"), False),
            ("hf_grouped_mm_compile", lambda: hf_model(c, "grouped_mm"), compile_),
        ]
    plan += [
        ("ours_topk", lambda: our_model(c, partial(TopKRouter)), compile_),
        # the Lightning path's precision (trainer.precision=bf16-mixed): its reference for moe-train's step time
        ("ours_topk_bf16_mixed", lambda: our_model(c, partial(TopKRouter)), compile_, True),
        # and with its gradient clipping (conf/trainer/default.yaml: gradient_clip_val=1.0): moe-train's whole step
        ("ours_topk_bf16_mixed_clip", lambda: our_model(c, partial(TopKRouter)), compile_, True),
        # the SwiGLU derivative as autograd writes it (two zero-padded slice gradients): what _SwiGLU bought
        ("ours_topk_slice_swiglu", lambda: our_model(c, partial(TopKRouter)), compile_),
        ("ours_topk_fused_adamw", lambda: our_model(c, partial(TopKRouter)), compile_),
        ("ours_hash", lambda: our_model(c, partial(HashRouter)), compile_),
        ("ours_span", lambda: our_model(c, partial(SpanHeadRouter)), compile_),
        ("ours_topk_forced_balanced", lambda: our_model(c, BalancedRouter), compile_),
        ("ours_aux_free", lambda: our_model(c, partial(AuxFreeRouter)), compile_),
        ("ours_topk_capacity1.0", lambda: our_model(c, partial(TopKRouter), **capacity(1.0)), compile_),
        ("ours_topk_capacity1.25", lambda: our_model(c, partial(TopKRouter), **capacity(1.25)), compile_),
        ("ours_fine_grained", lambda: our_model(c, partial(TopKRouter), **fine_grained(c)), compile_),
        ("ours_fine_grained_shared2", lambda: our_model(c, partial(TopKRouter), **fine_grained(c, shared=2)),
         compile_),
    ]
    results = []
    for name, build, comp, *mixed in plan:
        if variants and name not in variants:
            continue
        try:
            # ours_topk_fused_adamw: the benchmark's optimizer before moe-train's optimizer_impl (what it bought)
            impl = "fused" if name.endswith("_fused_adamw") else optimizer_impl
            with slice_swiglu() if name.endswith("_slice_swiglu") else contextlib.nullcontext():
                results.append(time_variant(name, build, c, device, comp, steps, warmup, mixed=bool(mixed),
                                            optimizer_impl=impl, clip=1.0 if name.endswith("_clip") else None))
        except Exception as err:  # a failing variant is reported, not hidden, and the rest still run
            print(f"  {name}: FAILED {type(err).__name__}: {err}"[:400], flush=True)
            results.append({"variant": name, "error": f"{type(err).__name__}: {err}"[:400]})
    for r in results:
        if "tokens_per_s" in r:
            r["mfu"] = r["tokens_per_s"] * flops_tok / ceiling
    ok = [r for r in results if "tokens_per_s" in r]
    hf = [r for r in ok if r["variant"].startswith("hf_")]
    best_hf = max(hf, key=lambda r: r["tokens_per_s"]) if hf else None
    topk = next((r for r in ok if r["variant"] == "ours_topk"), None)
    for r in ok:
        if best_hf:
            r["vs_hf_best"] = r["tokens_per_s"] / best_hf["tokens_per_s"]
            r["mem_vs_hf_best"] = r["peak_mem_gib"] / best_hf["peak_mem_gib"]
        if topk and r["variant"].startswith("ours_"):
            r["vs_ours_topk"] = r["tokens_per_s"] / topk["tokens_per_s"]
    return {"config": vars(c), "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
            "torch": torch.__version__, "matmul_ceiling_flops": ceiling, "model_flops_per_token": flops_tok,
            "best_hf": best_hf["variant"] if best_hf else None, "results": results}


def markdown(report: dict) -> str:
    c = report["config"]
    lines = [f"### Config {c['name']}: dim {c['dim']}, {c['n_layers']} layers, {c['n_heads']} heads / "
             f"{c['n_kv_heads']} kv, expert hidden {c['hidden_dim']}, E{c['num_experts']} top-{c['top_k']}, "
             f"seq {c['seq_len']} x batch {c['batch']}, vocab {c['vocab_size']}",
             f"{report['device']}, torch {report['torch']}, measured bf16 matmul ceiling "
             f"{report['matmul_ceiling_flops'] / 1e12:.0f} TFLOP/s; baseline = best HF variant "
             f"({report['best_hf']})", "",
             "| variant | tokens/s | MFU | peak GiB | vs HF best | mem vs HF best | vs ours topk | AdamW |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        fmt = lambda k, f: (f.format(r[k]) if k in r else "")  # noqa: E731
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {fmt('mfu', '{:.1%}')} | "
                     f"{r['peak_mem_gib']:.1f} | {fmt('vs_hf_best', '{:.2f}x')} | {fmt('mem_vs_hf_best', '{:.2f}x')} | "
                     f"{fmt('vs_ours_topk', '{:.2f}x')} | {r.get('optimizer_impl', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", nargs="+", default=["A", "B"], choices=sorted(CONFIGS))
    p.add_argument("--smoke", action="store_true", help="CPU-sized run of every variant (no timing claims)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--optimizer-impl", default="auto", choices=IMPLEMENTATIONS,
                   help="our variants' AdamW update (moe-train's optimizer_impl; HF's stay fused)")
    p.add_argument("--out", default="results/bench")
    a = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    names = ["smoke"] if a.smoke else a.config
    reports = [run(CONFIGS[n], device, a.steps, a.warmup, a.skip_hf, a.variants, a.optimizer_impl) for n in names]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if a.smoke else "-".join(names)
    (out / f"throughput-{tag}.json").write_text(json.dumps(reports, indent=2))
    (out / f"throughput-{tag}.md").write_text("\n".join(markdown(r) for r in reports))
    print("\n".join(markdown(r) for r in reports))
    return reports


if __name__ == "__main__":
    main()
