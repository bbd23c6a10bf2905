"""Expert-choice routing (Zhou et al., arXiv 2202.09368): experts choose tokens, not tokens experts.

Token-to-expert affinities ``S = softmax(x W_g)`` (over experts, per token); each expert takes the
``C = ceil(c * T / E)`` tokens of the batch (T = B*S tokens) with the highest affinity to it, with gate weight ``S``.
Every expert is exactly full, so no balancing loss is needed, and a token gets a variable number of experts
(0 to E; c on average).

It LOOKS AHEAD: an expert's choice at position t compares the token with every token of the batch, later ones
included, so a causal LM trained with it sees its future. It refuses to build unless ``allow_lookahead=true``.

How a variable number of experts fits the (B, S, K) contract: K = ``model.num_experts_per_tok`` slots per token,
filled with the experts that chose the token, highest affinity first. A token chosen by more than K experts keeps
its K best (the paper's capped variant, EC-CAP-K, by a greedy cap; those experts then compute fewer than C
tokens); slots left over are marked in ``RouterOutput.dropped`` (not computed, weight 0) and hold the token's
best remaining experts as distinct filler ids. Loads and drop rates in the routing metrics count computed copies
only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_variants.model.routing import LayerSpec, Router, RouterOutput, RoutingContext


class ExpertChoiceRouter(Router):
    """Args:
    capacity_factor: the paper's c, experts per token on average: each expert takes ``ceil(c * T / E)`` tokens;
        None = ``model.num_experts_per_tok`` (the compute of top-K token choice).
    allow_lookahead: must be True to build (the choice reads the whole batch).
    """

    causal = False

    def __init__(self, spec: LayerSpec, *, capacity_factor: float | None = None, allow_lookahead: bool = False
                 ) -> None:
        super().__init__(spec)
        self.capacity_factor = float(spec.top_k if capacity_factor is None else capacity_factor)
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or null for top_k), got {capacity_factor!r}")
        self.gate = nn.Linear(spec.dim, spec.num_experts, bias=False)
        self.refuse_lookahead(allow_lookahead)

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> RouterOutput:
        B, S, _ = x.shape
        E, K, T = self.num_experts, self.top_k, B * S
        logits = self.gate(x).float()  # (B, S, E)
        affinity_TE = torch.softmax(logits, dim=-1).reshape(T, E)
        capacity = min(T, math.ceil(self.capacity_factor * T / E))
        picked_EC = affinity_TE.t().topk(capacity, dim=-1).indices  # (E, C) the tokens each expert takes
        chosen_TE = torch.zeros(E, T, dtype=torch.bool, device=x.device).scatter_(1, picked_EC, True).t()
        # affinities lie in [0, 1]: + 1 ranks the experts that chose the token first, each group by affinity
        expert_ids = (affinity_TE + chosen_TE.float()).topk(K, dim=-1).indices  # (T, K)
        active = chosen_TE.gather(1, expert_ids)
        weights = torch.where(active, affinity_TE.gather(1, expert_ids), 0.0)
        return RouterOutput(expert_ids=expert_ids.view(B, S, K), weights=weights.view(B, S, K), logits=logits,
                            dropped=~active.view(B, S, K))

    def describe(self) -> str:
        return f"expert_choice(c={self.capacity_factor:g}, slots={self.top_k})"
