"""Expert parallelism, 1 GPU vs W GPUs: same config, same seed, same global batch; losses and tokens/s.

Run with one process per GPU; rank 0 first trains the plain single-GPU model on the whole global batch (the
other ranks wait), then all ranks train the expert-parallel model (each rank: E/W experts, B/W sequences,
all-to-all token dispatch, DDP for the dense grads as in ``moe-train trainer=ddp parallel=ep`` (``--no-ddp``:
``parallel.sync_expert_parallel_grads`` after backward), EP-aware grad clipping), then rank 0 trains
the single-GPU model once more on one rank's share (B/W sequences) for the weak-scaling baseline. The runs use
AdamW, grad clipping at 1.0, the same seeded random tokens and, as ``moe-train``, the configured loss (LM loss +
``loss.*`` aux losses; ``--loss lm``: the LM loss only). The compared losses are the global-batch LM losses; with
aux losses they match up to rounding and the per-rank aux losses (``conf/parallel/ep.yaml``: computed per process,
as with DDP). Without the load-balancing loss a learned router collapses within steps and EP timings measure the
imbalance (the ``expert load`` column: the busiest rank's routed copies over the mean, averaged over layers).
Rank 0 writes ``expert_parallel.json`` and ``expert_parallel.md`` to ``--out`` and the script exits 1 when the
per-step LM losses differ by more than ``--tol``.

    torchrun --nproc-per-node 2 experiments/bench/expert_parallel.py --out results/bench/ep   # GPU: model=gpu_small
    torchrun --nproc-per-node 2 experiments/bench/expert_parallel.py --device cpu --out /tmp/ep model=tiny

Trailing ``key=value`` arguments are Hydra overrides of ``conf/config.yaml`` (``model=gpu_medium router=hash
model.num_experts=8``). Throughput is strong scaling: tokens/s of W GPUs on the global batch over tokens/s of
one GPU on the same batch (so the single-GPU run must fit that batch). Weak scaling: tokens/s of W GPUs over
tokens/s of one GPU doing one rank's share (the same work per GPU), the usual data-parallel scaling figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=gpu_small router=hash")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="results/bench/expert_parallel")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (still compared)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch (sequences), split over the ranks")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--precision", choices=["bf16-mixed", "32"], default=None,
                   help="default: bf16-mixed on cuda, 32 on cpu")
    p.add_argument("--tol", type=float, default=None, help="max |loss diff| (default 2e-2 bf16, 1e-4 fp32)")
    p.add_argument("--loss", choices=["config", "lm"], default="config",
                   help="config: LM + aux losses as moe-train; lm: the LM loss only (exact EP/1-process comparison)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--no-ddp", dest="ddp", action="store_false",
                   help="EP run without DDP: dense grads all-reduced in one flat call after backward (default: DDP "
                        "buckets overlapped with backward, as moe-train trainer=ddp parallel=ep)")
    p.add_argument("--one-copy-per-rank", action="store_true",
                   help="dispatch with parallel.dedup.OneCopyPerRankDispatcher: a token's hidden state travels once "
                        "per destination rank, not once per expert (parallel.one_copy_per_rank=true in moe-train)")
    p.add_argument("--overlap", action="store_true",
                   help="dispatch with parallel.overlap.OverlappedDispatcher: the token exchange runs as point-to-"
                        "point rounds overlapped with the expert compute (parallel.overlap=true in moe-train; the "
                        "plain path under --compile)")
    p.add_argument("--per-layer-splits", action="store_true",
                   help="exchange the split sizes in every MoE layer even for routers that route by token ids "
                        "(default: once per forward for them, parallel.expert_parallel.plan_dispatch)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the EP run, profile N more steps (torch.profiler): profile_ep_rank<r>.txt per rank")
    a = p.parse_args(argv)
    if a.overlap and a.one_copy_per_rank:
        p.error("--overlap and --one-copy-per-rank are two dispatchers: choose one")
    a.precision = a.precision or ("bf16-mixed" if a.device == "cuda" else "32")
    a.tol = a.tol if a.tol is not None else (2e-2 if a.precision == "bf16-mixed" else 1e-4)
    return a


def init_distributed(device: str) -> tuple[int, int, torch.device]:
    """torchrun's env (or a one-process group when started with plain python)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def compose(a: argparse.Namespace) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    defaults = {"model": "gpu_small" if a.device == "cuda" else "tiny",
                "experts": "grouped" if a.device == "cuda" else "loop"}
    given = {o.split("=", 1)[0] for o in a.overrides}
    overrides = [f"{k}={v}" for k, v in defaults.items() if k not in given] + list(a.overrides)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides), overrides


