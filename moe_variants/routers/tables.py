"""Expert tables: (num_keys, K) int64 maps from a routing key (a token id, a bucket, a routing-vocabulary id) to K
distinct experts. Plain functions, one per way of filling a table; routers keep the result as a buffer, so a
checkpoint carries it.
"""

from __future__ import annotations

import heapq
from pathlib import Path

import torch

from moe_variants.model.routing import LayerSpec


def layer_seed(seed: int, layer_idx: int) -> int:
    """The seed of one layer's table: a different table in every layer, the same for the same (seed, layer)."""
    return seed * 100_003 + layer_idx


def random_expert_table(num_keys: int, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """(num_keys, K) int64: K distinct experts per key, uniformly at random."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_keys, num_experts, generator=g).argsort(dim=1)[:, :top_k].contiguous()


def balanced_expert_table(counts: torch.Tensor, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """(V, K) int64: ids (most frequent first) go to the K experts with the lowest ``load + jitter``, the
    jitter uniform in [0, E x the id's own count) and drawn per (id, expert) from ``seed``. Heavy ids still
    land where the load is low, so the token mass ends balanced (the tail evens out what the head leaves), while
    the jitter picks among near-equally loaded experts at random: every K-set is used, about uniformly, and
    layers (seeds) partition the vocabulary independently (unlike :func:`lpt_expert_table`)."""
    g = torch.Generator().manual_seed(seed)
    V, E = counts.numel(), num_experts
    mass = counts.double().tolist()
    jitter = torch.rand(V, E, generator=g, dtype=torch.float64).tolist()
    load = [0.0] * E
    table = torch.empty(V, top_k, dtype=torch.int64)
    for token in sorted(range(V), key=lambda i: (-mass[i], i)):
        scale = max(mass[token], 1.0) * E
        chosen = sorted(range(E), key=lambda e: load[e] + jitter[token][e] * scale)[:top_k]
        for e in chosen:
            load[e] += mass[token]
        table[token] = torch.tensor(chosen)
    return table


def lpt_expert_table(counts: torch.Tensor, num_experts: int, top_k: int, seed: int) -> torch.Tensor:
    """(V, K) int64: greedy longest-processing-time assignment of ids (most frequent first) to the K least
    loaded distinct experts; expert labels are permuted by ``seed`` so layers differ (by a relabelling only:
    for K > 1 the experts pair up into E/K fixed sets, the same partition in every layer)."""
    g = torch.Generator().manual_seed(seed)
    relabel = torch.randperm(num_experts, generator=g).tolist()
    order = sorted(range(counts.numel()), key=lambda i: (-float(counts[i]), i))
    heap = [(0.0, e) for e in range(num_experts)]  # (load, expert)
    table = torch.empty(counts.numel(), top_k, dtype=torch.int64)
    for token in order:
        chosen = [heapq.heappop(heap) for _ in range(top_k)]
        table[token] = torch.tensor([relabel[e] for _, e in chosen])
        for load, e in chosen:
            heapq.heappush(heap, (load + float(counts[token]), e))
    return table


def file_expert_table(path: str | Path | None, spec: LayerSpec) -> torch.Tensor:
    """This layer's (V, K) rows of a table file: a .pt file holding a (n_layers, V, K) integer tensor."""
    if path is None:
        raise ValueError("router.table=file needs router.table_path=<a .pt file of shape (n_layers, V, K)> "
                         "(experiments/router_study/distill_hash.py writes one)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"router.table_path={path} does not exist: write it first (e.g. with "
                         f"experiments/router_study/distill_hash.py) or fix the path (relative to the working dir)")
    try:
        table = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or not plain tensors
        raise ValueError(f"router.table_path={path} is not a torch tensor file ({type(e).__name__}: {e})") from e
    want = (spec.n_layers, spec.vocab_size, spec.top_k)
    if not isinstance(table, torch.Tensor) or table.dtype.is_floating_point or tuple(table.shape) != want:
        got = f"{tuple(table.shape)} {table.dtype}" if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"router.table_path={path} holds {got}; this model needs an int64 tensor of shape "
                         f"(n_layers, V, K) = {want}")
    rows = table[spec.layer_idx].long()  # (V, K)
    if rows.min() < 0 or rows.max() >= spec.num_experts or (rows.sort(-1).values.diff(dim=-1) == 0).any():
        raise ValueError(f"router.table_path={path}: layer {spec.layer_idx} has expert ids outside "
                         f"[0, {spec.num_experts}) or a row repeating an expert (the K must be distinct)")
    return rows.contiguous()
