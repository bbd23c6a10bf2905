"""Token-id hash routing (Hash Layers, Roller et al. 2021, arXiv 2106.04426).

A fixed table maps a key to K distinct experts, different in every layer and saved in checkpoints as a
buffer. Tables (``table``; their builders are the plain functions of ``routers.tables``):

- ``random``: the current token id, experts drawn at random (seeded: ``seed``, which the config sets to the run's
  seed unless ``router.seed`` is given, so a seed sweep varies the table too);
- ``balanced``: the current token id; every expert receives the same token mass on the training data, and
  the K-expert sets are as diverse as random ones (all E-choose-K sets used, a different partition per layer);
- ``balanced_lpt``: the current token id, ids assigned greedily (most frequent first) to the K least loaded
  experts, the paper's balanced assignment. For K > 1 it uses only E/K disjoint expert sets, the same partition
  in every layer (relabelled): in effect E/K double-width experts. The first router study ran it
  (``results/router_study``: it lost ~0.39 nats/token to ``random``);
- ``prev_token``: the previous token id (the paper's previous-token hash; the first position uses a "none" id);
- ``bigram``: a hash of (previous, current) ids into ``num_buckets`` buckets (the paper's bigram hash);
- ``file``: the current token id, experts read from ``table_path``, a ``.pt`` file holding a (n_layers, V, K)
  int64 tensor (layer i takes row i), e.g. a "distilled hash" read off a trained top-k model
  (``experiments/router_study/distill_hash.py``).

Combine weights: ``uniform`` (1/K each) or ``learned`` (a gate scores only the hashed experts, softmax over those K,
fp32). The gate does not decide the routing, so its logits are not reported as routing logits (``logits=None``:
no router entropy is logged for it).

Departures from the paper: Hash Layers routes every token to one expert (K=1) with weight 1, which is K=1 with
``uniform`` here. K > 1 (K distinct experts per key, K from ``model.num_experts_per_tok``), ``learned`` weights
(refused at K=1: a softmax over one logit is always 1 and the gate would never learn), the ``balanced`` table
(the project's own, beside the paper-like ``balanced_lpt``) and ``file`` tables are this project's extensions.
"""

from __future__ import annotations

import torch

from moe_variants.model.routing import LayerSpec, Router, RouterOutput, RoutingContext
from moe_variants.routers.gates import check_weights, chosen_expert_weights, weight_gate
from moe_variants.routers.resources import corpus_table, require
from moe_variants.routers.tables import (
    balanced_expert_table,
    file_expert_table,
    layer_seed,
    lpt_expert_table,
    random_expert_table,
)

TABLES = ("random", "balanced", "balanced_lpt", "prev_token", "bigram", "file")
_FROM_CORPUS = ("balanced", "balanced_lpt", "file")  # not rebuilt from the seed: a checkpoint holds them
_BIGRAM_MULT = 1_000_003


def hash_expert_table(
    table: str, spec: LayerSpec, seed: int, num_buckets: int, table_path: str | None, resources: object
) -> torch.Tensor:
    """(num_keys, K) int64 expert table of one layer for the ``table`` kind (see the module docstring)."""
    E, K, V = spec.num_experts, spec.top_k, spec.vocab_size
    build = {
        "random": lambda: random_expert_table(V, E, K, seed),
        "prev_token": lambda: random_expert_table(V + 1, E, K, seed),  # key V: no previous token
        "bigram": lambda: random_expert_table(num_buckets, E, K, seed),
        "balanced": lambda: balanced_expert_table(require(resources, "table=balanced").token_counts(), E, K, seed),
        "balanced_lpt": lambda: lpt_expert_table(require(resources, "table=balanced_lpt").token_counts(), E, K, seed),
        "file": lambda: file_expert_table(table_path, spec),
    }[table]
    return corpus_table(resources, (V, K), build) if table in _FROM_CORPUS else build()


class HashRouter(Router):
    """Routes each token by a fixed table keyed on token ids (see the module docstring)."""

    needs_resources = True  # the balanced tables count tokens of the training split
    ids_from_tokens = True  # a table lookup on token ids (a learned gate only weights the chosen experts)

    def __init__(
        self, spec: LayerSpec, *, table: str = "random", weights: str = "uniform", seed: int = 0,
        num_buckets: int = 65536, table_path: str | None = None, resources: object = None,
    ) -> None:
        super().__init__(spec)
        if table not in TABLES:
            raise ValueError(f"unknown hash table {table!r}; choices: {list(TABLES)}")
        check_weights(weights, spec.top_k)
        self.table_kind, self.weights_kind, self.num_buckets = table, weights, num_buckets
        expert_table = hash_expert_table(table, spec, layer_seed(seed, spec.layer_idx), num_buckets, table_path,
                                         resources)
        self.register_buffer("expert_table", expert_table)  # (num_keys, K), saved in checkpoints
        self.gate = weight_gate(weights, spec.dim, spec.num_experts)

    def keys(self, ctx: RoutingContext) -> torch.Tensor:
        """(B, S) int64 table rows for the current chunk (reads tokens <= t only)."""
        cur = ctx.token_ids
        if self.table_kind not in ("prev_token", "bigram"):
            return cur
        prev = ctx.previous_ids(none_id=self.spec.vocab_size)
        if self.table_kind == "prev_token":
            return prev
        return (prev * _BIGRAM_MULT + cur) % self.num_buckets

    def token_expert_ids(self, ctx: RoutingContext) -> torch.Tensor:
        return self.expert_table[self.keys(ctx)]  # (B, S, K)

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        expert_ids = self.token_expert_ids(ctx)  # (B, S, K)
        logits = None if self.gate is None else self.gate(x).float()  # weights the hashed experts only
        return RouterOutput(expert_ids=expert_ids, weights=chosen_expert_weights(expert_ids, logits))

    def describe(self) -> str:
        return f"hash(table={self.table_kind}, weights={self.weights_kind}, k={self.top_k})"