def make_data(a: argparse.Namespace, vocab: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Seeded random tokens (steps, B, S), next-token labels (last position ignored), synthetic router resources
    (a random word-span table and corpus, so that word-span and vocabulary routers run on synthetic text)."""
    from moe_variants.routers.resources import synthetic_resources

    g = torch.Generator().manual_seed(a.seed + 1)
    ids = torch.randint(0, vocab, (a.steps, a.batch_size, a.seq_len), generator=g)
    labels = ids.roll(-1, dims=-1)
    labels[..., -1] = -100
    return ids, labels, synthetic_resources(vocab, seed=a.seed)


def build(cfg: Any, a: argparse.Namespace, resources: Any, dev: torch.device, ep: bool) -> torch.nn.Module:
    from moe_variants.parallel import expert_parallel as parallel
    from moe_variants.parallel.dedup import OneCopyPerRankDispatcher
    from moe_variants.parallel.overlap import OverlappedDispatcher
    from moe_variants.training.build import build_model

    torch.manual_seed(a.seed)
    model = build_model(cfg, resources=resources)
    if ep:  # slices the same full init on every rank
        dispatcher = OneCopyPerRankDispatcher if a.one_copy_per_rank else OverlappedDispatcher if a.overlap else None
        parallel.apply_expert_parallel(model, dispatcher=dispatcher)
        if a.per_layer_splits:
            model.dispatch_planner = None
    return model.to(dev).train()


def rank_load_imbalance(counts_LE: torch.Tensor, ranks: int) -> float:
    """Busiest EP rank's routed copies over the mean rank's, averaged over layers (1.0 = balanced; ``ranks``
    times as slow as balanced at worst). ``counts_LE``: (layers, E) copies routed to each expert."""
    per_rank = counts_LE.view(counts_LE.shape[0], ranks, -1).sum(-1)
    return float((per_rank.max(-1).values / per_rank.mean(-1).clamp(min=1)).mean())


def train(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, a: argparse.Namespace,
          dev: torch.device, ep: bool, loss_coefficients: dict[str, float]) -> dict[str, Any]:
    """Train ``a.steps`` steps on this rank's rows; returns the global-batch LM losses, the expert load per
    EP rank (for the single-device runs: what it would be on ``world`` ranks) and timing."""
    from moe_variants.model.experts import expert_counts
    from moe_variants.model.losses import compose_loss
    from moe_variants.parallel import expert_parallel as parallel
    from moe_variants.routers.aux_free import AuxFreeRouter

    B = ids.shape[1]  # the global batch of this run (sequences)
    W, r = (dist.get_world_size(), dist.get_rank()) if ep else (1, 0)
    rows = slice(r * B // W, (r + 1) * B // W)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=a.lr,
                            betas=(0.9, 0.95), weight_decay=0.1)
    fwd = model
    if ep and a.ddp:  # as the Lightning path: DDP averages the dense grads in buckets during backward
        from torch.nn.parallel import DistributedDataParallel as DDP

        DDP._set_params_and_buffers_to_ignore_for_model(model, parallel.expert_parameter_names(model))
        fwd = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    fwd = torch.compile(fwd) if a.compile else fwd
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16-mixed")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def train_step(i: int) -> tuple[float, float]:
        """One optimizer step on batch ``i``; returns the global-batch LM loss and the expert load per rank."""
        x, y = ids[i, rows].to(dev, non_blocking=True), labels[i, rows].to(dev, non_blocking=True)
        with autocast:
            out = fwd(x, labels=y)
            loss = compose_loss(out.lm_loss, out.routing, loss_coefficients)[0] if a.loss == "config" \
                else out.lm_loss
        loss.backward()
        if ep:
            if a.ddp:
                for p in parallel.expert_parameters(model):  # a shard that got no token: zeros, as in one process
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                parallel.scale_expert_grads(model)
            else:
                parallel.sync_expert_parallel_grads(model)  # one flat all-reduce after backward
            parallel.clip_grad_norm_(model, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # LM loss and routed copies per (layer, expert), summed over ranks in one all-reduce (the global-batch
        # loss: every rank has the same number of labelled tokens)
        counts = torch.stack([expert_counts(r.expert_ids, E) for r in out.routing])
        stats = torch.cat([out.lm_loss.detach().float().view(1), counts.flatten().float()])
        if ep:
            dist.all_reduce(stats)
            stats[0] /= W
        stats = stats.cpu()  # (a host sync per step, as a logger would)
        counts_LE = stats[1:].view(-1, E)
        for layer, router in bias_routers.items():  # as moe-train's BiasBalancing: global counts, once per step
            router.update_bias(counts_LE[layer])
        return float(stats[0]), rank_load_imbalance(counts_LE, world)

    E, world = int(model.args.num_experts), dist.get_world_size()
    bias_routers = {i: rt for i, rt in enumerate(model.routers) if isinstance(rt, AuxFreeRouter)}
    losses, loads, t0 = [], [], None
    for step in range(a.steps):
        if step == a.warmup:
            sync()
            if ep:
                dist.barrier()
            t0 = time.perf_counter()
        lm, load = train_step(step)
        losses.append(lm)
        loads.append(load)
    sync()
    elapsed = time.perf_counter() - t0 if t0 is not None else float("nan")
    timed = a.steps - a.warmup
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    if ep and dev.type == "cuda":
        t = torch.tensor([peak], device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = float(t)
    if ep and a.profile:  # extra steps, not timed, not compared (they reuse the data)
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            for step in range(a.profile):
                train_step(step % a.steps)
            sync()
        write_profile(prof, Path(a.out), r, a.profile, dev.type)
    return {"losses": losses, "expert_load": loads, "step_time_s": elapsed / max(timed, 1),
            "tokens_per_s": B * a.seq_len * timed / elapsed if timed > 0 else float("nan"),
            "peak_mem_gib_per_rank": peak,
            "expert_bias": [rt.expert_bias.float().cpu().tolist() for rt in bias_routers.values()]}


def write_profile(prof: Any, out: Path, rank: int, steps: int, device: str) -> None:
    """``profile_ep_rank<r>.txt``: the top ops by device time, then the collectives split by input shape (which
    tells the per-layer count exchange, a few ints, from the token all-to-alls and the gradient all-reduce)."""
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    top = prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)
    comms = [e for e in prof.key_averages(group_by_input_shape=True)
             if any(k in e.key for k in ("all_to_all", "alltoall", "all_reduce", "allreduce"))]
    lines = [f"{e.key[:50]:50s} shapes {str(e.input_shapes)[:60]:60s} calls {e.count:5d} "
             f"device total {e.device_time_total / 1e3:9.2f} ms  cpu total {e.cpu_time_total / 1e3:9.2f} ms"
             for e in sorted(comms, key=lambda e: -e.device_time_total)]
    out.mkdir(parents=True, exist_ok=True)
    text = f"{steps} steps, EP rank {rank}\n{top}\n\ncollectives by input shape:\n" + "\n".join(lines) + "\n"
    (out / f"profile_ep_rank{rank}.txt").write_text(text)
    if rank == 0:
        print(text)


def comm_probe(dev: torch.device, sizes_mib: tuple[int, ...], iters: int = 10) -> list[dict]:
    """All-to-all bandwidth with no compute around it (equal splits, bf16): what the token exchange could cost
    at best. ``gb_per_s``: bytes this rank sends to other ranks per second."""
    W = dist.get_world_size()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    for mib in sizes_mib:
        n = mib * 2**20 // 2 // W * W  # bf16 elements, divisible by W
        x, y = torch.randn(n, device=dev).to(torch.bfloat16), torch.empty(n, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            dist.all_to_all_single(y, x)
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_to_all_single(y, x)
        sync()
        dt = (time.perf_counter() - t0) / iters
        sent = 2 * n * (W - 1) / W
        rows.append({"mib": mib, "seconds": dt, "gb_per_s": sent / dt / 1e9})
    return rows


def markdown(res: dict[str, Any]) -> str:
    s, e, w = res["single"], res["ep"], res["single_share"]
    precision = "fp32" if res["precision"] == "32" else res["precision"]
    loss = "LM + aux losses (as moe-train)" if res["loss"] == "config" else "LM loss only"

    def load(run: dict[str, Any]) -> str:
        timed = run["expert_load"][res["warmup"]:] or run["expert_load"]
        return f"{sum(timed) / len(timed):.2f}"
    lines = [
        f"# Expert parallelism: 1 vs {res['world_size']} {res['device']} ranks",
        "",
        f"`{' '.join(res['overrides'])}`, global batch {res['batch_size']} x {res['seq_len']} tokens, "
        f"{precision}, {loss}, {res['steps']} steps ({res['warmup']} untimed), seed {res['seed']}, "
        f"{res['num_experts']} experts ({res['num_experts'] // res['world_size']} per rank).",
        "",
        "| run | tokens/s | step time (s) | peak mem / rank (GiB) | final LM loss | expert load (timed steps) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| 1 rank | {s['tokens_per_s']:.0f} | {s['step_time_s']:.4f} | {s['peak_mem_gib_per_rank']:.2f} | "
        f"{s['losses'][-1]:.5f} | {load(s)} |",
        f"| EP x{res['world_size']} | {e['tokens_per_s']:.0f} | {e['step_time_s']:.4f} | "
        f"{e['peak_mem_gib_per_rank']:.2f} | {e['losses'][-1]:.5f} | {load(e)} |",
        f"| 1 rank, one rank's share ({res['batch_size'] // res['world_size']} x {res['seq_len']}) | "
        f"{w['tokens_per_s']:.0f} | {w['step_time_s']:.4f} | {w['peak_mem_gib_per_rank']:.2f} | "
        f"{w['losses'][-1]:.5f} | {load(w)} |",
        "",
        f"Speedup on the same global batch (strong scaling) {res['speedup']:.2f}x; with the same work per GPU "
        f"(weak scaling) **{res['weak_scaling_speedup']:.2f}x**. Expert load: the busiest of {res['world_size']} EP "
        "ranks' routed copies over the mean (1.00 = balanced), mean over layers and timed steps; for the 1-rank runs, "
        "what it would be with EP.",
        "",
        f"Max |loss difference| (1 rank vs EP, same global batch) over all steps {res['max_abs_loss_diff']:.2e} "
        f"(tolerance {res['tol']:.0e}): {'match' if res['losses_match'] else 'MISMATCH'}.",
        "",
        "| step | 1 rank LM loss | EP LM loss | EP expert load |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {i} | {x:.6f} | {y:.6f} | {b:.2f} |"
              for i, (x, y, b) in enumerate(zip(s["losses"], e["losses"], e["expert_load"]))]
    if res.get("all_to_all_probe") and "error" not in res["all_to_all_probe"][0]:
        lines += ["", "All-to-all alone (equal splits, bf16; bytes each rank sends to the others per second):", "",
                  "| size | time (ms) | GB/s |", "|---:|---:|---:|"]
        lines += [f"| {p['mib']} MiB | {p['seconds'] * 1e3:.3f} | {p['gb_per_s']:.1f} |"
                  for p in res["all_to_all_probe"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    rank, world, dev = init_distributed(a.device)
    try:
        if a.batch_size % world:
            raise ValueError(f"--batch-size {a.batch_size} must be divisible by the world size {world}")
        cfg, overrides = compose(a)
        ids, labels, resources = make_data(a, int(cfg.model.vocab_size))
        coefs = {k: float(v) for k, v in cfg.loss.items()}
        single = None
        if rank == 0:  # the reference: one device, the whole global batch
            single = train(build(cfg, a, resources, dev, ep=False), ids, labels, a, dev, False, coefs)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        dist.barrier()
        ep = train(build(cfg, a, resources, dev, ep=True), ids, labels, a, dev, True, coefs)
        # (not on CPU: after all-to-alls of this size, gloo sometimes aborts a rank at exit)
        try:
            probe = comm_probe(dev, (1, 8, 32, 128)) if dev.type == "cuda" else []
        except Exception as err:  # a diagnostic: it must not cost the measurement above
            probe = [{"error": f"{type(err).__name__}: {err}"[:300]}]
        single_share = None
        if rank == 0:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            share = a.batch_size // world  # weak-scaling baseline: one GPU doing one rank's share
            single_share = train(build(cfg, a, resources, dev, ep=False), ids[:, :share], labels[:, :share], a,
                                 dev, False, coefs)
        dist.barrier()  # every rank leaves together (a rank that tore down its group early could abort)
        if rank != 0:
            return 0
        diff = max(abs(x - y) for x, y in zip(single["losses"], ep["losses"]))
        res = {
            "world_size": world, "device": a.device, "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else platform.processor(), "torch": torch.__version__, "overrides": overrides,
            "num_experts": int(cfg.model.num_experts), "batch_size": a.batch_size, "seq_len": a.seq_len,
            "steps": a.steps, "warmup": a.warmup, "seed": a.seed, "lr": a.lr, "precision": a.precision,
            "compile": a.compile, "ddp": a.ddp, "one_copy_per_rank": a.one_copy_per_rank,
            "overlap": a.overlap, "per_layer_splits": a.per_layer_splits, "loss": a.loss,
            "single": single, "ep": ep,
            "single_share": single_share,
            "speedup": ep["tokens_per_s"] / single["tokens_per_s"],
            "weak_scaling_speedup": ep["tokens_per_s"] / single_share["tokens_per_s"],
            "max_abs_loss_diff": diff, "tol": a.tol, "losses_match": diff <= a.tol, "all_to_all_probe": probe,
        }
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "expert_parallel.json").write_text(json.dumps(res, indent=2))
        md = markdown(res)
        (out / "expert_parallel.md").write_text(md)
        print(md)
        return 0 if res["losses_match"] else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
