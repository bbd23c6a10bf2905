"""Token-id hash routing (Hash Layers, Roller et al. 2021, arXiv 2106.04426).

A fixed table maps a key to K distinct experts, different in every layer and saved in checkpoints as a
buffer. Keys (``table``):

- ``random``: the current token id, experts drawn at random (seeded);
- ``balanced``: the current token id; every expert receives the same token mass on the training data, and
  the K-expert sets are as diverse as random ones (all E-choose-K sets used, a different partition per layer);
- ``balanced_lpt``: the current token id, ids assigned greedily (most frequent first) to the K least loaded
  experts. Balanced too, but for K > 1 it uses only E/K disjoint expert sets, the same partition in every
  layer (relabelled): in effect E/K double-width experts. Kept because the first router study ran it
  (``results/router_study``: it lost ~0.39 nats/token to ``random``);
- ``prev_token``: the previous token id (the paper's context variant; the first position uses a "none" id);
- ``bigram``: a hash of (previous, current) ids into ``num_buckets`` buckets;
- ``file``: the current token id, experts read from ``table_path``, a ``.pt`` file holding a (n_layers, V, K)
  int64 tensor (layer i takes row i), e.g. a "distilled hash" read off a trained top-k model
  (``experiments/router_study/distill_hash.py``).

Combine weights: ``uniform`` (1/K each) or ``learned`` (a learned gate scores only the hashed experts,
softmax over those K, fp32).
"""

from __future__ import annotations

import heapq
from pathlib import Path

import torch
from torch import nn

from moe_variants.model.routing import LayerSpec, Router, RouterOutput, RoutingContext

TABLES = ("random", "balanced", "balanced_lpt", "prev_token", "bigram", "file")
WEIGHTS = ("uniform", "learned")


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


def load_table_file(path: str | Path | None, spec: LayerSpec) -> torch.Tensor:
    """This layer's (V, K) rows of a ``file`` table: a .pt file holding a (n_layers, V, K) integer tensor."""
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


def hashed_weights(
    gate: nn.Linear | None, x: torch.Tensor, expert_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Combine weights for fixed expert choices: uniform, or softmax of a learned gate over the chosen K."""
    if gate is None:
        return torch.full(expert_ids.shape, 1.0 / expert_ids.shape[-1], device=x.device), None
    logits = gate(x).float()  # (B, S, E)
    return torch.softmax(logits.gather(-1, expert_ids), dim=-1), logits


class HashRouter(Router):
    """Routes each token by a fixed table keyed on token ids (see module docstring)."""

    def __init__(
        self, spec: LayerSpec, *, table: str = "random", weights: str = "uniform", seed: int = 0,
        num_buckets: int = 65536, table_path: str | None = None,
    ) -> None:
        super().__init__(spec)
        if table not in TABLES:
            raise ValueError(f"unknown hash table {table!r}; choices: {list(TABLES)}")
        if weights not in WEIGHTS:
            raise ValueError(f"unknown hash weights {weights!r}; choices: {list(WEIGHTS)}")
        self.table_kind, self.weights_kind, self.num_buckets = table, weights, num_buckets
        E, K, V = spec.num_experts, spec.top_k, spec.vocab_size
        layer_seed = seed * 100_003 + spec.layer_idx  # a different table in every layer
        num_keys = {"prev_token": V + 1, "bigram": num_buckets}.get(table, V)
        if table == "file":
            if spec.resources is None and table_path is not None and not Path(table_path).is_file():
                # rebuilt from a checkpoint (load_model) after the file was moved: the state dict holds the table
                expert_table = torch.zeros(V, K, dtype=torch.int64)
            else:
                expert_table = load_table_file(table_path, spec)
        elif table in ("balanced", "balanced_lpt"):
            if spec.resources is None:  # being rebuilt from a checkpoint: the table comes from its state dict
                expert_table = torch.zeros(V, K, dtype=torch.int64)
            else:
                build = balanced_expert_table if table == "balanced" else lpt_expert_table
                expert_table = build(spec.resources.token_counts(), E, K, layer_seed)
        else:
            expert_table = random_expert_table(num_keys, E, K, layer_seed)
        self.register_buffer("expert_table", expert_table)  # (num_keys, K), saved in checkpoints
        self.gate = nn.Linear(spec.dim, E, bias=False) if weights == "learned" else None

    def keys(self, ctx: RoutingContext) -> torch.Tensor:
        """(B, S) int64 table rows for the current chunk (reads tokens <= t only)."""
        cur = ctx.token_ids
        if self.table_kind in ("random", "balanced", "balanced_lpt", "file"):
            return cur
        hist = ctx.history_ids
        prev = torch.full_like(cur, self.spec.vocab_size)  # "none" before the first token
        n_prev = min(hist.shape[1] - 1, cur.shape[1])
        if n_prev > 0:
            prev[:, cur.shape[1] - n_prev :] = hist[:, -n_prev - 1 : -1]
        if self.table_kind == "prev_token":
            return prev
        return (prev * 1_000_003 + cur) % self.num_buckets

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        expert_ids = self.expert_table[self.keys(ctx)]  # (B, S, K)
        weights, logits = hashed_weights(self.gate, x, expert_ids)
        return RouterOutput(expert_ids=expert_ids, weights=weights, logits=logits)

    def describe(self) -> str:
        return f"hash(table={self.table_kind}, weights={self.weights_kind}, k={self.top_k})"
